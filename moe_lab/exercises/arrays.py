"""Comparing a learner's numbers with the reference: what is wrong, said in words.

Checkers of the numeric exercises share these so that every "wrong" says the same kind of thing:
the expected shape against the one found, or how many values differ (and where the first one is),
never the reference value itself: a learner who types 0 must not be told the answer.
"""

from __future__ import annotations

import numpy as np
import torch


def to_array(answer) -> np.ndarray | None:
    """A tensor, array, list or number as a float64 array; None when it cannot be one."""
    try:
        if isinstance(answer, torch.Tensor):
            return answer.detach().to("cpu", torch.float64).numpy()
        return np.asarray(answer, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def to_number(answer) -> float | None:
    """A number, or a tensor/array/list holding exactly one, as a float; None otherwise."""
    a = to_array(answer)
    return float(a.reshape(())) if a is not None and a.size == 1 else None


def mismatch(expected, found, *, atol: float = 1e-5, rtol: float = 1e-4, labels=None) -> str | None:
    """None when ``found`` matches ``expected`` (same shape, values within tolerance), else a
    sentence naming the problem without the reference value: the type, the shape, NaN, or
    "not equal: N of M values differ" with the position of the first one.

    ``labels``: one name per axis (e.g. ``("snapshot", "layer")``) for the element's position.
    """
    exp = to_array(expected)
    got = to_array(found)
    if got is None:
        return f"expected numbers (a tensor or an array), found a {type(found).__name__}"
    if got.shape != exp.shape:
        return f"expected shape {tuple(exp.shape)}, found shape {tuple(got.shape)}"
    if np.isnan(got).any():
        return "your answer contains NaN"
    bad = ~np.isclose(got, exp, atol=atol, rtol=rtol)
    if not bad.any():
        return None
    if not exp.ndim:
        return "not equal to the reference (beyond the tolerance)"
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    names = labels or [f"axis {i}" for i in range(exp.ndim)]
    place = ", ".join(f"{n} {i}" for n, i in zip(names, where))
    return f"not equal: {int(bad.sum())} of {bad.size} values differ (the first at {place})"


def matches(expected, found, *, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """True when ``found`` has ``expected``'s shape and values (within tolerance)."""
    got = to_array(found)
    exp = to_array(expected)
    return got is not None and got.shape == exp.shape and bool(np.allclose(got, exp, atol=atol, rtol=rtol))
