"""Exercises of notebook 10 · The MoE design space.

Each checker computes the reference with the code the lab runs (``moe_lab.moe.routers``, the block's
``update_selection_bias``, ``moe_lab.lab.summary.interval``), says what kind of wrong an answer is, and
never prints the reference value. 10.1 and 10.2 are by hand: they take the learner's function and run
it on inputs of their own as well as on the notebook's, with the library's own rule
(``routers.drop_overflow``, ``routers.expert_choice``) switched off (:func:`~moe_lab.exercises.byhand.run_by_hand`).
Hints come in two levels: a nudge, then the method (``Feedback.method``), never the solution line.

* 10.1 :func:`check_capacity_drops`  Switch's capacity: which tokens an expert keeps, in token order
* 10.2 :func:`check_expert_choice`   expert choice: each expert's top-c tokens of the sequence
* 10.3 :func:`check_bias_update`     DeepSeek-V3's selection-bias update, one step
* 10.4 :func:`check_seed_interval`   the half width of a 95% interval over seeds
* 10.5 :func:`check_capacity_overflow`  (multiple choice) why capacity 1.0 still drops tokens
* 10.6 :func:`check_expert_choice_decoding`  (multiple choice) why expert choice cannot decode token by token
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..lab.summary import interval
from ..model import ModelArgs
from ..moe import MoE, routers
from .arrays import to_array, to_number
from .byhand import run_by_hand
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice


def _kept(indices: torch.Tensor, n_experts: int, capacity: int) -> np.ndarray:
    """[T] bool: the top-1 choices ``indices`` [T] an expert keeps at ``capacity`` (the block's rule)."""
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1, 1)
    kept, _ = routers.drop_overflow(idx, torch.ones(idx.shape), n_experts, capacity)
    return (kept[:, 0] >= 0).numpy()


def _differ(expected: np.ndarray, got: np.ndarray, what: str) -> str:
    return f"{int((expected != got).sum())} of {expected.size} {what} differ"


def _call(name: str, fn, args, what: str, forbidden, hint: str, method: str):
    """(answer as array or None, Feedback or None): run the learner's function with the library's
    ``forbidden`` functions switched off, turning a stub, a pasted value, an error or a library call into
    feedback."""
    out, bad = run_by_hand(name, fn, args, forbidden=forbidden, hint=hint, method=method, what=what)
    if bad is not None:
        return None, bad
    arr = to_array(out)
    if arr is None:
        return None, wrong(name, f"your function returned a {type(out).__name__}, not an array: it should be {what}.",
                           hint, method)
    return arr, None


def check_capacity_drops(fn, indices, n_experts: int, capacity: int) -> Feedback:
    """10.1, by hand: ``fn(indices, n_experts, capacity) -> [T] bool``: for top-1 choices ``indices`` [T]
    of one sequence, which tokens their expert keeps when each expert takes at most ``capacity`` tokens,
    first come first served in token order (Switch). Checked on the checker's choices and on yours."""
    name = "Exercise 10.1 (capacity)"
    what = "fn(indices, n_experts, capacity) -> bool array [T]"
    hint = "go through the tokens in order and count, per expert, how many it has taken so far."
    method = ("start a counter at 0 for each of the n_experts; walk the tokens in order: a token is kept when "
              "the counter of its expert is still below the capacity, and either way that counter goes up by "
              "one; collect one True/False per token and return them as an array (not the library's "
              "drop_overflow: it is switched off during the check).")
    g = torch.Generator().manual_seed(10)
    own = torch.cat([torch.zeros(6, dtype=torch.long), torch.randint(0, n_experts, (18,), generator=g)])
    own = own[torch.randperm(len(own), generator=g)]
    for idx in (own, torch.as_tensor(indices, dtype=torch.long).reshape(-1)):
        arr, bad = _call(name, fn, (idx.clone(), n_experts, capacity), what, [routers.drop_overflow], hint, method)
        if bad is not None:
            return bad
        expected = _kept(idx, n_experts, capacity)
        if arr.shape != expected.shape:
            return wrong(name, f"your mask has shape {arr.shape}, one value per token is shape {expected.shape}.", hint, method)
        got = arr.astype(bool)
        if np.array_equal(got, expected):
            continue
        where = " (on the checker's own choices)" if idx is own else ""
        if got.all():
            return wrong(name, "you kept every token: the capacity drops the overflow" + where + ".", hint, method)
        if np.array_equal(got, _kept(idx.flip(0), n_experts, capacity)[::-1]):
            return wrong(name, "you kept the *last* tokens of each expert; Switch keeps the first ones (token order)" + where + ".",
                         hint, method)
        if np.array_equal(got, _kept(idx, n_experts, capacity - 1)):
            return wrong(name, "one token too few per expert: an expert keeps `capacity` tokens, not capacity - 1" + where + ".",
                         hint, method)
        if np.array_equal(got, _kept(idx, n_experts, capacity + 1)):
            return wrong(name, "one token too many per expert: stop at `capacity`" + where + ".", hint, method)
        return wrong(name, _differ(expected, got, "tokens") + where + ".", hint, method)
    dropped = int((~expected).sum())
    return correct(name, f"right on the checker's choices and on yours ({dropped} of {len(expected)} tokens "
                         f"pass through the residual only).")


def _chosen(logits: torch.Tensor, capacity: int) -> np.ndarray:
    """[T, E] bool: expert choice's assignment of one sequence (the block's rule)."""
    _, idx, _ = routers.expert_choice(logits, capacity)
    T, E = logits.shape
    out = np.zeros((T, E), dtype=bool)
    for t, row in enumerate(idx.tolist()):
        for e in row:
            if e >= 0:
                out[t, e] = True
    return out


def check_expert_choice(fn, logits, capacity: int) -> Feedback:
    """10.2, by hand: ``fn(logits, capacity) -> [T, E] bool``: for router logits [T, E] of one sequence,
    which tokens each expert takes when every expert takes the ``capacity`` tokens with the highest
    softmax probability (softmax over the experts) for it (expert choice)."""
    name = "Exercise 10.2 (expert choice)"
    what = "fn(logits, capacity) -> bool array [T, E]"
    hint = "first the probabilities (softmax over the experts of each token), then, for each expert (column), its top-c tokens."
    method = ("turn each row of logits into probabilities with a softmax over the last axis; start from an all-False "
              "[T, E] array; for every column e, find the rows of its `capacity` largest probabilities (a topk along "
              "the token axis, dim 0, does every column at once) and set those (row, e) entries to True (not the "
              "library's routers.expert_choice: it is switched off during the check).")
    g = torch.Generator().manual_seed(11)
    own = torch.randn(16, 4, generator=g) * 2 + torch.linspace(0, 2, 16)[:, None] * torch.tensor([1.0, -1.0, 0.5, 0.0])
    for lg in (own, torch.as_tensor(logits, dtype=torch.float32)):
        arr, bad = _call(name, fn, (lg.clone(), capacity), what, [routers.expert_choice], hint, method)
        if bad is not None:
            return bad
        expected = _chosen(lg, capacity)
        where = " (on the checker's own logits)" if lg is own else ""
        if arr.shape != expected.shape:
            return wrong(name, f"your mask has shape {arr.shape}; [tokens, experts] is {expected.shape}" + where + ".", hint, method)
        got = arr.astype(bool)
        if np.array_equal(got, expected):
            continue
        k = max(1, round(capacity * lg.shape[1] / lg.shape[0]))
        tc = np.zeros_like(expected)
        np.put_along_axis(tc, lg.topk(k, dim=-1).indices.numpy(), True, axis=-1)
        if np.array_equal(got, tc) or (got.sum(1) == got.sum(1)[0]).all() and not (got.sum(0) == capacity).all():
            return wrong(name, "each *token* chose its experts: that is token choice. Here each expert (column) chooses" + where + ".",
                         hint, method)
        raw = np.zeros_like(expected)
        np.put_along_axis(raw, lg.topk(capacity, dim=0).indices.numpy(), True, axis=0)
        if np.array_equal(got, raw):
            return wrong(name, "you ranked the raw logits; expert choice ranks the softmax probabilities (a token's "
                               "logits are compared with its other experts' first)" + where + ".", hint, method)
        if not (got.sum(0) == capacity).all():
            return wrong(name, f"every expert takes exactly capacity = {capacity} tokens; some columns of yours do not" + where + ".",
                         hint, method)
        return wrong(name, _differ(expected, got, "(token, expert) pairs") + where + ".", hint, method)
    per_token = expected.sum(1)
    return correct(name, f"right on the checker's logits and on yours; here tokens got between {per_token.min()} and "
                         f"{per_token.max()} experts ({int((per_token == 0).sum())} tokens got none), and every "
                         "expert exactly its capacity.")


def _bias_step(bias, load, rate) -> np.ndarray:
    """The block's own update (``MoE.update_selection_bias``) applied to a bias and a load."""
    bias_t = torch.as_tensor(np.asarray(bias, dtype=np.float32))
    E = len(bias_t)
    moe = MoE(ModelArgs(dim=2, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, vocab_size=2, hidden_dim=1,
                        n_experts=E, experts_per_token=1, selection_bias=True, selection_bias_rate=float(rate)))
    moe.selection_bias.copy_(bias_t)
    counts = np.asarray(load, dtype=np.int64)
    moe.update_selection_bias(torch.as_tensor(np.repeat(np.arange(E), counts)).reshape(-1, 1))
    return moe.selection_bias.double().numpy()


def check_bias_update(answer, bias, load, rate: float) -> Feedback:
    """10.3: ``answer`` [E]: the selection bias after one DeepSeek-V3 update from ``bias`` [E], given the
    tokens each expert received in the batch, ``load`` [E] (counts), and the update speed ``rate``."""
    name = "Exercise 10.3 (bias update)"
    hint = "an expert with fewer tokens than the mean load gets a higher bias (so it is chosen more), by `rate`."
    method = ("compute the mean of the loads; each expert's step is +rate when its load is below that mean, -rate "
              "when above and 0 when equal (the sign of mean minus load, times rate); the new bias is the old "
              "bias plus that step, one number per expert.")
    if is_todo(answer):
        return todo(name, hint, method)
    got = to_array(answer)
    expected = _bias_step(bias, load, rate)
    if got is None or got.shape != expected.shape:
        return wrong(name, f"one new bias per expert: an array of {len(expected)} numbers.", hint, method)
    if np.allclose(got, expected, atol=1e-6):
        return correct(name, "right: a fixed step of `rate` towards balance, whatever the size of the imbalance "
                             "(only its sign counts).")
    b = np.asarray(bias, dtype=np.float64)
    if np.allclose(got, 2 * b - expected, atol=1e-6):
        return wrong(name, "the sign is flipped: you raised the bias of overloaded experts.", hint, method)
    load = np.asarray(load, dtype=np.float64)
    if np.allclose(got, b + rate * (load.mean() - load), atol=1e-6):
        return wrong(name, "the step is rate * sign(mean - load), not rate * (mean - load): only the direction counts.",
                     hint, method)
    if np.allclose(got, expected - b, atol=1e-6):
        return wrong(name, "that is the change; add it to the old bias.", hint, method)
    return wrong(name, _differ(np.round(expected, 6), np.round(got, 6), "experts' biases") + ".", hint, method)


def check_seed_interval(answer, values) -> Feedback:
    """10.4: ``answer`` (a number): the half width of the 95% t-interval of the mean of ``values``
    (one held-out CE per seed), as the lab's summary computes it."""
    name = "Exercise 10.4 (interval over seeds)"
    hint = "t quantile (two-sided 95%, n - 1 degrees of freedom) x sample standard deviation / sqrt(n)."
    method = ("n is the number of seeds; look up Student's t quantile for n - 1 degrees of freedom in "
              "moe_lab.lab.summary.T95 (two-sided 95%); take the sample standard deviation of the values "
              "(dividing by n - 1: ddof=1); the half width is the quantile times that deviation divided by the "
              "square root of n.")
    if is_todo(answer):
        return todo(name, hint, method)
    got = to_number(answer)
    if got is None:
        return wrong(name, "one number: the half width.", hint, method)
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    m, lo, hi = interval(v)
    half = (hi - lo) / 2
    close = lambda x: math.isclose(got, x, rel_tol=1e-4, abs_tol=1e-9)  # noqa: E731
    if close(half):
        return correct(name, f"right: with {n} seeds the t quantile is more than twice the normal 1.96, so three "
                             "seeds give wide intervals.")
    sd = v.std(ddof=1)
    if close(1.96 * sd / math.sqrt(n)):
        return wrong(name, "you used the normal quantile 1.96; with so few seeds use Student's t (n - 1 degrees of "
                           "freedom).", hint, method)
    if close(half * v.std(ddof=0) / sd):
        return wrong(name, "your standard deviation divides by n; the sample standard deviation divides by n - 1.", hint, method)
    if close(half * math.sqrt(n)):
        return wrong(name, "that is a spread of single seeds: divide by sqrt(n) for the mean's interval.", hint, method)
    if close(hi - lo):
        return wrong(name, "that is the whole width; the half width is half of it.", hint, method)
    return wrong(name, "not equal to the reference.", hint, method)


def check_capacity_overflow(answer) -> Feedback:
    """10.5 (multiple choice): with capacity factor 1.0 every Switch expert may take exactly the balanced
    share of a sequence's tokens, yet section 4's table shows a large share of (token, layer) pairs dropped.
    Why?"""
    name = "Exercise 10.5 (why capacity 1.0 drops tokens)"
    options = {"a": "the capacity is counted over the whole batch, so long sequences crowd out short ones",
               "b": "no sequence is routed exactly evenly: an over-chosen expert drops every token past its share, "
                    "and the room left in under-chosen experts is not given to anyone",
               "c": "the tokens with the lowest router probability are the ones dropped",
               "d": "the Switch recipes train without a balancing loss"}
    why_not = {"a": "the capacity is per sequence (the block's group is one sequence), and every sequence has the "
                    "same length here.",
               "c": "Switch keeps each expert's first tokens in token order, whatever their probability (10.1).",
               "d": "both Switch recipes train with the auxiliary loss (coefficient 0.01, section 3); it lowers the "
                    "imbalance on average but cannot make every sequence exactly even."}
    return choice(name, answer, options, "b", why_not,
                  why="a capacity of exactly the mean leaves no slack: any imbalance becomes drops, which is why "
                      "Switch uses factors above 1 (1.25 drops less in the table).",
                  hint="what happens in one sequence where one expert is chosen a little more often than average?",
                  method="count, in your 10.1 answer, the tokens chosen per expert (np.bincount) next to the "
                         "capacity: the drops are the excess of the over-chosen experts, while others stay below it.")


def check_expert_choice_decoding(answer) -> Feedback:
    """10.6 (multiple choice): why can expert choice, as trained in the lab, not generate text one token at
    a time?"""
    name = "Exercise 10.6 (expert choice and decoding)"
    options = {"a": "it costs more compute per token than top-2 token choice",
               "b": "each expert picks its top tokens among the whole sequence, so a token's experts depend on "
                    "tokens after it, which do not exist yet while it is generated",
               "c": "it drops tokens, and a language model cannot skip a token",
               "d": "it needs a balancing loss, which is undefined at inference"}
    why_not = {"a": "at capacity 1.0 it gives a token 2 experts on average, the same compute as top-2.",
               "c": "Switch drops tokens too and still decodes: a token with no expert goes through the residual.",
               "d": "expert choice is balanced by construction and trains with no balancing loss (section 3)."}
    return choice(name, answer, options, "b", why_not,
                  why="section 6 measures it: changing one later token changes the experts of earlier tokens, "
                      "which a token-choice router never does.",
                  hint="to choose its tokens, what does an expert need to see?",
                  method="look at section 6's table: in which variant does changing the last token change "
                         "the routing of earlier tokens, and why does that require the future?")
