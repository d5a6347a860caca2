"""RoutingTrace: which experts every token went to, in every layer, flattened over documents.

Arrays are numpy (analysis code is numpy and pandas). N tokens, L traced layers, k experts per
token, E experts. Every figure and analysis in moe_lab reads one of these.

A trace may hold expert ids only (``weights`` and ``router_logits`` both ``None``): that is what
serving engines (vLLM, SGLang) and the OLMoE study record. Analyses that need weights or logits
refuse such a trace by name (:meth:`RoutingTrace.require`); the others work unchanged.

A token routed to fewer than k experts has **empty slots: expert id -1, weight 0**. That is how a
trace records designs where tokens get a variable number of experts: tokens dropped by an expert's
capacity (Switch: the slot is -1, the token passes through the residual), expert choice (k = E
columns, a token's experts first, then -1), and ``SetTopK`` on some layers only. Load counts skip them.

Importers for those formats are the ``RoutingTrace.from_*`` classmethods (parsing lives in
:mod:`moe_lab.routing.importers`).

**One type, any size.** Expert ids are held in the smallest dtype that fits (``uint8`` up to 256
experts; ``int8`` when ``-1`` pads a slot), token ids and positions as ``int32``.
:meth:`RoutingTrace.save` writes the chunked on-disk form (a directory of ``.npy`` columns, see
:mod:`moe_lab.routing.store`) and :meth:`RoutingTrace.load` memory-maps it: what comes back is a
``RoutingTrace`` (a :class:`~moe_lab.routing.store.TraceStore`, its disk-backed kind) that every
analysis reads chunk by chunk. Old single-file ``.safetensors`` traces still load.

**Rank order.** ``rank_ordered`` says whether column 0 of ``expert_ids`` is the first choice
(the largest router weight). moe_lab's own traces and the OLMoE study's are; an engine's
(vLLM, SGLang) only when the model's config names a router whose top-k the engine returns
sorted (:func:`moe_lab.routing.importers.model_layout`). Analyses of "the first choice" refuse
an unordered trace (:meth:`RoutingTrace.require_rank_order`); analyses of top-k sets work.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import importers

FORMAT_VERSION = 1  # the old single-file .safetensors form (still read by load)
#: meta keys holding one entry per document (sliced by select, joined by concat, stored per chunk)
DOC_META = ("prompt_lengths", "doc_checkpoints")
#: the chunked on-disk form, registered by :mod:`moe_lab.routing.store` when it is imported (it
#: imports this module, so this one cannot import it; ``import moe_lab`` loads both):
#: "save" (trace, path, shard_tokens, progress), "pieces" (path, pieces), "open" (path)
CHUNKED: dict = {}


def _chunked(name: str):
    if name not in CHUNKED:
        raise RuntimeError("the chunked trace form is registered by moe_lab.routing.store: import moe_lab first")
    return CHUNKED[name]


def layer_row(layers: list[int], layer: int) -> int:
    """Index of model layer ``layer`` in a trace's ``layers`` (a KeyError naming them if absent)."""
    try:
        return layers.index(layer)
    except ValueError:
        raise KeyError(f"layer {layer} is not in this trace (it holds layers {layers})") from None


@dataclass
class RoutingTrace:
    token_ids: np.ndarray  # [N] int32
    doc_ids: np.ndarray  # [N] int32, 0..n_docs-1
    positions: np.ndarray  # [N] int32, position within the document (0 = BOS if present)
    expert_ids: np.ndarray  # [L, N, k] uint8 (E <= 256; a signed type where a slot is -1: empty, see below),
    #                         column 0 = first choice if rank_ordered
    weights: np.ndarray | None = None  # [L, N, k] float32, renormalised over the k; None = ids only
    router_logits: np.ndarray | None = None  # [L, N, E] float32, optional
    domains: list[str] = field(default_factory=list)  # one label per document ("" if none)
    layers: list[int] = field(default_factory=list)  # model layer index of each row of expert_ids
    n_experts: int = 0
    pieces: list[str] | None = None  # [N] display strings, when traced with a tokenizer
    meta: dict = field(default_factory=dict)  # model config, dtype, moe_lab version, ...
    rank_ordered: bool = True  # column 0 of expert_ids is the first choice (see the module docstring)

    def __post_init__(self):
        self.token_ids = _narrow_int(self.token_ids, "token_ids")
        self.doc_ids = _narrow_int(self.doc_ids, "doc_ids")
        self.positions = _narrow_int(self.positions, "positions")
        self.expert_ids = np.asarray(self.expert_ids)
        if not np.issubdtype(self.expert_ids.dtype, np.integer):
            if self.expert_ids.size and not np.array_equal(self.expert_ids, np.round(self.expert_ids)):
                raise ValueError(f"expert_ids must be integers, found dtype {self.expert_ids.dtype}")
            self.expert_ids = self.expert_ids.astype(np.int64)
        self.rank_ordered = bool(self.rank_ordered)
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float32)
        if self.router_logits is not None:
            self.router_logits = np.asarray(self.router_logits, dtype=np.float32)
        N = self.token_ids.shape[0]
        if self.expert_ids.ndim != 3:
            raise ValueError(f"expert_ids must be [L, N, k], got shape {self.expert_ids.shape}")
        L, _, k = self.expert_ids.shape
        checks = [("doc_ids", self.doc_ids.shape, (N,)), ("positions", self.positions.shape, (N,)),
                  ("expert_ids", self.expert_ids.shape, (L, N, k))]
        if self.weights is not None:
            checks.append(("weights", self.weights.shape, (L, N, k)))
        if self.router_logits is not None:
            checks.append(("router_logits", self.router_logits.shape[:2], (L, N)))
        for name, found, expected in checks:
            if tuple(found) != tuple(expected):
                raise ValueError(f"{name} has shape {tuple(found)}, expected {tuple(expected)}")
        if not self.layers:
            self.layers = list(range(L))
        if len(self.layers) != L:
            raise ValueError(f"layers lists {len(self.layers)} layers but expert_ids has {L}")
        n_docs = int(self.doc_ids.max()) + 1 if N else 0
        if not self.domains:
            self.domains = [""] * n_docs
        if len(self.domains) < n_docs:
            raise ValueError(f"domains has {len(self.domains)} labels but doc_ids go up to {n_docs - 1}")
        if not self.n_experts:
            self.n_experts = (self.router_logits.shape[2] if self.router_logits is not None
                              else int(self.expert_ids.max()) + 1 if self.expert_ids.size else 0)
        if self.expert_ids.size:  # -1 pads the slots of a layer that routes to fewer experts (SetTopK)
            lo, hi = int(self.expert_ids.min()), int(self.expert_ids.max())
            if lo < -1 or hi >= self.n_experts:
                raise ValueError(f"expert_ids must be in [0, {self.n_experts}) (n_experts={self.n_experts}; -1 "
                                 f"for padding), found values {lo}..{hi}")
        else:
            lo = 0
        self.expert_ids = self.expert_ids.astype(importers.id_dtype(self.n_experts, signed=lo < 0), copy=False)
        if self.pieces is not None and len(self.pieces) != N:
            raise ValueError(f"pieces has {len(self.pieces)} entries, expected {N}")

    # ---- sizes

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def n_docs(self) -> int:
        return len(self.domains)

    @property
    def ids_only(self) -> bool:
        """True when the trace holds expert ids but neither weights nor router logits (what vLLM,
        SGLang and the OLMoE study record)."""
        return self.weights is None and self.router_logits is None

    def require_rank_order(self, analysis: str, instead: str = "") -> None:
        """Raise a ValueError naming ``analysis`` unless column 0 of ``expert_ids`` is known to be
        the first choice (``rank_ordered``): an engine's grouped/biased router returns its top-k
        unsorted, so "the first choice" of such a trace is an arbitrary one of the k."""
        if self.rank_ordered:
            return
        src = self.meta.get("source", "this trace")
        why = self.meta.get("rank_order_reason")
        raise ValueError(
            f"{analysis} reads the first choice (column 0 of expert_ids), but this trace ({src}) is not rank-ordered"
            + (f" ({why})" if why else "") + ": its top-k may be in any order. What works instead: "
            + (instead + "; " if instead else "")
            + "analyses of the top-k set (kind='any', choice='either', co-activation, specialisation, the expert "
              "cache); a trace with router weights, sorted by weight (moe_lab.trace_routing through the "
              "transformers bridge); or, for an engine trace of a model whose router sorts its top-k, importing it "
              "with config= (the model's config.json)")

    def require(self, fields: str | Sequence[str], analysis: str) -> None:
        """Raise a ValueError naming ``analysis`` unless this trace holds ``fields`` ("weights",
        "router_logits"; a sequence means "any one of them")."""
        names = [fields] if isinstance(fields, str) else list(fields)
        if any(getattr(self, f) is not None for f in names):
            return
        src = self.meta.get("source", "this trace")
        raise ValueError(f"{analysis} needs the router's {' or '.join(names)}, but this trace ({src}) holds "
                         f"expert ids only; analyses of ids (load, repetition, co-activation, specialisation, "
                         f"the expert cache) still work")

    @property
    def is_generated(self) -> np.ndarray:
        """[N] bool: the token was generated (position >= its document's prompt length in
        ``meta["prompt_lengths"]``); all False when the trace does not say."""
        lengths = self.meta.get("prompt_lengths")
        if lengths is None or len(lengths) != self.n_docs:
            return np.zeros(self.n_tokens, dtype=bool)
        return self.positions >= np.asarray(lengths, dtype=np.int64)[self.doc_ids]

    @property
    def domain_names(self) -> list[str]:
        """Distinct domain labels in order of first appearance."""
        return list(dict.fromkeys(self.domains))

    @property
    def token_domains(self) -> np.ndarray:
        """[N] domain label of each token."""
        return np.asarray(self.domains, dtype=object)[self.doc_ids] if self.n_tokens else np.array([], dtype=object)

    def layer_index(self, layer: int) -> int:
        """Row of ``expert_ids`` holding model layer ``layer``."""
        return layer_row(self.layers, layer)

    def __repr__(self):
        doms = ", ".join(self.domain_names) or "-"
        return (f"RoutingTrace(tokens={self.n_tokens}, docs={self.n_docs}, layers={self.layers}, "
                f"experts={self.n_experts}, top_k={self.top_k}, domains=[{doms}], "
                f"weights={'yes' if self.weights is not None else 'no'}, "
                f"router_logits={'yes' if self.router_logits is not None else 'no'}, "
                f"rank_ordered={self.rank_ordered})")

    # ---- selection and concatenation

    def select(self, layers: Iterable[int] | None = None, docs: Iterable[int] | None = None,
               domain: str | Sequence[str] | None = None) -> "RoutingTrace":
        """A new trace restricted to model layers, document ids and/or domain(s). Documents are
        renumbered 0..n-1 in their original order."""
        rows = list(range(self.n_layers)) if layers is None else [self.layer_index(l) for l in layers]
        keep_docs = np.ones(self.n_docs, dtype=bool)
        if docs is not None:
            wanted = np.zeros(self.n_docs, dtype=bool)
            idx = np.asarray(list(docs), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= self.n_docs):
                raise IndexError(f"document ids must be in [0, {self.n_docs}), got {idx.min()}..{idx.max()}")
            wanted[idx] = True
            keep_docs &= wanted
        if domain is not None:
            names = [domain] if isinstance(domain, str) else list(domain)
            unknown = set(names) - set(self.domains)
            if unknown:
                raise KeyError(f"unknown domain(s) {sorted(unknown)}; this trace has {self.domain_names}")
            keep_docs &= np.isin(np.asarray(self.domains, dtype=object), names)
        tok = keep_docs[self.doc_ids] if self.n_tokens else np.zeros(0, dtype=bool)
        new_id = np.cumsum(keep_docs) - 1
        meta = dict(self.meta)
        for key in DOC_META:
            if len(meta.get(key) or []) == self.n_docs:
                meta[key] = [n for n, k in zip(meta[key], keep_docs) if k]
        return RoutingTrace(
            token_ids=self.token_ids[tok], doc_ids=new_id[self.doc_ids[tok]], positions=self.positions[tok],
            expert_ids=self.expert_ids[rows][:, tok],
            weights=None if self.weights is None else self.weights[rows][:, tok],
            router_logits=None if self.router_logits is None else self.router_logits[rows][:, tok],
            domains=[d for d, k in zip(self.domains, keep_docs) if k], layers=[self.layers[r] for r in rows],
            n_experts=self.n_experts, pieces=None if self.pieces is None else [p for p, k in zip(self.pieces, tok) if k],
            meta=meta, rank_ordered=self.rank_ordered)

    @classmethod
    def concat(cls, traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        """Documents of several traces (same layers and top-k) in one trace."""
        if not traces:
            raise ValueError("concat needs at least one trace")
        first = traces[0]
        for t in traces[1:]:
            if t.layers != first.layers or t.top_k != first.top_k or t.n_experts != first.n_experts:
                raise ValueError(f"cannot concatenate traces with layers/top_k/n_experts {t.layers}/{t.top_k}/"
                                 f"{t.n_experts} and {first.layers}/{first.top_k}/{first.n_experts}")
        offsets = np.cumsum([0] + [t.n_docs for t in traces[:-1]])
        logits = None
        if all(t.router_logits is not None for t in traces):
            logits = np.concatenate([t.router_logits for t in traces], axis=1)
        weights = None
        if all(t.weights is not None for t in traces):
            weights = np.concatenate([t.weights for t in traces], axis=1)
        pieces = None
        if all(t.pieces is not None for t in traces):
            pieces = [p for t in traces for p in t.pieces]
        return cls(
            token_ids=np.concatenate([t.token_ids for t in traces]),
            doc_ids=np.concatenate([t.doc_ids + o for t, o in zip(traces, offsets)]),
            positions=np.concatenate([t.positions for t in traces]),
            expert_ids=np.concatenate([t.expert_ids for t in traces], axis=1),
            weights=weights, router_logits=logits, domains=[d for t in traces for d in t.domains],
            layers=list(first.layers), n_experts=first.n_experts, pieces=pieces, meta=_concat_meta(traces),
            rank_ordered=all(t.rank_ordered for t in traces))

    def __add__(self, other: "RoutingTrace") -> "RoutingTrace":
        return RoutingTrace.concat([self, other])

    # ---- importers (parsing in moe_lab.routing.importers; each cites the producer's code)

    @classmethod
    def from_olmoe(cls, path: str | os.PathLike | Sequence[str | os.PathLike], *, n_experts: int | None = None,
                   domain: str | None = None, token_ids: str = "input",
                   max_docs: int | None = None) -> "RoutingTrace":
        """An id-only trace from the OLMoE study's routing files (``allenai/analysis_mixtral`` or
        ``allenai/analysis_olmoe``: ``c4_results*.jsonl``), one document per 2048-token window.
        Rank-ordered (the study wrote ``argsort`` of the router logits). Several paths give one
        trace; each file's dataset name (from its file name, the only place the study records it)
        becomes the domain of its documents unless ``domain`` is given, and its checkpoint
        (``c4_results.jsonl``: the final model, ``c4_results_5000.jsonl``: step 5000) is kept per
        document in ``meta["doc_checkpoints"]`` (``meta["checkpoint"]`` is None when the files
        mix checkpoints; pick one with :meth:`select_checkpoint`).
        Format and options: :func:`moe_lab.routing.importers.read_olmoe`."""
        paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        docs = [d for p in paths for d in importers.read_olmoe(p, n_experts=n_experts, domain=domain,
                                                                token_ids=token_ids, max_docs=max_docs)]
        if not docs:
            raise ValueError(f"no records in {', '.join(map(str, paths))}")
        _, L, k = docs[0].expert_ids.shape
        if n_experts is None:
            n_experts = importers.OLMOE_STUDY_MODELS[(k, L)][1]
        meta = importers.olmoe_meta(paths[0], k, L, token_ids)
        checkpoints = [d.info["checkpoint"] for d in docs]
        if len(paths) > 1:
            meta["files"] = [str(p) for p in paths]
        meta["doc_checkpoints"] = checkpoints
        meta["checkpoints"] = list(dict.fromkeys(checkpoints))
        if len(meta["checkpoints"]) > 1:
            meta["checkpoint"] = None  # mixed: per document in doc_checkpoints
        return cls(**importers.collect(docs, n_experts=n_experts, meta=meta))

    def select_checkpoint(self, checkpoint: str) -> "RoutingTrace":
        """The documents of one checkpoint (``meta["doc_checkpoints"]``, set by :meth:`from_olmoe`
        when files of several checkpoints are read together, e.g. ``"main"`` or ``"step5000"``)."""
        cps = self.meta.get("doc_checkpoints")
        if cps is None or len(cps) != self.n_docs:
            raise KeyError("this trace records no checkpoint per document (meta['doc_checkpoints']); "
                           "RoutingTrace.from_olmoe sets it")
        if checkpoint not in cps:
            raise KeyError(f"no documents of checkpoint {checkpoint!r}; this trace has {list(dict.fromkeys(cps))}")
        out = self.select(docs=[d for d, c in enumerate(cps) if c == checkpoint])
        out.meta["checkpoint"] = checkpoint
        out.meta["checkpoints"] = [checkpoint]
        return out

    @staticmethod
    def _engine_meta(base: dict, report: dict, rank_ordered: bool | None) -> tuple[dict, bool]:
        meta = dict(base)
        ordered = report.get("rank_ordered", False) if rank_ordered is None else bool(rank_ordered)
        meta.update(rank_order_reason=("set by the caller (rank_ordered=)" if rank_ordered is not None
                                       else report.get("rank_order_reason")),
                    layer_note=report.get("layer_note"), dropped_layers=report.get("dropped_layers", []))
        if report.get("layout"):
            meta["config"] = report["layout"]
        return meta, ordered

    @classmethod
    def from_vllm(cls, outputs, *, n_experts: int | None = None, config=None, prompt_start: int = 0,
                  layers: Sequence[int] | None = None, domain: str | Sequence[str] = "", model: str | None = None,
                  engine_version: str | None = None, drop_unknown: bool = True,
                  rank_ordered: bool | None = None) -> "RoutingTrace":
        """An id-only trace from vLLM ``RequestOutput`` objects (offline ``LLM.generate`` with
        ``enable_return_routed_experts=True``), the same fields as dicts, or OpenAI-server
        response dicts: one document per completion, prompt and generated tokens both kept
        (``meta["prompt_lengths"]``, :attr:`is_generated`). Every vLLM release with the feature
        (0.14-0.34) is read.

        ``config=``: the model's ``config.json`` (path, directory or dict). It names the MoE layers
        (dense layers come back as zero rows, never routing), labels them with their decoder
        index, gives ``n_experts``, and says whether the router's top-k comes back sorted
        (``rank_ordered``). Without it, layers whose rows all repeat an expert are dropped with a
        warning, a top-1 model is refused, and the trace is not rank-ordered. Completions without
        routing are skipped with a warning (``meta["skipped"]``). ``rank_ordered=True`` asserts a
        sorted top-k yourself. Format and options: :func:`moe_lab.routing.importers.read_vllm`."""
        report: dict = {}
        docs = list(importers.read_vllm(outputs, n_experts=n_experts, prompt_start=prompt_start, layers=layers,
                                        config=config, domain=domain, drop_unknown=drop_unknown,
                                        engine_version=engine_version, report=report))
        if not docs:
            skipped = report.get("skipped") or []
            raise ValueError("no vLLM outputs to import" + (f": all {len(skipped)} completions came back without "
                                                            f"routing ({skipped[0]['cause']})" if skipped else ""))
        n_experts = n_experts or importers.model_layout(config).n_experts
        meta, ordered = cls._engine_meta(
            {"source": "vLLM routed experts", "engine": "vllm", "engine_version": engine_version, "model": model,
             "ids_only": True, "requests": [d.info for d in docs], "skipped": report.get("skipped", []),
             "unknown_rows": sum(d.info["unknown_rows"] for d in docs),
             "note": "the last sampled token of each sequence has no routing (never forwarded) and is not in "
                     "the trace"}, report, rank_ordered)
        out = importers.collect(docs, n_experts=n_experts, meta=meta)
        out["rank_ordered"] = ordered
        return cls(**out)

    @classmethod
    def from_sglang(cls, responses, *, n_layers: int | None = None, top_k: int | None = None,
                    n_experts: int | None = None, config=None, input_ids: Sequence[Sequence[int]] | None = None,
                    output_ids: Sequence[Sequence[int]] | None = None, start_len: int | Sequence[int] = 0,
                    layers: Sequence[int] | None = None, domain: str | Sequence[str] = "",
                    model: str | None = None, engine_version: str | None = None,
                    rank_ordered: bool | None = None) -> "RoutingTrace":
        """An id-only trace from SGLang responses with ``return_routed_experts`` (``/generate``
        ``meta_info`` or the OpenAI endpoints' ``sglext``): one document per response. Token ids
        are read where each endpoint puts them; ``config=`` as in :meth:`from_vllm` (and it gives
        ``n_layers``, ``top_k``, ``n_experts``). Format and options:
        :func:`moe_lab.routing.importers.read_sglang`."""
        report: dict = {}
        docs = list(importers.read_sglang(responses, n_layers=n_layers, top_k=top_k, n_experts=n_experts,
                                          config=config, input_ids=input_ids, output_ids=output_ids,
                                          start_len=start_len, layers=layers, domain=domain, report=report))
        if not docs:
            raise ValueError("no SGLang responses to import")
        n_experts = n_experts or importers.model_layout(config).n_experts
        meta, ordered = cls._engine_meta(
            {"source": "SGLang routed experts", "engine": "sglang", "engine_version": engine_version,
             "model": model, "ids_only": True, "requests": [d.info for d in docs],
             "unknown_rows": sum(d.info["unknown_rows"] for d in docs)}, report, rank_ordered)
        out = importers.collect(docs, n_experts=n_experts, meta=meta)
        out["rank_ordered"] = ordered
        return cls(**out)

    @classmethod
    def from_sglang_dump(cls, dump, *, top_k: int | None = None, n_experts: int | None = None, config=None,
                         logical: bool = True, domain: str = "", model: str | None = None,
                         rank_ordered: bool | None = None) -> "RoutingTrace":
        """An id-only trace from a per-token dump of SGLang's expert-distribution recorder (the
        ``.pt`` file of ``/dump_expert_distribution_record``, or its loaded dict). Format, how
        sequences are rebuilt without request ids (and when that is refused), and options:
        :func:`moe_lab.routing.importers.read_sglang_dump`."""
        report: dict = {}
        docs = list(importers.read_sglang_dump(dump, top_k=top_k, n_experts=n_experts, logical=logical,
                                               domain=domain, config=config, report=report))
        if not docs:
            raise ValueError("the dump holds no tokens")
        if n_experts is None:
            n_experts = importers.model_layout(config).n_experts if config is not None else None
        if n_experts is None:
            n_experts = int(max(int(d.expert_ids.max()) for d in docs if d.expert_ids.size)) + 1
        meta, ordered = cls._engine_meta(
            {"source": "SGLang expert-distribution recorder (per_token)", "engine": "sglang", "model": model,
             "ids_only": True, "expert_ids": "logical" if logical else "physical"}, report, rank_ordered)
        out = importers.collect(docs, n_experts=n_experts, meta=meta)
        out["rank_ordered"] = ordered
        return cls(**out)

    # ---- export

    def to_pandas(self, tokenizer=None):
        """Long table: one row per (token, layer, rank) with doc, domain, position, token id,
        piece, layer, rank, expert and (unless the trace holds ids only) weight."""
        import pandas as pd

        L, N, k = self.expert_ids.shape
        pieces = self.pieces
        if pieces is None and tokenizer is not None:
            pieces = tokenizer.pieces(self.token_ids.tolist())
        tok_cols = {
            "doc": self.doc_ids, "domain": self.token_domains, "position": self.positions,
            "token_id": self.token_ids, "piece": np.asarray(pieces if pieces is not None else [""] * N, dtype=object),
        }
        rep = L * k  # each token appears once per (layer, rank)
        order = np.arange(N).repeat(rep)  # token index of each row, layers and ranks inside
        df = pd.DataFrame({name: col[order] for name, col in tok_cols.items()})
        df["layer"] = np.tile(np.asarray(self.layers).repeat(k), N)
        df["rank"] = np.tile(np.arange(k), N * L)
        df["expert"] = self.expert_ids.transpose(1, 0, 2).reshape(-1)
        if self.weights is not None:
            df["weight"] = self.weights.transpose(1, 0, 2).reshape(-1)
        return df

    # ---- files

    def save(self, path: str | os.PathLike, *, progress: bool = False) -> Path:
        """Write the trace to the directory ``path`` in the chunked, memory-mappable form of
        :mod:`moe_lab.routing.store` (``.npy`` columns: expert ids in the smallest dtype, token
        ids int32; weights and logits when the trace has them; rank order, layers, domains, meta
        and pieces in the manifest). :meth:`load` memory-maps it back. Atomic: the directory is
        written beside ``path`` and renamed into place, replacing a trace saved there before."""
        path = Path(path)
        if path.exists() and not (path.is_dir() and (path / "manifest.json").exists()) and not \
                (path.is_file() and path.suffix == ".safetensors"):
            raise FileExistsError(f"{path} exists and is not a saved routing trace; not overwriting it")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            _chunked("save")(self, tmp / "trace", shard_tokens=max(self.n_tokens, 1), progress=progress)
            if self.pieces is not None:
                _chunked("pieces")(tmp / "trace", self.pieces)
            if path.is_dir():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                os.replace(path, old / "trace")
                os.replace(tmp / "trace", path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                if path.exists():
                    path.unlink()
                os.replace(tmp / "trace", path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        """A saved trace. A directory (:meth:`save`, ``TraceWriter``, ``scripts/trace_with_vllm.py``)
        comes back memory-mapped: a :class:`~moe_lab.routing.store.TraceStore`, which is a
        ``RoutingTrace`` whose arrays are read from disk on use and which every analysis reads
        chunk by chunk. An old single-file ``.safetensors`` trace is read into memory."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no routing trace at {path}")
        if path.is_dir():
            return _chunked("open")(path)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
        if "moe_lab_routing_trace" not in meta:
            raise ValueError(f"{path} is a safetensors file but not a moe_lab routing trace (no header)")
        header = json.loads(meta["moe_lab_routing_trace"])
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} has routing-trace format version {version}; this moe_lab reads version {FORMAT_VERSION}")
        missing = {"token_ids", "doc_ids", "positions", "expert_ids"} - set(arrays)
        if missing:
            raise ValueError(f"{path} lacks arrays {sorted(missing)}")
        meta = header.get("meta", {})
        ordered = header.get("rank_ordered", default_rank_ordered(meta))
        return cls(**arrays, domains=header["domains"], layers=header["layers"], n_experts=header["n_experts"],
                   pieces=header.get("pieces"), meta=meta, rank_ordered=ordered)


def default_rank_ordered(meta: dict) -> bool:
    """Rank order of a trace saved before ``rank_ordered`` existed: engine traces (vLLM,
    SGLang) unknown, so False; moe_lab's own and the OLMoE study's True."""
    return str(meta.get("engine") or "").lower() not in ("vllm", "sglang")


def _concat_meta(traces: Sequence[RoutingTrace]) -> dict:
    """The first trace's meta; per-document lists (prompt lengths, checkpoints) joined when every
    trace has them; a rank-order reason kept from the first unordered trace."""
    meta = dict(traces[0].meta)
    for key in DOC_META:
        lists = [t.meta.get(key) for t in traces]
        if all(n is not None and len(n) == t.n_docs for n, t in zip(lists, traces)):
            meta[key] = [x if isinstance(x, str) or x is None else int(x) for n in lists for x in n]
        else:
            meta.pop(key, None)
    unordered = [t for t in traces if not t.rank_ordered]
    if unordered and "rank_order_reason" in unordered[0].meta:
        meta["rank_order_reason"] = unordered[0].meta["rank_order_reason"]
    return meta


def _narrow_int(a, name: str) -> np.ndarray:
    """int32 copy (or view) of an integer column, with a clear error if a value does not fit."""
    a = np.asarray(a)
    if a.dtype == np.int32:
        return a
    if a.size and a.dtype.kind in "iu" and a.dtype.itemsize >= 4:
        lo, hi = int(a.min()), int(a.max())
        if lo < -(2**31) or hi >= 2**31:
            raise ValueError(f"{name} must fit in int32, found values {lo}..{hi}")
    if a.size and a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
        raise ValueError(f"{name} must be integers, found dtype {a.dtype}")
    return a.astype(np.int32)
