"""moe_lab vs transformers' MixtralForCausalLM holding the same weights.

fp32: logits, router logits, chosen experts, load-balancing loss, CE, padded batches and greedy
generation must agree. bf16: the two implementations round differently, so routing may flip at
near-ties; we measure (and bound) how often.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIG_IDS, TINY_CONFIGS, hf_position_ids, left_padded_batch, make_pair, random_tokens

pytest.importorskip("transformers")

T_LONG = 24  # longer than both sliding windows in TINY_CONFIGS (16 and 8)


@pytest.fixture(scope="module", params=TINY_CONFIGS, ids=CONFIG_IDS)
def pair(request):
    args = request.param
    model, hf = make_pair(args, seed=1234)
    return args, model, hf


class RouterRecorder:
    """Plain forward hooks on every layer's ``hook_router_logits`` / ``hook_topk_indices``."""

    def __init__(self, model):
        self.logits, self.indices, self.handles = {}, {}, []
        for L, block in enumerate(model.blocks):
            self.handles.append(block.moe.hook_router_logits.register_forward_hook(self._save(self.logits, L)))
            self.handles.append(block.moe.hook_topk_indices.register_forward_hook(self._save(self.indices, L)))

    @staticmethod
    def _save(store, L):
        def hook(module, inputs, output):
            store[L] = output.detach().clone()
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def hf_topk(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(router_logits.float().softmax(-1), k, dim=-1).indices


@torch.no_grad()
def test_logits_match_fp32(pair):
    args, model, hf = pair
    tokens = random_tokens(args, 2, T_LONG, seed=1)
    ours = model(tokens)
    theirs = hf(tokens).logits
    diff = (ours - theirs).abs().max().item()
    assert ours.shape == theirs.shape == (2, T_LONG, args.vocab_size)
    assert diff <= 1e-5, f"max |logits diff| = {diff:.3g}"
    # the comparison is not vacuous: logits are not all ~0
    assert ours.abs().max() > 0.1


@torch.no_grad()
def test_router_logits_and_chosen_experts_match(pair):
    args, model, hf = pair
    tokens = random_tokens(args, 2, T_LONG, seed=2)
    with RouterRecorder(model) as rec:
        model(tokens)
    out = hf(tokens, output_router_logits=True)
    assert len(out.router_logits) == args.n_layers == len(rec.logits)
    for L in range(args.n_layers):
        theirs = out.router_logits[L]
        assert rec.logits[L].shape == theirs.shape == (2 * T_LONG, args.n_experts)
        diff = (rec.logits[L] - theirs).abs().max().item()
        assert diff <= 1e-5, f"layer {L}: router logits differ by {diff:.3g}"
        assert torch.equal(rec.indices[L], hf_topk(theirs, args.experts_per_token)), f"layer {L}: chosen experts differ"


@torch.no_grad()
def test_losses_match(pair):
    args, model, hf = pair
    tokens = random_tokens(args, 2, T_LONG, seed=3)
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)  # moe_lab: pre-shifted
    _, loss = model(tokens, targets)
    out = hf(tokens, labels=tokens, output_router_logits=True)  # HF shifts labels itself
    coef = hf.router_aux_loss_coef
    no_logits, chunked = model(tokens, targets, return_logits=False)  # the training loop's call
    assert no_logits is None
    assert abs(chunked.total.item() - out.loss.item()) <= 1e-5
    assert abs(chunked.ce.item() - loss.ce.item()) <= 1e-6
    assert coef == args.router_aux_loss_coef
    assert abs(loss.load_balancing.item() - out.aux_loss.item()) <= 1e-6
    hf_ce = out.loss.item() - coef * out.aux_loss.item()
    assert abs(loss.ce.item() - hf_ce) <= 1e-5
    assert abs(loss.total.item() - out.loss.item()) <= 1e-5
    # f_e <= 1 (an expert is chosen at most once per token) and sum_e P_e = 1, so 0 < aux <= E
    assert 0 < loss.load_balancing.item() <= args.n_experts + 1e-6


@torch.no_grad()
def test_padded_batch_matches_hf_and_single_rows(pair):
    args, model, hf = pair
    lengths = [T_LONG, T_LONG - 5, T_LONG - 13]
    tokens, mask, rows = left_padded_batch(args, lengths, seed=4)
    ours = model(tokens, attention_mask=mask)
    theirs = hf(tokens, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
    real = mask.bool()
    diff = (ours - theirs)[real].abs().max().item()
    assert diff <= 1e-5, f"padded batch vs HF: {diff:.3g}"
    for b, row in enumerate(rows):
        alone = model(row[None])[0]
        d = (ours[b, real[b]] - alone).abs().max().item()
        assert d <= 1e-5, f"row {b} padded vs alone: {d:.3g}"

    # masked load-balancing loss: HF means over real tokens only, like ours
    # HF labels are unshifted; moe_lab's targets[t] = labels[t + 1]. A label is ignored when it is
    # padding or follows padding (padding positions' logits are arbitrary in both libraries).
    follows_real = torch.cat([torch.zeros(3, 1, dtype=torch.bool), real[:, :-1]], dim=1)
    labels = tokens.masked_fill(~(real & follows_real), -100)
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    _, loss = model(tokens, targets, attention_mask=mask)
    out = hf(tokens, attention_mask=mask, position_ids=hf_position_ids(mask), labels=labels,
             output_router_logits=True)
    assert abs(loss.load_balancing.item() - out.aux_loss.item()) <= 1e-6
    assert abs(loss.total.item() - out.loss.item()) <= 1e-5


@torch.no_grad()
def test_greedy_generation_matches_hf(pair):
    args, model, hf = pair
    n = 20
    prompt = random_tokens(args, 1, 8, seed=5)
    ours = model.generate(prompt, n)
    theirs = hf.generate(prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    assert ours.shape == theirs.shape == (1, 8 + n)
    assert ours.tolist() == theirs.tolist()

    # left-padded batch: HF derives position ids from the mask during generate
    tokens, mask, _ = left_padded_batch(args, [8, 5], seed=6)
    ours = model.generate(tokens, n, attention_mask=mask)
    theirs = hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    assert ours[:, 8:].tolist() == theirs[:, 8:].tolist()


# --------------------------------------------------------------------------------------------
# bf16


@torch.no_grad()
def _ours_routes(model, tokens):
    with RouterRecorder(model) as rec:
        logits = model(tokens)
    return logits.float(), [rec.indices[L] for L in range(len(model.blocks))]


@torch.no_grad()
def _hf_routes(hf, tokens, k):
    out = hf(tokens, output_router_logits=True)
    return out.logits.float(), [hf_topk(r, k) for r in out.router_logits]


def flip_rates(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """Share of (token, layer) whose first choice differs, and whose top-k set differs."""
    a, b = torch.stack(a), torch.stack(b)  # (L, N, k)
    first = (a[..., 0] != b[..., 0]).float().mean().item()
    sets = (a.sort(-1).values != b.sort(-1).values).any(-1).float().mean().item()
    return first, sets


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_bf16_routing_flip_rate(args, record_property):
    model, hf = make_pair(args, seed=1234)
    tokens = random_tokens(args, 8, 64, seed=7)
    ref_logits, ref = _ours_routes(model, tokens)  # fp32 (equals HF fp32, tested above)
    model, hf = model.to(torch.bfloat16), hf.to(torch.bfloat16)
    ours_logits, ours = _ours_routes(model, tokens)
    hf_logits, theirs = _hf_routes(hf, tokens, args.experts_per_token)

    rates = {
        "ours_bf16_vs_hf_bf16": flip_rates(ours, theirs),
        "ours_bf16_vs_fp32": flip_rates(ours, ref),
        "hf_bf16_vs_fp32": flip_rates(theirs, ref),
    }
    def rel(a, b):  # relative RMS difference of the logits
        return ((a - b).norm() / b.norm()).item()

    logit_diffs = {
        "ours_bf16_vs_hf_bf16": rel(ours_logits, hf_logits),
        "ours_bf16_vs_fp32": rel(ours_logits, ref_logits),
        "hf_bf16_vs_fp32": rel(hf_logits, ref_logits),
    }
    n = tokens.numel() * args.n_layers
    print(f"\n[bf16 routing, {n} (token, layer) pairs] " + "; ".join(
        f"{k}: first-choice {f:.2%}, top-{args.experts_per_token} set {s:.2%}, rel RMS logits diff {logit_diffs[k]:.3g}"
        for k, (f, s) in rates.items()))
    for k, (f, s) in rates.items():
        record_property(f"{k}_first_flip", f)
        record_property(f"{k}_set_flip", s)
        record_property(f"{k}_rel_rms_logit_diff", logit_diffs[k])
        assert f < 0.05 and s < 0.05, f"{k}: flip rates {f:.2%} / {s:.2%}"
        assert logit_diffs[k] < 0.05, f"{k}: logits differ by {logit_diffs[k]:.3g} relative"
