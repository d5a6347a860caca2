"""The lab's results, summarised: intervals over seeds, paired differences, and expert choice's leak.

``summary_table`` turns the rows of ``results.jsonl`` into one line per recipe (mean and a 95%
t-interval over the seeds of held-out CE; means of the other measures); ``paired_difference`` compares
two recipes seed by seed (the same seed means the same batch order); ``causality_leak`` measures what
expert choice does to a causal language model: change one token and count how many *earlier* tokens
of the same sequence change their experts (a causal model, and any token-choice router, gives 0).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..model import Mixtral
from ..train import TrainConfig
from ..train.data import inputs_targets, prepare_data
from .recipes import FULL, RECIPES
from .run import Lab

#: Student t quantiles (two-sided 95%) by degrees of freedom; larger samples use the normal 1.96.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

MEASURES = ("ce", "tokens_per_s", "max_violation", "max_violation_train", "cv", "dropped_share", "experts_per_token",
            "router_saturation_mid", "router_saturation_chance", "router_saturation_final", "domain_tv", "domain_tv_null",
            "vocab_specialization", "vocab_specialization_chance")


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of ``results.jsonl`` (a file, or the lab's output folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no lab results here (run python -m moe_lab.lab run --out {p.parent})")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def interval(values) -> tuple[float, float, float]:
    """(mean, low, high): a 95% t-interval of the mean over seeds (low = high = mean for one value)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return (math.nan, math.nan, math.nan)
    m = float(v.mean())
    if len(v) == 1:
        return (m, m, m)
    half = T95.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return (m, m - half, m + half)


def summary_table(rows: list[dict], order=None):
    """One line per recipe: seeds ok / failed (and why), CE mean with its interval, the other measures' means."""
    import pandas as pd

    names = list(order or RECIPES)
    names += [r["recipe"] for r in rows if r["recipe"] not in names]
    out = []
    for name in dict.fromkeys(names):
        rs = [r for r in rows if r["recipe"] == name]
        if not rs:
            continue
        ok = [r for r in rs if r.get("status") == "ok"]
        line = {"recipe": name, "seeds_ok": len(ok), "failed": "; ".join(f"seed {r['seed']}: {r['reason']}" for r in rs
                                                                        if r.get("status") != "ok")}
        m, lo, hi = interval([r["ce"] for r in ok])
        line.update({"ce": m, "ce_low": lo, "ce_high": hi, "ce_half": (hi - lo) / 2})
        for k in MEASURES[1:]:
            vals = [r[k] for r in ok if r.get(k) is not None]
            line[k] = float(np.mean(vals)) if vals else math.nan
        if ok:
            line["params_active"], line["params_total"] = ok[0]["params"]["active"], ok[0]["params"]["total"]
        out.append(line)
    return pd.DataFrame(out).set_index("recipe")


def paired_difference(rows: list[dict], a: str, b: str, measure: str = "ce") -> dict:
    """``a - b`` seed by seed (the seeds both finished): mean, 95% t-interval, n, and whether the interval
    excludes 0 ("beyond seed noise")."""
    va = {r["seed"]: r.get(measure) for r in rows if r["recipe"] == a and r.get("status") == "ok"}
    vb = {r["seed"]: r.get(measure) for r in rows if r["recipe"] == b and r.get("status") == "ok"}
    seeds = sorted(s for s in set(va) & set(vb) if va[s] is not None and vb[s] is not None)
    m, lo, hi = interval([va[s] - vb[s] for s in seeds])
    return {"a": a, "b": b, "measure": measure, "diff": m, "low": lo, "high": hi, "n": len(seeds),
            "beyond_noise": bool(len(seeds) > 1 and (lo > 0 or hi < 0))}


@torch.no_grad()
def routing_sets(model, tokens: torch.Tensor) -> torch.Tensor:
    """[L, B, T, E] bool: which experts process each token in each MoE layer (empty slots left out)."""
    _, cache = model.run_with_cache(tokens, names_filter=["topk_indices"])
    layers = cache.layers("topk_indices")
    B, T = tokens.shape
    out = []
    for l in layers:
        idx = cache["topk_indices", l].reshape(B, T, -1)
        E = model.args.n_experts
        onehot = torch.zeros(B, T, E + 1, dtype=torch.bool)
        onehot.scatter_(-1, idx.clamp(min=-1) % (E + 1), True)  # -1 -> column E, dropped below
        out.append(onehot[..., :E])
    return torch.stack(out)


@torch.no_grad()
def causality_leak(model, tokens: torch.Tensor, n_changes: int = 8, seed: int = 0) -> dict:
    """Change the token at a random position t of each sequence (to a random other id) and count the
    tokens *before* t whose set of experts changes, in any MoE layer and in the first one.

    In a causal model a token's hidden state depends only on itself and earlier tokens, so with
    token-choice routing (top-k, or a capacity filled in token order with one choice per token) no
    earlier token can change: the share is exactly 0. Expert choice ranks each expert's candidates
    over the whole sequence, so a later token can push an earlier one out of (or into) an expert.
    Returns shares over (changed sequence, earlier token) pairs and the number of pairs."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    B, T = tokens.shape
    base = routing_sets(model, tokens)
    changed_any = changed_first = pairs = 0
    for _ in range(n_changes):
        t = torch.randint(T // 4, T, (B,), generator=g)
        edited = tokens.clone()
        new = torch.randint(2, model.args.vocab_size, (B,), generator=g)
        edited[torch.arange(B), t] = torch.where(new == tokens[torch.arange(B), t], (new + 1) % model.args.vocab_size, new)
        after = routing_sets(model, edited)
        diff = (after != base).any(-1)  # [L, B, T] the expert set changed
        earlier = torch.arange(T)[None, :] < t[:, None]  # [B, T]
        changed_any += int((diff.any(0) & earlier).sum())
        changed_first += int((diff[0] & earlier).sum())
        pairs += int(earlier.sum())
    return {"share_earlier_changed": changed_any / max(pairs, 1), "share_earlier_changed_layer0": changed_first / max(pairs, 1),
            "earlier_tokens": pairs}


def lab_causality(work: str | os.PathLike, out: str | os.PathLike, recipes=("expert_choice", "mixtral_aux", "switch_cf1.0"),
                  windows_per_domain: int = 2, n_changes: int = 8, scale=None) -> list[dict]:
    """:func:`causality_leak` of the lab's trained models (final checkpoints under ``work``) on held-out
    windows, written to ``out/causality.json``: expert choice and two token-choice controls."""
    lab = Lab(out, work, scale or FULL, progress=False)
    rows = []
    for d in sorted(Path(work).glob("*-s*")):
        name, seed = d.name.rsplit("-s", 1)
        if name not in recipes or not (d / "checkpoint.pt").exists():
            continue
        ck = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=False)
        cfg = TrainConfig.from_dict(ck["config"])
        if ck["step"] != cfg.optim.steps:
            continue  # not finished
        model = Mixtral(cfg.model)
        model.load_state_dict(ck["model"])
        data = prepare_data(cfg, d, lab.corpus, lab.tokenizer, progress=False)
        x, _ = inputs_targets(np.concatenate([w[:windows_per_domain] for w in data.heldout.values()]), data.bos_id)
        rows.append({"recipe": name, "seed": int(seed), **causality_leak(model, x, n_changes, seed=int(seed))})
    (Path(out) / "causality.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


# --------------------------------------------------------------------------------------------
# The papers' questions: their claim (stated) next to our measurement (derived from the lab's rows)

#: question -> (paper, what it states). "stated": the paper's own words or numbers, not re-measured here.
CLAIMS = {
    "bias balancing": ("Wang et al. 2024 (arXiv 2408.15664), used by DeepSeek-V3",
                       "a per-expert selection bias updated by +-gamma outside autograd gives a lower MaxVio than the "
                       "auxiliary loss AND a lower perplexity (1B and 3B models)"),
    "capacity": ("Switch Transformer (Fedus et al. 2021)",
                 "capacity factors 1.0-1.25 work well; a lower factor drops more tokens (they pass through the "
                 "residual) but costs less compute and memory"),
    "MoE vs dense": ("Switch Transformer (Fedus et al. 2021); Mixtral (Jiang et al. 2024)",
                     "at the same compute per token an MoE learns faster than its dense twin (Switch: up to 7x "
                     "pre-training speed-up over T5); Mixtral's 13B active parameters match or beat Llama 2 70B"),
    "upcycling": ("Komatsuzaki et al. 2023; Drop-Upcycling (Nakamura et al., ICLR 2025); OLMoE's discussion",
                  "experts copied from one dense FFN start identical and specialise less than experts trained "
                  "from scratch; re-initialising part of each expert (Drop-Upcycling, r = 0.5) restores diversity"),
    "fine-grained + shared": ("DeepSeekMoE (Dai et al. 2024)",
                              "many small experts plus shared ones: DeepSeekMoE 2B is comparable to GShard 2.9B "
                              "(1.5x the expert parameters and compute)"),
    "expert choice": ("Expert choice (Zhou et al. 2022)",
                      "more than 2x faster training convergence than Switch top-1 and GShard top-2; a variable "
                      "number of experts per token, balanced by construction"),
}


def _fmt(d: dict, digits: int = 3) -> str:
    if d["n"] == 0:
        return "n/a (no paired seeds)"
    iv = f" [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]" if d["n"] > 1 else " (one seed: no interval)"
    return f"{d['diff']:+.{digits}f}{iv}"


def _noise(d: dict) -> str:
    if d["n"] < 2:
        return "one seed: cannot tell"
    return "beyond seed noise" if d["beyond_noise"] else "within seed noise"


def direction(d: dict, expected: str) -> str:
    """Did a paired difference ``d`` go the ``expected`` way ("lower" or "higher")? "yes" / "no, the
    opposite" only when its interval excludes 0; otherwise "not shown (within seed noise)"."""
    if d["n"] == 0:
        return "n/a"
    if d["n"] < 2:
        return "cannot tell (one seed)"
    if not d["beyond_noise"]:
        return "not shown (within seed noise)"
    went = "lower" if d["diff"] < 0 else "higher"
    return "yes" if went == expected else f"no, the opposite ({went}, beyond seed noise)"


def claims_table(rows: list[dict]):
    """One line per question: the paper, its claim (stated), our measurement (derived from the rows, paired
    by seed: differences with their 95% intervals) and whether the paper's direction reproduced here."""
    import pandas as pd

    pd_ = lambda a, b, m="ce": paired_difference(rows, a, b, m)  # noqa: E731
    out = []

    def add(q, measured, verdicts):
        paper, says = CLAIMS[q]
        out.append({"question": q, "paper": paper, "paper says (stated)": says,
                    "we measured (derived, a - b over seeds)": measured,
                    "direction reproduced here": "; ".join(f"{k}: {v}" for k, v in verdicts.items())})

    mv = pd_("v3_bias", "mixtral_aux", "max_violation")
    mvt = pd_("v3_bias", "mixtral_aux", "max_violation_train")
    mv0 = pd_("v3_bias", "mixtral_noaux", "max_violation")
    ce = pd_("v3_bias", "mixtral_aux")
    add("bias balancing",
        f"MaxVio (held-out) bias - aux loss {_fmt(mv, 2)}, (training batches) {_fmt(mvt, 2)}; bias - no balancing "
        f"{_fmt(mv0, 2)}; CE bias - aux loss {_fmt(ce)}",
        {"MaxVio lower than with the aux loss": direction(mv, "lower"),
         "lower than with no balancing": direction(mv0, "lower"), "CE lower than with the aux loss": direction(ce, "lower")})
    dr = pd_("switch_cf1.0", "switch_cf1.25", "dropped_share")
    c = pd_("switch_cf1.0", "switch_cf1.25")
    add("capacity", f"dropped share 1.0 - 1.25 {_fmt(dr)}; CE 1.0 - 1.25 {_fmt(c)}",
        {"capacity 1.0 drops more": direction(dr, "higher"), "and costs loss": direction(c, "higher")})
    a = pd_("mixtral_aux", "dense_active")
    t = pd_("mixtral_aux", "dense_total")
    add("MoE vs dense", f"CE top-2 of 8 - dense equal active {_fmt(a)}; - dense equal total {_fmt(t)}",
        {"MoE lower CE than dense at equal active parameters": direction(a, "lower")})
    sp = pd_("upcycled", "mixtral_aux", "domain_tv")
    sd = pd_("drop_upcycled", "upcycled", "domain_tv")
    vs = pd_("upcycled", "mixtral_aux", "vocab_specialization")
    cu = pd_("upcycled", "mixtral_aux")
    add("upcycling", f"domain TV (specialisation by domain) upcycled - scratch {_fmt(sp)}; drop - copy {_fmt(sd)}; "
                     f"vocabulary specialisation upcycled - scratch {_fmt(vs)}; CE upcycled - scratch {_fmt(cu)}",
        {"upcycled experts specialise less by domain": direction(sp, "lower"),
         "by vocabulary": direction(vs, "lower"), "Drop-Upcycling more than copying": direction(sd, "higher")})
    f = pd_("finegrained_shared", "mixtral_aux")
    add("fine-grained + shared", f"CE fine-grained + shared - top-2 of 8 {_fmt(f)}",
        {"lower CE at equal active parameters": direction(f, "lower")})
    e1 = pd_("expert_choice", "mixtral_aux")
    e2 = pd_("expert_choice", "switch_cf1.25")
    add("expert choice", f"CE expert choice - top-2 {_fmt(e1)}; - Switch 1.25 {_fmt(e2)}; not comparable: "
                         "expert choice's routing sees later tokens (section 6)",
        {"lower CE than top-2": direction(e1, "lower"), "than Switch top-1": direction(e2, "lower")})
    return pd.DataFrame(out).set_index("question")
