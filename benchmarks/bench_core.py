"""moe_lab vs transformers' Mixtral: the MoE layer, greedy decoding and a training step.

    python benchmarks/bench_core.py [--quick] [--full-layer] [--threads N] [--clock cpu|wall] [--json PATH]
                                    [--old REF]

``--old REF`` (default: b4094cf, the main before "one forward per concept") also times moe_lab
as it was at that git commit, in the same process, interleaved with the others: the package is
extracted with ``git archive`` to a temporary folder and imported as ``moe_lab_old``. Its ratios
against transformers are reported beside today's (``--old ''`` leaves it out).

Both sides run in one process with the SAME config and the SAME weights (in the MoE-layer runs
moe_lab's per-expert ``w1``/``w3``/``w2`` are views into transformers' fused ``gate_up_proj`` /
``down_proj``: one copy of the experts in memory). Candidates are timed interleaved
(A B C A B C ..., order alternating) and medians are reported.

transformers v5 picks the experts kernel with ``config._experts_implementation``
(``model.set_experts_implementation``): "eager" (a loop over the experts that got tokens),
"batched_mm", and "grouped_mm" (its default; ``torch.nn.functional.grouped_mm`` on CPU).
Ratios are given against "eager" and against the default.

Timing on a shared CPU. By default the run uses 1 thread and the process CPU clock
(``time.process_time``): time stolen by other processes is not counted, and no OpenMP barrier
waits on a core someone else holds (with 2 threads on a loaded 2-CPU machine a single small
matmul can stall for a scheduler tick, ~10 ms). ``--threads 2 --clock wall`` measures what an
idle machine would give with both cores.

1. MoE layer alone (router + experts), one sequence of 1, 4, 64 and 512 tokens, fp32 and bf16,
   at the tiny preset's layer (dim 128, hidden 256: overhead-bound), a small shape (dim 512,
   hidden 1024, 8 experts, top-2: already weight-streaming-bound at 1 token) and a Mixtral-shaped one: 1/4 width
   (1024 x 3584) by default, the real 8x7B layer (4096 x 14336, 5.6 GB fp32) with --full-layer.
   Calls cycle through 8 different inputs so consecutive calls hit different experts, as
   consecutive tokens do (plus one 1-token case with the same input every call). Reference
   points measured in the same run: the bare matmuls of the 2 chosen experts (1 token), the
   time to read those experts' weights once with ``torch.sum`` (1 token: no implementation can
   read them faster, so eager's time over it is the "ceiling", the largest speed-up possible),
   and dense matmul FLOP/s of the same weights (512 tokens).
2. Greedy decoding of the tiny preset: ``model.generate`` vs ``generate(do_sample=False)``,
   same prompt, same number of new tokens; the tokens must be identical.
   Prefill: one forward of a 512-token sequence through the tiny preset, no autograd, logits of
   every position on both sides.
3. One training step (forward, backward, AdamW step) of the tiny preset, fp32, with
   ``labels`` and ``output_router_logits=True`` on the transformers side.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import environment, fmt_time, interleaved, markdown_table, use_cpu_clock, write_json  # noqa: E402

import moe_lab  # noqa: E402
from moe_lab.model import MoE, Mixtral  # noqa: E402

try:
    import transformers
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
except ImportError:  # pragma: no cover
    sys.exit("this benchmark compares against transformers: pip install 'transformers>=5,<6'")

from moe_lab.checkpoints.convert import to_hf_model  # noqa: E402

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

OLD_REF = "b4094cf"  # main before "one forward per concept" (issue 11)
OLD = None  # the old package (moe_lab_old) when --old is given; see load_old()
HF_DEFAULT = "grouped_mm"  # transformers v5's default experts backend (checked at start-up)
TOKEN_COUNTS = (1, 4, 64, 512)
POOL = 8  # distinct inputs per MoE-layer case


def load_old(ref: str):
    """moe_lab as it was at git commit ``ref``, imported as the package ``moe_lab_old``."""
    repo = os.path.dirname(HERE)
    sha = subprocess.run(["git", "-C", repo, "rev-parse", "--short", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    root = os.path.join(tempfile.gettempdir(), f"moe_lab_old-{sha}")
    if not os.path.isdir(os.path.join(root, "moe_lab")):
        os.makedirs(root, exist_ok=True)
        archive = subprocess.run(["git", "-C", repo, "archive", sha, "moe_lab"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    path = os.path.join(root, "moe_lab")
    spec = importlib.util.spec_from_file_location("moe_lab_old", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moe_lab_old"] = mod
    spec.loader.exec_module(mod)
    mod.ref = sha
    return mod


def model_args(pkg, **kw):
    """``pkg.ModelArgs(**kw)`` where ``k`` is the number of experts per token, whatever the
    package calls it (``experts_per_token`` today, ``top_k`` before)."""
    k = kw.pop("k", None)
    if k is not None:
        names = {f.name for f in dataclasses.fields(pkg.ModelArgs)}
        kw["experts_per_token" if "experts_per_token" in names else "top_k"] = k
    return pkg.ModelArgs(**kw)


def ours():
    """The moe_lab candidates: {"moe_lab": package} plus {"old": old package} with --old."""
    return {"moe_lab": moe_lab, **({"old": OLD} if OLD is not None else {})}


def ratios(t: dict) -> dict:
    """transformers' time / ours (x > 1: ours faster), against its eager and default experts,
    for today's moe_lab (vs_eager, vs_default) and the old one (old_vs_eager, old_vs_default)."""
    out = {}
    for name, prefix in (("moe_lab", ""), ("old", "old_")):
        if name in t:
            out[f"{prefix}vs_eager"] = t["hf_eager"] / t[name]
            out[f"{prefix}vs_default"] = t[f"hf_{HF_DEFAULT}"] / t[name]
    return out


# --------------------------------------------------------------------------------------------
# 1. MoE layer


def moe_pair(D: int, I: int, E: int, k: int, dtype: torch.dtype, seed: int = 0):
    """moe_lab ``MoE``s ({"moe_lab": today's, "old": --old's}) and transformers
    ``MixtralSparseMoeBlock``s (one per experts backend), all sharing every weight tensor."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.empty(E, D, dtype=dtype)
    gate_up = torch.empty(E, 2 * I, D, dtype=dtype)
    down = torch.empty(E, D, I, dtype=dtype)
    for t, std in ((gate, D ** -0.5), (gate_up, D ** -0.5), (down, I ** -0.5)):
        flat = t.view(-1)  # filled in chunks: no full-size fp32 staging copy for bf16
        for s in range(0, flat.numel(), 1 << 25):
            chunk = flat[s : s + (1 << 25)]
            chunk.copy_(torch.randn(chunk.numel(), generator=g).mul_(std))

    def P(t):
        return nn.Parameter(t, requires_grad=False)

    mine = {}
    for name, pkg in ours().items():
        args = model_args(pkg, dim=D, hidden_dim=I, n_experts=E, k=k, n_heads=1, n_kv_heads=1, head_dim=2)
        with torch.device("meta"):
            moe = pkg.model.MoE(args)
        moe.gate.weight = P(gate)
        for e, ex in enumerate(moe.experts):
            ex.w1.weight, ex.w3.weight, ex.w2.weight = P(gate_up[e, :I]), P(gate_up[e, I:]), P(down[e])
        mine[name] = moe.eval()
    hf = {}
    for impl in ("eager", HF_DEFAULT):
        cfg = MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k)
        cfg._experts_implementation = impl
        with torch.device("meta"):
            blk = MixtralSparseMoeBlock(cfg)
        blk.gate.weight, blk.experts.gate_up_proj, blk.experts.down_proj = P(gate), P(gate_up), P(down)
        hf[impl] = blk.eval()
    return mine, hf


def _cycling(fn, items):
    """A no-argument function calling ``fn`` on the next of ``items`` each time (round robin)."""
    state = {"i": -1}

    def f():
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])

    return f


def _chosen_weights(ours: MoE, x: torch.Tensor) -> list[tuple]:
    """(w1, w3, w2) of each expert the router picks for the one token x."""
    with torch.inference_mode():
        chosen = ours.route(x.reshape(-1, x.shape[-1]))[1][0].tolist()
    return [(ours.experts[e].w1.weight, ours.experts[e].w3.weight, ours.experts[e].w2.weight) for e in chosen]


def _bare_expert_matmuls(ours: MoE, x: torch.Tensor):
    """For one token: the three plain matmuls of each of its k experts, nothing else."""
    ws = _chosen_weights(ours, x)
    x2 = x.reshape(1, -1)
    h = torch.randn(1, ws[0][0].shape[0], dtype=x.dtype)

    def f():
        for w1, w3, w2 in ws:
            F.linear(x2, w1), F.linear(x2, w3), F.linear(h, w2)

    return f


def _read_once(ours: MoE, x: torch.Tensor):
    """For one token: read every weight of its k experts once, as fast as this machine reads
    memory (``torch.sum``, a streaming reduction). Any implementation has to read those bytes, so
    (transformers' time) / (this time) bounds the speed-up anyone can get over transformers at
    1 token."""
    ws = [w for triple in _chosen_weights(ours, x) for w in triple]

    def f():
        for w in ws:
            w.sum()

    return f


def _dense_flops(x: torch.Tensor, h: torch.Tensor, W1, W3, W2, reps: int, target_s: float) -> float:
    """FLOP/s of x W1^T, x W3^T, h W2^T with one expert's own ([out, in]) weights: the same
    matmuls as the MoE, done densely on all M rows, no elementwise work."""
    def f():
        F.linear(x, W1), F.linear(x, W3), F.linear(h, W2)

    t = interleaved({"dense": f}, reps=reps, target_s=target_s)["dense"]
    return 2 * x.shape[0] * 3 * W1.shape[0] * W1.shape[1] / t


def bench_moe_layer(label: str, D: int, I: int, E: int, k: int, dtypes, reps: int, target_s: float,
                    results: list, log) -> None:
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        t0 = time.perf_counter()
        mine, hf = moe_pair(D, I, E, k, dtype)
        ours = mine["moe_lab"]
        log(f"  [{label} {dname}: weights ready in {time.perf_counter() - t0:.1f} s]")
        torch.manual_seed(1)
        cases = [(N, POOL) for N in TOKEN_COUNTS]
        if label == "small":
            cases.insert(1, (1, 1))  # 1 token, the same one every call: its 2 experts may stay cached
        for N, pool in cases:
            flops = 2 * N * k * 3 * D * I  # expert matmuls only
            heavy = flops > 2e10  # > ~0.1 s per call: fewer repetitions
            r = max(3, reps // 2) if heavy else reps
            xs = [torch.randn(1, N, D, dtype=dtype) for _ in range(pool)]
            with torch.inference_mode():
                for x in xs[:2]:  # same routing and the same numbers (up to summation order)
                    ref = ours(x)[0].float()
                    others = {**hf, **{n: (lambda x, m=m: m(x)[0]) for n, m in mine.items() if n != "moe_lab"}}
                    for impl, blk in others.items():
                        err = (blk(x).float() - ref).abs().max().item()
                        tol = (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, ref.abs().max().item())
                        assert err <= tol, f"{label} {dname} N={N} {impl}: outputs differ by {err}"
                fns = {name: _cycling(m, xs) for name, m in mine.items()}
                fns.update({f"hf_{impl}": _cycling(blk, xs) for impl, blk in hf.items()})
                if N == 1:
                    fns["bare"] = _cycling(lambda f: f(), [_bare_expert_matmuls(ours, x) for x in xs])
                    fns["read"] = _cycling(lambda f: f(), [_read_once(ours, x) for x in xs])
                t = interleaved(fns, reps=r, target_s=target_s)
            row = dict(section="moe_layer", shape=label, D=D, I=I, E=E, k=k, dtype=dname, tokens=N, inputs=pool,
                       **{f"t_{n}": v for n, v in t.items()}, **ratios(t))
            extra = ""
            if N == 1:
                row["bare_share"] = {n: t["bare"] / t[n] for n in fns if n not in ("bare", "read")}
                row["ceiling"] = t["hf_eager"] / t["read"]  # the most any implementation could gain
                row["read_gbs"] = 3 * k * D * I * torch.finfo(dtype).bits / 8 / t["read"] / 1e9
                extra = (f"  | bare matmuls {fmt_time(t['bare'])} = {100 * row['bare_share']['moe_lab']:.0f}% of moe_lab, "
                         f"{100 * row['bare_share']['hf_eager']:.0f}% of eager; reading the weights once "
                         f"{fmt_time(t['read'])} ({row['read_gbs']:.0f} GB/s): ceiling x{row['ceiling']:.2f}")
            if N == TOKEN_COUNTS[-1]:
                M, e0 = N * k, ours.experts[0]
                W = (e0.w1.weight, e0.w3.weight, e0.w2.weight)
                with torch.inference_mode():
                    dense = _dense_flops(torch.randn(M, D, dtype=dtype), torch.randn(M, I, dtype=dtype), *W, r, target_s)
                    Me = M // E  # rows per expert with perfectly even routing
                    dense_e = _dense_flops(torch.randn(Me, D, dtype=dtype), torch.randn(Me, I, dtype=dtype), *W, r, target_s)
                row.update(dense_flops=dense, dense_flops_expert_rows=dense_e, moe_flops=flops / t["moe_lab"],
                           hf_eager_flops=flops / t["hf_eager"], hf_default_flops=flops / t[f"hf_{HF_DEFAULT}"],
                           pct_of_dense=100 * flops / t["moe_lab"] / dense,
                           pct_of_dense_expert_rows=100 * flops / t["moe_lab"] / dense_e)
                extra = (f"  | dense {dense / 1e9:.0f} GFLOP/s ({M} rows; {dense_e / 1e9:.0f} at {Me} rows), "
                         f"moe_lab {row['moe_flops'] / 1e9:.0f} = {row['pct_of_dense']:.0f}%")
            results.append(row)
            same = " same input" if pool == 1 else ""
            old = f"  old x{row['old_vs_eager']:.2f} / x{row['old_vs_default']:.2f}" if "old_vs_eager" in row else ""
            log(f"  {label:>12} {dname:>8} {N:>3} tok{same:<11} moe_lab {fmt_time(t['moe_lab']):>9}  eager "
                f"{fmt_time(t['hf_eager']):>9}  {HF_DEFAULT} {fmt_time(t[f'hf_{HF_DEFAULT}']):>9}  "
                f"x{row['vs_eager']:.2f} / x{row['vs_default']:.2f}{old}{extra}")
        del ours, mine, hf


# --------------------------------------------------------------------------------------------
# 2. greedy decoding and 3. training step (tiny preset)


def tiny_pair(seed: int = 0):
    """{"moe_lab": Mixtral, "old": the old package's Mixtral} and transformers models (one per
    experts backend), all with the same weights (the tiny preset)."""
    torch.manual_seed(seed)
    model = Mixtral(moe_lab.ModelArgs.from_name("tiny")).eval()
    mine = {"moe_lab": model}
    for name, pkg in ours().items():
        if name != "moe_lab":
            mine[name] = pkg.Mixtral(pkg.ModelArgs.from_name("tiny")).eval()
            mine[name].load_state_dict(model.state_dict())
    hf = {}
    for impl in ("eager", HF_DEFAULT):
        m = to_hf_model(model)
        m.set_experts_implementation(impl)
        hf[impl] = m
    return mine, hf


def bench_decode(prompt_len: int, new_tokens: int, reps: int, results: list, log) -> None:
    mine, hf = tiny_pair()
    model = mine["moe_lab"]
    prompt = torch.randint(3, model.args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(2))
    hf_kw = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                 temperature=None, top_p=None, top_k=None)
    for m in hf.values():
        m.generation_config.eos_token_id = None  # never stop early: exactly new_tokens on both sides

    def hf_generate(m):
        def f():
            with torch.inference_mode():
                return m.generate(prompt, **hf_kw)
        return f

    ours_out = model.generate(prompt, new_tokens)
    for impl, m in hf.items():
        assert torch.equal(hf_generate(m)(), ours_out), f"greedy tokens differ from transformers ({impl})"
    for name, m in mine.items():
        assert torch.equal(m.generate(prompt, new_tokens), ours_out), f"greedy tokens differ ({name})"
    log(f"  greedy tokens identical ({new_tokens} new tokens after a {prompt_len}-token prompt, all candidates)")
    fns = {name: (lambda m=m: m.generate(prompt, new_tokens)) for name, m in mine.items()}
    fns.update({f"hf_{impl}": hf_generate(m) for impl, m in hf.items()})
    t = interleaved(fns, reps=reps, target_s=0.0)
    tps = {n: new_tokens / v for n, v in t.items()}
    row = dict(section="decode", prompt_len=prompt_len, new_tokens=new_tokens,
               **{f"t_{n}": v for n, v in t.items()}, **{f"tok_s_{n}": v for n, v in tps.items()}, **ratios(t))
    results.append(row)
    log(f"  tokens/s: " + "  ".join(f"{n} {v:.0f}" for n, v in tps.items()) + f"  {_x(row)}")


def bench_prefill(seq: int, reps: int, results: list, log) -> None:
    mine, hf = tiny_pair()
    tokens = torch.randint(3, mine["moe_lab"].args.vocab_size, (1, seq), generator=torch.Generator().manual_seed(4))

    def run(m, hf_model=False):
        def f():
            with torch.inference_mode():
                return m(tokens).logits if hf_model else m(tokens)
        return f

    ref = run(mine["moe_lab"])()
    for impl, m in hf.items():
        err = (run(m, True)() - ref).abs().max().item()
        assert err < 1e-4, f"prefill logits differ from transformers ({impl}): {err}"
    fns = {name: run(m) for name, m in mine.items()}
    fns.update({f"hf_{impl}": run(m, True) for impl, m in hf.items()})
    t = interleaved(fns, reps=reps, target_s=0.0)
    row = dict(section="prefill", seq=seq, **{f"t_{n}": v for n, v in t.items()},
               **{f"tok_s_{n}": seq / v for n, v in t.items()}, **ratios(t))
    results.append(row)
    log(f"  forward: " + "  ".join(f"{n} {fmt_time(v)}" for n, v in t.items()) + f"  {_x(row)}")


def _x(row) -> str:
    """'x1.23 / x1.10 (old x1.25 / x1.12)': transformers eager / default time over ours."""
    old = f" (old x{row['old_vs_eager']:.2f} / x{row['old_vs_default']:.2f})" if "old_vs_eager" in row else ""
    return f"x{row['vs_eager']:.2f} / x{row['vs_default']:.2f}{old}"


def bench_train(batch: int, seq: int, reps: int, results: list, log) -> None:
    mine, hf = tiny_pair()
    for m in (*mine.values(), *hf.values()):
        m.train()
    tokens = torch.randint(0, mine["moe_lab"].args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3))
    # moe_lab takes already-shifted targets; transformers shifts its labels (last position ignored)
    targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), -100)], dim=1)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in mine.items()}
    opts.update({impl: torch.optim.AdamW(m.parameters(), lr=1e-4) for impl, m in hf.items()})

    def step_ours(name):
        def f():
            _, loss = mine[name](tokens, targets, return_logits=False)  # the training loop's call
            loss.total.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            return loss.total.detach()
        return f

    def step_hf(impl):
        def f():
            out = hf[impl](tokens, labels=tokens, output_router_logits=True)
            out.loss.backward()
            opts[impl].step()
            opts[impl].zero_grad(set_to_none=True)
            return out.loss.detach()
        return f

    first = {**{name: step_ours(name)().item() for name in mine}, **{impl: step_hf(impl)().item() for impl in hf}}
    for name in first:  # same weights, same loss (cross-entropy + 0.02 x load balancing) on step 1
        assert abs(first[name] - first["moe_lab"]) < 1e-4 * abs(first["moe_lab"]), first
    log("  first-step losses agree: " + ", ".join(f"{n} {v:.6f}" for n, v in first.items()))
    fns = {name: step_ours(name) for name in mine}
    fns.update({f"hf_{impl}": step_hf(impl) for impl in hf})
    t = interleaved(fns, reps=reps, target_s=0.0)
    n = batch * seq
    row = dict(section="train", batch=batch, seq=seq, **{f"t_{k}": v for k, v in t.items()},
               **{f"tok_s_{k}": n / v for k, v in t.items()}, **ratios(t))
    results.append(row)
    log(f"  step: " + "  ".join(f"{n} {fmt_time(v)}" for n, v in t.items()) + f"  {_x(row)}")


# --------------------------------------------------------------------------------------------
# summary


def summarise(results: list) -> tuple[str, list[dict]]:
    def x(v):
        return f"x{v:.2f}"

    has_old = any("old_vs_eager" in r for r in results)
    rows = []
    for r in results:
        if r["section"] == "moe_layer":
            same = ", same input" if r["inputs"] == 1 else ""
            name, unit, note = f"MoE {r['shape']} {r['dtype']}, {r['tokens']} tok{same}", None, ""
            if "bare_share" in r:
                note = (f"bare matmuls of its 2 experts: {fmt_time(r['t_bare'])} "
                        f"({100 * r['bare_share']['moe_lab']:.0f}% of moe_lab, {100 * r['bare_share']['hf_eager']:.0f}% of eager); "
                        f"ceiling x{r['ceiling']:.2f}")
            if "pct_of_dense" in r:
                note = (f"{r['moe_flops'] / 1e9:.0f} GFLOP/s = {r['pct_of_dense']:.0f}% of dense {r['dense_flops'] / 1e9:.0f} "
                        f"({r['tokens'] * r['k']} rows), {r['pct_of_dense_expert_rows']:.0f}% of "
                        f"{r['dense_flops_expert_rows'] / 1e9:.0f} ({r['tokens'] * r['k'] // r['E']} rows); "
                        f"eager {100 * r['hf_eager_flops'] / r['dense_flops']:.0f}%")
        elif r["section"] == "decode":
            name, unit, note = (f"tiny greedy decode, {r['new_tokens']} new tok (tok/s)", "tok_s",
                                f"identical tokens; prompt {r['prompt_len']}")
        elif r["section"] == "prefill":
            name, unit, note = f"tiny prefill, {r['seq']} tok, no grad", None, "all logits"
        elif r["section"] == "train":
            name, unit, note = (f"tiny train step, {r['batch']}x{r['seq']} tok (tok/s)", "tok_s",
                                f"{fmt_time(r['t_moe_lab'])} per step, fwd+bwd+AdamW")
        else:
            continue

        def val(n):
            if unit:
                return f"{r[f'{unit}_{n}']:.0f}" if f"{unit}_{n}" in r else "-"
            return fmt_time(r[f"t_{n}"]) if f"t_{n}" in r else "-"
        cells = [name, val("moe_lab")] + ([val("old")] if has_old else []) + [val("hf_eager"), val(f"hf_{HF_DEFAULT}"),
                                                                              x(r["vs_eager"])]
        if has_old:
            cells.append(x(r["old_vs_eager"]) if "old_vs_eager" in r else "-")
        cells.append(x(r["vs_default"]))
        if has_old:
            cells.append(x(r["old_vs_default"]) if "old_vs_default" in r else "-")
        rows.append(cells + [note])
    header = (["benchmark", "moe_lab"] + (["old main"] if has_old else []) + ["HF eager", f"HF {HF_DEFAULT}", "vs eager"]
              + (["old vs eager"] if has_old else []) + [f"vs {HF_DEFAULT}"] + ([f"old vs {HF_DEFAULT}"] if has_old else [])
              + ["notes"])
    table = markdown_table(header, rows)

    checks = []  # the targets, against transformers "eager" unless named, in the same run

    def target(name, r, key, floor, where=None):
        c = dict(target=f"{name} >= {floor}x", value=r[key], met=r[key] >= floor)
        if f"old_{key}" in r:  # and within 10% of the old code's ratio in this run
            old = r[f"old_{key}"]
            c.update(old=old, met=c["met"] and r[key] >= 0.9 * old)
            c["target"] += " and >= 0.9 x old main's ratio"
        if where:
            c["where"] = where
        checks.append(c)

    moe = [r for r in results if r["section"] == "moe_layer"]
    for r in moe:
        if r["dtype"] == "float32" and r["tokens"] == 1:
            which = "same input every call" if r["inputs"] == 1 else f"{r['inputs']} inputs in turn"
            target(f"MoE {r['shape']} fp32, 1 token ({which}) vs eager", r, "vs_eager", 1.5,
                   f"ceilings: x{r['ceiling']:.2f} = eager's time / reading the 2 experts' weights "
                   f"once; x{r['t_hf_eager'] / r['t_bare']:.2f} = eager's time / its own matmul calls alone")
    if moe:
        worst = min(moe, key=lambda r: r["vs_eager"])
        checks.append(dict(target="MoE layer never slower than eager (every shape, dtype, token count)",
                           value=worst["vs_eager"], met=worst["vs_eager"] >= 1.0,
                           where=f"worst: {worst['shape']} {worst['dtype']} {worst['tokens']} tok"))
    for r in moe:
        if "pct_of_dense" in r:
            name = f"MoE {r['shape']} {r['dtype']}, 512 tok"
            target(f"{name} vs eager", r, "vs_eager", 1.0)
            checks.append(dict(target=f"{name} >= 70% of dense matmul FLOP/s ({r['tokens'] * r['k']} rows)",
                               value=r["pct_of_dense"], met=r["pct_of_dense"] >= 70, pct=True,
                               where=f"{r['pct_of_dense_expert_rows']:.0f}% of dense at "
                                     f"{r['tokens'] * r['k'] // r['E']} rows (the per-expert shape)"))
    for r in results:
        for key, impl in (("vs_eager", "eager"), ("vs_default", HF_DEFAULT)):
            if r["section"] == "decode":
                target(f"tiny greedy decode vs HF generate() ({impl} experts)", r, key, 1.8)
            if r["section"] == "prefill":
                target(f"tiny prefill, {r['seq']} tokens vs HF forward ({impl} experts)", r, key, 1.0)
            if r["section"] == "train":
                target(f"tiny training step vs HF ({impl} experts)", r, key, 1.15)
    return table, checks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions and new tokens (about 1-2 minutes)")
    p.add_argument("--full-layer", action="store_true",
                   help="also the real Mixtral 8x7B MoE layer, 4096 x 14336 x 8 (5.6 GB fp32 / 2.8 GB bf16; minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    p.add_argument("--clock", choices=("cpu", "wall"), default=None,
                   help="process CPU time (default with 1 thread) or wall time (default with more)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: moe, decode, prefill, train")
    p.add_argument("--old", default=OLD_REF, help=f"git commit of the old moe_lab to time too (default {OLD_REF}; '' = none)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "core.json"), help="where to write results ('' = nowhere)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    use_cpu_clock(clock == "cpu")
    skip = set(filter(None, args.skip.split(",")))
    global OLD
    OLD = load_old(args.old) if args.old else None
    reps = 5 if args.quick else 9
    target_s = 0.03 if args.quick else 0.1

    def log(msg=""):
        print(msg, flush=True)

    env = environment() | {"transformers": transformers.__version__, "clock": clock,
                           "avx512": _has_avx512(), "old_main": OLD.ref if OLD is not None else None}
    log(f"moe_lab vs transformers {transformers.__version__} | torch {env['torch']} | {env['threads']} thread(s) | "
        f"{env['cpus']} CPUs ({env['processor']}) | clock: {'process CPU time' if clock == 'cpu' else 'wall time'}")
    if OLD is not None:
        log(f"  old main: moe_lab at {OLD.ref} (imported as moe_lab_old), timed interleaved with today's")
    if clock == "cpu" and args.threads > 1:
        log("  note: the CPU clock adds up all threads' time; use --clock wall with several threads")
    tiny_cfg = MixtralConfig(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    default_impl = MixtralForCausalLM(tiny_cfg).config._experts_implementation
    if default_impl != HF_DEFAULT:
        log(f"  note: this transformers defaults to experts_implementation={default_impl!r}; compared with {HF_DEFAULT!r}")
    results: list = []
    t_start = time.perf_counter()

    if "moe" not in skip:
        log("\n1. MoE layer (router + experts), one sequence of N tokens; x = HF time / moe_lab time (eager / default)")
        shapes = [("tiny", 128, 256, 8, 2), ("small", 512, 1024, 8, 2), ("mixtral/4", 1024, 3584, 8, 2)]
        if args.full_layer:
            shapes.append(("mixtral-8x7b", 4096, 14336, 8, 2))
        for label, D, I, E, k in shapes:
            need = E * 3 * D * I * 4 * 1.2  # fp32 experts + working memory
            if need > _mem_available():
                log(f"  skipping {label}: needs ~{need / 2**30:.1f} GiB, {_mem_available() / 2**30:.1f} GiB available")
                continue
            bench_moe_layer(label, D, I, E, k, (torch.float32, torch.bfloat16), reps, target_s, results, log)
    if "decode" not in skip:
        log("\n2. greedy decoding, tiny preset, batch 1")
        bench_decode(prompt_len=16, new_tokens=32 if args.quick else 64, reps=reps, results=results, log=log)
    if "prefill" not in skip:
        log("\n2b. prefill: one forward of 512 tokens, tiny preset, no autograd")
        bench_prefill(seq=512, reps=reps, results=results, log=log)
    if "train" not in skip:
        log("\n3. training step (forward + backward + AdamW), tiny preset, fp32")
        bench_train(batch=4, seq=128, reps=reps, results=results, log=log)

    table, checks = summarise(results)
    log(f"\nSummary: medians of interleaved repetitions; {'process CPU time' if clock == 'cpu' else 'wall time'}, "
        f"{env['threads']} thread(s), {env['processor']}, torch {env['torch']}, transformers {env['transformers']}; "
        f"x > 1 = moe_lab faster ({time.perf_counter() - t_start:.0f} s)\n")
    log(table)
    log("\nTargets (vs transformers eager unless named, same run):")
    for c in checks:
        v = f"{c['value']:.0f}%" if c.get("pct") else f"x{c['value']:.2f}"
        where = f" ({c['where']})" if "where" in c else ""
        old = f" (old main x{c['old']:.2f})" if "old" in c else ""
        log(f"  {'met   ' if c['met'] else 'MISSED'} {c['target']}: {v}{old}{where}")
    if args.json:
        write_json(args.json, dict(env=env, argv=sys.argv[1:], hf_default=HF_DEFAULT, results=results,
                                   targets=checks, table=table))
        log(f"\nwrote {os.path.relpath(args.json)}")


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


def _mem_available() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


if __name__ == "__main__":
    main()
