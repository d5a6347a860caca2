"""Notebook 02's exercise checkers: the right answer passes, None is todo, typical mistakes are named."""

import torch
import torch.nn.functional as F

from moe_lab import Mixtral, ModelArgs, count_params, load_balancing_loss, topk_softmax_routing
from moe_lab.exercises import nb02 as ex


def _logits(L=3, N=20, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(N, E, generator=g) for _ in range(L)]


def lb_by_hand(router_logits, E, k, f_sums_to_one=False):
    probs = torch.cat(router_logits).float().softmax(-1)  # (L*N, E)
    f = F.one_hot(probs.topk(k, -1).indices, E).sum(1).float().mean(0)  # fraction of rows whose top-k has e
    if f_sums_to_one:
        f = f / k
    return E * (f * probs.mean(0)).sum()


def test_load_balancing_by_hand():
    lg = _logits()
    assert torch.allclose(lb_by_hand(lg, 8, 2), load_balancing_loss(lg, 8, 2))
    assert ex.check_load_balancing(lb_by_hand, lg, 8, 2)
    assert ex.check_load_balancing(lambda rl, E, k: float(lb_by_hand(rl, E, k)), lg, 8, 2)
    assert ex.check_load_balancing(None, lg, 8, 2).status == "todo"
    assert ex.check_load_balancing(lambda rl, E, k: None, lg, 8, 2).status == "todo"  # the stub
    fb = ex.check_load_balancing(lambda rl, E, k: lb_by_hand(rl, E, k, f_sums_to_one=True), lg, 8, 2)
    assert fb.status == "wrong" and "sum to 1" in fb.message and "sums to k" in fb.hint
    fb = ex.check_load_balancing(lambda rl, E, k: sum(float(load_balancing_loss([x], E, k)) for x in rl), lg, 8, 2)
    assert fb.status == "wrong" and "calls the library" in fb.message  # by hand: the library is switched off
    per_layer = lambda rl, E, k: sum(lb_by_hand([x], E, k) for x in rl)  # noqa: E731
    fb = ex.check_load_balancing(per_layer, lg, 8, 2)
    assert fb.status == "wrong" and "per-layer" in fb.message
    fb = ex.check_load_balancing(lambda rl, E, k: per_layer(rl, E, k) / len(rl), lg, 8, 2)
    assert fb.status == "wrong" and "mean of per-layer" in fb.message
    # a pasted value (the old form) is not accepted: the exercise takes a function
    fb = ex.check_load_balancing(float(load_balancing_loss(lg, 8, 2)), lg, 8, 2)
    assert fb.status == "wrong" and "takes your function" in fb.message


def test_switch_routing():
    a1 = ModelArgs.from_name("tiny", experts_per_token=1)
    assert ex.check_switch_routing((count_params(a1).active, 1.0), a1)
    assert ex.check_switch_routing(None, a1).status == "todo"
    fb = ex.check_switch_routing((count_params(a1).active, 2), a1)
    assert fb.status == "wrong" and "balanced value" in fb.message
    fb = ex.check_switch_routing((count_params(a1).total, 1), a1)
    assert fb.status == "wrong" and "is the total" in fb.message
    a2 = ModelArgs.from_name("tiny")
    assert ex.check_switch_routing((count_params(a2).active, 2), a2).status == "wrong"


def _small(sliding_window):
    torch.manual_seed(0)
    return Mixtral(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                             vocab_size=100, max_seq_len=64, sliding_window=sliding_window)).eval()


def test_sliding_window_decode():
    model = _small(4)
    seq = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = model.new_cache(batch_size=1, max_len=12)
        pieces = [model(seq[:, :5], cache=cache)] + [model(seq[:, t:t + 1], cache=cache) for t in range(5, 12)]
        right = torch.cat(pieces, 1)
        no_cache = torch.cat([model(seq[:, :5])] + [model(seq[:, t:t + 1]) for t in range(5, 12)], 1)
    assert ex.check_sliding_window_decode(right, model, seq, 5)
    assert ex.check_sliding_window_decode(None, model, seq, 5).status == "todo"
    fb = ex.check_sliding_window_decode(no_cache, model, seq, 5)
    assert fb.status == "wrong" and "position 5" in fb.message
    assert "shape" in ex.check_sliding_window_decode(right[:, :-1], model, seq, 5).message
    assert "no sliding window" in ex.check_sliding_window_decode(right, _small(None), seq, 5).message


def test_force_routing_fn():
    def force(logits, k):
        bonus = torch.zeros(logits.shape[-1])
        bonus[3] = 100.0
        return topk_softmax_routing(logits + bonus, k)

    def in_place(logits, k):
        logits[:, 3] += 100
        return topk_softmax_routing(logits, k)

    assert ex.check_force_routing_fn(force)
    assert ex.check_force_routing_fn(None).status == "todo"
    assert "in place" in ex.check_force_routing_fn(in_place).message
    fb = ex.check_force_routing_fn(topk_softmax_routing)  # forgot the bonus
    assert fb.status == "wrong" and "first choice" in fb.message
    assert "raised" in ex.check_force_routing_fn(lambda logits, k: 1 / 0).message
    assert ex.check_force_routing_fn(lambda logits, k: None).status == "todo"  # the notebook's unfilled stub
    assert "must return" in ex.check_force_routing_fn(lambda logits, k: (1, 2)).message
    # the model really uses such a function in place of its router
    model = _small(None)
    model.blocks[0].moe.routing_fn = force
    _, act = model.run_with_cache(torch.randint(0, 100, (1, 6)), names_filter="topk_indices")
    assert (act["topk_indices", 0][:, 0] == 3).all()
