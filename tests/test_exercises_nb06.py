"""Notebook 06's exercise checkers: the right answer passes, None is todo, typical mistakes are
wrong with a message that names them. A seeded random tiny model, so no demo model is needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_lab
from moe_lab import analysis
from moe_lab.exercises import nb06 as ex

TEXTS = {
    "english": ["The server will restart at midnight, so please save your work before you leave.",
                "Walking to the station in the rain, she remembered that the shop closes early on Sundays."],
    "french": ["Le serveur redémarrera à minuit, alors enregistrez votre travail avant de partir.",
               "En marchant vers la gare sous la pluie, elle se souvint que le magasin ferme tôt le dimanche."],
    "python": ["def parse(path):\n    with open(path) as fh:\n        return [line.strip() for line in fh]\n"],
}


@pytest.fixture(scope="module")
def trace():
    torch.manual_seed(0)
    model = moe_lab.Mixtral(moe_lab.ModelArgs.from_name("tiny")).eval()
    return moe_lab.trace_routing(model, TEXTS, tokenizer=moe_lab.load_tokenizer(), progress=False)


def _status(fb):
    return fb.status, fb.message


def test_marginal_baseline(trace):
    layer = trace.layers[-1]
    p = analysis.expert_load(trace, "first")[-1]
    assert ex.check_marginal_baseline(float((p ** 2).sum()), trace, layer).status == "correct"
    assert ex.check_marginal_baseline(None, trace, layer).status == "todo"
    fb = ex.check_marginal_baseline(1 / trace.n_experts, trace, layer)
    assert fb.status == "wrong" and "uniform" in fb.message and fb.hint
    either = analysis.expert_load(trace)[-1]
    assert "top-k" in ex.check_marginal_baseline(float((either ** 2).sum()), trace, layer).message
    assert "one number" in ex.check_marginal_baseline(p ** 2, trace, layer).message  # forgot to sum
    assert ex.check_marginal_baseline(float((p ** 2).sum()), trace, trace.layers[0]).status in ("wrong", "correct")
    ref = float((p ** 2).sum())
    rounded = ex.check_marginal_baseline(round(ref, 4) + (1e-5 if round(ref, 4) == ref else 0), trace, layer)
    assert rounded.status == "wrong" and "rounded" in rounded.message  # not "expected 0.1337, found 0.1337"
    off = ex.check_marginal_baseline(ref + 0.01, trace, layer)
    assert off.status == "wrong" and f"{ref:.4f}" not in off.message  # the reference is not printed


def test_word_start_repetition(trace):
    layer = trace.layers[1]
    first = trace.expert_ids[1, :, 0]
    rates = []
    for word_start in (True, False):  # computed here by a plain loop, independently of the checker
        same = total = 0
        for i in range(trace.n_tokens - 1):
            if trace.doc_ids[i] != trace.doc_ids[i + 1] or 1 in (trace.token_ids[i], trace.token_ids[i + 1]):
                continue
            if word_start and not trace.pieces[i + 1].startswith("▁"):
                continue
            same += first[i] == first[i + 1]
            total += 1
        rates.append(same / total)
    assert ex.check_word_start_repetition(rates[0], trace, layer).status == "correct"
    assert ex.check_word_start_repetition(None, trace, layer).status == "todo"
    if not np.isclose(rates[0], rates[1]):
        fb = ex.check_word_start_repetition(rates[1], trace, layer)
        assert fb.status == "wrong" and "mask" in fb.message
    assert "percentage" in ex.check_word_start_repetition(100 * rates[0], trace, layer).message
    with_bos = ex.same_first_rate(trace, layer, word_start_only=True, bos_id=-1)  # pairs starting at BOS kept
    if not np.isclose(with_bos, rates[0]):
        assert "BOS" in ex.check_word_start_repetition(with_bos, trace, layer).message
    off = ex.check_word_start_repetition(rates[0] + 0.05, trace, layer)
    assert f"{rates[0]:.4f}" not in str(off) and f"{rates[0]:.3f}" not in str(off)  # never the reference
    assert ex.check_word_start_repetition(rates[0] + 0.05, trace, layer).status == "wrong"


def _usage_by_hand(tr, layer, *, bos=True, first_only=False):
    """Independent of the library: a plain loop over tokens."""
    row = tr.layer_index(layer)
    out = np.zeros((tr.n_docs, tr.n_experts))
    for i in range(tr.n_tokens):
        if bos and tr.token_ids[i] == 1:
            continue
        for e in tr.expert_ids[row, i, :1 if first_only else None]:
            out[tr.doc_ids[i], e] += 1
    return out / out.sum(1, keepdims=True)


def test_expert_usage(trace):
    layer = trace.layers[2]
    assert ex.check_expert_usage(_usage_by_hand, trace, layer).status == "correct"
    assert ex.check_expert_usage(None, trace, layer).status == "todo"
    assert ex.check_expert_usage(lambda tr, l: None, trace, layer).status == "todo"
    fb = ex.check_expert_usage(analysis.expert_usage(trace)[2], trace, layer)  # a pasted value
    assert fb.status == "wrong" and "takes your function" in fb.message
    fb = ex.check_expert_usage(lambda tr, l: analysis.expert_usage(tr)[tr.layer_index(l)], trace, layer)
    assert fb.status == "wrong" and "calls the library" in fb.message
    assert "shape" in ex.check_expert_usage(lambda tr, l: _usage_by_hand(tr, l).T, trace, layer).message
    assert "BOS" in ex.check_expert_usage(lambda tr, l: _usage_by_hand(tr, l, bos=False), trace, layer).message
    assert "sum to 1" in ex.check_expert_usage(lambda tr, l: 10 * _usage_by_hand(tr, l), trace, layer).message
    fb = ex.check_expert_usage(lambda tr, l: _usage_by_hand(tr, l, first_only=True), trace, layer)
    assert fb.status == "wrong" and "first choice" in fb.message
    # the row of expert_ids taken as the layer number: right on a trace whose layers are 0..L-1, not on the checker's
    fb = ex.check_expert_usage(lambda tr, l: _usage_by_hand(tr, tr.layers[l]) if l < tr.n_layers else None,
                               trace, layer)
    assert fb.status in ("wrong", "todo") and not fb


def test_graded_questions(trace):
    layer = trace.layers[1]
    letters = [x for x in "abc" if ex.check_word_start_drop(x, trace, layer)]
    assert len(letters) == 1
    diff = ex.same_first_rate(trace, layer, True) - ex.same_first_rate(trace, layer)
    assert letters == ["a" if diff < -0.01 else "c" if diff > 0.01 else "b"]
    for check, right in ((ex.check_baseline_reading, "b"), (ex.check_mediator_reading, "a")):
        assert check(right) and check(f"({right.upper()})") and check(None).status == "todo"
        for other in "abcd".replace(right, ""):
            fb = check(other)
            assert fb.status == "wrong" and f"({right})" not in str(fb) and f"not ({other})" in fb.message
        assert "one letter" in check("e").message and "one letter" in check(2).message


def test_first_choice_divergence(trace):
    layer = trace.layers[0]
    docs = np.array(trace.domains)
    a = analysis.expert_load(trace.select(domain="python"), "first")[0]
    b = analysis.expert_load(trace.select(docs=np.flatnonzero(docs != "python")), "first")[0]
    tv = 0.5 * np.abs(a - b).sum()
    assert ex.check_first_choice_divergence(tv, trace, "python", layer).status == "correct"
    assert ex.check_first_choice_divergence(None, trace, "python", layer).status == "todo"
    assert "half" in ex.check_first_choice_divergence(2 * tv, trace, "python", layer).message
    fb = ex.check_first_choice_divergence(tv + 0.1, trace, "python", layer)
    assert fb.status == "wrong" and fb.hint and "not equal" in fb.message  # never the reference value (issue 27)
    with pytest.raises(moe_lab.exercises.ExerciseError, match="06.4"):
        ex.check_first_choice_divergence(tv + 0.1, trace, "python", layer).require()
