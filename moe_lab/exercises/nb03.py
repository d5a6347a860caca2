"""Exercises of notebook 03 (loading weights): read a tensor from a file, the q/k row permutation,
the order of the blocks, and the memory a partial load needs.

Each checker computes the right answer itself from what the learner used (the model, the checkpoint
directory, the tokens), so the exercises work on any model, trained or random::

    from moe_lab.exercises import nb03 as ex
    ex.check_router_from_file(answer, model, layer=1)

* 03.5 :func:`check_block_order`, 03.6 :func:`check_hd4_blind_spot`: graded questions (multiple choice).
"""

from __future__ import annotations

import os

import torch

from ..checkpoints.convert import half_to_interleaved, interleaved_to_half
from ..checkpoints.loading import load_model
from ..model import ModelArgs, count_params
from .feedback import Feedback, correct, is_todo, todo, wrong
from .questions import choice, in_range

BF16_BYTES = 2


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens).float()


# --------------------------------------------------------------------------------------------
# 03.1


def check_router_from_file(answer, model, layer: int = 1) -> Feedback:
    """Exercise 03.1: open the Mistral-layout ``consolidated.safetensors`` with
    ``safetensors.safe_open`` and read the router weight of ``layer`` (``answer``: that tensor).
    It must equal ``model.blocks[layer].moe.gate.weight``."""
    name = "Exercise 03.1 (the router, read from the file)"
    nudge = "list the file's tensor names first: which one is a router of that layer?"
    hint = ("with safe_open(path, 'pt') as f: f.keys() lists the names (the Mistral layout's router is under "
            "feed_forward); f.get_tensor(name) reads that one tensor.")
    if is_todo(answer):
        return todo(name, nudge, hint)
    if not isinstance(answer, torch.Tensor):
        return wrong(name, f"expected a torch.Tensor, found {type(answer).__name__}.", nudge, hint)
    ref = model.blocks[layer].moe.gate.weight.detach()
    if tuple(answer.shape) != tuple(ref.shape):
        extra = (" That is the transpose: nn.Linear (and every checkpoint) stores [out_features, in_features]"
                 " = [experts, dim]." if tuple(answer.shape) == tuple(ref.shape[::-1]) else "")
        return wrong(name, f"shape {tuple(answer.shape)}, expected shape {tuple(ref.shape)} ([experts, dim]).{extra}", nudge, hint)
    answer = answer.detach().to(ref.device, ref.dtype)
    if torch.equal(answer, ref):
        return correct(name, f"layer {layer}'s router, {tuple(ref.shape)}, identical to model.blocks[{layer}].moe.gate.weight.")
    for j, block in enumerate(model.blocks):
        if j != layer and torch.equal(answer, block.moe.gate.weight.detach()):
            return wrong(name, f"this is the router of layer {j}, not of layer {layer}.", nudge, hint)
    n_bad = int((answer != ref).sum())
    return wrong(name, f"the shape is right but {n_bad} of {ref.numel()} values differ from "
                       f"model.blocks[{layer}].moe.gate.weight.", nudge, hint)


# --------------------------------------------------------------------------------------------
# 03.2


def check_qk_permutation(fn) -> Feedback:
    """Exercise 03.2: write ``fn(w, n_heads)`` that takes a ``wq`` or ``wk`` weight in moe_lab's
    (Mistral's, interleaved) row order and returns it in the Hugging Face file's row order: per
    head, rows 0, 2, 4, ... then 1, 3, 5, .... Checked on weights with several heads against
    :func:`moe_lab.checkpoints.convert.interleaved_to_half`."""
    name = "Exercise 03.2 (the q/k row permutation)"
    nudge = "the permutation works within each head: even rows first, then odd rows."
    hint = ("keep the head axis in front and view each head's hd rows as [hd // 2 pairs, 2 members]; "
            "swapping those two axes puts the first members of all pairs first; reshape back.")
    if is_todo(fn):
        return todo(name, nudge, hint)
    if not callable(fn):
        return wrong(name, f"expected a function fn(w, n_heads), found {type(fn).__name__}.", nudge, hint)
    for n_heads, hd, dim in [(2, 8, 3), (3, 4, 2), (1, 16, 5)]:
        w = torch.arange(n_heads * hd * dim, dtype=torch.float32).reshape(n_heads * hd, dim)
        try:
            out = fn(w.clone(), n_heads)
        except Exception as e:  # the learner's code: report, never raise
            return wrong(name, f"fn(w, n_heads={n_heads}) with w of shape {tuple(w.shape)} raised "
                               f"{type(e).__name__}: {e}", nudge, hint)
        if out is None:  # the stub, not filled in yet
            return todo(name, nudge, hint)
        ref = interleaved_to_half(w, n_heads)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(w.shape):
            found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            return wrong(name, f"for w of shape {tuple(w.shape)} ({n_heads} heads of {hd} rows) the result should "
                               f"have the same shape, found {found}.", nudge, hint)
        if torch.equal(out, ref):
            continue
        rows = (out[:, 0] / dim).round().long().tolist()  # which input row each output row holds
        if torch.equal(out, half_to_interleaved(w, n_heads)):
            return wrong(name, f"this is the inverse permutation (HF -> Mistral): with {n_heads} head(s) of {hd} rows "
                               f"your rows are {rows[:hd]}.... "
                               "For hd = 4 both directions are the same permutation, which is why this bug hides "
                               "in small tests.", nudge, hint)
        if torch.equal(out, interleaved_to_half(w, 1)) and n_heads > 1:
            return wrong(name, f"you permuted all {n_heads * hd} rows as one head: the permutation applies within "
                               f"each head of {hd} rows (found rows {rows}).", nudge, hint)
        n_bad = int((out[:, 0] != ref[:, 0]).sum())
        return wrong(name, f"with {n_heads} head(s) of {hd} rows, {n_bad} of {n_heads * hd} output rows hold the wrong "
                           f"input row (yours: {rows}).", nudge, hint)
    return correct(name, "per-head row permutation right for 1, 2 and 3 heads (hd 4, 8, 16).")


# --------------------------------------------------------------------------------------------
# 03.3


def check_layer_order_effect(answer, checkpoint: str | os.PathLike, tokens: torch.Tensor) -> Feedback:
    """Exercise 03.3: load the checkpoint with its blocks in reverse order (``layers=[1, 0]`` for a
    two-layer checkpoint) and report ``answer`` = max |logit difference| against the model loaded
    normally, on ``tokens``."""
    name = "Exercise 03.3 (blocks in another order)"
    nudge = "load_model can choose which blocks to load, and in which order."
    hint = ("load the checkpoint twice, once with layers=[1, 0]; run both on the same tokens and take the "
            "largest absolute difference of the logits (a float, .item()).")
    if is_todo(answer):
        return todo(name, nudge, hint)
    try:
        value = float(answer)
    except (TypeError, ValueError):
        return wrong(name, f"expected one number (the max |logit difference|), found {type(answer).__name__}.", nudge, hint)
    normal = load_model(checkpoint)
    n = len(normal.blocks)
    reversed_model = load_model(checkpoint, layers=list(range(n))[::-1])
    ref = (_logits(reversed_model, tokens) - _logits(normal, tokens)).abs().max().item()
    if value == 0 and ref > 0:
        return wrong(name, "0 means the order does not matter, but it does: each block reads the residual stream "
                           "that the blocks before it wrote.", nudge, hint)
    if abs(value - ref) <= 1e-4 + 1e-3 * ref:
        return correct(name, f"max |logit difference| = {ref:.3g}: the blocks are not interchangeable.")
    return wrong(name, f"found {value:.3g}: not equal to the reference (within 0.1%).", nudge, hint)


# --------------------------------------------------------------------------------------------
# 03.4


def partial_load_bytes(args: ModelArgs, n_layers: int, bytes_per_param: int = BF16_BYTES) -> int:
    """Bytes of ``load_model(path, layers=n_layers)``: embeddings, output head, final norm and the
    first ``n_layers`` blocks, at ``bytes_per_param`` bytes per parameter."""
    return count_params(args.replace(n_layers=n_layers)).total * bytes_per_param


def check_partial_load_memory(answer, args: ModelArgs, n_layers: int = 4) -> Feedback:
    """Exercise 03.4: how many bytes does ``load_model(path, dtype=torch.bfloat16, layers=n_layers)``
    hold for a model with config ``args`` (Mixtral 8x7B in the notebook)? Weights only; within 1 %."""
    name = f"Exercise 03.4 (memory of the first {n_layers} layers)"
    nudge = "what is loaded besides the first n blocks, and how many bytes is a bf16 value?"
    hint = ("count_params(args.replace(n_layers=n)).total counts the embeddings, the output head, "
            "the final norm and n blocks; bf16 is 2 bytes per parameter.")
    if is_todo(answer):
        return todo(name, nudge, hint)
    try:
        value = float(answer)
    except (TypeError, ValueError):
        return wrong(name, f"expected a number of bytes, found {type(answer).__name__}.", nudge, hint)
    ref = partial_load_bytes(args, n_layers)
    if abs(value - ref) <= 0.01 * ref:
        return correct(name, f"{ref / 1e9:.2f} GB (embeddings + head {(2 * args.vocab_size * args.dim) * 2 / 1e9:.2f} GB, "
                             f"{n_layers} blocks {(ref - partial_load_bytes(args, 0)) / 1e9:.2f} GB).")
    per_block = partial_load_bytes(args, 1) - partial_load_bytes(args, 0)
    guesses = {
        "that is fp32 (4 bytes per parameter); bf16 is 2": partial_load_bytes(args, n_layers, 4),
        "that is the whole model; layers=n keeps only the first n blocks": partial_load_bytes(args, args.n_layers),
        "that is only the blocks: the embeddings and the output head are loaded too": n_layers * per_block,
        "that counts only the active parameters: every expert is loaded, not just the k a token uses":
            count_params(args.replace(n_layers=n_layers)).active * BF16_BYTES,
        "that is a number of parameters, not bytes": ref / BF16_BYTES,
        "that is in GB; give bytes": ref / 1e9,
    }
    for why, guess in guesses.items():
        if abs(value - guess) <= 0.01 * guess:
            return wrong(name, f"{value:.4g}: {why}.", nudge, hint)
    return wrong(name, f"found {value:.4g} bytes: not within 1% of the reference, and not one of the usual slips "
                       "(fp32, the whole model, only the blocks, only the active parameters, parameters instead of "
                       "bytes, GB).", nudge, hint)


# --------------------------------------------------------------------------- 03.5-03.6: graded questions


def check_block_order(answer) -> Feedback:
    """Exercise 03.5 (multiple choice): the two blocks loaded in the other order (03.3) give other
    logits. Why?"""
    name = "Exercise 03.5 (why block order matters)"
    options = {"a": "each block was trained to read the residual stream as the blocks before it left it; swapped, "
                    "each reads an input it never saw",
               "b": "the blocks have different shapes, so swapping them is a different model",
               "c": "it is rounding error: swapped blocks compute the same function",
               "d": "the loader re-initialises swapped blocks"}
    why_not = {"b": "every block of a Mixtral has the same shapes: that is why they can be swapped at all.",
               "c": "the difference is far larger than bf16 or fp32 rounding (compare with §4's parity tolerances).",
               "d": "layers=[1, 0] loads the same weights, only in the other order."}
    return choice(name, answer, options, "a", why_not,
                  why="Same shapes, different functions: a checkpoint's layer order is part of the model.",
                  hint="the shapes allow the swap; what about what each block learned to expect?",
                  method="compare the size of 03.3's difference with the parity tolerances of §4: it is not rounding.")


def check_hd4_blind_spot(answer) -> Feedback:
    """Exercise 03.6 (multiple choice): why would a test with head size 4 not catch the q/k
    permutation written in the wrong direction (03.2)?"""
    name = "Exercise 03.6 (the head size 4 blind spot)"
    options = {"a": "for 4 rows the permutation (0, 2, 1, 3) is its own inverse, so both directions give the same rows",
               "b": "with head size 4 RoPE does nothing",
               "c": "a head of size 4 has no q/k weights",
               "d": "the test would catch it: the directions always differ"}
    why_not = {"b": "RoPE rotates the pairs at any head size; the blind spot is in the permutation itself.",
               "c": "every head has q and k rows, whatever its size.",
               "d": "write both directions for 4 rows: they are the same list."}
    return choice(name, answer, options, "a", why_not,
                  why="Test a permutation at a size where it is not an involution (6 or 8 rows), as the checker does.",
                  hint="write the permutation for 4 rows, then its inverse.",
                  method="even rows first then odd: for 4 rows (0, 2, 1, 3); apply it twice and see what you get.")
