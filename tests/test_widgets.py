"""The routing explorer, driven through its callbacks (no browser needed)."""

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")

from moe_lab import viz
from moe_lab.model import Mixtral, ModelArgs
from moe_lab.tokenizer import load_tokenizer
from moe_lab.widgets import RoutingExplorer, explore, intervention_effect, widget_frontend

ARGS = ModelArgs(dim=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=48, vocab_size=32000,
                 max_seq_len=128, n_experts=4, experts_per_token=2, init_std=0.2)
SAMPLES = {"python": ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())"],
           "english": ["The cat sat on the mat and looked at the dog."]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mixtral(ARGS).eval()


@pytest.fixture(scope="module")
def model2():
    torch.manual_seed(1)
    return Mixtral(ARGS.replace(n_layers=2, n_experts=8)).eval()


def colors(fig):
    return list(fig.data[0].marker.color)


def first_choice_colors(ex, layer):
    return [viz.expert_color(e) for e in ex.trace.expert_ids[ex.trace.layer_index(layer), :, 0]]


def test_text_and_layer_drive_the_figures(model, tok):
    ex = RoutingExplorer(model, tok, samples=SAMPLES)
    assert ex.text == SAMPLES["python"][0] and ex.domain == "python" and ex.layer == 0
    assert colors(ex.token_fig) == first_choice_colors(ex, 0)

    ex.set_text("Hello world, this is a test of the routing explorer.")
    assert ex.ids == tok.encode(ex.text) and ex.trace.n_tokens == len(ex.ids)
    assert list(ex.token_fig.data[0].text)[1] == " Hello"
    assert colors(ex.token_fig) == first_choice_colors(ex, 0)

    ex.set_layer(2)
    assert ex.token_fig.layout.meta["layers"] == [2]
    assert colors(ex.token_fig) == first_choice_colors(ex, 2)
    assert colors(ex.token_fig) != [viz.expert_color(e) for e in ex.trace.expert_ids[0, :, 0]]  # really layer 2
    bars = [d for d in ex.load_fig.data if d.type == "bar" and d.x[0] is not None]
    np.testing.assert_allclose(bars[0].y, np.bincount(ex.trace.expert_ids[2].ravel(), minlength=4) / (2 * len(ex.ids)))

    table = ex.table
    assert len(table) == len(ex.ids)
    np.testing.assert_array_equal(table["expert 1"], ex.trace.expert_ids[2, :, 0])
    np.testing.assert_allclose(table["weight 1"] + table["weight 2"], 1, atol=1e-5)
    assert (table.entropy > 0).all()

    with pytest.raises(KeyError, match="layer 7"):
        ex.set_layer(7)
    with pytest.raises(ValueError):
        ex.set_text("   ")


def test_samples_and_models(model, model2, tok):
    ex = RoutingExplorer(model, tok, samples=SAMPLES, models={"other": model2}, layer=2)
    assert list(ex.models) == ["model", "other"]
    ex.set_sample("english", 0)
    assert ex.text == SAMPLES["english"][0] and ex.trace.domains == ["english"] and ex.sample == ("english", 0)
    ex.set_model("other")
    assert ex.model_name == "other" and ex.layers == [0, 1] and ex.layer == 0  # layer 2 does not exist there
    assert ex.n_experts == 8
    assert colors(ex.token_fig) == first_choice_colors(ex, 0)
    with pytest.raises(KeyError):
        ex.set_model("missing")
    with pytest.raises(KeyError):
        ex.set_sample("klingon")


def test_widget_controls_call_the_callbacks(model, model2, tok):
    ex = RoutingExplorer(model, tok, samples=SAMPLES, models={"other": model2})
    w = ex.widget
    assert w is ex.widget  # built once
    ex.w_layer.value = 1
    assert ex.layer == 1 and colors(ex.token_fig) == first_choice_colors(ex, 1)
    assert ex.out_tokens.outputs[0]["data"]["application/vnd.plotly.v1+json"]["data"][0]["marker"]["color"] \
        == first_choice_colors(ex, 1)
    ex.w_text.value = "A brand new text"
    assert ex.text == "A brand new text" and ex.w_sample.value is None
    ex.w_sample.value = ("python", 1)
    assert ex.text == SAMPLES["python"][1] and ex.w_text.value == ex.text
    ex.set_layer(2)  # code -> widget
    assert ex.w_layer.value == 2
    ex.w_model.value = "other"
    assert ex.model_name == "other" and list(ex.w_layer.options) == [0, 1] and ex.w_layer.value == 0
    assert list(ex.w_expert.options) == list(range(8))
    ex.w_layer.value = 1
    ex.w_kind.value, ex.w_expert.value, ex.w_iv_layer.value = "ablate", 3, 0
    ex.w_apply.click()
    assert ex.effect is not None and (ex.effect.kind, ex.effect.expert, ex.effect.layer) == ("ablate", 3, 0)
    assert (ex.w_kind.value, ex.w_expert.value, ex.w_iv_layer.value) == ("ablate", 3, 0)  # choices kept
    ex.w_iv_layer.value = 1
    ex.w_apply.click()
    assert ex.effect.layer == 1 and ex.w_iv_layer.value == 1 and ex.w_expert.value == 3
    assert "switched off" in ex.w_effect.value and ex.out_change.outputs
    ex.w_clear.click()
    assert ex.effect is None and ex.out_change.outputs == ()
    # an error in a callback is shown in the status line, not raised into the front-end
    ex._from_widget(ex.set_text, "")
    assert "ValueError" in ex.w_status.value


def test_ablation_changes_exactly_the_tokens_that_used_the_expert(model, tok):
    ex = RoutingExplorer(model, tok, text="The quick brown fox jumps over the lazy dog. " * 3)
    layer = 1
    ids = ex.trace.expert_ids[layer]
    expert = int(np.bincount(ids.ravel(), minlength=4).argmax())
    eff = ex.apply_intervention("ablate", expert, layer)
    ch = eff.changes()
    assert (ch[ch.layer < layer][["first_choice_changed", "topk_set_changed"]] == 0).all().all()  # causal
    used = (ids == expert).any(-1).mean()
    assert ch.set_index("layer").loc[layer, "topk_set_changed"] == pytest.approx(used)
    assert not (eff.new_trace.expert_ids[layer] == expert).any()
    assert eff.new_probs.sum() == pytest.approx(1, abs=1e-4)
    assert eff.kl >= 0
    # figures reflect it
    fig = ex.routing_change_fig
    assert list(fig.data[0].y) == pytest.approx(list(ch.topk_set_changed))
    assert ex.next_token_fig.layout.meta["kl"] == pytest.approx(eff.kl, rel=1e-6)
    assert len(ex.next_token_fig.data) == 2

    force = ex.apply_intervention("force", expert=0, layer=2)
    assert (force.new_trace.expert_ids[2, :, 0] == 0).all()
    assert force.changes().set_index("layer").loc[[0, 1]].values.sum() == 0
    ex.set_text("new text")  # a new text forgets the intervention
    assert ex.effect is None and ex.routing_change_fig is None
    with pytest.raises(ValueError):
        ex.apply_intervention("ablate", 9, 0)
    with pytest.raises(ValueError):
        intervention_effect(model, ex.ids, "remove", 0, 0)


def test_ablation_modes_swap_and_steering(model, tok):
    ex = RoutingExplorer(model, tok, text="The quick brown fox jumps over the lazy dog. " * 3)
    layer = 1
    ids = ex.trace.expert_ids[layer]
    expert = int(np.bincount(ids.ravel(), minlength=4).argmax())
    used = (ids == expert).any(-1)
    zero = ex.apply_intervention("zero", expert, layer)
    assert np.array_equal(zero.new_trace.expert_ids[layer], ids)  # routing kept at the layer...
    assert (zero.new_trace.weights[layer][ids == expert] == 0).all() and zero.kl > 0  # ...its slot emptied
    assert "contribution zeroed" in zero.summary(tok)
    other = (expert + 1) % 4
    swap = ex.apply_intervention("swap", expert, layer, replacement=other)
    assert np.array_equal(swap.new_trace.expert_ids[layer], ids) and swap.kl > 0
    assert f"replaced by expert {other}" in ex.next_token_fig.data[1].name
    rare = int(np.bincount(ids.ravel(), minlength=4).argmin())
    steer = ex.apply_intervention("steer", rare, layer, offset=50.0)
    assert (steer.new_trace.expert_ids[layer] == rare).any(-1).all()  # in every token's top-k
    assert steer.offset == 50.0 and "+50 on its logit" in steer.summary()
    assert ex.apply_intervention("steer", rare, layer, offset=0.0).kl == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="needs replacement"):
        ex.apply_intervention("swap", expert, layer)
    with pytest.raises(ValueError, match="is the expert itself"):
        ex.apply_intervention("swap", expert, layer, replacement=expert)
    with pytest.raises(ValueError, match="needs offset"):
        ex.apply_intervention("steer", expert, layer)
    assert used.any()
    # the widget offers the five kinds; swap and steer show their extra control
    w = ex.widget
    assert w is not None and [v for _, v in ex.w_kind.options] == ["ablate", "zero", "swap", "steer", "force"]
    ex.w_kind.value = "swap"
    assert ex.w_replacement.layout.display is None and ex.w_offset.layout.display == "none"
    ex.w_expert.value, ex.w_replacement.value, ex.w_iv_layer.value = expert, other, layer
    ex.w_apply.click()
    assert (ex.effect.kind, ex.effect.replacement) == ("swap", other) and "replaced by" in ex.w_effect.value
    ex.w_kind.value = "steer"
    assert ex.w_offset.layout.display is None and ex.w_replacement.layout.display == "none"
    ex.w_expert.value, ex.w_offset.value = rare, 8.0
    ex.w_apply.click()
    assert (ex.effect.kind, ex.effect.offset, ex.effect.expert) == ("steer", 8.0, rare)
    ex.w_kind.value = "zero"
    ex.w_apply.click()
    assert ex.effect.kind == "zero" and ex.effect.offset is None


def test_explore_without_a_frontend_shows_static_output(model, tok, capsys):
    assert widget_frontend() == "none"  # pytest: plain Python
    ex = explore(model, tok, samples=SAMPLES)
    out = capsys.readouterr().out
    assert "expert 1" in out and "layer 0" in out
    assert isinstance(ex, RoutingExplorer)
    explore(model, tok, static=True, text="x = 1")
    assert "x" in capsys.readouterr().out


def test_mimebundle_has_static_fallbacks(model, tok):
    ex = RoutingExplorer(model, tok, text="hi there")
    from moe_lab.widgets import _mimebundle

    b = _mimebundle(ex.token_fig)
    assert "application/vnd.plotly.v1+json" in b and "text/html" in b and "text/plain" in b


def test_default_samples_are_real_held_out_text(model, tok):
    from moe_lab.evalset import load_aligned_sample, load_heldout_sample
    from moe_lab.widgets import default_samples

    samples = default_samples()
    assert set(samples) == {"english", "french", "german", "spanish", "italian", "python"}
    aligned = {r["en"]: r for r in load_aligned_sample()}
    for i, text in enumerate(samples["english"]):  # the same paragraph in every language: translations
        row = aligned[text]
        assert [samples[d][i] for d in ("french", "german", "spanish", "italian")] == [row[g] for g in ("fr", "de", "es", "it")]
    assert len({aligned[t]["source"] for t in samples["english"]}) == min(2, len(samples["english"]))
    python = [r["text"] for r in load_heldout_sample() if r["domain"] == "python"]
    assert all(any(doc.startswith(t.rstrip("\n")) for doc in python) for t in samples["python"])
    ex = explore(model, tok, static=True)  # no samples given: the picker offers these
    assert ex.samples == samples and ex.domain == "english" and ex.text == samples["english"][0]
