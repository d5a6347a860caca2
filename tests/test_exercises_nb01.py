"""Notebook 01's exercise checkers: the right answer passes, None is todo, typical mistakes are named."""

import torch

from moe_lab.exercises import nb01 as ex
from moe_lab.model import Attention, ModelArgs, topk_softmax_routing

ARGS = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                 vocab_size=100, n_experts=8, experts_per_token=2, rope_theta=1e4)


def _status(fb):
    return fb.status


def test_inverse_permutation():
    for hd in (4, 8, 16):
        perm = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
        inv = torch.argsort(perm).tolist()
        x = torch.arange(hd)
        assert torch.equal(x[perm][inv], x)
        assert ex.check_inverse_permutation(inv, hd)
    assert "its own inverse" in ex.check_inverse_permutation([0, 2, 1, 3], 4).message
    assert ex.check_inverse_permutation(None, 8).status == "todo"
    fb = ex.check_inverse_permutation([0, 2, 4, 6, 1, 3, 5, 7], 8)  # perm itself, not its inverse
    assert fb.status == "wrong" and "perm itself" in fb.message and "argsort" in fb.method
    assert "not a permutation" in ex.check_inverse_permutation([0, 0, 1, 2, 3, 4, 5, 6], 8).message
    assert "expected a list of 8" in ex.check_inverse_permutation([0, 1], 8).message


def test_window_one():
    torch.manual_seed(0)
    attn = Attention(ARGS)
    x = torch.randn(2, 6, ARGS.dim)
    with torch.no_grad():
        v = (x @ attn.wv.weight.T).view(2, 6, ARGS.n_kv_heads, ARGS.head_dim)
        group = ARGS.n_heads // ARGS.n_kv_heads
        right = v.repeat_interleave(group, dim=2).flatten(-2) @ attn.wo.weight.T
        assert ex.check_window_one(right, x, attn, ARGS)
        assert ex.check_window_one(None, x, attn, ARGS).status == "todo"
        fb = ex.check_window_one(v.flatten(-2), x, attn, ARGS)  # forgot wo (shape differs here: report shape)
        assert fb.status == "wrong" and "shape" in fb.message
        wrong_group = v.repeat(1, 1, group, 1).flatten(-2) @ attn.wo.weight.T  # heads grouped the wrong way
        fb = ex.check_window_one(wrong_group, x, attn, ARGS)
        assert fb.status == "wrong" and "repeat_interleave" in fb.hint


def test_window_one_forgot_wo_when_shapes_match():
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=8, hidden_dim=48, vocab_size=100)
    torch.manual_seed(1)
    attn = Attention(args)
    x = torch.randn(1, 5, args.dim)
    with torch.no_grad():
        fb = ex.check_window_one(x @ attn.wv.weight.T, x, attn, args)
    assert fb.status == "wrong" and "output projection" in fb.message


def test_route_token_with_a_tie():
    logits = torch.tensor([0.1, -1.0, 0.3, 10.0, 2.0, 10.0, -0.5, 0.0])
    assert ex.check_route_token(([3, 5], [0.5, 0.5]), logits)
    assert ex.check_route_token(([5, 3], [0.5, 0.5]), logits)  # tie: either order
    assert ex.check_route_token(None, logits).status == "todo"
    probs = logits.softmax(-1)
    fb = ex.check_route_token(([3, 5], [float(probs[3]), float(probs[5])]), logits)  # forgot to renormalise
    assert fb.status == "wrong" and "before renormalising" in fb.message
    fb = ex.check_route_token(([3, 4], [0.5, 0.5]), logits)
    assert fb.status == "wrong" and "not the 2 largest" in fb.message


def test_route_token_without_a_tie():
    logits = torch.randn(8, generator=torch.Generator().manual_seed(3))
    _, idx, w = topk_softmax_routing(logits[None], 2)
    assert ex.check_route_token((idx[0].tolist(), w[0].tolist()), logits)
    assert not ex.check_route_token((idx[0].tolist(), w[0].flip(0).tolist()), logits)
    assert "expected k = 2 experts" in ex.check_route_token(([1], [1.0]), logits).message


def test_param_count():
    a = ModelArgs.from_name("mixtral-8x22b")
    D, L, nh, nkv, hd, I, E, K, V = (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim,
                                     a.n_experts, a.experts_per_token, a.vocab_size)
    shared = 2 * V * D + L * (D * nh * hd + 2 * D * nkv * hd + nh * hd * D) + L * 2 * D + D + L * E * D
    total, active = shared + L * E * 3 * D * I, shared + L * K * 3 * D * I
    assert (total, active) == (140_620_634_112, 39_152_031_744)
    assert ex.check_param_count((total, active), a)
    assert ex.check_param_count(None, a).status == "todo"
    fb = ex.check_param_count((total - V * D, active - V * D), a)
    assert fb.status == "wrong" and "embedding" in fb.message
    fb = ex.check_param_count((total, total), a)
    assert fb.status == "wrong" and "all E experts" in fb.message
    top1 = ModelArgs.from_name("mixtral-8x7b", experts_per_token=1)
    assert not ex.check_param_count((total, active), top1)


def test_kv_cache_bytes():
    a = ModelArgs.from_name("mixtral-8x7b")
    right = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2
    assert right == 131072
    assert ex.check_kv_cache_bytes(right, a)
    assert ex.check_kv_cache_bytes(None, a).status == "todo"
    fb = ex.check_kv_cache_bytes(2 * a.n_layers * a.n_heads * a.head_dim * 2, a)
    assert fb.status == "wrong" and "without GQA" in fb.message
    assert "both k and v" in ex.check_kv_cache_bytes(right // 2, a).message
    assert ex.check_kv_cache_bytes("lots", a).status == "wrong"
