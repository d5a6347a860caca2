"""Notebook 00's exercise checkers, on traces of a seeded random tiny model (no demo model needed)."""

import numpy as np
import pytest
import torch

import moe_lab
from moe_lab import AblateExpert, Mixtral, ModelArgs, intervene, trace_routing
from moe_lab.exercises import nb00 as ex


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Mixtral(ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                             vocab_size=100, max_seq_len=64, init_std=0.1)).eval()


def _ids(seed, n=24):
    ids = torch.randint(2, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    ids[::4] = [7] * len(ids[::4])  # token 7 repeats
    return [1] + ids


@pytest.fixture(scope="module")
def traces(model):
    a = trace_routing(model, [_ids(0)], progress=False)
    b = trace_routing(model, [_ids(1)], progress=False)
    return a, b


def test_token_experts(traces):
    t, _ = traces
    right = t.expert_ids[t.layer_index(2), 5].tolist()
    assert ex.check_token_experts(right, t, 5, 2)
    assert ex.check_token_experts(None, t, 5, 2).status == "todo"
    fb = ex.check_token_experts(right[::-1], t, 5, 2)
    assert fb.status == "wrong" and "wrong order" in fb.message
    other = t.expert_ids[t.layer_index(0), 5].tolist()
    if sorted(other) != sorted(right):
        fb = ex.check_token_experts(other, t, 5, 2)
        assert fb.status == "wrong" and "layer 0" in fb.message
    assert "expected a list of 2" in ex.check_token_experts(3, t, 5, 2).message


def test_token_consistency(traces):
    t, _ = traces
    firsts = t.expert_ids[t.layer_index(1), t.token_ids == 7, 0]
    right = np.bincount(firsts).max() / len(firsts)
    assert ex.check_token_consistency(right, t, 7, 1)
    assert ex.check_token_consistency(None, t, 7, 1).status == "todo"
    fb = ex.check_token_consistency(float(np.bincount(firsts).max()), t, 7, 1)
    assert fb.status == "wrong" and "count" in fb.message
    assert "does not occur" in ex.check_token_consistency(0.5, t, 99999, 1).message
    with pytest.raises(ValueError):
        ex.token_consistency(t, 99999, 1)


def test_first_choice_tv(traces):
    a, b = traces
    row = 1
    pa = np.bincount(a.expert_ids[row, :, 0], minlength=8) / a.n_tokens
    pb = np.bincount(b.expert_ids[row, :, 0], minlength=8) / b.n_tokens
    right = 0.5 * np.abs(pa - pb).sum()
    assert 0 < right <= 1
    assert ex.check_first_choice_tv(right, a, b, a.layers[row])
    assert ex.check_first_choice_tv(None, a, b, 1).status == "todo"
    fb = ex.check_first_choice_tv(2 * right, a, b, a.layers[row])
    assert fb.status == "wrong" and "1/2" in fb.hint
    assert ex.check_first_choice_tv(0.5 * right, a, b, a.layers[row]).status == "wrong"
    assert ex.check_first_choice_tv(0.0, a, a, 1)


def test_changed_share(model):
    ids = _ids(2)
    base = trace_routing(model, [ids], progress=False)
    busiest = int(np.bincount(base.expert_ids[0].ravel()).argmax())
    with intervene(model, AblateExpert(layer=0, expert=busiest)):
        new = trace_routing(model, [ids], progress=False)
    right = (np.sort(base.expert_ids, -1) != np.sort(new.expert_ids, -1)).any(-1).mean(1)
    assert right[0] > 0
    assert ex.check_changed_share(right, base, new)
    assert ex.check_changed_share(None, base, new).status == "todo"
    first = (base.expert_ids[:, :, 0] != new.expert_ids[:, :, 0]).mean(1)
    if not np.allclose(first, right):
        assert "first choice" in ex.check_changed_share(first, base, new).message
    assert "counts" in ex.check_changed_share(right * base.n_tokens, base, new).message
    assert "one number per traced layer" in ex.check_changed_share(right[:2], base, new).message
    assert moe_lab.exercises.nb00.check_changed_share.__doc__
