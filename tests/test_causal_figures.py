"""The causal figures of moe_lab.viz: one colour scale per layer, greyed uncounted domains, intervals."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_CONFIGS, make_model
from moe_lab import SteerExperts, viz
from moe_lab.causal import ablation_scan, disable_top_experts, dose_response, mask_top_experts


@pytest.fixture(scope="module")
def setup():
    args = TINY_CONFIGS[1]  # 2 layers, top-2 of 8
    model = make_model(args, seed=51)
    g = np.random.default_rng(0)
    texts = {"a": [g.integers(0, 150, 12).tolist() for _ in range(3)],
             "b": [g.integers(150, 300, 10).tolist() for _ in range(2)]}
    return args, model, texts


def test_ablation_scan_figure(setup):
    args, model, texts = setup
    scan = ablation_scan(model, texts, n_boot=20, progress=False, n_sources={"a": 3, "b": 1})
    fig = viz.ablation_scan_figure(scan, title="scan (random tiny model)")
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == args.n_layers and len({t.coloraxis for t in heat}) == args.n_layers  # one scale per layer
    for t in heat:
        axis = fig.layout[t.coloraxis]
        assert axis.cmin == -axis.cmax and np.nanmax(np.abs(np.asarray(t.z, dtype=float))) <= axis.cmax + 1e-12
        assert list(t.x) == list(range(args.n_experts))  # a column for every expert
    assert list(fig.layout.xaxis.tickvals) == list(range(args.n_experts))  # and a tick for each
    assert "b" in heat[0].y and len(fig.layout.shapes) == args.n_layers  # greyed row in each panel
    assert any("not counted" in (t.name or "") and "b" in t.name for t in fig.data)  # named in the legend
    assert any(t.showlegend for t in fig.data if t.type == "scatter")  # the circle's legend entry (or "none")
    assert "scan (random tiny model)" in fig.layout.title.text


def test_redundancy_and_dose_figures(setup):
    args, model, texts = setup
    pooled = {"all": texts["a"] + texts["b"]}
    per_token = mask_top_experts(model, pooled, r_values=[0, 1, 2], n_boot=20, progress=False)
    busiest = disable_top_experts(model, pooled, r_values=[0, 1, 2], n_random=1, n_boot=20, progress=False)
    fig = viz.redundancy_figure(per_token, busiest)
    lines = [t for t in fig.data if t.type == "scatter"]
    assert len(lines) == 6 and all(t.error_y.array is not None for t in lines)  # every curve with its interval
    with pytest.raises(ValueError, match="must hold one domain"):
        viz.redundancy_figure(mask_top_experts(model, texts, r_values=[0, 1], n_boot=5, progress=False), busiest)
    dose = dose_response(model, texts, lambda d: [SteerExperts(0, {1: d})], [0.0, 1.0], n_boot=20, progress=False)
    import pandas as pd
    behaviour = pd.DataFrame({"dose": [0.0, 1.0], "share": [0.1, 0.2], "ci_low": [0.0, 0.1], "ci_high": [0.2, 0.3]})
    fig = viz.dose_response_figure(dose, behaviour, baseline=0.05)
    assert len([t for t in fig.data if t.type == "scatter"]) == 3 and fig.layout.xaxis.title.text
