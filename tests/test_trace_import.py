"""Importers: the OLMoE study's files, vLLM outputs, SGLang responses and dumps, on the synthetic
fixtures in data/fixtures/traces/ (written by scripts/make_trace_fixtures.py in each producer's
documented format) and on hand-built inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_lab import RoutingTrace
from moe_lab import analysis as A

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "data" / "fixtures" / "traces"
MIXTRAL_STUDY = FIX / "olmoe_study" / "mixtral" / "c4_results.jsonl"
OLMOE_STUDY = FIX / "olmoe_study" / "olmoe" / "c4_results_5000.jsonl"


# --------------------------------------------------------------------------------------------
# OLMoE study


def test_olmoe_study_mixtral_fixture_axes_and_labels():
    records = [json.loads(line) for line in MIXTRAL_STUDY.read_text().splitlines()]
    t = RoutingTrace.from_olmoe(MIXTRAL_STUDY)
    T = len(records[0]["input_ids"])
    assert (t.n_layers, t.top_k, t.n_experts, t.n_docs) == (32, 2, 8, len(records))
    assert t.n_tokens == T * len(records) and t.ids_only and t.weights is None
    assert t.domains == ["c4"] * len(records) and t.meta["checkpoint"] == "main"
    assert t.meta["model"] == "mistralai/Mixtral-8x7B-v0.1"
    # exp_ids is [token, rank, layer] in the file; expert_ids is [layer, token, rank]
    r = records[1]
    for tok, rank, layer in [(0, 0, 0), (5, 1, 31), (T - 1, 0, 17), (40, 1, 3)]:
        assert t.expert_ids[layer, T + tok, rank] == r["exp_ids"][tok][rank][layer]
    assert t.token_ids[T:2 * T].tolist() == r["input_ids"]
    assert t.positions[:T].tolist() == list(range(T))
    assert not t.is_generated.any()
    pred = RoutingTrace.from_olmoe(MIXTRAL_STUDY, token_ids="predicted", max_docs=2)
    assert pred.n_docs == 2 and pred.token_ids[:T].tolist() == records[0]["predicted_token_ids"]


def test_olmoe_study_olmoe_fixture_and_several_files():
    t = RoutingTrace.from_olmoe(OLMOE_STUDY)
    assert (t.n_layers, t.top_k, t.n_experts) == (16, 8, 64)
    assert t.meta["checkpoint"] == "step5000" and t.domain_names == ["c4"]
    for l in range(16):  # top-8 sets are distinct experts (argsort of the logits)
        assert all(len(set(row)) == 8 for row in t.expert_ids[l].tolist())
    both = RoutingTrace.from_olmoe([MIXTRAL_STUDY, MIXTRAL_STUDY], domain="web")
    assert both.n_docs == 12 and both.domain_names == ["web"] and len(both.meta["files"]) == 2
    assert t.rank_ordered and both.rank_ordered  # the study wrote argsort of the router logits


def test_olmoe_study_files_of_several_checkpoints_keep_each_window_s_checkpoint(tmp_path):
    # scripts/run_moe_analysis.py (allenai/OLMoE 357454f4) names the checkpoint only in the file name:
    # c4_results.jsonl (final) and c4_results_{step}.jsonl
    final = tmp_path / "c4_results.jsonl"
    final.write_text(OLMOE_STUDY.read_text())
    t = RoutingTrace.from_olmoe([final, OLMOE_STUDY])
    n = t.n_docs // 2
    assert t.meta["doc_checkpoints"] == ["main"] * n + ["step5000"] * n
    assert t.meta["checkpoint"] is None and t.meta["checkpoints"] == ["main", "step5000"]
    early, late = t.select_checkpoint("step5000"), t.select_checkpoint("main")
    assert early.n_docs == late.n_docs == n and early.meta["checkpoint"] == "step5000"
    assert np.array_equal(early.expert_ids, RoutingTrace.from_olmoe(OLMOE_STUDY).expert_ids)
    np.testing.assert_allclose(A.router_saturation(early, late), 1.0)  # the same file under two names
    # kept through slicing, concatenation and save/load
    assert t.select(docs=[n - 1, n]).meta["doc_checkpoints"] == ["main", "step5000"]
    assert (early + late).meta["doc_checkpoints"] == ["step5000"] * n + ["main"] * n
    back = RoutingTrace.load(t.save(tmp_path / "both"))
    assert back.meta["doc_checkpoints"] == t.meta["doc_checkpoints"]
    assert back.select_checkpoint("main").n_docs == n
    with pytest.raises(KeyError, match=r"no documents of checkpoint 'step9'; this trace has \['main', 'step5000'\]"):
        t.select_checkpoint("step9")


def test_first_choice_analyses_refuse_an_unordered_trace():
    t = RoutingTrace.from_olmoe(MIXTRAL_STUDY, max_docs=2)
    u = RoutingTrace(**{f: getattr(t, f) for f in ("token_ids", "doc_ids", "positions", "expert_ids", "domains",
                                                     "layers", "n_experts")},
                     meta={"source": "vLLM routed experts", "rank_order_reason": "deepseek_v2 routes with a "
                           "grouped/biased top-k"}, rank_ordered=False)
    from moe_lab import viz

    calls = {"repetition(kind='first')": lambda: A.repetition(u, "first", n_boot=10),
             "choice='first'": lambda: A.expert_load(u, "first"),
             "choice='second'": lambda: A.expert_load_by_domain(u, "second"),
             "router_saturation(k=1)": lambda: A.router_saturation(u, t, k=1),
             "layer_transitions": lambda: A.layer_transitions(u, 0, 1),
             "cross_layer_nmi": lambda: A.cross_layer_nmi(u),
             "viz.token_figure": lambda: viz.token_figure(u, 0, layers=[0])}
    for name, call in calls.items():
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert name in msg and "not rank-ordered" in msg and "grouped/biased" in msg, msg
        assert "kind='any'" in msg and "config=" in msg and "weight" in msg, msg
    with pytest.raises(ValueError, match=r"top_tokens_per_expert|choice='first'"):
        A.top_tokens_per_expert(u, 0)
    # analyses of top-k sets work as before, with the same numbers as the ordered trace
    assert np.array_equal(A.expert_load(u), A.expert_load(t))
    assert np.array_equal(A.repetition(u, "any", n_boot=10).rate, A.repetition(t, "any", n_boot=10).rate)
    assert np.array_equal(A.coactivation(u, 3), A.coactivation(t, 3), equal_nan=True)
    np.testing.assert_allclose(A.router_saturation(u, t), 1.0)  # whole top-2 sets: order does not matter


def test_id_only_trace_analyses_work_and_weight_analyses_refuse():
    t = RoutingTrace.from_olmoe(MIXTRAL_STUDY)
    assert A.expert_load(t).shape == (32, 8)
    rep = A.repetition(t, "first", n_boot=100)
    assert (rep.rate > rep.marginal).all()  # the fixture's first choices are sticky by construction
    assert np.isfinite(A.coactivation(t, 0)[0, 1])
    with pytest.raises(ValueError, match=r"router_confidence needs the router's weights or router_logits.*ids only"):
        A.router_confidence(t)
    df = t.to_pandas()
    assert "weight" not in df.columns and len(df) == t.n_tokens * 64


def test_id_only_trace_save_load_select_concat(tmp_path):
    t = RoutingTrace.from_olmoe(MIXTRAL_STUDY, max_docs=3)
    back = RoutingTrace.load(t.save(tmp_path / "t.safetensors"))
    assert back.weights is None and np.array_equal(back.expert_ids, t.expert_ids)
    assert back.meta["prompt_lengths"] == t.meta["prompt_lengths"]
    sub = t.select(docs=[2])
    assert sub.meta["prompt_lengths"] == [t.meta["prompt_lengths"][2]] and sub.weights is None
    cat = t + sub
    assert cat.weights is None and cat.meta["prompt_lengths"] == t.meta["prompt_lengths"] * 1 + sub.meta["prompt_lengths"]


def _write(path: Path, records: list, tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _record(T=4, k=2, L=3, E=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)], 1) for _ in range(T)])  # [T, k, L]
    return {"input_ids": list(range(T)), "predicted_token_ids": list(range(1, T + 1)), "exp_ids": ids.tolist()}


def test_olmoe_bad_input_names_file_line_expected_found(tmp_path):
    good = _record()
    # not one of the study's two models: n_experts must be given
    with pytest.raises(ValueError, match=r"line 1: .*top_k=2, layers=3.*pass n_experts="):
        RoutingTrace.from_olmoe(_write(tmp_path / "a_results.jsonl", [good]))
    t = RoutingTrace.from_olmoe(_write(tmp_path / "wiki_results.jsonl", [good]), n_experts=8)
    assert t.domains == ["wiki"] and t.n_layers == 3
    # truncated file: the last line stops mid-record
    text = json.dumps(good) + "\n" + json.dumps(good)[:50]
    (tmp_path / "trunc_results.jsonl").write_text(text)
    with pytest.raises(ValueError, match=r"trunc_results.jsonl, line 2: not a JSON object \(the file ends mid-record"):
        RoutingTrace.from_olmoe(tmp_path / "trunc_results.jsonl", n_experts=8)
    # wrong shape: exp_ids with 3 tokens for 4 input ids
    bad = dict(good, exp_ids=good["exp_ids"][:3])
    with pytest.raises(ValueError, match=r"line 2: exp_ids has shape \[3, 2, 3\], expected \[4, top_k, layers\]"):
        RoutingTrace.from_olmoe(_write(tmp_path / "s_results.jsonl", [good, bad]), n_experts=8)
    # mismatched token counts
    bad = dict(good, predicted_token_ids=[1, 2])
    with pytest.raises(ValueError, match=r"predicted_token_ids has 2 entries, expected 4"):
        RoutingTrace.from_olmoe(_write(tmp_path / "p_results.jsonl", [bad]), n_experts=8)
    # expert ids >= n_experts
    with pytest.raises(ValueError, match=r"line 1: expert ids must be in \[0, 4\) for n_experts=4, found [4-7]"):
        RoutingTrace.from_olmoe(_write(tmp_path / "e_results.jsonl", [good]), n_experts=4)
    # a record from another layout (layers changed between lines)
    other = _record(L=4, seed=1)
    with pytest.raises(ValueError, match=r"line 2: exp_ids has \[top_k, layers\] = \[2, 4\], expected \[2, 3\]"):
        RoutingTrace.from_olmoe(_write(tmp_path / "m_results.jsonl", [good, other]), n_experts=8)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['exp_ids'\]"):
        RoutingTrace.from_olmoe(_write(tmp_path / "k_results.jsonl", [{"input_ids": [1], "predicted_token_ids": [1]}]))
    with pytest.raises(FileNotFoundError, match="no OLMoE routing file"):
        RoutingTrace.from_olmoe(tmp_path / "nothing.jsonl")


def test_routing_trace_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, 4\).*found values 0\.\.5"):
        RoutingTrace(token_ids=[1, 2], doc_ids=[0, 0], positions=[0, 1], expert_ids=[[[0], [5]]], n_experts=4)
    with pytest.raises(ValueError, match=r"found values -2\.\.0"):
        RoutingTrace(token_ids=[1, 2], doc_ids=[0, 0], positions=[0, 1], expert_ids=[[[0], [-2]]], n_experts=4)
    padded = RoutingTrace(token_ids=[1], doc_ids=[0], positions=[0], expert_ids=[[[2, -1]]], n_experts=4)
    assert padded.top_k == 2  # -1 pads a slot (an intervention that routes to fewer experts)


def test_figures_of_an_id_only_trace_say_so():
    from moe_lab import viz

    t = RoutingTrace.from_olmoe(MIXTRAL_STUDY, max_docs=2)
    note = "computed from expert ids only"
    figs = [viz.load_heatmap(t), viz.domain_load_bars(t), viz.repetition_figure(t, n_boot=50),
            viz.coactivation_heatmap(t, 0), viz.domain_specialization_heatmap(t, [0, 31]),
            viz.cache_hit_figure(t.select(layers=[0]), sizes=[2, 4])]
    for fig in figs:
        assert note in fig.layout.title.text, fig.layout.meta["kind"]
    tf = viz.token_figure(t, 0, layers=[0, 31])
    assert note in tf.layout.title.text and "(%{customdata[2]" not in tf.data[0].hovertemplate
    assert tf.data[0].customdata.shape[1] == 2 + 2  # the 2 experts, token id, position
    traced = RoutingTrace(token_ids=[1, 2], doc_ids=[0, 0], positions=[0, 1], expert_ids=[[[0, 1], [1, 0]]],
                          weights=[[[0.6, 0.4], [0.5, 0.5]]], n_experts=2)
    assert note not in viz.load_heatmap(traced).layout.title.text


def test_router_saturation_between_checkpoints():
    final = make_simple([[0, 1], [2, 3], [4, 5]])
    early = make_simple([[1, 0], [2, 6], [7, 6]])  # overlaps 2/2, 1/2, 0/2
    np.testing.assert_allclose(A.router_saturation(early, final), [0.5])
    np.testing.assert_allclose(A.router_saturation(early, final, k=1), [1 / 3])  # first choices: only token 1
    np.testing.assert_allclose(A.router_saturation(final, final), [1.0])
    other = make_simple([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="same tokens and layers"):
        A.router_saturation(other, final)


def make_simple(rows, E=8):
    ids = np.asarray(rows)[None]
    N = ids.shape[1]
    return RoutingTrace(token_ids=np.arange(N), doc_ids=np.zeros(N, int), positions=np.arange(N), expert_ids=ids,
                        n_experts=E)
