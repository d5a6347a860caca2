"""The shipped demo model (data/tiny-mixtral) meets issue 12's quality bar, and its card says so truthfully.

What can be recomputed without the corpus is recomputed here: the everyday-sentence NLL per
language (data/eval), the expert shares on held-out real prose (data/eval/aligned_heldout.jsonl),
and the logits of transformers' MixtralForCausalLM on the same files. The card's and
evaluation.json's verdicts must all be "pass" and agree with the numbers behind them.

This test fails on a model that does not meet the bar (the v3 model did not: it scored 7.8-9.7
nats/token on French, German, Spanish and Italian everyday sentences). Nothing is marked xfail.

The shipped v4 model misses three criteria, all on English, listed in KNOWN_MISSES with the measured values (issue 12
stays open for them). For those the test checks the opposite: that evaluation.json and the card
*report* them as failing. A known miss that starts to pass fails the test, so the list cannot go stale.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import moe_lab
from moe_lab import analysis
from moe_lab.demo import demo_model_available, demo_model_dir
from moe_lab.evalset import EVAL_LANGS, load_aligned_sample, load_eval_sentences, sentence_nll
from moe_lab.train import EVERYDAY_MIN_SENTENCES, EVERYDAY_NLL_MAX, LOAD_RANGE, quality_bar

pytestmark = pytest.mark.skipif(not demo_model_available(), reason="data/tiny-mixtral not present")

#: every criterion of issue 12's quality bar: evaluation.json must carry each one's verdict
REQUIRED = ("ce_at_most_70pct_of_unigram", "prose_ce_at_most_70pct_of_unigram", "everyday_nll_at_most_5.5",
            "code_math_no_worse_than_v3", "load_between_2_and_40pct",
            "repetition_above_marginal_in_half_the_layers", "code_math_samples_in_domain")


#: criteria the shipped v4 model does not meet, all on English (measured at export: everyday NLL 5.53 > 5.5;
#: held-out ratio 0.702 > 0.70 on the whole English domain and 0.718 on its real prose)
KNOWN_MISSES = {"everyday_nll_at_most_5.5": {"en"},
                "prose_ce_at_most_70pct_of_unigram": {"english"},
                "ce_at_most_70pct_of_unigram": {"english"}}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return moe_lab.load_demo_model()


@pytest.fixture(scope="module")
def tokenizer():
    return moe_lab.load_tokenizer()


@pytest.fixture(scope="module")
def evaluation() -> dict:
    ev = json.loads((demo_model_dir() / "evaluation.json").read_text(encoding="utf-8"))
    missing = [k for k in ("everyday_nll", "prose_ce_ratio", "training_data") if k not in ev]
    assert not missing, f"evaluation.json lacks {missing}: re-export the model with the v4 evaluation"
    return ev


@pytest.fixture(scope="module")
def card() -> str:
    return (demo_model_dir() / "MODEL_CARD.md").read_text(encoding="utf-8")


def _section(card: str, heading: str) -> str:
    assert f"## {heading}" in card, f"MODEL_CARD.md has no '## {heading}' section"
    return card.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def _table_rows(section: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|")]
    return [r for r in rows[2:]]  # header and --- line left out


def test_evaluation_has_every_verdict_and_all_pass(evaluation):
    qb = evaluation["quality_bar"]
    missing = [k for k in REQUIRED if k not in qb]
    assert not missing, f"evaluation.json lacks the verdicts {missing}: re-export the model with the v4 evaluation"
    failing = {k: qb[k] for k in REQUIRED if not qb[k]["pass"]}
    assert set(failing) == set(KNOWN_MISSES), (
        f"quality bar: failing {sorted(failing)}, known misses {sorted(KNOWN_MISSES)}; a new failure is a "
        f"regression, a known miss that passes now should leave KNOWN_MISSES: {failing}")
    assert qb["all_pass"] == (not KNOWN_MISSES)


def test_verdicts_follow_from_the_stored_numbers(evaluation):
    """quality_bar() on evaluation.json's own numbers gives the stored verdicts (nothing edited by hand)."""
    assert json.loads(json.dumps(quality_bar(evaluation))) == evaluation["quality_bar"]


def test_card_quality_bar_rows_all_pass(card, evaluation):
    rows = _table_rows(_section(card, "Quality bar"))
    assert len(rows) == len([k for k in evaluation["quality_bar"] if k != "all_pass"])
    not_passing = [r for r in rows if r[1] != "pass"]
    assert len(not_passing) == len(KNOWN_MISSES), f"the card's quality bar rows that do not pass: {not_passing}"


def test_everyday_nll_recomputed_matches_card_and_meets_target(model, tokenizer, evaluation, card):
    sentences = load_eval_sentences()
    assert set(sentences) == set(EVAL_LANGS)
    assert all(len(v) >= EVERYDAY_MIN_SENTENCES for v in sentences.values()), "fewer than 10 sentences in a language"
    nll = sentence_nll(model, tokenizer, sentences, per_sentence=True)
    stored = evaluation["everyday_nll"]
    table = {r[0].split()[0]: r for r in _table_rows(_section(card, "How well it knows each language"))}
    for lang in EVAL_LANGS:
        assert nll[lang]["mean"] == pytest.approx(stored[lang]["mean"], abs=1e-3), lang
        assert nll[lang]["tokens"] == stored[lang]["tokens"] and len(nll[lang]["sentences"]) == stored[lang]["sentences"]
        if lang in KNOWN_MISSES["everyday_nll_at_most_5.5"]:
            assert nll[lang]["mean"] > EVERYDAY_NLL_MAX, f"{lang} now meets the target: remove it from KNOWN_MISSES"
        else:
            assert nll[lang]["mean"] <= EVERYDAY_NLL_MAX, f"{lang}: {nll[lang]['mean']:.2f} nats/token > {EVERYDAY_NLL_MAX}"
        assert table[lang][3] == f"{stored[lang]['mean']:.2f}", f"the card's {lang} row disagrees with evaluation.json"


def test_card_names_every_prose_source(card, evaluation):
    sources = evaluation["training_data"]["prose_sources"]
    assert {s["package"] for s in sources} >= {"debian-handbook"}
    section = _section(card, "What it was trained on")
    for s in sources:
        assert f"`{s['package']}` | {s['version']} | {s['licence']}" in section, s["package"]
    for lang in evaluation["prose_ce_ratio"]:  # every language domain's real prose was scored on its own
        assert re.search(rf"\| {lang}: real prose only \(\d+ documents\)", card), lang
    assert set(evaluation["prose_ce_ratio"]) == {"english", "french", "german", "spanish", "italian"}


def test_expert_shares_on_heldout_prose(model, tokenizer, evaluation):
    """On held-out real prose in all five languages (not the corpus windows the card used), every
    expert still gets 2-40% of the assignments in every layer; the stored shares are in range too."""
    rows = load_aligned_sample()[:24]
    trace = moe_lab.trace_routing(model, {lang: [r[lang] for r in rows] for lang in EVAL_LANGS},
                                  tokenizer=tokenizer, progress=False)
    load = analysis.expert_load(trace)  # [L, E]
    lo, hi = LOAD_RANGE
    assert load.shape == (model.args.n_layers, model.args.n_experts)
    assert load.min() >= lo and load.max() <= hi, f"expert shares {load.min():.3f}-{load.max():.3f}"
    stored = np.asarray(evaluation["load"])
    assert stored.shape == load.shape and stored.min() >= lo and stored.max() <= hi
    assert evaluation["quality_bar"]["load_between_2_and_40pct"]["min"] == pytest.approx(stored.min())


def test_transformers_parity_fp32(model, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32).eval()
    texts = [s[0] for s in load_eval_sentences().values()]
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text, bos=True)])
        with torch.no_grad():
            diff = (model(ids) - hf(ids).logits).abs().max().item()
        assert diff <= 1e-4, f"max |logit difference| {diff:.2e} on {text!r}"
