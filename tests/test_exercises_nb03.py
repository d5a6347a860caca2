"""Notebook 03's exercise checkers: the right answer passes, None is todo, typical mistakes are named."""

import pytest
import torch
from safetensors import safe_open

from moe_lab import Mixtral, ModelArgs, count_params, load_model, save_model
from moe_lab.checkpoints.convert import half_to_interleaved, interleaved_to_half
from moe_lab.exercises import nb03 as ex


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mixtral(ModelArgs.from_name("tiny", n_layers=2, vocab_size=256, init_std=0.05)).eval()


@pytest.fixture(scope="module")
def mistral_dir(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("nb03") / "mistral", layout="mistral")


def test_router_from_file(model, mistral_dir):
    with safe_open(mistral_dir / "consolidated.safetensors", "pt") as f:
        r1, r0 = f.get_tensor("layers.1.feed_forward.gate.weight"), f.get_tensor("layers.0.feed_forward.gate.weight")
    assert ex.check_router_from_file(r1, model, layer=1)
    assert ex.check_router_from_file(None, model, layer=1).status == "todo"
    fb = ex.check_router_from_file(r0, model, layer=1)
    assert fb.status == "wrong" and "layer 0" in fb.message and fb.hint
    fb = ex.check_router_from_file(r1.T, model, layer=1)
    assert fb.status == "wrong" and "transpose" in fb.message
    fb = ex.check_router_from_file(r1 + 1e-3, model, layer=1)
    assert fb.status == "wrong" and "values differ" in fb.message
    assert ex.check_router_from_file([1, 2], model).status == "wrong"


def test_qk_permutation():
    assert ex.check_qk_permutation(interleaved_to_half)

    def by_hand(w, n_heads):
        hd = w.shape[0] // n_heads
        order = [h * hd + r for h in range(n_heads) for r in [*range(0, hd, 2), *range(1, hd, 2)]]
        return w[order]

    assert ex.check_qk_permutation(by_hand)
    assert ex.check_qk_permutation(None).status == "todo"
    fb = ex.check_qk_permutation(half_to_interleaved)
    assert fb.status == "wrong" and "inverse" in fb.message and "hd = 4" in fb.message
    fb = ex.check_qk_permutation(lambda w, n: interleaved_to_half(w, 1))
    assert fb.status == "wrong" and "one head" in fb.message
    fb = ex.check_qk_permutation(lambda w, n: w)
    assert fb.status == "wrong" and "hold the wrong input row" in fb.message
    fb = ex.check_qk_permutation(lambda w, n: w.T)
    assert fb.status == "wrong" and "same shape" in fb.message
    fb = ex.check_qk_permutation(lambda w, n: 1 / 0)
    assert fb.status == "wrong" and "ZeroDivisionError" in fb.message


def test_layer_order_effect(model, mistral_dir):
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        diff = (load_model(mistral_dir, layers=[1, 0])(tokens) - load_model(mistral_dir)(tokens)).abs().max().item()
    assert diff > 0
    assert ex.check_layer_order_effect(diff, mistral_dir, tokens)
    assert ex.check_layer_order_effect(None, mistral_dir, tokens).status == "todo"
    fb = ex.check_layer_order_effect(0.0, mistral_dir, tokens)
    assert fb.status == "wrong" and "order" in fb.message
    fb = ex.check_layer_order_effect(diff * 2, mistral_dir, tokens)
    assert fb.status == "wrong" and "not equal" in fb.message
    assert ex.check_layer_order_effect("big", mistral_dir, tokens).status == "wrong"


def test_partial_load_memory():
    args = ModelArgs.from_name("mixtral-8x7b")
    right = count_params(args.replace(n_layers=4)).total * 2
    # by hand: embeddings + head + final norm, and 4 blocks
    D, V = args.dim, args.vocab_size
    per_block = (count_params(args).total - 2 * V * D - D) // args.n_layers
    assert right == 2 * (2 * V * D + D + 4 * per_block)
    assert 11e9 < right < 13e9  # "about 12 GB" in the notebook
    assert ex.check_partial_load_memory(right, args, n_layers=4)
    assert ex.check_partial_load_memory(right * 1.005, args, n_layers=4)  # within 1 %
    assert ex.check_partial_load_memory(None, args).status == "todo"
    for mistake, word in [(right * 2, "fp32"), (4 * per_block * 2, "embeddings"), (right / 2, "parameters"),
                          (count_params(args).total * 2, "whole model"), (right / 1e9, "GB")]:
        fb = ex.check_partial_load_memory(mistake, args, n_layers=4)
        assert fb.status == "wrong" and word in fb.message, (mistake, fb)
    fb = ex.check_partial_load_memory(1e9, args, n_layers=4)
    assert fb.status == "wrong" and "not within 1%" in fb.message


def test_function_stub_is_todo():
    assert ex.check_qk_permutation(lambda w, n_heads: None).status == "todo"
