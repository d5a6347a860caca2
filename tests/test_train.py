"""Training loop, schedule, resume, determinism, logging and the evaluation behind the model card.

Everything trains a 2-layer model of width 32 for a few dozen steps on a synthetic three-domain
corpus, so the whole file runs in well under a minute on one CPU thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_lab
from moe_lab import analysis

from moe_lab.corpus import Corpus, Document
from moe_lab.model import ModelArgs, count_params
from moe_lab.train import (
    CKPT_NAME,
    LOG_NAME,
    SNAPSHOT_NAME,
    DataConfig,
    OptimConfig,
    TrainConfig,
    batch_schedule,
    classify_domain,
    evaluate_model,
    heldout_documents,
    inputs_targets,
    load_config,
    load_summary,
    lr_at,
    pack_windows,
    quality_bar,
    read_log,
    routing_report,
    router_saturation,
    tokenize_corpus,
    train,
    unigram_baseline,
    unigram_logprobs,
)

REPO = Path(__file__).resolve().parent.parent


def _docs(domain: str, n: int, seed: int) -> list[Document]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if domain == "numbers":
            a = rng.integers(0, 50, 6)
            text = "\n".join(f"Question: What is {x} + {y}?\nAnswer: {x + y}" for x, y in zip(a[::2], a[1::2]))
        elif domain == "code":
            names = rng.choice(["alpha", "beta", "gamma", "delta"], 3)
            text = "\n".join(f"def {n}(x):\n    return x + {k}\n" for k, n in enumerate(names))
        else:
            words = rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"], 40)
            text = " ".join(words) + "."
        out.append(Document(domain, f"{domain}/{seed}/{i}", text))
    return out


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    domains = ["numbers", "code", "prose"]
    train_docs = [d for k, dom in enumerate(domains) for d in _docs(dom, 40, k)]
    held = [d for k, dom in enumerate(domains) for d in _docs(dom, 6, 100 + k)]
    return Corpus(train=train_docs, heldout=held, domains=domains)


@pytest.fixture(scope="module")
def tokenizer():
    from moe_lab.tokenizer import load_tokenizer

    return load_tokenizer()


def tiny_config(**changes) -> TrainConfig:
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=32000,
                     max_seq_len=64, n_experts=4, experts_per_token=2)
    cfg = TrainConfig(model=args,
                      data=DataConfig(seq_len=32, eval_tokens_per_domain=128, eval_windows=2, probe_windows=1),
                      optim=OptimConfig(steps=24, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=4),
                      name="test", seed=0, num_threads=1, log_every=4, eval_every=8, checkpoint_every=8,
                      snapshot_every=8)
    d = cfg.to_dict()
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        (d[section] if section else d)[name] = value
    return TrainConfig.from_dict(d)


def run(corpus, tokenizer, out=None, **kw):
    cfg = kw.pop("cfg", None) or tiny_config()
    return train(cfg, out, corpus=corpus, tokenizer=tokenizer, progress=False, **kw)


def same_params(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def full_run(corpus, tokenizer, tmp_path_factory):
    return run(corpus, tokenizer, tmp_path_factory.mktemp("full"))


# --------------------------------------------------------------------------------------------
# schedule and data


def test_lr_schedule_warmup_then_cosine():
    o = OptimConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = np.array([lr_at(s, o) for s in range(o.steps)])
    assert np.all(np.diff(lrs[:10]) > 0), "warm-up must increase linearly"
    assert np.allclose(np.diff(lrs[:10]), 0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert np.all(np.diff(lrs[10:]) <= 1e-12), "cosine must decrease"
    assert lrs[-1] == pytest.approx(0.1)
    mid = 10 + (100 - 1 - 10) // 2
    assert lrs[mid] == pytest.approx(0.55, abs=0.01)  # half way down the cosine


def test_inputs_targets_shift_and_ignore_bos():
    w = np.array([[1, 5, 6, 1, 7]])
    x, y = inputs_targets(w, bos_id=1)
    assert x.tolist() == [[1, 5, 6, 1]]
    assert y.tolist() == [[5, 6, -100, 7]]


def test_packing_and_schedule_are_deterministic(corpus, tokenizer, tmp_path):
    td = tokenize_corpus(corpus, tokenizer, tmp_path, progress=False)
    assert all(td.tokens["train"][d][td.starts["train"][d]].tolist() == [1] * len(td.starts["train"][d])
               for d in td.domains), "every document starts with BOS"
    w1 = pack_windows(td, "train", "code", 32, shuffle_seed=0)
    w2 = pack_windows(td, "train", "code", 32, shuffle_seed=0)
    assert w1.shape[1] == 33 and np.array_equal(w1, w2)
    assert np.array_equal(w1[1:, 0], w1[:-1, -1]), "windows overlap by one token"
    td2 = tokenize_corpus(corpus, tokenizer, tmp_path, progress=False)  # from the cache
    assert td2.fingerprint == td.fingerprint and np.array_equal(td2.tokens["heldout"]["prose"], td.tokens["heldout"]["prose"])
    s1 = batch_schedule({"a": 5, "b": 50}, 40, 4, seed=3, alpha=0.0)
    s2 = batch_schedule({"a": 5, "b": 50}, 40, 4, seed=3, alpha=0.0)
    assert s1.shape == (40, 4, 2) and np.array_equal(s1, s2)
    share_a = (s1[..., 0] == 0).mean()
    assert 0.35 < share_a < 0.65, "alpha 0 draws the domains uniformly"
    a_windows = s1[..., 1][s1[..., 0] == 0]
    assert sorted(a_windows[:5].tolist()) == list(range(5)), "each epoch visits every window once"
    nat = batch_schedule({"a": 5, "b": 50}, 40, 4, seed=3, alpha=1.0)
    assert (nat[..., 0] == 0).mean() < 0.2


# --------------------------------------------------------------------------------------------
# training


def test_loss_decreases_and_log_is_complete(full_run):
    res = full_run
    trains = res.records("train")
    assert trains[0]["step"] == 4 and trains[-1]["step"] == 24
    assert trains[-1]["ce"] < trains[0]["ce"] - 1.0
    evals = res.records("eval")
    assert [e["step"] for e in evals] == [8, 16, 24]
    assert evals[-1]["ce_mean"] < evals[0]["ce_mean"]
    assert set(evals[-1]["ce"]) == {"numbers", "code", "prose"} == set(res.final_eval)
    L, E = res.config.model.n_layers, res.config.model.n_experts
    for r in trains + [e for e in evals]:
        loads = [r["load"]] if r["type"] == "train" else list(r["load"].values())
        for load in loads:
            assert np.array(load).shape == (L, E)
            assert np.allclose(np.array(load).sum(1), 1.0)
    for key in ("lr", "total", "ce", "load_balancing", "z", "grad_norm", "clipped_frac", "tokens", "elapsed_s"):
        assert key in trains[-1]
    on_disk = read_log(res.out_dir)
    assert [r["type"] for r in on_disk] == [r["type"] for r in res.log]
    assert on_disk[0]["event"] == "start" and on_disk[-1]["event"] == "stop"
    assert res.tokens_seen == 24 * 4 * 32


def test_router_snapshots_and_saturation(full_run):
    z = np.load(full_run.out_dir / SNAPSHOT_NAME)
    assert z["steps"].tolist() == [0, 8, 16, 24]
    S, L, N, k = z["indices"].shape
    assert (S, L, k) == (4, 2, 2) and N == len(z["probe_tokens"].reshape(-1)) == 3 * 32
    sat = router_saturation(z["indices"])
    assert sat.shape == (4, 2)
    assert np.allclose(sat[-1], 1.0)
    assert np.all((sat >= 0) & (sat <= 1))


def test_router_saturation_by_hand():
    # one layer, two tokens, k = 2; final choices {0, 1} and {2, 3}
    final = [[[0, 1], [2, 3]]]
    early = [[[1, 5], [6, 7]]]  # token 0 shares one of two experts, token 1 none
    sat = router_saturation(np.array([early, final]))
    assert sat.shape == (2, 1)
    assert sat[0, 0] == pytest.approx((1 / 2 + 0) / 2) and sat[1, 0] == 1.0
    with pytest.raises(ValueError, match="snapshots, layers, tokens, k"):
        router_saturation(np.zeros((2, 3, 2), dtype=int))


def test_two_runs_are_identical(corpus, tokenizer, full_run):
    again = run(corpus, tokenizer, None)
    assert same_params(again.model, full_run.model)
    assert [r["total"] for r in again.records("train")] == [r["total"] for r in full_run.records("train")]


def test_resume_is_bit_identical(corpus, tokenizer, full_run, tmp_path):
    first = run(corpus, tokenizer, tmp_path, max_steps=10)  # checkpoints at 8, and at the stop (10)
    assert first.step == 10 and (tmp_path / CKPT_NAME).exists()
    resumed = run(corpus, tokenizer, tmp_path, resume=True)
    assert resumed.step == 24
    assert same_params(resumed.model, full_run.model)
    # the interrupted run also logged, evaluated and snapshotted at its stop (step 10); every
    # record of the uninterrupted run is reproduced exactly
    steps = {r["step"] for r in full_run.log if r["type"] != "run"}
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}
                          for r in recs if r["step"] in steps]
    assert strip(resumed.records("train")) == strip(full_run.records("train"))
    assert strip(resumed.records("eval")) == strip(full_run.records("eval"))
    assert [r["event"] for r in read_log(tmp_path) if r["type"] == "run"] == ["start", "stop", "resume", "stop"]
    z = np.load(tmp_path / SNAPSHOT_NAME)
    assert z["steps"].tolist() == [0, 8, 10, 16, 24]
    keep = np.isin(z["steps"], full_run.snapshots["steps"])
    assert np.array_equal(z["indices"][keep], full_run.snapshots["indices"])
    n_records = len(read_log(tmp_path))
    again = run(corpus, tokenizer, tmp_path, resume=True)  # already finished: nothing to do
    assert again.step == 24 and same_params(again.model, full_run.model)
    assert len(read_log(tmp_path)) == n_records
    with pytest.raises(ValueError, match="different config"):
        run(corpus, tokenizer, tmp_path, resume=True, cfg=tiny_config(seed=1))


def test_gradient_clipping_is_applied(corpus, tokenizer, full_run):
    clipped = run(corpus, tokenizer, None, cfg=tiny_config(optim__grad_clip=1e-3, optim__steps=8, eval_every=8))
    assert all(r["clipped_frac"] == 1.0 and r["grad_norm"] > 1e-3 for r in clipped.records("train"))
    free = run(corpus, tokenizer, None, cfg=tiny_config(optim__grad_clip=0.0, optim__steps=8, eval_every=8))
    assert all(r["clipped_frac"] == 0.0 for r in free.records("train"))
    assert not same_params(clipped.model, free.model)


def test_load_balancing_coefficient_is_used(corpus, tokenizer):
    base = run(corpus, tokenizer, None, cfg=tiny_config(optim__steps=4, eval_every=4))
    off = run(corpus, tokenizer, None, cfg=tiny_config(optim__steps=4, eval_every=4, model__router_aux_loss_coef=0.0))
    b, o = base.records("train")[0], off.records("train")[0]
    assert b["total"] == pytest.approx(b["ce"] + 0.02 * b["load_balancing"], rel=1e-5)
    assert o["total"] == pytest.approx(o["ce"], rel=1e-6)
    per = run(corpus, tokenizer, None, cfg=tiny_config(optim__steps=4, eval_every=4, load_balancing="per_layer",
                                                       model__router_z_loss_coef=1e-3))
    p = per.records("train")[0]
    L = per.config.model.n_layers
    assert p["total"] == pytest.approx(p["ce"] + 0.02 * L * p["load_balancing_per_layer"] + 1e-3 * p["z"], rel=1e-5)
    assert p["load_balancing_per_layer"] == pytest.approx(2.0, abs=0.5)  # k at balance; near it at init
    with pytest.raises(ValueError, match="load_balancing"):
        tiny_config(load_balancing="sum")


# --------------------------------------------------------------------------------------------
# evaluation


def test_unigram_baseline_matches_hand_computation(corpus, tokenizer, tmp_path):
    td = tokenize_corpus(corpus, tokenizer, None, progress=False)
    held = {"code": pack_windows(td, "heldout", "code", 32, max_windows=2)}
    got = unigram_baseline(td, held, 32000)["code"]
    train = td.tokens["train"]["code"].astype(int)
    train = train[train != 1]
    y = held["code"][:, 1:].reshape(-1)
    y = y[y != 1]
    p = (np.bincount(train, minlength=32000)[y] + 1) / (len(train) + 32000)
    assert got == pytest.approx(float(-np.log(p).mean()))


def test_classify_domain_recognises_held_out_text(corpus, tokenizer):
    td = tokenize_corpus(corpus, tokenizer, None, progress=False)
    logprobs = {d: unigram_logprobs(td, d, 32000) for d in td.domains}
    for d in td.domains:
        for doc in td.documents("heldout", d)[:3]:
            assert classify_domain(doc[1:40], logprobs) == d
    # the same tokens read as whichever domain made them likely
    fake = {"a": np.log(np.full(10, 0.1)), "b": np.log(np.r_[np.full(5, 0.02), np.full(5, 0.18)])}
    assert classify_domain([7, 8, 9], fake) == "b" and classify_domain([0, 1, 7], fake) == "a"


def _sample_report(classified: dict[str, str]) -> dict:
    return {"ce_ratio": {"python": 0.5, "math": 0.3, "prose": 0.5}, "load": [[0.25] * 4],
            "repetition": [{"above_marginal": True}],
            "prose_ce_ratio": {"prose": 0.6},
            "everyday_nll": {lang: {"mean": 5.0, "tokens": 200, "sentences": 12} for lang in ("en", "fr")},
            "samples": [{"domain": d, "classified_as": c} for d, c in classified.items()]
            + [{"domain": "prose", "classified_as": "math"}]}  # not a checked domain


def test_quality_bar_prose_everyday_and_v3_criteria():
    ok = quality_bar(_sample_report({"python": "python", "math": "math"}))
    assert all(v["pass"] for k, v in ok.items() if k != "all_pass") and ok["all_pass"]
    assert ok["everyday_nll_at_most_5.5"]["worst_nll"] == 5.0
    cases = {  # one number off the bar -> that criterion (and only it) fails
        "prose_ce_at_most_70pct_of_unigram": lambda r: r["prose_ce_ratio"].update(prose=0.71),
        "everyday_nll_at_most_5.5": lambda r: r["everyday_nll"]["fr"].update(mean=5.51),
        "code_math_no_worse_than_v3": lambda r: r["ce_ratio"].update(math=0.33),
        "ce_at_most_70pct_of_unigram": lambda r: r["ce_ratio"].update(prose=0.71),
        "load_between_2_and_40pct": lambda r: r.update(load=[[0.41, 0.19, 0.2, 0.2]]),
    }
    for name, spoil in cases.items():
        rep = _sample_report({"python": "python", "math": "math"})
        spoil(rep)
        qb = quality_bar(rep)
        assert [k for k, v in qb.items() if k != "all_pass" and not v["pass"]] == [name] and not qb["all_pass"]
    rep = _sample_report({"python": "python", "math": "math"})
    rep["everyday_nll"]["en"]["sentences"] = 9  # fewer than 10 sentences: not a valid measurement
    assert quality_bar(rep)["everyday_nll_at_most_5.5"]["too_few_sentences"] == ["en"]
    for key in ("prose_ce_ratio", "everyday_nll"):  # missing numbers fail, saying what is missing
        rep = _sample_report({"python": "python", "math": "math"})
        del rep[key]
        qb = quality_bar(rep)
        assert not qb["all_pass"] and any("missing" in v for k, v in qb.items() if k != "all_pass")


def test_prose_documents_and_prose_ce(full_run, tokenizer, corpus):
    from moe_lab.train import pack_documents, prose_ce_report, prose_documents

    held = list(corpus.heldout)
    held[1] = Document(held[1].domain, "deb/pkg/page#1", held[1].text)  # mark two documents as real prose
    held[-1] = Document(held[-1].domain, "deb/pkg/page#2", held[-1].text)
    marked = Corpus(train=corpus.train, heldout=held, domains=corpus.domains)
    idx = prose_documents(marked, marked.domains)
    first, last = held[1].domain, held[-1].domain
    n_last = sum(d.domain == last for d in held)
    assert idx == ({first: [1, n_last - 1]} if first == last else {first: [1], last: [n_last - 1]})
    td = tokenize_corpus(marked, tokenizer, None, progress=False)
    rep = prose_ce_report(full_run.model, td, idx, seq_len=8)
    for d, positions in idx.items():
        docs = td.documents("heldout", d)
        w = pack_documents([docs[i] for i in positions], 8)
        ce = moe_lab.train.heldout_ce(full_run.model, {d: w}, td.bos_id)[d]
        assert rep["prose_heldout_ce"][d] == pytest.approx(ce)
        assert rep["prose_ce_ratio"][d] == pytest.approx(ce / unigram_baseline(td, {d: w}, 32000)[d])
        assert rep["prose_docs"][d] == len(positions)


def test_batch_schedule_probabilities_are_what_the_schedule_draws():
    from moe_lab.train import batch_schedule_probabilities

    p = batch_schedule_probabilities({"a": 10, "b": 30}, alpha=1.0, weights={"a": 3.0})
    assert p == pytest.approx({"a": 0.5, "b": 0.5})
    sched = batch_schedule({"a": 10, "b": 30}, steps=2000, batch_size=4, seed=0, alpha=1.0, weights={"a": 3.0})
    assert (sched[..., 0] == 0).mean() == pytest.approx(0.5, abs=0.03)


def test_quality_bar_checks_code_and_math_samples():
    ok = quality_bar(_sample_report({"python": "python", "math": "math"}))
    assert ok["code_math_samples_in_domain"] == {"pass": True, "in_domain": {"python": "1/1", "math": "1/1"}}
    assert ok["all_pass"]
    bad = quality_bar(_sample_report({"python": "prose", "math": "math"}))
    assert not bad["code_math_samples_in_domain"]["pass"] and not bad["all_pass"]
    assert bad["code_math_samples_in_domain"]["in_domain"]["python"] == "0/1"


def test_load_summary_is_analysis_load_balance_plus_extremes():
    shares = np.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    s = load_summary(shares)
    bal = analysis.load_balance(shares)
    assert s["min"] == [0.0, 0.25] and s["max"] == [0.5, 0.25]
    assert np.allclose(s["cv"], bal.cv) and np.allclose(s["entropy"], bal.normalized_entropy)
    assert s["entropy"][1] == pytest.approx(1.0) and s["cv"][1] == pytest.approx(0.0)
    over_steps = load_summary(np.stack([shares, shares]))  # [S, L, E] -> per step and layer
    assert np.array(over_steps["max"]).shape == (2, 2)


def test_card_routing_numbers_are_notebook_06s(full_run, tokenizer, corpus):
    """The card's load and repetition are moe_lab.analysis on a trace_routing trace of the same
    held-out documents: recomputing them the way notebook 06 does gives the same numbers."""
    td = tokenize_corpus(corpus, tokenizer, None, progress=False)
    docs = heldout_documents(td, max_docs=4, max_len=32)
    report = routing_report(moe_lab.trace_routing(full_run.model, docs, progress=False), td.bos_id, n_boot=50)
    trace = moe_lab.trace_routing(full_run.model, docs, progress=False, batch_size=3)  # other batches: same routing
    first = analysis.repetition(trace, "first", n_boot=50)
    anyk = analysis.repetition(trace, "any", n_boot=50)
    assert np.allclose(report["load"], analysis.expert_load(trace))
    assert [r["rate"] for r in report["repetition"]] == pytest.approx(first.rate.tolist())
    assert np.allclose([r["ci"] for r in report["repetition"]], np.stack([first.ci_low, first.ci_high], 1))
    assert [r["marginal"] for r in report["repetition"]] == pytest.approx(first.marginal.tolist())
    assert [r["above_marginal"] for r in report["repetition"]] == first.above_marginal().tolist()
    assert [r["any_rate"] for r in report["repetition"]] == pytest.approx(anyk.rate.tolist())
    assert report["routing_tokens"] == trace.n_tokens == sum(len(d) for ds in docs.values() for d in ds)
    assert report["load_by_domain"].keys() == docs.keys()


def test_evaluate_model_report(full_run, tokenizer, corpus):
    td = tokenize_corpus(corpus, tokenizer, None, progress=False)
    rep = evaluate_model(full_run.model, td, tokenizer, seq_len=32, eval_tokens_per_domain=128, n_boot=50,
                         max_docs=4)
    assert set(rep["heldout_ce"]) == set(rep["unigram_ce"]) == {"numbers", "code", "prose"}
    assert np.array(rep["load"]).shape == (2, 4) and np.allclose(np.array(rep["load"]).sum(1), 1)
    assert len(rep["repetition"]) == 2
    assert {"rate", "uniform", "marginal", "shuffled", "ci", "above_marginal", "any_rate"} <= set(rep["repetition"][0])
    assert {s["domain"] for s in rep["samples"]} >= {"numbers", "code", "prose", "python", "math"}
    qb = quality_bar(rep)
    assert set(qb) == {"ce_at_most_70pct_of_unigram", "load_between_2_and_40pct",
                       "repetition_above_marginal_in_half_the_layers", "all_pass", "prose_ce_at_most_70pct_of_unigram",
                       "everyday_nll_at_most_5.5", "code_math_no_worse_than_v3"}
    assert set(rep["everyday_nll"]) == {"en", "fr", "de", "es", "it"}  # the shipped everyday sentences
    assert rep["everyday_nll"]["fr"]["sentences"] >= 10 and rep["everyday_uniform_nll"] == pytest.approx(math.log(32000))
    assert rep["everyday_nll"]["de"]["mean"] == pytest.approx(
        moe_lab.evalset.sentence_nll(full_run.model, tokenizer)["de"])
    assert not qb["prose_ce_at_most_70pct_of_unigram"]["pass"]  # this corpus has no real prose: fails, says so
    json.dumps(rep)  # the report is JSON-able


def test_export_loads_in_moe_lab_and_transformers(full_run, tmp_path):
    pytest.importorskip("transformers")
    from moe_lab.train import check_against_transformers, save_hf_checkpoint

    (tmp_path / "MODEL_CARD.md").write_text("kept")
    save_hf_checkpoint(full_run.model, tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "MODEL_CARD.md").read_text() == "kept"
    chk = check_against_transformers(tmp_path, torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0)))
    assert chk["max_abs_diff"] < 1e-4 and chk["argmax_agree"] == 1.0


def test_export_run_writes_card(full_run, corpus, tokenizer, tmp_path):
    pytest.importorskip("transformers")
    from moe_lab.train import export_run

    rep = export_run(full_run.out_dir, tmp_path, corpus=corpus, tokenizer=tokenizer, n_boot=50, progress=False)
    for name in ("config.json", "model.safetensors", "MODEL_CARD.md", LOG_NAME, SNAPSHOT_NAME, "evaluation.json"):
        assert (tmp_path / name).exists(), name
    card = (tmp_path / "MODEL_CARD.md").read_text()
    for heading in ("## Reproduce", "## Held-out cross-entropy", "## Expert load", "## Consecutive tokens",
                    "## Greedy samples", "## Quality bar", "## Loading check", "## What it was trained on",
                    "## How well it knows each language"):
        assert heading in card
    for lang, v in rep["everyday_nll"].items():  # the language table shows the report's numbers
        assert f"| {lang} ({v['domain']}) | {v['sentences']} | {v['tokens']:,} | {v['mean']:.2f} |" in card
    mix = rep["training_data"]["domain_mix"]
    assert sum(m["probability"] for m in mix.values()) == pytest.approx(1.0) and set(mix) == set(corpus.domains)
    assert "everyday sentences: mean NLL <= 5.5" in card and "no real-prose held-out pages" in card
    assert rep["transformers_check"]["max_abs_diff"] < 1e-3
    assert json.loads((tmp_path / "evaluation.json").read_text())["heldout_ce"] == pytest.approx(rep["heldout_ce"])


# --------------------------------------------------------------------------------------------
# the demo model's config and shipped files


def test_demo_config_meets_the_spec():
    cfg = load_config(REPO / "configs" / "tiny-mixtral.json")
    a = cfg.model
    assert (a.n_experts, a.experts_per_token, a.rope_theta, a.vocab_size) == (8, 2, 1e6, 32000)
    assert a.n_kv_heads < a.n_heads, "grouped-query attention"
    assert a.router_aux_loss_coef == 0.02
    assert 2 * count_params(a).total <= 64e6, "bf16 checkpoint must fit in 64 MB"
    assert cfg.device == "cpu"
    assert load_config("tiny-mixtral").to_dict() == cfg.to_dict()


def test_shipped_demo_model():
    path = REPO / "data" / "tiny-mixtral"
    if not (path / "model.safetensors").exists():
        pytest.skip("data/tiny-mixtral not exported yet")
    assert (path / "model.safetensors").stat().st_size <= 64 * 2**20
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2 and cfg["vocab_size"] == 32000
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"] and not cfg.get("tie_word_embeddings", False)
    for name in ("MODEL_CARD.md", LOG_NAME, "evaluation.json"):
        assert (path / name).exists(), name


def test_router_saturation_never_counts_an_empty_slot():
    """-1 (a token a capacity dropped) chooses no expert: empty in both snapshots is no match."""
    from moe_lab.train.evaluate import router_saturation

    snaps = np.array([[[[0, -1], [1, 2]]], [[[0, -1], [2, 1]]]])  # [S=2, L=1, N=2, k=2]
    sat = router_saturation(snaps)
    assert sat.shape == (2, 1) and sat[0, 0] == (1 / 2 + 2 / 2) / 2  # token 0: expert 0 only; token 1: both
    assert sat[1, 0] == 0.75  # the final snapshot against itself: the empty slot still counts for nothing
