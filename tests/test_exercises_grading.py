"""The exercise checkers grade (issue 27): every checker of every notebook, called with wrong answers,
never states the reference value in any printed form (repr, rounded to 2-6 decimals or significant
digits, a percentage, with thousands separators, in GB); the "by hand" checkers reject the library's
own result (called inside the learner's function, or pasted as a value); the random-router checker
rejects the router's own first choice plus a random second.

Every case builds its inputs from seeded random tiny models, so nothing here needs the demo model.
"""

from __future__ import annotations

import importlib
import math
import re
from functools import cached_property

import numpy as np
import pytest
import torch

import moe_lab
from moe_lab import AblateExpert, Mixtral, ModelArgs, analysis as A, causal, intervene, load_tokenizer
from moe_lab.attribution import logit_attribution
from moe_lab.checkpoints.convert import interleaved_to_half
from moe_lab.exercises import nb00, nb01, nb02, nb03, nb04, nb05, nb06, nb07, nb08, nb09, nb10
from moe_lab.model import count_params, load_balancing_loss, router_z_loss, topk_softmax_routing
from moe_lab.moe import routers
from moe_lab.train import router_saturation
from moe_lab.viz import routing_changes

MODULES = {f"{i:02d}": importlib.import_module(f"moe_lab.exercises.nb{i:02d}") for i in range(11)}
TEXTS = {"english": ["The server will restart at midnight, so please save your work before you leave. In 1999 "
                     "the 42 servers cost 3,500 dollars.",
                     "Walking to the station in the rain, she remembered that the shop closes early on Sundays."],
         "french": ["Le serveur redémarrera à minuit, alors enregistrez votre travail avant de partir.",
                    "En marchant vers la gare sous la pluie, elle se souvint que le magasin ferme tôt le dimanche."]}


# ---------------------------------------------------------------- the printed forms of a value

def forms(value) -> set[str]:
    """The ways a message could print ``value``: for a number, its repr, 2-6 decimals, 3-6
    significant digits, a percentage, thousands separators; for an array or a list, its list repr
    and every element with 3-6 decimals. Small integers (|v| < 10) and round numbers are left out:
    "k = 2" or "0.0" in a message is not a leak."""
    out: set[str] = set()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, np.integer)) for v in value):
        out |= {repr([int(v) for v in value]), repr(tuple(int(v) for v in value)),
                ", ".join(str(int(v)) for v in value)}
        return out
    if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
        arr = value.detach().double().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, float)
        for v in arr.ravel()[:64]:
            if abs(v) >= 1e-3 and abs(v - round(v)) > 1e-9:
                out |= {f"{v:.{d}f}" for d in (3, 4, 5, 6)}
        return out
    v = float(value)
    if abs(v - round(v)) < 1e-9:  # an integer
        return {str(int(round(v))), f"{int(round(v)):,}"} if abs(v) >= 10 else set()
    out |= {repr(v), repr(float(np.float32(v)))}
    out |= {f"{v:.{d}f}" for d in range(2, 7)} | {f"{v:.{d}g}" for d in range(3, 7)}
    if abs(v) <= 1:
        out |= {f"{100 * v:.{d}f}%" for d in range(0, 3)}
    return {f for f in out if f.strip("-0.%") != ""}


def leaks(text: str, value) -> list[str]:
    """The forms of ``value`` that occur in ``text`` as whole numbers (not inside a longer one)."""
    return [f for f in forms(value) if re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", text)]


def full_text(fb) -> str:
    return f"{fb}\n{fb.method}\n{fb._repr_html_()}"


# ---------------------------------------------------------------- inputs, built once

class Inputs:
    """Seeded tiny models, traces and the values each checker needs (built on first use)."""

    @cached_property
    def tok(self):
        return load_tokenizer()

    @cached_property
    def model(self):
        torch.manual_seed(0)
        return Mixtral(ModelArgs.from_name("tiny", n_layers=3, init_std=0.1)).eval()

    @cached_property
    def trace(self):
        return moe_lab.trace_routing(self.model, TEXTS, tokenizer=self.tok, progress=False)

    @cached_property
    def docs(self):
        g = torch.Generator().manual_seed(1)
        return [[1] + torch.randint(2, 500, (15,), generator=g).tolist() for _ in range(6)]

    @cached_property
    def logits(self):
        return torch.randn(64, 8, generator=torch.Generator().manual_seed(3)) * 2

    @cached_property
    def layer_logits(self):
        g = torch.Generator().manual_seed(5)
        return [torch.randn(20, 8, generator=g) * 2 for _ in range(3)]

    @cached_property
    def snapshots(self):
        rng = np.random.default_rng(0)
        return np.argsort(rng.random((5, 2, 40, 8)), axis=-1)[..., :2]

    @cached_property
    def switch_choices(self):
        g = torch.Generator().manual_seed(5)
        return (torch.randn(32, 8, generator=g) + torch.linspace(1.5, 0, 8)).argmax(-1)  # skewed towards expert 0

    @cached_property
    def checkpoint(self, ):
        import tempfile
        torch.manual_seed(0)
        m = Mixtral(ModelArgs.from_name("tiny", n_layers=2, vocab_size=256, init_std=0.05)).eval()
        return m, moe_lab.save_model(m, tempfile.mkdtemp(prefix="grading_") + "/mistral", layout="mistral")


I = Inputs()


def _value_case(call, ref, wrongs=(0.0, 123.456)):
    return call, ref, list(wrongs)


def _fn(value):
    """A learner's function that returns ``value`` whatever its inputs."""
    return lambda *args, **kwargs: value


# Each case: () -> (call(answer) -> Feedback, the reference value(s), wrong answers).
def cases():
    t, m = I.trace, I.model
    L1 = t.layers[1]
    c = {}
    # ---- 00
    row = t.layer_index(L1)
    ref = [int(e) for e in t.expert_ids[row, 5]]
    others = [e for e in range(8) if e not in ref][:2]
    c["00.check_token_experts"] = (lambda a: nb00.check_token_experts(a, t, 5, L1), ref, [others, others[::-1]])
    tok_id = int(np.bincount(t.token_ids[t.token_ids > 2]).argmax())
    c["00.check_token_consistency"] = _value_case(lambda a: nb00.check_token_consistency(a, t, tok_id, L1),
                                                  nb00.token_consistency(t, tok_id, L1), (0.0013, 0.4321))
    ta, tb = t.select(docs=[0, 1]), t.select(docs=[2, 3])
    pa = A.expert_load(ta, "first")[row]
    pb = A.expert_load(tb, "first")[row]
    c["00.check_first_choice_tv"] = _value_case(lambda a: nb00.check_first_choice_tv(a, ta, tb, L1),
                                                0.5 * float(np.abs(pa - pb).sum()), (0.0013, 0.987))
    ids = [I.docs[0]]
    base = moe_lab.trace_routing(m, ids, progress=False)
    with intervene(m, AblateExpert(0, 3)):
        new = moe_lab.trace_routing(m, ids, progress=False)
    sets = routing_changes(base, new)[2]
    c["00.check_changed_share"] = (lambda a: nb00.check_changed_share(a, base, new), sets,
                                   [np.zeros_like(sets), np.full_like(sets, 0.0123)])
    # ---- 01
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2)])
    c["01.check_inverse_permutation"] = (lambda a: nb01.check_inverse_permutation(a, 8),
                                         torch.argsort(perm).tolist(), [list(range(8)), list(range(8))[::-1]])
    args01 = ModelArgs.from_name("tiny")
    torch.manual_seed(0)
    attn = moe_lab.model.Attention(args01)
    x = torch.randn(1, 5, args01.dim)
    ref = nb01.window_one_reference(x, attn, args01)
    c["01.check_window_one"] = (lambda a: nb01.check_window_one(a, x, attn, args01), ref, [torch.zeros_like(ref)])
    row8 = I.logits[0]
    _, idx, w = topk_softmax_routing(row8[None], 2)
    bottom = row8.argsort()[:2].tolist()
    c["01.check_route_token"] = (lambda a: nb01.check_route_token(a, row8), w[0],
                                 [(idx[0].tolist(), [0.5, 0.5]), (bottom, [0.6, 0.4])])
    big = ModelArgs.from_name("mixtral-8x22b")
    cp = count_params(big)
    c["01.check_param_count"] = (lambda a: nb01.check_param_count(a, big), [cp.total, cp.active],
                                 [(0, 0), (cp.total, 0), (1, 1)])
    mx = ModelArgs.from_name("mixtral-8x7b")
    kv = 2 * mx.n_kv_heads * mx.n_layers * mx.head_dim * 2
    c["01.check_kv_cache_bytes"] = (lambda a: nb01.check_kv_cache_bytes(a, mx), kv, [0, 1, 7])
    # ---- 02
    lg = I.layer_logits
    lb = float(load_balancing_loss(lg, 8, 2))
    c["02.check_load_balancing"] = (lambda a: nb02.check_load_balancing(a, lg, 8, 2),
                                    [lb, float(load_balancing_loss(nb02._fresh_router_logits(8), 8, 2))],
                                    [_fn(0.0), _fn(123.456), lb, 0.0])
    top1 = ModelArgs.from_name("tiny", experts_per_token=1)
    c["02.check_switch_routing"] = (lambda a: nb02.check_switch_routing(a, top1), count_params(top1).active,
                                    [(0, 0), (count_params(top1).active, 3.0), (count_params(top1).total, 1.0)])
    torch.manual_seed(0)
    sw = Mixtral(ModelArgs.from_name("tiny", sliding_window=4)).eval()
    seq = torch.randint(2, 500, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = sw(seq)
    c["02.check_sliding_window_decode"] = (lambda a: nb02.check_sliding_window_decode(a, sw, seq, 4), full,
                                           [torch.zeros_like(full)])
    c["02.check_force_routing_fn"] = (lambda a: nb02.check_force_routing_fn(a), [],
                                      [lambda logits, k: topk_softmax_routing(logits, k)])
    # ---- 03
    m03, ckpt = I.checkpoint
    router = m03.blocks[1].moe.gate.weight.detach()
    c["03.check_router_from_file"] = (lambda a: nb03.check_router_from_file(a, m03, layer=1), router,
                                      [torch.zeros_like(router)])
    w = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    rows = (interleaved_to_half(w, 2)[:, 0] / 3).long().tolist()
    c["03.check_qk_permutation"] = (lambda a: nb03.check_qk_permutation(a), rows,
                                    [lambda w, n: w.clone(), lambda w, n: w.flip(0)])
    tokens = torch.randint(2, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    normal, rev = moe_lab.load_model(ckpt), moe_lab.load_model(ckpt, layers=[1, 0])
    with torch.inference_mode():
        diff = (rev(tokens).float() - normal(tokens).float()).abs().max().item()
    c["03.check_layer_order_effect"] = _value_case(lambda a: nb03.check_layer_order_effect(a, ckpt, tokens), diff,
                                                   (0.0013, 123.456))
    mem = nb03.partial_load_bytes(mx, 4)
    c["03.check_partial_load_memory"] = (lambda a: nb03.check_partial_load_memory(a, mx, 4),
                                         [mem, mem / 1e9, mem / 2 ** 30], [1, 1e9, 0.5])
    # ---- 04
    _, ref_idx, ref_w = topk_softmax_routing(I.logits, 2)
    c["04.check_topk_by_hand"] = (lambda a: nb04.check_topk_by_hand(a, I.logits, k=2), ref_w,
                                  [_fn((torch.zeros(64, 2), torch.zeros(64, 2, dtype=torch.long))),
                                   (ref_w, ref_idx)])
    prompt = [1, 17, 52, 9, 33, 81, 40, 12, 66, 7]
    kls = nb04.ablation_kls(m, prompt, 1)
    c["04.check_ablation_sweep"] = (lambda a: nb04.check_ablation_sweep(a, m, prompt, 1), kls,
                                    [np.zeros(8), np.full(8, 0.0123)])
    spread = nb04.forced_changes(m, prompt, 0, 3, 4).tolist()
    c["04.check_force_spread"] = (lambda a: nb04.check_force_spread(a, m, prompt, 0, 3, 4), spread,
                                  [[], [9], [4, 5]])
    c["04.check_random_routing"] = (lambda a: nb04.check_random_routing(a), [], [_top1_plus_random])
    c["04.check_hf_moe_trace"] = (lambda a: nb04.check_hf_moe_trace(a, m, [prompt]), [], [I.trace])
    # ---- 05
    c["05.check_first_choice_load"] = (lambda a: nb05.check_first_choice_load(a, t),
                                       A.expert_load(t, "first"), [_fn(np.zeros((3, 8))),
                                                                   A.expert_load(t, "first")])
    rate = A.repetition(t, "first", n_boot=10, n_shuffles=1).rate
    c["05.check_repetition_rate"] = (lambda a: nb05.check_repetition_rate(a, t), rate,
                                     [_fn(np.zeros(3)), _fn(np.full(3, 0.0123)), rate])
    digits = nb05.digit_first_choice(t, L1)
    c["05.check_digit_experts"] = (lambda a: nb05.check_digit_experts(a, t, L1), digits,
                                   [np.zeros(8), np.eye(8)[0]])
    prompts = ["def f(x):", "Once upon a time"]
    hit = nb05.greedy_lru_hit_rate(m, prompts, I.tok, 6, 4)
    c["05.check_greedy_cache_hits"] = _value_case(lambda a: nb05.check_greedy_cache_hits(a, m, prompts, I.tok, 6, 4),
                                                  hit, (0.0013, 0.9987))
    # ---- 06
    c["06.check_marginal_baseline"] = _value_case(lambda a: nb06.check_marginal_baseline(a, t, L1),
                                                  nb06.marginal_baseline(t, L1), (0.0013, 0.9987))
    c["06.check_word_start_repetition"] = _value_case(lambda a: nb06.check_word_start_repetition(a, t, L1),
                                                      nb06.same_first_rate(t, L1, word_start_only=True),
                                                      (0.0013, 0.9987))
    usage = A.expert_usage(t)[t.layer_index(L1)]
    c["06.check_expert_usage"] = (lambda a: nb06.check_expert_usage(a, t, L1), usage,
                                  [_fn(np.full_like(usage, 1 / usage.shape[1])), _fn(np.zeros_like(usage)), usage])
    c["06.check_first_choice_divergence"] = _value_case(
        lambda a: nb06.check_first_choice_divergence(a, t, "english", L1),
        nb06.first_choice_divergence(t, "english", L1), (0.0013, 0.9987))
    c["06.check_word_start_drop"] = _choice_case(lambda a: nb06.check_word_start_drop(a, t, L1), "abc")
    c["06.check_baseline_reading"] = _choice_case(nb06.check_baseline_reading, "abcd")
    c["06.check_mediator_reading"] = _choice_case(nb06.check_mediator_reading, "abcd")
    # ---- 07
    frac = nb07._fraction(I.logits, 2)
    c["07.check_expert_fraction"] = (lambda a: nb07.check_expert_fraction(a, I.logits, 2), frac,
                                     [_fn(torch.zeros(8)), frac])
    c["07.check_load_balancing"] = _value_case(lambda a: nb07.check_load_balancing(a, I.logits, 2),
                                               float(load_balancing_loss([I.logits], 8, 2)), (0.0, 123.456))
    c["07.check_effective_coefficient"] = _value_case(lambda a: nb07.check_effective_coefficient(a, 0.02, 32),
                                                      0.02 * 32, (0.0, 123.456))
    c["07.check_z_loss"] = _value_case(lambda a: nb07.check_z_loss(a, I.logits),
                                       float(router_z_loss([I.logits])), (0.0, 123.456))
    sat = router_saturation(I.snapshots)
    c["07.check_router_saturation"] = (lambda a: nb07.check_router_saturation(a, I.snapshots), sat,
                                       [_fn(np.zeros((5, 2))), sat])
    # ---- 08
    texts = {"x": I.docs[:3]}
    base_loss = causal.document_losses(m, texts).loss.mean()
    zero = float(causal.document_losses(m, texts, interventions=[AblateExpert(1, 2, mode="zero")]).loss.mean()
                 - base_loss)
    c["08.check_zero_ablation_delta"] = _value_case(lambda a: nb08.check_zero_ablation_delta(a, m, texts, 1, 2),
                                                    zero, (0.0, 123.456))
    table = causal.contrastive_experts(m, I.docs[:2], I.docs[2:4], n_boot=1, max_len=None)
    rd = float(table[(table.layer == 1) & (table.expert == 3)].risk_diff.iloc[0])
    c["08.check_risk_difference"] = (lambda a: nb08.check_risk_difference(a, m, I.docs[:2], I.docs[2:4], 1, 3), rd,
                                     [_fn(0.0013), _fn(0.9987), rd])
    doc, pos = I.docs[0], 5
    att = logit_attribution(m, doc)
    experts = att.table(pos)[[c_ for c_ in att.table(pos).index if ".expert." in c_]]
    best = experts.index[0]
    best_pair = [int(best.split(".")[1]), int(best.split(".")[3])]
    worst = experts.index[-1]
    c["08.check_top_expert_for_logit"] = (lambda a: nb08.check_top_expert_for_logit(a, m, doc, pos),
                                          [best_pair, float(experts.iloc[0])],
                                          [(int(worst.split(".")[1]), int(worst.split(".")[3])),
                                           (int(experts.index[2].split(".")[1]), int(experts.index[2].split(".")[3]))])
    routes = causal.alternative_routes(m, doc, 1, 6)
    rank = int(routes[routes.router_choice]["rank"].iloc[0])
    wrong_ranks = [r for r in (3, 11, 20) if r not in (rank, len(routes) + 1 - rank)][:2]
    c["08.check_router_rank"] = (lambda a: nb08.check_router_rank(a, m, doc, 1, 6),
                                 [f"rank {rank}", f"{rank} of {len(routes)}"], wrong_ranks)
    c["08.check_zero_vs_reroute"] = _choice_case(lambda a: nb08.check_zero_vs_reroute(a, m, texts, 1, 2), "ab")
    c["08.check_steering_test"] = _choice_case(nb08.check_steering_test, "abcd")
    c["08.check_small_ablation"] = _choice_case(nb08.check_small_ablation, "abcd")
    # ---- 09
    tr9 = moe_lab.trace_routing(m, I.docs, progress=False)
    profile, test = tr9.select(docs=range(3)), tr9.select(docs=range(3, 6))
    hind = nb09._frequency_hit_rate(test, 2, None) - nb09._frequency_hit_rate(test, 2, profile)
    c["09.check_hindsight_gap"] = _value_case(lambda a: nb09.check_hindsight_gap(a, test, 2, profile), hind,
                                              (0.4321, 0.9987))
    laptop = A.Link("my laptop", 60e9, 0.7, 0)
    kw = dict(hit_rate=0.6, precision="4bit", link="nvme_ssd", memory=laptop)
    tps = A.decode_time(A.moe_bytes("mixtral-8x7b", "4bit"), 32 * 2 * 0.4, "nvme_ssd", laptop)["tokens_per_s"]
    c["09.check_decode_speed"] = _value_case(lambda a: nb09.check_decode_speed(a, **kw), tps, (0.0013, 123.456))
    pf = A.speculative_prefetch(m, I.docs, n_guess=3)
    c["09.check_prefetch_recall"] = (lambda a: nb09.check_prefetch_recall(a, pf), pf.recall,
                                     [_fn(np.zeros_like(pf.recall)), _fn(np.full_like(pf.recall, 0.0123)), pf.recall])
    c["09.check_any_uniform"] = _value_case(lambda a: nb09.check_any_uniform(a, 32, 8),
                                            1 - math.comb(24, 8) / math.comb(32, 8), (0.0, 0.5))
    # ---- 10 (by hand: 10.1, 10.2 take the learner's function; the reference is a mask, never printed)
    sw10 = I.switch_choices
    cap10 = routers.capacity_of(len(sw10), 1, 8, 1.0)
    c["10.check_capacity_drops"] = (lambda a: nb10.check_capacity_drops(a, sw10, 8, cap10),
                                    nb10._kept(sw10, 8, cap10).astype(int).tolist(),
                                    [lambda i, E, C: np.ones(len(i), bool), lambda i, E, C: nb10._kept(i.flip(0), E, C)[::-1],
                                     lambda i, E, C: nb10._kept(i, E, C - 1), lambda i, E, C: np.zeros(len(i), bool)])
    ec10, ec_cap10 = I.logits[:16], routers.capacity_of(16, 2, 8, 1.0)

    def token_choice(lg, c_):
        out = np.zeros(tuple(lg.shape), bool)
        np.put_along_axis(out, lg.topk(2, dim=-1).indices.numpy(), True, axis=-1)
        return out

    def raw_logits(lg, c_):
        out = np.zeros(tuple(lg.shape), bool)
        np.put_along_axis(out, lg.topk(c_, dim=0).indices.numpy(), True, axis=0)
        return out

    c["10.check_expert_choice"] = (lambda a: nb10.check_expert_choice(a, ec10, ec_cap10),
                                   nb10._chosen(ec10, ec_cap10).astype(int).ravel().tolist(),
                                   [token_choice, raw_logits, lambda lg, c_: np.zeros(tuple(lg.shape), bool)])
    bias10 = np.array([0.0213, -0.0117, 0.0, 0.0334, -0.0251, 0.0042, 0.0108, -0.0329])
    load10, rate10 = np.array([40, 12, 25, 31, 18, 25, 9, 40]), 0.0013
    new_bias10 = nb10._bias_step(bias10, load10, rate10)
    c["10.check_bias_update"] = (lambda a: nb10.check_bias_update(a, bias10, load10, rate10), new_bias10,
                                 [2 * bias10 - new_bias10, bias10 + rate10 * (load10.mean() - load10), new_bias10 - bias10,
                                  np.zeros(8), new_bias10 + 0.0123])
    ce10 = [3.3127, 3.3481, 3.2913]
    m10, lo10, hi10 = nb10.interval(ce10)
    sd10 = float(np.std(ce10, ddof=1))
    c["10.check_seed_interval"] = _value_case(lambda a: nb10.check_seed_interval(a, ce10), (hi10 - lo10) / 2,
                                              (1.96 * sd10 / math.sqrt(3), (hi10 - lo10) / 2 * np.std(ce10) / sd10,
                                               hi10 - lo10, 0.0, 123.456))
    # ---- the graded questions of 00-05 and 07 (issue 27, item 2)
    for key, fn in (("00.check_ablation_reach", nb00.check_ablation_reach),
                    ("00.check_same_token_reason", nb00.check_same_token_reason),
                    ("01.check_routing_orders", nb01.check_routing_orders),
                    ("02.check_window_cache", nb02.check_window_cache),
                    ("02.check_forced_expert_effect", nb02.check_forced_expert_effect),
                    ("03.check_block_order", nb03.check_block_order),
                    ("03.check_hd4_blind_spot", nb03.check_hd4_blind_spot),
                    ("04.check_unchanged_positions", nb04.check_unchanged_positions),
                    ("04.check_more_experts", nb04.check_more_experts)):
        c[key] = _choice_case(fn, "abcd")
    c["01.check_gqa_factor"] = (lambda a: nb01.check_gqa_factor(a, mx), mx.n_heads / mx.n_kv_heads,
                                [0.25, mx.n_heads, 3.5, "four"])
    c["05.check_first_choice_balance"] = _choice_case(lambda a: nb05.check_first_choice_balance(a, t), "ab")
    d5 = nb05.digit_first_choice(t, L1)
    ratio = float(d5.max() / A.expert_load(t, "first")[t.layer_index(L1)][int(d5.argmax())])
    c["05.check_digit_ratio"] = _value_case(lambda a: nb05.check_digit_ratio(a, t, L1), ratio,
                                            (0.0013, 1 / ratio, 100 * ratio, 1.25 * ratio))
    c["07.check_closer_to_k"] = _choice_case(lambda a: nb07.check_closer_to_k(a, I.logits, I.layer_logits[0], 2), "ab")
    c["07.check_random_saturation"] = _value_case(lambda a: nb07.check_random_saturation(a, 8), 1 / 8,
                                                  (0.25, 0.0, 1.5, 0.5))
    c["09.check_prefetch_cost"] = _choice_case(nb09.check_prefetch_cost, "abcd")
    c["09.check_any_saturation"] = _choice_case(nb09.check_any_saturation, "abcd")
    c["09.check_hindsight_reading"] = _choice_case(nb09.check_hindsight_reading, "abcd")
    c["10.check_capacity_overflow"] = _choice_case(nb10.check_capacity_overflow, "abcd")
    c["10.check_expert_choice_decoding"] = _choice_case(nb10.check_expert_choice_decoding, "abcd")
    return c


def _choice_case(call, letters):
    """A multiple-choice question: the right letter (found by asking the checker) must never appear, as
    "(x)" or as its option's text, in the messages given to the other letters."""
    right = [x for x in letters if call(x)]
    assert len(right) == 1, f"exactly one right option, found {right}"
    fb = call(right[0])
    option_text = fb.message.split(")", 1)[1].strip().split(".")[0]  # "(b) <option text>. <why>"
    return call, [f"({right[0]})", option_text], [x for x in letters if x != right[0]] + ["z", 3]


def _top1_plus_random(logits, k):
    """A "random" router that keeps the router's own first choice and draws only the rest."""
    probs = logits.float().softmax(-1)
    first = logits.argmax(-1, keepdim=True)
    noise = torch.rand_like(probs).scatter(-1, first, -1.0)
    idx = torch.cat([first, noise.topk(k - 1, dim=-1).indices], -1)
    w = probs.gather(-1, idx)
    return probs, idx, w / w.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def all_cases():
    return cases()


def test_every_checker_of_every_notebook_has_a_case(all_cases):
    checkers = {f"{nn}.{name}" for nn, mod in MODULES.items() for name in dir(mod) if name.startswith("check_")}
    assert checkers == set(all_cases), (f"no grading case for {sorted(checkers - set(all_cases))}; "
                                        f"stale cases {sorted(set(all_cases) - checkers)}")
    assert len(checkers) >= 43


def test_wrong_answers_never_state_the_reference(all_cases):
    found = []
    for key, (call, ref, wrongs) in all_cases.items():
        refs = ref if isinstance(ref, list) and ref and not all(isinstance(v, (int, np.integer)) for v in ref) \
            else [ref]
        for answer in wrongs:
            fb = call(answer)
            assert not fb, f"{key}: the wrong answer {answer!r} passed"
            text = full_text(fb)
            for r in refs:
                hits = ([r] if isinstance(r, str) and r in text else []) if isinstance(r, str) else leaks(text, r)
                if hits:
                    found.append(f"{key} with {str(answer)[:40]}: {hits} in {str(fb)[:300]!r}")
    assert not found, "messages state the reference:\n" + "\n".join(found)


def test_the_leak_search_finds_the_old_messages():
    """The search would have caught the messages the review quoted."""
    assert leaks("✗ Exercise 09.4: expected 0.930077, found 0", 1 - math.comb(24, 8) / math.comb(32, 8))
    assert leaks("total: expected 46,702,792,704, found 0", 46_702_792_704)
    assert leaks("expected [5, 0], found [0, 1]", [5, 0])
    assert leaks("layer row 1, expert 2: found 0.2000, expected 0.1337.", np.array([0.1, 0.13371]))
    assert leaks("that is 13% of tokens", 0.1337) and not leaks("found 0.1342", 0.13)


BY_HAND = {  # checker: (the learner's function that calls the library, the library's value pasted)
    "02.check_load_balancing": (lambda: (lambda rl, E, k: load_balancing_loss(rl, E, k),
                                         float(load_balancing_loss(I.layer_logits, 8, 2)))),
    "04.check_topk_by_hand": (lambda: (lambda lg, k: topk_softmax_routing(lg, k)[:0:-1],
                                       topk_softmax_routing(I.logits, 2)[:0:-1])),
    "05.check_first_choice_load": (lambda: (lambda tr: A.expert_load(tr, "first"), A.expert_load(I.trace, "first"))),
    "05.check_repetition_rate": (lambda: (lambda tr: A.repetition(tr, "first", n_boot=10, n_shuffles=1).rate,
                                          A.repetition(I.trace, "first", n_boot=10, n_shuffles=1).rate)),
    "07.check_expert_fraction": (lambda: (None, nb07._fraction(I.logits, 2))),
    "07.check_router_saturation": (lambda: (lambda idx: router_saturation(idx), router_saturation(I.snapshots))),
    "06.check_expert_usage": (lambda: (lambda tr, layer: A.expert_usage(tr)[tr.layer_index(layer)],
                                       A.expert_usage(I.trace)[I.trace.layer_index(I.trace.layers[1])])),
    "08.check_risk_difference": (lambda: (
        lambda ta, tb, layer, e: float((lambda tb_: tb_[(tb_.layer == layer) & (tb_.expert == e)].risk_diff.iloc[0])(
            causal.contrastive_experts(I.model, I.docs[:2], I.docs[2:4], n_boot=1, max_len=None))),
        float((lambda tb: tb[(tb.layer == 1) & (tb.expert == 3)].risk_diff.iloc[0])(
            causal.contrastive_experts(I.model, I.docs[:2], I.docs[2:4], n_boot=1, max_len=None))))),
    # 10.1 / 10.2: the block's own rules (routers.drop_overflow, routers.expert_choice) are switched off
    "10.check_capacity_drops": (lambda: (
        lambda idx, E, C: (routers.drop_overflow(idx.reshape(-1, 1), torch.ones(len(idx), 1), E, C)[0][:, 0] >= 0).numpy(),
        nb10._kept(I.switch_choices, 8, routers.capacity_of(32, 1, 8, 1.0)))),
    "10.check_expert_choice": (lambda: (
        lambda lg, cap: np.stack([(routers.expert_choice(lg, cap)[1] == e).any(-1).numpy() for e in range(lg.shape[1])], 1),
        nb10._chosen(I.logits[:16], routers.capacity_of(16, 2, 8, 1.0)))),
    # 09.3 takes plain arrays: there is no .recall to call, and a copied result fails on the checker's own arrays
    "09.check_prefetch_recall": (lambda: (None, A.speculative_prefetch(I.model, I.docs, n_guess=3).recall)),
}


@pytest.mark.parametrize("key", sorted(BY_HAND))
def test_by_hand_checkers_reject_the_library(key, all_cases):
    call = all_cases[key][0]
    library_fn, pasted = BY_HAND[key]()
    if library_fn is not None:
        fb = call(library_fn)
        assert fb.status == "wrong" and "calls the library" in fb.message, fb
    fb = call(pasted)
    assert fb.status == "wrong" and "takes your function" in fb.message, fb
    if key == "09.check_prefetch_recall":  # a function returning the notebook's values fails on fresh arrays
        fb = call(lambda guess, actual: pasted)
        assert fb.status == "wrong", fb


def test_the_random_router_checker_rejects_top1_plus_random():
    fb = nb04.check_random_routing(_top1_plus_random, n_experts=8)
    assert fb.status == "wrong" and "own first choice" in fb.message and "k/E" in fb.message

    def uniform(logits, k):
        probs = logits.float().softmax(-1)
        idx = torch.rand_like(probs).topk(k, dim=-1).indices
        w = probs.gather(-1, idx)
        return probs, idx, w / w.sum(-1, keepdim=True)

    assert all(nb04.check_random_routing(uniform, n_experts=8) for _ in range(5))  # no false alarm


def _solution_lines(nn: str) -> set[str]:
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "notebooks" / "solutions" / f"{nn}_solutions.ipynb"
    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                     if c["cell_type"] == "code")
    lines = {re.sub(r"\s+", "", ln.split("#")[0]) for ln in code.splitlines()}
    return {ln for ln in lines if len(ln) >= 16 and not ln.startswith(("import", "from", "print(", "ex."))}


def test_hints_come_in_two_levels_and_never_give_the_solution_line(all_cases):
    """The stub's feedback has a nudge and a method (folded away), different from each other; neither
    holds a line of the worked solution (whitespace aside)."""
    problems = []
    for key, (call, _, _) in all_cases.items():
        nn = key[:2]
        fb = call(None)
        assert fb.status == "todo", (key, fb)
        if not (fb.hint and fb.method and fb.hint != fb.method):
            problems.append(f"{key}: hint {fb.hint!r}, method {fb.method!r}")
        said = re.sub(r"\s+", "", fb.hint + fb.method)
        problems += [f"{key}: the hint holds the solution line {line!r}" for line in _solution_lines(nn)
                     if line in said]
    assert not problems, "\n".join(problems)


def test_06_08_09_do_not_rely_on_the_redaction_net(all_cases, monkeypatch):
    """Notebooks 06, 08, 09 and 10 (and every graded question) say what kind of wrong an answer is in their own
    words: with the "expected <value>" net switched off, their messages still hold no reference value."""
    from moe_lab.exercises import feedback

    monkeypatch.setattr(feedback, "redact", lambda message: message)
    found = []
    for key, (call, ref, wrongs) in all_cases.items():
        if key[:2] not in {"06", "08", "09", "10"} and not key.endswith(tuple(QUESTIONS)):
            continue
        refs = ref if isinstance(ref, list) and ref and not all(isinstance(v, (int, np.integer)) for v in ref) \
            else [ref]
        for answer in wrongs:
            text = full_text(call(answer))
            for r in refs:
                if (r in text) if isinstance(r, str) else leaks(text, r):
                    found.append(f"{key} with {str(answer)[:40]}: {text[:200]!r}")
    assert not found, "\n".join(found)


QUESTIONS = ("check_ablation_reach", "check_same_token_reason", "check_routing_orders", "check_gqa_factor",
             "check_window_cache", "check_forced_expert_effect", "check_block_order", "check_hd4_blind_spot",
             "check_unchanged_positions", "check_more_experts", "check_first_choice_balance", "check_digit_ratio",
             "check_closer_to_k", "check_random_saturation", "check_capacity_overflow", "check_expert_choice_decoding")


def test_every_notebook_has_two_or_three_graded_questions(all_cases):
    """Issue 27, item 2: at least two interpretive questions per notebook are graded (a letter or a number
    in a range), each with a case above."""
    import inspect

    from moe_lab.exercises import questions

    for nn, mod in MODULES.items():
        graded = [name for name in dir(mod) if name.startswith("check_")
                  and re.search(r"(?<![\w.])(choice|in_range)\(", inspect.getsource(getattr(mod, name)))]
        assert 2 <= len(graded) <= 3, f"notebook {nn}: graded questions {graded}"
    assert questions.choice and questions.in_range


def test_question_helpers():
    from moe_lab.exercises.questions import choice, in_range

    opts = {"a": "one", "b": "two", "c": "three"}
    why_not = {"a": "not one.", "c": "not three."}
    assert choice("Q", "b", opts, "b", why_not) and choice("Q", " (B) ", opts, "b", why_not)
    fb = choice("Q", "a", opts, "b", why_not)
    assert not fb and fb.message == "not (a): not one." and "(b)" not in str(fb) and "two" not in str(fb)
    assert choice("Q", None, opts, "b", why_not).status == "todo"
    for bad in ("e", 1, True, ["a"]):
        fb = choice("Q", bad, opts, "b", why_not)
        assert fb.status == "wrong" and "one letter" in fb.message
    with pytest.raises(ValueError, match="why_not"):
        choice("Q", "a", opts, "b", {"a": "x"})
    assert in_range("R", 0.5, 0.4, 0.6) and in_range("R", np.float32(0.4), 0.4, 0.6)
    fb = in_range("R", 0.7, 0.4, 0.6, diagnoses=[(lambda v: v > 1, "a percentage")])
    assert not fb and "outside" in fb.message and "0.4" not in str(fb) and "0.6" not in str(fb)
    assert in_range("R", 55, 0.4, 0.6, diagnoses=[(lambda v: v > 1, "a percentage")]).message == "a percentage"
    assert in_range("R", "x", 0.4, 0.6).status == "wrong" and in_range("R", None, 0.4, 0.6).status == "todo"
    with pytest.raises(ValueError):
        in_range("R", 1, 2, 1)
