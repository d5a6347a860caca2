"""Notebook 09's exercise checkers: the right answer passes, None is todo, the typical mistakes
(sign, seconds for tokens/s, hits for misses, precision for recall, k/E for the chance of any
shared expert) are named."""

import math

import numpy as np
import pytest
import torch

import moe_lab
from moe_lab import analysis as A
from moe_lab.exercises import nb09 as ex


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return moe_lab.Mixtral(moe_lab.ModelArgs.from_name("tiny")).eval()


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(2)
    return [[1] + torch.randint(2, 300, (23,), generator=g).tolist() for _ in range(6)]


def test_hindsight_gap(model, docs):
    trace = moe_lab.trace_routing(model, docs, progress=False)
    profile, test = trace.select(docs=range(3)), trace.select(docs=range(3, 6))

    def hit(p):
        return float(A.policy_comparison(test, [2], ["frequency"], profile=p).hit_rate.iloc[0])

    right = hit(None) - hit(profile)
    assert ex.check_hindsight_gap(right, test, 2, profile)
    assert ex.check_hindsight_gap(None, test, 2, profile).status == "todo"
    if abs(right) > 1e-9:
        assert "sign" in ex.check_hindsight_gap(-right, test, 2, profile).message
    assert "one of the two" in ex.check_hindsight_gap(hit(None), test, 2, profile).message


def test_decode_speed():
    laptop = A.Link("my laptop", 60e9, 0.7, 0)
    kw = dict(hit_rate=0.6, precision="4bit", link="nvme_ssd", memory=laptop)
    sizes = A.moe_bytes("mixtral-8x7b", "4bit")
    misses = 32 * 2 * 0.4
    t = A.decode_time(sizes, misses, "nvme_ssd", laptop)
    assert ex.check_decode_speed(t["tokens_per_s"], **kw)
    assert ex.check_decode_speed(None, **kw).status == "todo"
    assert "seconds per token" in ex.check_decode_speed(t["seconds"], **kw).message
    hits_as_misses = A.decode_time(sizes, 32 * 2 * 0.6, "nvme_ssd", laptop)["tokens_per_s"]
    assert "hits as misses" in ex.check_decode_speed(hits_as_misses, **kw).message
    fp16 = A.decode_time(A.moe_bytes("mixtral-8x7b", "fp16"), misses, "nvme_ssd", laptop)["tokens_per_s"]
    assert "fp16" in ex.check_decode_speed(fp16, **kw).message
    assert not ex.check_decode_speed(t["tokens_per_s"] * 1.5, **kw)


def test_prefetch_recall(model, docs):
    pf = A.speculative_prefetch(model, docs, n_guess=3)

    def recall(guess, actual):
        return (actual[..., :, None] == guess[..., None, :]).any(-1).mean((1, 2))

    assert ex.check_prefetch_recall(recall, pf)
    assert ex.check_prefetch_recall(None, pf).status == "todo"
    fb = ex.check_prefetch_recall(pf.recall, pf)  # the library's value, pasted
    assert fb.status == "wrong" and "takes your function" in fb.message
    assert not ex.check_prefetch_recall(lambda g, a: pf.recall, pf)  # a constant fails on the checker's arrays
    precision = lambda guess, actual: (guess[..., :, None] == actual[..., None, :]).any(-1).mean((1, 2))  # noqa: E731
    assert "precision" in ex.check_prefetch_recall(precision, pf).message
    fb = ex.check_prefetch_recall(lambda g, a: recall(g, a).mean(), pf)
    assert not fb and "shape" in fb.message
    first = lambda g, a: (a[..., 0, None] == g).any(-1).mean(-1)  # noqa: E731
    assert "first" in ex.check_prefetch_recall(first, pf).message


def test_graded_questions():
    for check, right in ((ex.check_prefetch_cost, "b"), (ex.check_any_saturation, "b"),
                         (ex.check_hindsight_reading, "b")):
        assert check(right) and check(None).status == "todo"
        for other in "abcd".replace(right, ""):
            fb = check(other)
            assert fb.status == "wrong" and f"({right})" not in str(fb)


@pytest.mark.parametrize("E,k", [(8, 2), (32, 8), (64, 8)])
def test_any_uniform(E, k):
    right = 1 - math.comb(E - k, k) / math.comb(E, k)
    assert ex.check_any_uniform(right, E, k)
    assert ex.check_any_uniform(None, E, k).status == "todo"
    assert "k/E" in ex.check_any_uniform(k / E, E, k).message
    assert "without replacement" in ex.check_any_uniform(1 - (1 - k / E) ** k, E, k).message
    assert not ex.check_any_uniform(right + 0.01, E, k)
    if (E, k) == (8, 2):
        assert np.isclose(right, 0.4643, atol=1e-4)  # Table 5's 46.4%
