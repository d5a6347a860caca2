"""Property tests of the router and the sparse MoE block (hypothesis)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_lab.model import MoE, ModelArgs, topk_softmax_routing

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def moe_cases(draw, dtypes=(torch.float32,)):
    E = draw(st.integers(1, 8))
    return dict(
        N=draw(st.one_of(st.just(1), st.integers(1, 24))),
        E=E,
        k=draw(st.integers(1, E)),
        D=draw(st.integers(2, 24)),
        I=draw(st.integers(1, 20)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)),
    )


def build_moe(c) -> tuple[MoE, torch.Tensor]:
    args = ModelArgs(dim=c["D"], hidden_dim=c["I"], n_experts=c["E"], experts_per_token=c["k"], n_heads=1, n_kv_heads=1,
                     head_dim=2, n_layers=1, vocab_size=8)
    torch.manual_seed(c["seed"])
    moe = MoE(args)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 1.0)  # well-separated router logits (ties are measure-zero)
    x = torch.randn(c["N"], c["D"])
    return moe.to(c["dtype"]), x.to(c["dtype"])


def random_logits(N, E, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, E, generator=g) * scale


@SETTINGS
@given(N=st.integers(1, 16), E=st.integers(1, 16), data=st.data(), scale=st.floats(0.01, 20.0),
       seed=st.integers(0, 2**16))
def test_routing_weights_sum_to_one_and_experts_distinct(N, E, data, scale, seed):
    k = data.draw(st.integers(1, E))
    logits = random_logits(N, E, scale, seed)
    probs, idx, w = topk_softmax_routing(logits, k)
    assert probs.dtype == w.dtype == torch.float32
    assert probs.shape == (N, E) and idx.shape == w.shape == (N, k)
    torch.testing.assert_close(probs.sum(-1), torch.ones(N), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.ones(N), rtol=0, atol=1e-6)
    assert bool((w >= 0).all())
    # distinct experts per token
    assert all(len(set(row)) == k for row in idx.tolist())
    # rank order: weights non-increasing; chosen probs dominate every unchosen prob
    assert bool((w[:, :-1] >= w[:, 1:]).all())
    chosen = torch.zeros(N, E, dtype=torch.bool).scatter(1, idx, True)
    if k < E:
        assert bool((probs.gather(1, idx).min(-1).values >= probs.masked_fill(chosen, -1).max(-1).values).all())


@SETTINGS
@given(N=st.integers(1, 16), E=st.integers(1, 16), data=st.data(), scale=st.floats(0.01, 20.0),
       seed=st.integers(0, 2**16), half=st.booleans())
def test_routing_equals_mistral_inference_order(N, E, data, scale, seed, half):
    """mistral-inference: top-k on the raw logits, then softmax over the k chosen (fp32)."""
    k = data.draw(st.integers(1, E))
    logits = random_logits(N, E, scale, seed)
    if half:
        logits = logits.bfloat16()
    _, idx, w = topk_softmax_routing(logits, k)
    ref_vals, ref_idx = torch.topk(logits, k, dim=-1)
    ref_w = F.softmax(ref_vals.float(), dim=-1)
    # compare as dense (N, E) weight maps so that exact ties (possible in bf16) cannot fail the test
    # on order alone; rows with a tie at the top-k boundary may legitimately pick either expert
    dense = torch.zeros(N, E).scatter(1, idx, w)
    ref_dense = torch.zeros(N, E).scatter(1, ref_idx, ref_w)
    keep = torch.ones(N, dtype=torch.bool)
    if k < E:
        s = logits.float().sort(-1, descending=True).values
        keep = s[:, k - 1] != s[:, k]
    if not half:
        assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dense[keep], ref_dense[keep], rtol=0, atol=1e-6)


def by_hand(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """y_n = sum_j w_nj * w2(silu(w1 x_n) * w3 x_n), every step written out in fp32."""
    x = x.float()
    logits = x @ moe.gate.weight.float().T  # (N, E)
    probs = logits.softmax(-1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        top = sorted(range(moe.n_experts), key=lambda e: -probs[n, e].item())[: moe.experts_per_token]
        z = sum(probs[n, e] for e in top)
        for e in top:
            ex = moe.experts[e]
            h = F.silu(ex.w1.weight.float() @ x[n]) * (ex.w3.weight.float() @ x[n])
            out[n] += probs[n, e] / z * (ex.w2.weight.float() @ h)
    return out


@SETTINGS
@given(c=moe_cases())
@torch.no_grad()
def test_moe_output_equals_weighted_sum_of_experts(c):
    moe, x = build_moe(c)
    expected = by_hand(moe, x)
    for fast in (True, False):
        moe.fast = fast
        y, logits = moe(x[None])  # (1, N, D)
        assert y.shape == (1, c["N"], c["D"]) and logits.shape == (c["N"], c["E"])
        torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(c=moe_cases(dtypes=(torch.float32, torch.bfloat16)), B=st.integers(1, 3))
@torch.no_grad()
def test_fast_dispatch_equals_reference(c, B):
    moe, x = build_moe(c)
    x = x.repeat(B, 1)[None].reshape(B, c["N"], c["D"]) if B > 1 else x[None]
    moe.fast = True
    fast, fast_logits = moe(x)
    moe.fast = False
    ref, ref_logits = moe(x)
    assert fast.dtype == ref.dtype == c["dtype"]
    assert torch.equal(fast_logits, ref_logits)
    if c["dtype"] == torch.float32:
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    else:  # bf16: summation order differs; one bf16 ulp of the output scale
        scale = ref.float().abs().max().item() + 1e-3
        assert (fast.float() - ref.float()).abs().max().item() <= 2e-2 * scale


@torch.no_grad()
def test_unchosen_experts_do_not_run():
    """Sparsity: an expert nobody picked is never called (fast and reference)."""
    c = dict(N=6, E=8, k=2, D=8, I=8, dtype=torch.float32, seed=3)
    moe, x = build_moe(c)
    _, idx, _ = topk_softmax_routing(x @ moe.gate.weight.T, 2)
    chosen = set(idx.flatten().tolist())
    assert len(chosen) < 8
    for fast in (True, False):
        moe.fast = fast
        calls = []
        hs = [ex.register_forward_hook(lambda m, i, o, e=e: calls.append(e)) for e, ex in enumerate(moe.experts)]
        try:
            moe(x[None])
        finally:
            for h in hs:
                h.remove()
        assert set(calls) == chosen


def test_fast_dispatch_under_cpu_bf16_autocast_matches_reference():
    """Mixed dtypes under autocast must not break the no-grad fast path (the training loop evaluates this way)."""
    from moe_lab import Mixtral, ModelArgs

    torch.manual_seed(0)
    m = Mixtral(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=300,
                          max_seq_len=64)).eval()
    t = torch.randint(0, 300, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = m(t).float()
        m.set_fast_dispatch(False)
        ref = m(t).float()
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, atol=5e-2, rtol=5e-2)
