"""Parameter counts, meta-device construction, training losses and initialisation."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIG_IDS, TINY_CONFIGS, make_model, random_tokens
from moe_lab.model import Mixtral, ModelArgs, count_params, linear_cross_entropy


# ---- parameter counts


@pytest.mark.parametrize("name,total,active", [
    ("mixtral-8x7b", 46_702_792_704, 12_879_925_248),
    ("mixtral-8x22b", 140_620_634_112, 39_152_031_744),
])
def test_count_params_published(name, total, active):
    pc = count_params(ModelArgs.from_name(name))
    assert pc.total == total
    assert pc.active == active


def meta_model(args) -> Mixtral:
    with torch.device("meta"):
        return Mixtral(args)


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_count_params_equals_module(args):
    m = meta_model(args)
    total = sum(p.numel() for p in m.parameters())
    # active: every parameter except experts k..E-1 of each layer (the count is per token)
    active = sum(p.numel() for n, p in m.named_parameters()
                 if ".experts." not in n or int(n.split(".experts.")[1].split(".")[0]) < args.experts_per_token)
    pc = count_params(args)
    assert (pc.total, pc.active) == (total, active)
    # and the same by the formula written out once more
    D, I = args.dim, args.hidden_dim
    assert pc.total - pc.active == args.n_layers * (args.n_experts - args.experts_per_token) * 3 * D * I


def test_meta_build_of_8x7b_is_instant_and_allocates_nothing():
    psutil = None
    try:
        import psutil
    except ImportError:
        pass
    meta_model(TINY_CONFIGS[0])  # first use of the meta device imports torch's meta kernels (~2 s once)
    rss0 = psutil.Process().memory_info().rss if psutil else 0
    t0 = time.perf_counter()
    m = meta_model(ModelArgs.from_name("mixtral-8x7b"))
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"meta build took {elapsed:.1f}s"
    params = list(m.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert sum(p.numel() for p in params) == 46_702_792_704
    if psutil:
        grown = (psutil.Process().memory_info().rss - rss0) / 2**20
        assert grown < 200, f"RSS grew by {grown:.0f} MiB"


# ---- training


class RouterLogits:
    def __init__(self, model):
        self.logits = {}
        self.handles = [b.moe.hook_router_logits.register_forward_hook(self._hook(L)) for L, b in enumerate(model.blocks)]
        self.handles += [b.moe.hook_topk_indices.register_forward_hook(self._hook(("idx", L)))
                         for L, b in enumerate(model.blocks)]

    def _hook(self, key):
        def hook(module, inputs, out):
            self.logits[key] = out
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_backward_reaches_router_and_chosen_experts_only():
    args = TINY_CONFIGS[1]  # 8 experts, top-2: 3 tokens use at most 6 experts per layer
    m = make_model(args, seed=1).train()
    tokens = random_tokens(args, 1, 3, seed=1)
    rec = RouterLogits(m)
    _, loss = m(tokens, random_tokens(args, 1, 3, seed=2))
    rec.remove()
    loss.total.backward()
    for L, block in enumerate(m.blocks):
        assert block.moe.gate.weight.grad is not None and block.moe.gate.weight.grad.abs().sum() > 0
        chosen = set(rec.logits[("idx", L)].flatten().tolist())
        assert len(chosen) < args.n_experts
        with_grad = {e for e, ex in enumerate(block.moe.experts)
                     if ex.w1.weight.grad is not None and ex.w1.weight.grad.abs().sum() > 0}
        assert with_grad == chosen, f"layer {L}"
        for e in chosen:
            for w in ("w1", "w2", "w3"):
                assert getattr(block.moe.experts[e], w).weight.grad.abs().sum() > 0
    assert m.tok_embeddings.weight.grad.abs().sum() > 0 and m.output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("z_coef", [0.0, 1e-2])
@pytest.mark.parametrize("masked", [False, True])
def test_loss_parts_by_hand(z_coef, masked):
    args = TINY_CONFIGS[2].replace(router_z_loss_coef=z_coef, router_aux_loss_coef=0.05)
    m = make_model(args, seed=2)
    tokens = random_tokens(args, 2, 10, seed=3)
    targets = random_tokens(args, 2, 10, seed=4)
    targets[0, -1] = -100
    mask = None
    if masked:
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :4] = 0
        targets[1, :4] = -100
    rec = RouterLogits(m)
    with torch.no_grad():
        logits, loss = m(tokens, targets, attention_mask=mask)
    rec.remove()
    router = [rec.logits[L].float() for L in range(args.n_layers)]
    keep = torch.ones(20, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()

    ce = F.cross_entropy(logits.reshape(-1, args.vocab_size), targets.reshape(-1), ignore_index=-100)
    z = torch.stack([r.logsumexp(-1).pow(2)[keep].mean() for r in router]).mean()
    allr = torch.cat([r[keep] for r in router])  # (L * n_real, E)
    p = allr.softmax(-1)
    f = F.one_hot(p.topk(args.experts_per_token, -1).indices, args.n_experts).sum(1).float().mean(0)
    lb = args.n_experts * (f * p.mean(0)).sum()

    assert abs(loss.ce.item() - ce.item()) <= 1e-6
    assert abs(loss.z.item() - z.item()) <= 1e-5 * max(1.0, z.item())
    assert abs(loss.load_balancing.item() - lb.item()) <= 1e-6
    expected = ce + args.router_aux_loss_coef * lb + (z_coef * z if z_coef else 0.0)
    assert abs(loss.total.item() - expected.item()) <= 1e-6
    if z_coef:
        assert loss.total.item() - loss.ce.item() - 0.05 * loss.load_balancing.item() > 0.5 * z_coef * z.item()


def test_adamw_reduces_loss_on_repeated_batch():
    args = TINY_CONFIGS[3]
    m = make_model(args, seed=5).train()
    tokens = random_tokens(args, 2, 16, seed=6)
    targets = torch.roll(tokens, -1, dims=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(12):
        _, loss = m(tokens, targets)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(loss.total.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses


# ---- init


def test_init_std_and_norms():
    args = ModelArgs(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=512, n_experts=4,
                     experts_per_token=2, init_std=0.03)
    m = make_model(args, seed=8)
    resid_std = args.init_std / math.sqrt(2 * args.n_layers)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = resid_std if name.endswith(("wo.weight", "w2.weight")) else args.init_std
        got = p.std().item()
        assert abs(got - want) < 0.1 * want, f"{name}: std {got:.4g}, want {want:.4g}"
        assert abs(p.mean().item()) < 0.1 * want, name


# ---- chunked output layer + cross-entropy (return_logits=False, the training loop's path)


@pytest.mark.parametrize("chunk", [7, 64, 10_000])  # uneven chunks, exact fit, one chunk
def test_linear_cross_entropy_matches_logits_path(chunk):
    torch.manual_seed(0)
    N, D, V = 50, 16, 97
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[[3, 17, 49]] = -100
    ref = F.cross_entropy(h @ w.t(), targets, ignore_index=-100)
    ref.backward(torch.tensor(2.5))  # a non-unit upstream gradient is scaled through
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = linear_cross_entropy(h, w, targets, chunk=chunk)
    got.backward(torch.tensor(2.5))
    assert abs(got.item() - ref.item()) <= 1e-6
    assert torch.allclose(h.grad, gh, atol=1e-6, rtol=1e-5)
    assert torch.allclose(w.grad, gw, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation: no gradient work, same value
        assert abs(linear_cross_entropy(h, w, targets, chunk=chunk).item() - ref.item()) <= 1e-6
    all_ignored = torch.full((N,), -100)
    assert math.isnan(linear_cross_entropy(h, w, all_ignored).item()) and math.isnan(
        F.cross_entropy(h @ w.t(), all_ignored, ignore_index=-100).item())


def test_return_logits_false_gives_same_loss_and_gradients():
    args = TINY_CONFIGS[2].replace(router_z_loss_coef=1e-2)
    m = make_model(args, seed=3).train()
    tokens = random_tokens(args, 2, 12, seed=4)
    targets = random_tokens(args, 2, 12, seed=5)
    targets[1, :3] = -100
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    grads = []
    for return_logits in (True, False):
        m.zero_grad(set_to_none=True)
        logits, loss = m(tokens, targets, attention_mask=mask, return_logits=return_logits)
        assert (logits is None) == (not return_logits)
        loss.total.backward()
        grads.append(({n: p.grad.clone() for n, p in m.named_parameters()}, loss.item()))
    (g_full, l_full), (g_chunk, l_chunk) = grads
    for k in l_full:
        assert abs(l_full[k] - l_chunk[k]) <= 1e-6, k
    for n in g_full:
        assert torch.allclose(g_full[n], g_chunk[n], atol=1e-7, rtol=1e-5), n
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        m(tokens, return_logits=False)


def test_return_logits_false_follows_bf16_autocast():
    m = make_model(TINY_CONFIGS[0], seed=6).train()
    tokens = random_tokens(TINY_CONFIGS[0], 2, 16, seed=7)
    targets = torch.roll(tokens, -1, dims=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, full = m(tokens, targets)
        _, chunked = m(tokens, targets, return_logits=False)
    assert chunked.ce.dtype == torch.float32
    # both round the output layer's matmul to bf16: the same value up to bf16 accumulation order
    assert abs(full.ce.item() - chunked.ce.item()) <= 2e-2
    chunked.total.backward()
    assert m.output.weight.grad.dtype == torch.float32 and m.output.weight.grad.abs().sum() > 0
