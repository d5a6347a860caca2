"""Exercises done "by hand": the learner writes a *function*, the checker runs it on fresh inputs it
makes itself, with the library function the exercise forbids switched off.

A value can be pasted or computed with the very library call the exercise asks to do without; a
function run on inputs the learner never saw cannot. :func:`run_by_hand` calls the learner's
function inside :func:`forbid`, which replaces every reference to the forbidden functions (in every
loaded module, ``moe_lab.analysis`` as well as the notebook's own namespace, and in the function's
globals) by one that raises :class:`ForbiddenCall`, and puts them back afterwards::

    out, bad = run_by_hand(name, fn, (logits, 2), forbidden=[load_balancing_loss], hint=hint)
    if bad is not None:
        return bad   # a Feedback: todo (the stub returned None), or wrong (raised / called the library)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import numpy as np

from ..routing.trace import RoutingTrace
from .feedback import Feedback, todo, wrong


class ForbiddenCall(RuntimeError):
    """Raised when a "by hand" exercise's function calls the library function it should replace."""


def _raiser(fn: Callable) -> Callable:
    label = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))

    @functools.wraps(fn)
    def forbidden(*args, **kwargs):
        raise ForbiddenCall(f"{label} is switched off during this check: the exercise asks you to compute it "
                            "by hand")

    forbidden.__forbidden__ = label
    return forbidden


@contextmanager
def forbid(functions: Iterable[Callable], namespaces: Sequence[dict] = (), closures: Sequence = ()):
    """Within the block, every name bound to one of ``functions`` (in every loaded module, in
    ``namespaces`` and in the closure ``cells`` given) calls a function that raises
    :class:`ForbiddenCall`; restored on exit."""
    targets = {id(f): (f, _raiser(f)) for f in functions}
    cells: list[tuple[object, object]] = []
    dicts = [d for d in namespaces if isinstance(d, dict)]
    for module in list(sys.modules.values()):
        d = getattr(module, "__dict__", None)
        if isinstance(d, dict):
            dicts.append(d)
    swapped: list[tuple[dict, str, object]] = []
    seen: set[int] = set()
    try:
        for d in dicts:
            if id(d) in seen:
                continue
            seen.add(id(d))
            for key, value in list(d.items()):
                hit = targets.get(id(value))
                if hit is not None and hit[0] is value:
                    swapped.append((d, key, value))
                    d[key] = hit[1]
        for cell in closures:
            try:
                hit = targets.get(id(cell.cell_contents))
            except ValueError:  # an empty cell
                continue
            if hit is not None and hit[0] is cell.cell_contents:
                cells.append((cell, cell.cell_contents))
                cell.cell_contents = hit[1]
        yield
    finally:
        for cell, value in reversed(cells):
            cell.cell_contents = value
        for d, key, value in reversed(swapped):
            d[key] = value


def run_by_hand(name: str, fn, args: tuple = (), *, forbidden: Iterable[Callable] = (), hint: str = "",
                method: str = "", what: str = "fn(...)") -> tuple[object, Feedback | None]:
    """Call the learner's ``fn(*args)`` with ``forbidden`` switched off.

    Returns ``(output, None)``, or ``(None, feedback)``: todo when ``fn`` is a stub (None, or it
    returns None), wrong when ``fn`` is not a function (e.g. the old pasted value), raised, or called a
    forbidden function.
    """
    if fn is None or fn is Ellipsis:
        return None, todo(name, hint, method)
    if not callable(fn):
        return None, wrong(name, f"this exercise takes your function (def ...: a {what}), found a "
                                 f"{type(fn).__name__}: the checker runs it on inputs of its own.", hint, method)
    namespaces = [getattr(fn, "__globals__", {})]
    try:
        with forbid(forbidden, namespaces, getattr(fn, "__closure__", None) or ()):
            out = fn(*args)
    except ForbiddenCall as exc:
        return None, wrong(name, f"your function calls the library: {exc}.", hint, method)
    except Exception as exc:  # the learner's code: report, never raise
        return None, wrong(name, f"calling your function on the checker's inputs raised {type(exc).__name__}: "
                                 f"{exc}", hint, method)
    if out is None:
        return None, todo(name, hint, method)
    return out, None


__all__ = ["ForbiddenCall", "forbid", "run_by_hand"]


def fresh_trace(n_experts: int = 8, top_k: int = 2, layers=(0, 2, 5), doc_lengths=(9, 14, 11, 7),
                seed: int = 27, bos_id: int = 1):
    """A small synthetic :class:`~moe_lab.routing.trace.RoutingTrace` the learner never saw, for
    checking a "by hand" function: documents that start with BOS, uneven expert use, runs of the same
    first choice (so repetition is not zero), layer numbers that are not row numbers, and pieces
    (some of them digits, some starting a word)."""

    rng = np.random.default_rng(seed)
    N = int(sum(doc_lengths))
    doc_ids = np.concatenate([np.full(n, d) for d, n in enumerate(doc_lengths)])
    positions = np.concatenate([np.arange(n) for n in doc_lengths])
    token_ids = rng.integers(2, 400, size=N)
    token_ids[positions == 0] = bos_id
    popularity = rng.dirichlet(np.full(n_experts, 0.7))
    expert_ids = np.empty((len(layers), N, top_k), dtype=np.int64)
    for row in range(len(layers)):
        for t in range(N):
            choice = rng.choice(n_experts, size=top_k, replace=False, p=popularity)
            if t and positions[t] and rng.random() < 0.35 and expert_ids[row, t - 1, 0] not in choice[1:]:
                choice[0] = expert_ids[row, t - 1, 0]  # a run: same first choice as the token before
            expert_ids[row, t] = choice
    pieces = ["<s>" if p == 0 else (str(rng.integers(0, 10)) if rng.random() < 0.2
                                    else ("▁" if rng.random() < 0.5 else "") + "ab"[rng.integers(0, 2)])
              for p in positions]
    return RoutingTrace(token_ids=token_ids, doc_ids=doc_ids, positions=positions, expert_ids=expert_ids,
                        layers=list(layers), n_experts=n_experts, pieces=pieces,
                        domains=[f"doc{d}" for d in range(len(doc_lengths))])


__all__ += ["fresh_trace"]
