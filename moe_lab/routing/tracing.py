"""Record which experts every token went to: ``trace_routing`` and ``trace_generation``.

::

    trace = moe_lab.trace_routing(model, {"code": code_texts, "prose": prose_texts}, tokenizer=tok)
    trace.to_pandas()                     # doc, domain, position, token_id, piece, layer, rank, expert, weight

    tokens, trace = moe_lab.trace_generation(model, "Once upon a time", 20, tokenizer=tok)

How the capture works (and why it is cheap): the routing function of each traced MoE layer
(``MoE.routing_fn``) is wrapped by a function that keeps a *reference* to the indices and
weights it returns -- no copy, no device synchronisation, no ``nn.Module`` hook machinery --
and the tensors go to numpy once per batch. The model's computation is untouched, so the
routing is bit-identical with and without tracing (``benchmarks/bench_hooks.py`` measures the
overhead). On a transformers model the same is done with a forward hook on each router
(:mod:`moe_lab.routing.bridge`).

The forward stops after the last traced layer (no LM head: logits of a batch of long
documents can take gigabytes), and padding tokens never reach the trace.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..devices import resolve_device
from ..generation import generate_stream, left_pad
from ..hooks import StopForward
from ..provenance import provenance  # the demo model's label travels to every figure's title
from ..version import __version__
from . import bridge
from .bridge import is_hf_model
from .interventions import active_interventions, layer_ids, unwrap
from .trace import RoutingTrace


# --------------------------------------------------------------------------------------------
# inputs


def _encode(tokenizer, text: str, add_bos: bool) -> list[int]:
    if tokenizer is None:
        raise ValueError("texts need a tokenizer: trace_routing(model, texts, tokenizer=moe_lab.load_tokenizer())")
    try:
        return list(tokenizer.encode(text, bos=add_bos))  # moe_lab.Tokenizer
    except TypeError:
        return list(tokenizer.encode(text, add_special_tokens=add_bos))  # transformers tokenizers


def _pieces(tokenizer, ids: list[int]) -> list[str] | None:
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "pieces"):
        return list(tokenizer.pieces(ids))
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return list(tokenizer.convert_ids_to_tokens(ids))
    return None


def _as_doc(item, tokenizer, add_bos: bool, where: str) -> list[int]:
    if isinstance(item, str):
        return _encode(tokenizer, item, add_bos)
    if isinstance(item, Tensor):
        if item.dim() != 1:
            raise ValueError(f"{where}: a document tensor must be 1-D token ids, got shape {tuple(item.shape)}")
        return [int(x) for x in item.tolist()]
    if isinstance(item, np.ndarray):
        return [int(x) for x in item.reshape(-1).tolist()]
    if isinstance(item, Sequence) and all(isinstance(x, (int, np.integer)) for x in item):
        return [int(x) for x in item]
    raise TypeError(f"{where}: expected a text or a list of token ids, got {type(item).__name__}")


def normalise_inputs(inputs, tokenizer=None, *, add_bos: bool = True, domain=None,
                     attention_mask: Tensor | None = None) -> tuple[list[list[int]], list[str]]:
    """Any accepted input -> (documents as token lists, one domain label per document)."""
    docs: list[list[int]]
    domains: list[str] | None = None
    if isinstance(inputs, Tensor):
        if inputs.dim() == 1:
            inputs = inputs[None]
        if inputs.dim() != 2:
            raise ValueError(f"a token tensor must be [B, T] (or [T]), got shape {tuple(inputs.shape)}")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(inputs.shape):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(inputs.shape)}")
            docs = [row[m.bool()].tolist() for row, m in zip(inputs.cpu(), attention_mask.cpu())]
        else:
            docs = inputs.cpu().tolist()
    elif isinstance(inputs, Mapping):
        docs, domains = [], []
        for dom, items in inputs.items():
            if isinstance(items, (str, Tensor)) or (isinstance(items, Sequence) and items and isinstance(items[0], int)):
                items = [items]  # one document
            for j, item in enumerate(items):
                docs.append(_as_doc(item, tokenizer, add_bos, f"inputs[{dom!r}][{j}]"))
                domains.append(str(dom))
        if domain is not None:
            raise ValueError("domain= labels documents of a list; a mapping already names its domains")
    elif isinstance(inputs, str):
        docs = [_encode(tokenizer, inputs, add_bos)]
    elif isinstance(inputs, Sequence):
        if len(inputs) and all(isinstance(x, (int, np.integer)) for x in inputs):
            docs = [[int(x) for x in inputs]]  # a single list of ids
        else:
            docs = [_as_doc(item, tokenizer, add_bos, f"inputs[{i}]") for i, item in enumerate(inputs)]
    else:
        raise TypeError(f"inputs must be a token tensor, a list of token lists, a list of texts or a mapping "
                        f"domain -> list of texts, got {type(inputs).__name__}")
    if not docs:
        raise ValueError("no documents to trace")
    for i, d in enumerate(docs):
        if not d:
            raise ValueError(f"document {i} is empty")
    if domains is None:
        if domain is None:
            domains = [""] * len(docs)
        elif isinstance(domain, str):
            domains = [domain] * len(docs)
        else:
            domains = [str(x) for x in domain]
            if len(domains) != len(docs):
                raise ValueError(f"domain has {len(domains)} labels for {len(docs)} documents")
    return docs, domains


# --------------------------------------------------------------------------------------------
# capture


class RoutingRecorder:
    """Context manager wrapping ``MoE.routing_fn`` of the traced layers of a moe_lab model.

    ``records[layer]`` gets one ``(indices (N, k), weights (N, k), logits (N, E) or None)`` per
    call, as references (no copy, no sync). Interventions entered before the recorder are seen
    (the recorder wraps them); ``logits`` are the router's raw logits. ``layers`` are layer
    numbers (``model.layer_ids`` for a partly loaded model)."""

    def __init__(self, model, layers=None, keep_logits: bool = False):

        self.model, _ = unwrap(model)
        all_ids = layer_ids(self.model)
        self._block = {lid: i for i, lid in enumerate(all_ids)
                       if self.model.blocks[i].moe is not None}  # MoE layers only (a dense layer has no router)
        ids = list(self._block)
        if not ids:
            raise ValueError("this model has no MoE layer (every layer is dense: first_k_dense / dense_layers): "
                             "there is no routing to trace")
        self.layers = list(ids) if layers is None else [int(l) for l in layers]
        bad = [l for l in self.layers if l not in ids]
        if bad:
            raise ValueError(f"layer {bad[0]} is not in this model (its layers: {all_ids})" if bad[0] not in all_ids
                             else f"layer {bad[0]} is a dense layer (no router; MoE layers: {ids})")
        self.keep_logits = keep_logits
        self.records: dict[int, list] = {l: [] for l in self.layers}
        self._saved: list = []

    def __enter__(self):
        for layer in self.layers:
            moe = self.model.blocks[self._block[layer]].moe
            inner, rec, keep = moe.routing_fn, self.records[layer], self.keep_logits

            def routing_fn(logits, top_k, inner=inner, rec=rec, keep=keep):
                probs, indices, weights = inner(logits, top_k)
                rec.append((indices, weights, logits if keep else None))
                return probs, indices, weights
            self._saved.append((moe, inner))
            moe.routing_fn = routing_fn
        return self

    def __exit__(self, *exc):
        for moe, fn in reversed(self._saved):
            moe.routing_fn = fn
        self._saved.clear()

    def take(self) -> dict[int, list]:
        out = {l: list(calls) for l, calls in self.records.items()}
        for calls in self.records.values():  # cleared in place: the hooks hold these lists
            calls.clear()
        return out


def _batch_arrays(records: dict[int, list], layers: list[int], n_rows: int, keep_logits: bool):
    """Per-layer records of one forward -> numpy ids [L, n_rows, k], weights, logits or None."""
    ids, ws, lg = [], [], []
    for layer in layers:
        calls = records[layer]
        if not calls:
            raise RuntimeError(f"layer {layer} was not routed during the forward (nothing recorded)")
        idx = torch.cat([c[0] for c in calls]) if len(calls) > 1 else calls[0][0]
        w = torch.cat([c[1] for c in calls]) if len(calls) > 1 else calls[0][1]
        if idx.shape[0] != n_rows:
            raise RuntimeError(f"layer {layer} routed {idx.shape[0]} tokens, expected {n_rows}")
        ids.append(idx.cpu())
        ws.append(w.float().cpu())
        if keep_logits:
            l = torch.cat([c[2] for c in calls]) if len(calls) > 1 else calls[0][2]
            lg.append(l.float().cpu())
    k = max(t.shape[1] for t in ids)
    if any(t.shape[1] != k for t in ids):  # SetTopK on some layers only: pad with expert -1, weight 0
        warnings.warn(f"layers routed to different numbers of experts ({sorted({t.shape[1] for t in ids})}); "
                      f"the trace pads to k={k} with expert id -1 and weight 0", stacklevel=4)
        ids = [torch.nn.functional.pad(t, (0, k - t.shape[1]), value=-1) for t in ids]
        ws = [torch.nn.functional.pad(t, (0, k - t.shape[1]), value=0.0) for t in ws]
    return (torch.stack(ids).numpy(), torch.stack(ws).numpy(),
            torch.stack(lg).numpy() if keep_logits else None)


# --------------------------------------------------------------------------------------------
# engines: how one padded batch goes through the model


class _Engine:
    """What a tracing engine shares: its recorder is attached while the engine is entered."""

    def __enter__(self):
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc):
        self.recorder.__exit__(*exc)


class _MoeLabEngine(_Engine):
    def __init__(self, model, layers, keep_logits, device=None):

        self.device = resolve_device(model, device)  # where the batches go: the model's device
        self.model, self.call = unwrap(model)  # a StreamingMixtral is called, its .model hooked
        self.streaming = self.call is not self.model
        self.recorder = RoutingRecorder(self.model, layers, keep_logits)
        self.layers = self.recorder.layers
        self.max_len = self.model.args.max_seq_len
        self.n_experts = self.model.args.n_experts

    def forward(self, tokens, mask):
        last = self.model.blocks[max(self.recorder._block[l] for l in self.layers)]

        def stop(mod, inputs, out):
            raise StopForward
        handle = last.register_forward_hook(stop)
        try:
            self.call(tokens, attention_mask=mask)
        except StopForward:
            pass
        finally:
            handle.remove()
        return self.recorder.take()

    def meta(self) -> dict:
        p = self.model.output.weight
        meta = {"source": "moe_lab", "model_class": type(self.model).__name__,
                "config": self.model.args.to_dict(), "dtype": str(p.dtype).replace("torch.", "")}

        label = provenance(self.model)
        if label:
            meta["provenance"] = label
        if self.streaming:
            meta["model_class"] = type(self.call).__name__
            meta["checkpoint"] = str(getattr(getattr(self.call, "reader", None), "path", ""))
        return meta


class _HFEngine(_Engine):
    def __init__(self, model, layers, keep_logits, device=None):
        self.device = resolve_device(model, device)  # the embedding's device (device_map="auto": the first)
        self.bridge, self.model = bridge, model
        self.recorder = bridge.RouterRecorder(model, layers, keep_logits)
        self.layers = self.recorder.layers
        self.max_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.n_experts = bridge.n_experts_of(next(iter(self.recorder.routers.values())))
        self.renormalise = bridge.renormalises(next(iter(self.recorder.routers.values()))) is not True
        self._stop_after = bridge.decoder_layers(model)[max(self.layers)]
        self.unsorted = type(next(iter(self.recorder.routers.values()))).__name__ in bridge.UNSORTED_ROUTERS

    def forward(self, tokens, mask):
        self.bridge.hf_forward(self.model, tokens, mask, stop_after=self._stop_after)
        return self.recorder.take()

    def meta(self) -> dict:
        return self.bridge.hf_meta(self.model)


def _engine(model, layers, keep_logits, device=None):

    if is_hf_model(model):
        return _HFEngine(model, layers, keep_logits, device)
    if (hasattr(model, "blocks") and hasattr(model, "args")) or hasattr(model, "iter_layers"):
        return _MoeLabEngine(model, layers, keep_logits, device)
    raise TypeError(f"trace_routing needs a moe_lab Mixtral or a transformers MoE model, got {type(model).__name__}")


def _meta(engine, keep_logits: bool, extra: dict | None = None) -> dict:

    meta = engine.meta()
    meta.update({"moe_lab_version": __version__, "torch_version": torch.__version__,
                 "keep_logits": keep_logits,
                 "interventions": [repr(iv) for iv in active_interventions(engine.model)],
                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    if getattr(engine, "renormalise", False):
        meta["weights_note"] = ("weights renormalised over the top-k for the trace; this model's own top-k "
                                "weights do not (necessarily) sum to 1")
    meta.update(extra or {})
    return meta


# --------------------------------------------------------------------------------------------
# public functions


@torch.inference_mode()
def trace_routing(model, inputs, *, tokenizer=None, batch_size: int = 8, progress: bool = True,
                  keep_logits: bool = False, domain: str | Sequence[str] | None = None, add_bos: bool = True,
                  attention_mask: Tensor | None = None, layers: Sequence[int] | None = None,
                  max_len: int | None = None, sort_by_length: bool = True, pad_id: int = 0,
                  device=None) -> RoutingTrace:
    """Run ``model`` over ``inputs`` and record, for every real token and every MoE layer, the
    chosen experts (rank order) and their renormalised weights.

    ``inputs``: a token tensor ``[B, T]`` (with ``attention_mask`` for left-padded rows), a list
    of token lists, a list of texts (needs ``tokenizer``; BOS added when ``add_bos``), or a
    mapping ``domain -> list of texts`` (or of token lists). ``domain`` labels the documents of
    a non-mapping input (one label, or one per document).

    ``model``: a moe_lab ``Mixtral`` (also inside ``moe_lab.intervene``) or a transformers MoE
    model (see :mod:`moe_lab.routing.bridge`).

    Documents are batched ``batch_size`` at a time (sorted by length when ``sort_by_length`` so
    that little padding is needed; the trace keeps the input order), left-padded with an
    attention mask; padding is left out of the trace. ``keep_logits`` also stores the raw
    router logits ``[L, N, E]`` in fp32 (off by default: with 8 experts it doubles the size
    of the trace). ``layers`` traces some layers only (the forward stops after the last one).
    ``max_len`` truncates longer documents (otherwise they are an error beyond the model's
    maximum length). A tqdm bar counts tokens when ``progress``.

    ``device``: None (the model's device) or the model's device; each batch is sent there and
    the trace's arrays come back on the CPU (see :mod:`moe_lab.devices`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    docs, domains = normalise_inputs(inputs, tokenizer, add_bos=add_bos, domain=domain, attention_mask=attention_mask)
    engine = _engine(model, layers, keep_logits, device)
    limit = min(engine.max_len, max_len) if max_len is not None else engine.max_len
    if max_len is not None:
        docs = [d[:max_len] for d in docs]
    too_long = [(i, len(d)) for i, d in enumerate(docs) if len(d) > limit]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"document {i} has {n} tokens, more than the model's maximum {limit}; "
                         f"pass max_len= to truncate ({len(too_long)} documents are too long)")
    lengths = np.array([len(d) for d in docs])
    order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(len(docs))
    from tqdm.auto import tqdm

    bar = tqdm(total=int(lengths.sum()), unit="tok", desc="tracing routing", disable=not progress)
    ids_parts, w_parts, lg_parts, doc_parts = [], [], [], []
    was_training = engine.model.training
    engine.model.eval()
    try:
        with engine:
            for start in range(0, len(docs), batch_size):
                batch = order[start:start + batch_size]
                tokens, mask = left_pad([docs[i] for i in batch], pad_id, engine.device)
                records = engine.forward(tokens, mask)
                ids, ws, lg = _batch_arrays(records, engine.layers, tokens.numel(), keep_logits)
                if getattr(engine, "unsorted", False):  # DeepSeek's router returns an unsorted top-k
                    ids, ws = _rank_order(ids, ws)
                real = np.ones(tokens.numel(), bool) if mask is None else mask.cpu().numpy().reshape(-1).astype(bool)
                ids_parts.append(ids[:, real])
                w_parts.append(ws[:, real])
                if keep_logits:
                    lg_parts.append(lg[:, real])
                doc_parts.append(np.repeat(batch, lengths[batch]))
                bar.update(int(real.sum()))
    finally:
        bar.close()
        engine.model.train(was_training)
    doc_ids = np.concatenate(doc_parts)
    back = np.argsort(doc_ids, kind="stable")  # input document order; positions stay ascending
    token_ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
    trace = RoutingTrace(
        token_ids=token_ids, doc_ids=np.repeat(np.arange(len(docs)), lengths),
        positions=np.concatenate([np.arange(n) for n in lengths]),
        expert_ids=np.concatenate(ids_parts, axis=1)[:, back], weights=_renorm(np.concatenate(w_parts, axis=1)[:, back]),
        router_logits=np.concatenate(lg_parts, axis=1)[:, back] if keep_logits else None,
        domains=domains, layers=list(engine.layers), n_experts=engine.n_experts,
        pieces=_pieces(tokenizer, token_ids.tolist()), meta=_meta(engine, keep_logits))
    return trace


def _rank_order(ids: np.ndarray, ws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each token's experts by weight, largest first (a no-op for a sorted top-k)."""
    order = np.argsort(-ws, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(ws, order, -1)


def _renorm(w: np.ndarray) -> np.ndarray:
    """Weights renormalised over the k (a no-op up to rounding for models that already do)."""
    s = w.sum(-1, keepdims=True)
    if np.allclose(s, 1.0, atol=1e-4):
        return w
    return w / np.maximum(s, np.finfo(np.float32).tiny)


def _prompt_docs(prompt, tokenizer, add_bos: bool) -> list[list[int]]:
    if isinstance(prompt, Tensor):
        return (prompt[None] if prompt.dim() == 1 else prompt).tolist()
    docs, _ = normalise_inputs(prompt, tokenizer, add_bos=add_bos)
    return docs


@torch.inference_mode()
def trace_generation(model, prompt, max_new_tokens: int = 32, *, tokenizer=None, add_bos: bool = True,
                     keep_logits: bool = False, layers: Sequence[int] | None = None,
                     domain: str | Sequence[str] | None = None, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     eos_id: int | None = None, pad_id: int = 0, device=None) -> tuple[Tensor, RoutingTrace]:
    """Generate like ``model.generate`` (same arguments, same tokens) and record the routing of
    every token: the prompt (prefill) and each generated token (the decode steps, KV cache).

    Returns ``(tokens [B, T + n], trace)`` where ``tokens`` is exactly what ``model.generate``
    returns, and the trace has one document per row: its prompt (without padding) followed by
    its generated tokens (up to and including ``eos_id``). The last generated token is fed
    through the model once more so that its routing is known too. ``trace.meta["prompt_lengths"]``
    says where generation starts (``trace.positions >= prompt_length``).

    The tokens come from :func:`moe_lab.generation.generate_stream` (sampling: ``temperature``;
    ``top_k`` keeps the top_k most likely TOKENS, unrelated to experts; ``top_p``; ``seed``).
    ``prompt``: a text or list of texts (with ``tokenizer``), a list of token ids, a list of
    lists or a [B, T] tensor. On a transformers model, generation uses ``hf_model.generate``
    and the trace comes from one forward over the final sequences.

    ``device``: None (the model's device) or the model's device. ``tokens`` are on the model's
    device, as ``model.generate`` returns them; the trace is on the CPU (:mod:`moe_lab.devices`).
    """

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    docs = _prompt_docs(prompt, tokenizer, add_bos)
    if is_hf_model(model):
        return _hf_trace_generation(model, docs, max_new_tokens, tokenizer=tokenizer, keep_logits=keep_logits,
                                    layers=layers, domain=domain, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, eos_id=eos_id, pad_id=pad_id, device=device)
    if hasattr(model, "iter_layers"):
        raise TypeError("trace_generation needs a model held in memory (a StreamingMixtral would re-read every "
                        "layer for every new token); use trace_routing on the final sequences instead")
    engine = _MoeLabEngine(model, layers, keep_logits, device)
    tokens, mask = left_pad(docs, pad_id, engine.device)
    B, T = tokens.shape
    if T + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.args.max_seq_len}")
    cache = model.new_cache(B, T + max_new_tokens)
    new: list[Tensor] = []
    steps: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        with engine.recorder as rec:
            for nxt in generate_stream(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, eos_id=eos_id, pad_id=pad_id,
                                       attention_mask=mask, cache=cache, device=engine.device):
                steps.append(rec.take())  # the forward whose logits gave nxt: the prompt, then each token
                new.append(nxt)
            if new:  # feed the last generated token too, so that its routing is recorded
                model(new[-1][:, None], cache=cache, last_only=True)
            steps.append(rec.take())
    finally:
        model.train(was_training)
    out = torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens
    # routing per step -> [L, B, T + n, k]
    per_step = [_batch_arrays(s, engine.layers, B * (T if i == 0 else 1), keep_logits) for i, s in enumerate(steps)]
    ids = np.concatenate([p[0].reshape(len(engine.layers), B, -1, p[0].shape[-1]) for p in per_step], axis=2)
    ws = np.concatenate([p[1].reshape(len(engine.layers), B, -1, p[1].shape[-1]) for p in per_step], axis=2)
    lg = (np.concatenate([p[2].reshape(len(engine.layers), B, -1, p[2].shape[-1]) for p in per_step], axis=2)
          if keep_logits else None)
    keep = _generation_keep(out.cpu(), mask, T, eos_id)  # [B, T + n] real tokens
    return out, _trace_from_rows(out.cpu(), keep, ids, ws, lg, engine, keep_logits, tokenizer, domain,
                                 prompt_lengths=[len(d) for d in docs])


def _generation_keep(out: Tensor, mask: Tensor | None, T: int, eos_id: int | None) -> np.ndarray:
    B, total = out.shape
    keep = np.ones((B, total), dtype=bool)
    if mask is not None:
        keep[:, :T] = mask.cpu().numpy().astype(bool)
    if eos_id is not None and total > T:
        gen = out[:, T:].numpy()
        for b in range(B):
            hits = np.nonzero(gen[b] == eos_id)[0]
            if hits.size:
                keep[b, T + hits[0] + 1:] = False
    return keep


def _trace_from_rows(out, keep, ids, ws, lg, engine, keep_logits, tokenizer, domain, prompt_lengths):
    B = out.shape[0]
    flat = keep.reshape(-1)
    L, k = ids.shape[0], ids.shape[-1]
    lengths = keep.sum(1)
    token_ids = out.numpy().reshape(-1)[flat]
    if domain is None:
        domains = [""] * B
    elif isinstance(domain, str):
        domains = [domain] * B
    else:
        domains = list(domain)
    return RoutingTrace(
        token_ids=token_ids, doc_ids=np.repeat(np.arange(B), lengths),
        positions=np.concatenate([np.arange(n) for n in lengths]),
        expert_ids=ids.reshape(L, -1, k)[:, flat], weights=_renorm(ws.reshape(L, -1, k)[:, flat]),
        router_logits=lg.reshape(L, -1, lg.shape[-1])[:, flat] if keep_logits else None,
        domains=domains, layers=list(engine.layers), n_experts=engine.n_experts,
        pieces=_pieces(tokenizer, token_ids.tolist()),
        meta=_meta(engine, keep_logits, {"generated": True, "prompt_lengths": [int(n) for n in prompt_lengths]}))


def _hf_trace_generation(model, docs, max_new_tokens, *, tokenizer, keep_logits, layers, domain, temperature,
                         top_k, top_p, seed, eos_id, pad_id, device):

    device = resolve_device(model, device)
    tokens, mask = left_pad(docs, pad_id, device)
    T = tokens.shape[1]
    if mask is None:
        mask = torch.ones_like(tokens)
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=pad_id,
                              eos_token_id=eos_id, do_sample=temperature > 0)
    if temperature > 0:
        kw.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
        if seed is not None:
            torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(tokens, attention_mask=mask, **kw)  # on the model's device
    host = out.cpu()
    keep = _generation_keep(host, mask, T, eos_id)
    rows = [host[b][torch.from_numpy(keep[b])].tolist() for b in range(out.shape[0])]
    trace = trace_routing(model, rows, keep_logits=keep_logits, layers=layers, domain=domain, progress=False,
                          tokenizer=tokenizer, batch_size=len(rows), device=device)
    trace.meta.update({"generated": True, "prompt_lengths": [len(d) for d in docs],
                       "generation_note": "transformers generate; routing from one forward over the final sequences"})
    return out, trace
