"""Render every moe_lab.viz figure to a PNG, the way the saved notebooks get theirs, to look at them.

    python scripts/render_figures.py                 # writes build/figures/*.png
    python scripts/render_figures.py --only domain   # the figures whose name contains "domain"

The figures are drawn from the demo model (data/tiny-mixtral) on a few held-out documents per
domain (as notebook 05 does in fast mode), from a short generation for the cache figure, and from
the synthetic OLMoE-study fixture for the offloading figures; each title says which. PNGs are made
by ``scripts/execute_notebooks.py``'s ``figure_png`` (kaleido + a Chromium, at the figure's own
size, reduced to 256 colours), so what you see is what a saved notebook shows on GitHub.
Needs kaleido and a Chromium-family browser (see ``scripts/execute_notebooks.py``).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _executor():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
    xn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(xn)
    return xn


def figures(docs_per_domain: int = 3, max_tokens: int = 256):
    """(name, figure builder) for every figure function of moe_lab.viz, on the demo model and fixtures."""
    import numpy as np

    import moe_lab
    from moe_lab import analysis as A
    from moe_lab import viz
    from moe_lab.evalset import load_heldout_sample

    model = moe_lab.load_demo_model(random_if_missing=True)
    tok = moe_lab.load_tokenizer()
    heldout: dict[str, list[str]] = {}
    for doc in load_heldout_sample():
        heldout.setdefault(doc["domain"], []).append(doc["text"])
    heldout = {d: t[:docs_per_domain] for d, t in heldout.items()}
    trace = moe_lab.trace_routing(model, heldout, tokenizer=tok, keep_logits=True, progress=False, max_len=max_tokens)
    demo = "demo model"
    _, gen = moe_lab.trace_generation(model, ["def parse_config(path):\n", "The history of the city begins"],
                                      max_new_tokens=32, tokenizer=tok, temperature=0.8, top_k=50, seed=0)
    decode = A.generated_only(gen)
    fixture = ROOT / "data" / "fixtures" / "traces" / "olmoe_study" / "mixtral" / "c4_results.jsonl"
    synth = moe_lab.RoutingTrace.from_olmoe(fixture)
    doc = trace.domains.index("python")
    last = trace.layers[-1]
    base_probs = np.exp(np.linspace(0, -6, tok.vocab_size if hasattr(tok, "vocab_size") else 1000))
    base_probs /= base_probs.sum()
    new_probs = np.roll(base_probs, 3)

    yield "token_figure", lambda: viz.token_figure(trace, doc=doc, max_tokens=120, source=demo)
    yield "load_heatmap", lambda: viz.load_heatmap(trace, source=demo)
    yield "domain_load_bars", lambda: viz.domain_load_bars(trace, source=demo)
    yield "domain_load_bars_5", lambda: viz.domain_load_bars(
        trace, domains=["python", "english", "math", "french", "latex"], source=demo)
    yield "domain_load_bars_synthetic", lambda: viz.domain_load_bars(synth, layer=[0, 15, 31],
                                                                     source="synthetic fixture")
    yield "repetition_figure", lambda: viz.repetition_figure(trace, by_domain=True, n_boot=200, source=demo)
    yield "repetition_first", lambda: viz.repetition_figure(trace, kinds=("first",), n_boot=200, source=demo)
    yield "coactivation_heatmap", lambda: viz.coactivation_heatmap(trace, layer=last, source=demo)
    yield "domain_specialization_heatmap", lambda: viz.domain_specialization_heatmap(trace, source=demo)
    yield "expert_paths_sankey", lambda: viz.expert_paths_sankey(trace, source=demo)
    yield "cache_hit_figure", lambda: viz.cache_hit_figure(A.cache_hit_rates(decode), source=demo)
    yield "next_token_figure", lambda: viz.next_token_figure(base_probs, new_probs, tok, source=demo)
    yield "routing_change_figure", lambda: viz.routing_change_figure(
        trace, trace, marker_layer=1, source=demo)
    yield "expert_heatmap", lambda: _effect_heatmap(viz, trace, demo)
    half = synth.n_docs // 2
    pc = A.policy_comparison(synth.select(docs=range(half, half + 2)), profile=synth.select(docs=range(half)))
    yield "offload_policy_figure", lambda: viz.offload_policy_figure(pc, n_experts=8)
    piv = pc.pivot(index="budget", columns="policy", values="hit_rate")
    tab = A.offload_table({"LRU, 4 of 8 per layer": piv.loc[4, "lru"]})
    yield "tokens_per_second_figure", lambda: viz.tokens_per_second_figure(tab)
    yield "calibration_figure", lambda: viz.calibration_figure(A.mixtral_calibration())
    pf = A.speculative_prefetch(model, [t for ts in heldout.values() for t in ts[:1]], tokenizer=tok, max_len=128)
    yield "prefetch_figure", lambda: viz.prefetch_figure(A.prefetch_hit_rates(pf, sizes=[2]))
    # the causal figures, on a few short documents (their numbers mean little here: this is to look at them)
    from moe_lab import SteerExperts, causal

    few = {d: heldout[d][:3] for d in ("python", "english", "math", "latex")}
    scan = causal.ablation_scan(model, few, tokenizer=tok, n_boot=50, max_len=64, progress=False,
                                n_sources={"python": 3, "english": 3, "math": 3, "latex": 1})
    yield "ablation_scan_figure", lambda: viz.ablation_scan_figure(scan)
    pooled = {"all": [t for ts in few.values() for t in ts]}
    per_token = causal.mask_top_experts(model, pooled, tokenizer=tok, r_values=[0, 1, 2], n_boot=50, max_len=64,
                                        progress=False)
    busiest = causal.disable_top_experts(model, pooled, tokenizer=tok, r_values=[0, 1, 2], n_random=1, n_boot=50,
                                         max_len=64, progress=False)
    yield "redundancy_figure", lambda: viz.redundancy_figure(per_token, busiest)
    dose = causal.dose_response(model, {"python": few["python"]}, lambda d: [SteerExperts(0, {1: d})], [0.0, 1.0, 2.0],
                                tokenizer=tok, n_boot=50, max_len=64, progress=False)
    yield "dose_response_figure", lambda: viz.dose_response_figure(dose)


def _effect_heatmap(viz, trace, source):
    """A domain x (layer, expert) heatmap like notebook 08's ablation scan: here the difference of each
    domain's load from the uniform share, layer 0 made 20x larger than the others (as 08's layer 0 is)."""
    from moe_lab import analysis as A

    by_domain = A.expert_load_by_domain(trace)
    doms = list(by_domain)
    import numpy as np

    z = np.stack([by_domain[d] - 1 / trace.n_experts for d in doms])  # [D, L, E]
    z[:, 0] *= 20
    marks = [(doms[0], trace.layers[0], 1), (doms[2], trace.layers[1], 3)]
    return viz.expert_heatmap(z, rows=doms, layers=trace.layers, marks=marks, mark_label="beyond the null",
                              colorbar_title="Δ share", row_title="domain", source=source,
                              title="Each domain's load minus 1/E (layer 0 scaled x20)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "figures")
    ap.add_argument("--only", default="", help="render only figures whose name contains this")
    ap.add_argument("--json", action="store_true", help="also write each figure's JSON")
    a = ap.parse_args(argv)
    xn = _executor()
    xn.require_figure_tools(install=False)
    a.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, build in figures():
        if a.only and a.only not in name:
            continue
        t0 = time.perf_counter()
        try:
            fig = build()
        except Exception as e:  # keep going: one broken figure should not hide the others
            print(f"{name}: FAILED {type(e).__name__}: {e}", file=sys.stderr)
            failed += 1
            continue
        png = xn.figure_png(fig.to_plotly_json())
        (a.out / f"{name}.png").write_bytes(png)
        if a.json:
            (a.out / f"{name}.json").write_text(fig.to_json())
        print(f"{a.out / name}.png  {len(png) / 1024:.0f} KiB  {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
