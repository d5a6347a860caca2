"""The everyday evaluation sentences (data/eval/everyday_sentences.json) and their NLL."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_model
from moe_lab import corpus as mc
from moe_lab.evalset import EVAL_LANGS, load_eval_sentences, sentence_nll, token_nlls
from moe_lab.model import ModelArgs
from moe_lab.tokenizer import load_tokenizer

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=32, vocab_size=32000,
                 max_seq_len=128, n_experts=4, experts_per_token=2, init_std=0.05)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_at_least_ten_distinct_sentences_per_language():
    s = load_eval_sentences()
    assert set(s) == set(EVAL_LANGS)
    for lang, texts in s.items():
        assert len(texts) >= 10 and len(set(texts)) == len(texts), lang
        assert all(len(t.split()) >= 5 for t in texts)
    assert len({len(v) for v in s.values()}) == 1  # the same sentences in every language


def test_sentences_appear_in_no_corpus_source():
    """No sentence, and no run of 6 of its words, occurs in the (v3, small) corpus."""
    c = mc.build_corpus(None, size="small", seed=0, progress=False,
                        domains=["english", "french", "german", "spanish", "italian"])
    text = "\n".join(d.text for d in c.train + c.heldout)
    for lang, sentences in load_eval_sentences().items():
        for s in sentences:
            w = s.split()
            assert not any(" ".join(w[i:i + 6]) in text for i in range(len(w) - 5)), (lang, s)


def test_bad_file_names_the_problem(tmp_path):
    p = tmp_path / "e.json"
    p.write_text(json.dumps({"sentences": [{"id": "x", "en": "a b c", "fr": "a b c"}]}))
    with pytest.raises(ValueError, match="'de'"):
        load_eval_sentences(p)
    with pytest.raises(FileNotFoundError):
        load_eval_sentences(tmp_path / "missing.json")


def test_zero_output_layer_scores_a_uniform_guess(tok):
    model = make_model(ARGS)
    with torch.no_grad():
        model.output.weight.zero_()  # every logit 0: each token costs ln(V)
    nll = sentence_nll(model, tok, {"en": ["The cat sleeps on the warm windowsill today."]})
    assert nll["en"] == pytest.approx(math.log(ARGS.vocab_size), abs=1e-5)


def test_mean_pools_tokens_and_matches_a_direct_computation(tok):
    model = make_model(ARGS, seed=3)
    texts = ["A short one here.", "A much longer sentence about walking to the station in the rain."]
    out = sentence_nll(model, tok, {"en": texts}, per_sentence=True)["en"]
    direct = []
    for t in texts:  # log-softmax of the full sequence's logits, gathered at the next tokens
        ids = torch.tensor([tok.encode(t, bos=True)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).float(), -1)[0, :-1]
        direct.append(-logp.gather(1, ids[0, 1:, None])[:, 0])
    assert out["tokens"] == sum(len(d) for d in direct)
    assert out["mean"] == pytest.approx(float(torch.cat(direct).mean()), rel=1e-5)
    assert out["sentences"] == pytest.approx([float(d.mean()) for d in direct], rel=1e-5)
    assert len(token_nlls(model, tok, texts[0])) == len(tok.encode(texts[0], bos=False))
    assert model.training is False


def test_aligned_sample_is_held_out_and_complete():
    from moe_lab.evalset import load_aligned_sample
    from moe_lab.corpus.prose import is_heldout_page

    from moe_lab.corpus.prose import has_near_copies

    rows = load_aligned_sample()
    assert len(rows) == 61 and len({r["id"] for r in rows}) == 61
    for r in rows:
        assert r["split"] == "heldout" and is_heldout_page(r["source"], r["page"])
        # five translated texts: not merely different (quote marks) but no two near copies
        assert not has_near_copies(r[lang] for lang in EVAL_LANGS), r["id"]


def test_near_copies_are_not_translations():
    """The builder's test catches a paragraph left in English with other quote marks, and passes a
    real translation."""
    from moe_lab.corpus.prose import has_near_copies

    en = 'APT will never install an older version of a package (that is, a "downgrade").'
    assert has_near_copies([en, en.replace('"', "«", 1).replace('"', "»")])
    assert not has_near_copies([en, "APT n'installera jamais une version plus ancienne d'un paquet."])


def test_the_study_runs_on_the_sample(tok):
    """The language-vs-content study end to end (trace, usage, hidden states) on a tiny model."""
    from moe_lab import analysis as A
    from moe_lab.evalset import load_aligned_sample
    from moe_lab.routing.tracing import trace_routing

    rows = load_aligned_sample()[:4]
    texts = [r[lang] for r in rows for lang in EVAL_LANGS]
    paragraphs = [r["id"] for r in rows for _ in EVAL_LANGS]
    languages = [lang for _ in rows for lang in EVAL_LANGS]
    model = make_model(ARGS)
    trace = trace_routing(model, texts, tokenizer=tok, max_len=32, progress=False)
    result = A.language_vs_content(trace, paragraphs, languages, n_boot=50, n_shuffle=5)
    assert result.n_paragraphs == 4 and result.same_content.shape == (ARGS.n_layers,)
    hidden = A.mean_router_inputs(model, [tok.encode(t)[:32] for t in texts])
    control = A.hidden_state_control(trace, hidden, paragraphs, languages, n_boot=50, n_shuffle=5)
    assert np.all((control.r2 >= 0) & (control.r2 <= 1))
