"""Notebook 10's exercise checkers: a right answer passes (on the checker's own inputs too), each
diagnosed wrong answer gets its diagnosis, and no message prints the reference value."""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from moe_lab.exercises import nb10 as ex


def text(fb) -> str:
    return f"{fb}\n{fb._repr_html_()}"


def no_leak(fb, values) -> None:
    for v in np.ravel(values):
        v = float(v)
        if abs(v - round(v)) < 1e-9:
            continue
        for form in {f"{v:.{d}f}" for d in (3, 4, 5, 6)} | {f"{v:.{d}g}" for d in (3, 4, 5, 6)} | {repr(v)}:
            assert not re.search(rf"(?<![\d.]){re.escape(form)}(?![\d])", text(fb)), (form, str(fb))


def keep_first(idx, E, C):
    count, out = [0] * E, []
    for e in idx.tolist():
        out.append(count[e] < C)
        count[e] += 1
    return np.array(out)


def test_capacity_drops():
    idx = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(0))
    assert ex.check_capacity_drops(keep_first, idx, 4, 5)
    assert ex.check_capacity_drops(None, idx, 4, 5).status == "todo"
    assert "every token" in str(ex.check_capacity_drops(lambda i, E, C: np.ones(len(i), bool), idx, 4, 5))
    last = lambda i, E, C: keep_first(i.flip(0), E, C)[::-1]  # noqa: E731
    assert "last" in str(ex.check_capacity_drops(last, idx, 4, 5))
    assert "too few" in str(ex.check_capacity_drops(lambda i, E, C: keep_first(i, E, C - 1), idx, 4, 5))
    assert "raised" in str(ex.check_capacity_drops(lambda i, E, C: 1 / 0, idx, 4, 5))


def expert_choice(lg, c):
    m = np.zeros(lg.shape, bool)
    np.put_along_axis(m, lg.softmax(-1).topk(c, dim=0).indices.numpy(), True, axis=0)
    return m


def test_expert_choice():
    lg = torch.randn(12, 4, generator=torch.Generator().manual_seed(1)) * 2
    assert ex.check_expert_choice(expert_choice, lg, 6)
    def raw(lg, c):  # ranks the logits, not the probabilities
        m = np.zeros(lg.shape, bool)
        np.put_along_axis(m, lg.topk(c, dim=0).indices.numpy(), True, axis=0)
        return m

    assert "raw logits" in str(ex.check_expert_choice(raw, lg, 6))

    def token_choice(lg, c):
        m = np.zeros(lg.shape, bool)
        np.put_along_axis(m, lg.topk(2, dim=-1).indices.numpy(), True, axis=-1)
        return m

    assert "token choice" in str(ex.check_expert_choice(token_choice, lg, 6))


def test_bias_update_and_no_leak():
    b, load, rate = np.array([0.1, 0.0, -0.1, 0.05]), np.array([10, 3, 5, 2]), 0.001
    right = b + rate * np.sign(load.mean() - load)
    assert ex.check_bias_update(right, b, load, rate)
    for wrong, words in [(b - rate * np.sign(load.mean() - load), "sign"), (b + rate * (load.mean() - load), "only the"),
                         (right - b, "change"), (right + 0.01, "differ")]:
        fb = ex.check_bias_update(wrong, b, load, rate)
        assert not fb and words in str(fb), str(fb)
        no_leak(fb, right)


def test_seed_interval_and_no_leak():
    v = [3.2137, 3.2519, 3.2301]
    half = 4.303 * np.std(v, ddof=1) / math.sqrt(3)
    assert ex.check_seed_interval(half, v)
    for wrong, words in [(1.96 * np.std(v, ddof=1) / math.sqrt(3), "1.96"),
                         (4.303 * np.std(v, ddof=0) / math.sqrt(3), "n - 1"),
                         (4.303 * np.std(v, ddof=1), "sqrt(n)"), (2 * half, "whole width"), (half * 1.1, "not equal")]:
        fb = ex.check_seed_interval(wrong, v)
        assert not fb and words in str(fb), str(fb)
        no_leak(fb, half)
