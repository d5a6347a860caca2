"""Notebook 07's exercise checkers: the right answer passes, None is todo, typical mistakes are
named (the f that sums to 1, raw logits for P, the per-layer coefficient, a missing square, ...)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_lab.exercises import nb07 as ex

E, K, N = 8, 2, 64


@pytest.fixture
def logits():
    return torch.randn(N, E, generator=torch.Generator().manual_seed(0)) * 2


def fraction(lg, k=K):
    return F.one_hot(lg.topk(k, dim=-1).indices, E).sum(1).float().mean(0)


def test_expert_fraction(logits):
    assert ex.check_expert_fraction(fraction, logits, K).status == "correct"
    assert ex.check_expert_fraction(lambda lg, k: fraction(lg, k).numpy(), logits, K)  # arrays are fine too
    assert ex.check_expert_fraction(None, logits, K).status == "todo"
    fb = ex.check_expert_fraction(lambda lg, k: fraction(lg, k) / k, logits, K)
    assert fb.status == "wrong" and "sums to 1" in fb.message and fb.hint
    assert "top-1" in ex.check_expert_fraction(lambda lg, k: fraction(lg, 1), logits, K).message
    fb = ex.check_expert_fraction(lambda lg, k: fraction(lg, k)[:-1], logits, K)
    assert not fb and "shape (8,)" in fb.message and "(7,)" in fb.message

    def one_off(lg, k):
        g = fraction(lg, k)
        g[3] += 0.1
        return g
    fb = ex.check_expert_fraction(one_off, logits, K)
    assert "1 of 8 values differ (the first at expert 3)" in fb.message
    assert "takes your function" in ex.check_expert_fraction(fraction(logits), logits, K).message


def test_load_balancing(logits):
    f, p = fraction(logits), logits.softmax(-1).mean(0)
    right = E * (f * p).sum()
    assert ex.check_load_balancing(right, logits, K)
    assert ex.check_load_balancing(float(right), logits, K)
    assert ex.check_load_balancing(..., logits, K).status == "todo"
    assert "divided by k" in ex.check_load_balancing(right / K, logits, K).message
    assert "raw logits" in ex.check_load_balancing(E * (f * logits.mean(0)).sum(), logits, K).message
    assert "factor E" in ex.check_load_balancing((f * p).sum(), logits, K).message
    # the by-hand value is transformers' convention: k at perfect balance
    balanced = torch.zeros(E, E)
    balanced[torch.arange(E), torch.arange(E)] = 5.0
    balanced[torch.arange(E), (torch.arange(E) + 1) % E] = 4.0
    assert ex.check_load_balancing(
        E * (fraction(balanced) * balanced.softmax(-1).mean(0)).sum(), balanced, K)
    assert torch.allclose(fraction(balanced), torch.full((E,), K / E))


def test_effective_coefficient():
    assert ex.check_effective_coefficient(0.08, 0.02, 4)
    assert ex.check_effective_coefficient(None, 0.02, 4).status == "todo"
    fb = ex.check_effective_coefficient(0.02, 0.02, 4)
    assert not fb and "each layer" in fb.message
    assert "divided" in ex.check_effective_coefficient(0.005, 0.02, 4).message
    assert not ex.check_effective_coefficient(0.06, 0.02, 4)


def test_z_loss(logits):
    right = logits.logsumexp(-1).pow(2).mean()
    assert ex.check_z_loss(right, logits)
    assert ex.check_z_loss(None, logits).status == "todo"
    assert "square" in ex.check_z_loss(logits.logsumexp(-1).mean(), logits).message
    assert "mean of the squares" in ex.check_z_loss(logits.logsumexp(-1).mean() ** 2, logits).message
    assert "largest logit" in ex.check_z_loss(logits.amax(-1).pow(2).mean(), logits).message


def snapshots(S=5, L=2, T=40, seed=0):
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((S, L, T, E)), axis=-1)[..., :K]  # distinct experts per token


def by_hand(idx):
    S, L, T, k = idx.shape
    return np.array([[np.mean([len(set(idx[s, l, t]) & set(idx[-1, l, t])) / k for t in range(T)])
                      for l in range(L)] for s in range(S)])


def test_router_saturation():
    idx = snapshots()
    assert np.allclose(by_hand(idx)[-1], 1)
    assert ex.check_router_saturation(by_hand, idx)
    assert ex.check_router_saturation(None, idx).status == "todo"
    assert "first snapshot" in ex.check_router_saturation(lambda i: by_hand(i[::-1])[::-1], idx).message
    assert "divide by k" in ex.check_router_saturation(lambda i: by_hand(i) * i.shape[-1], idx).message
    fb = ex.check_router_saturation(lambda i: by_hand(i)[:, :1], idx)
    assert not fb and "shape" in fb.message

    def one_off(i):
        out = by_hand(i)
        out[1, 0] += 0.2
        return out
    assert "(the first at snapshot 1, layer 0)" in ex.check_router_saturation(one_off, idx).message
    from moe_lab.train import router_saturation
    fb = ex.check_router_saturation(lambda i: router_saturation(i), idx)
    assert fb.status == "wrong" and "calls the library" in fb.message
