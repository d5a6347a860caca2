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
:mod:`moe_lab.routing.importers`); traces of millions of tokens live on disk in
:mod:`moe_lab.routing.store`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import importers

FORMAT_VERSION = 1


def layer_row(layers: list[int], layer: int) -> int:
    """Index of model layer ``layer`` in a trace's ``layers`` (a KeyError naming them if absent)."""
    try:
        return layers.index(layer)
    except ValueError:
        raise KeyError(f"layer {layer} is not in this trace (it holds layers {layers})") from None


@dataclass
class RoutingTrace:
    token_ids: np.ndarray  # [N] int64
    doc_ids: np.ndarray  # [N] int64, 0..n_docs-1
    positions: np.ndarray  # [N] int64, position within the document (0 = BOS if present)
    expert_ids: np.ndarray  # [L, N, k] int64, rank order (column 0 = first choice); -1 = empty slot, see below
    weights: np.ndarray | None = None  # [L, N, k] float32, renormalised over the k; None = ids only
    router_logits: np.ndarray | None = None  # [L, N, E] float32, optional
    domains: list[str] = field(default_factory=list)  # one label per document ("" if none)
    layers: list[int] = field(default_factory=list)  # model layer index of each row of expert_ids
    n_experts: int = 0
    pieces: list[str] | None = None  # [N] display strings, when traced with a tokenizer
    meta: dict = field(default_factory=dict)  # model config, dtype, moe_lab version, ...

    def __post_init__(self):
        self.token_ids = np.asarray(self.token_ids, dtype=np.int64)
        self.doc_ids = np.asarray(self.doc_ids, dtype=np.int64)
        self.positions = np.asarray(self.positions, dtype=np.int64)
        self.expert_ids = np.asarray(self.expert_ids, dtype=np.int64)
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
                f"router_logits={'yes' if self.router_logits is not None else 'no'})")

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
        if len(meta.get("prompt_lengths") or []) == self.n_docs:
            meta["prompt_lengths"] = [n for n, k in zip(meta["prompt_lengths"], keep_docs) if k]
        return RoutingTrace(
            token_ids=self.token_ids[tok], doc_ids=new_id[self.doc_ids[tok]], positions=self.positions[tok],
            expert_ids=self.expert_ids[rows][:, tok],
            weights=None if self.weights is None else self.weights[rows][:, tok],
            router_logits=None if self.router_logits is None else self.router_logits[rows][:, tok],
            domains=[d for d, k in zip(self.domains, keep_docs) if k], layers=[self.layers[r] for r in rows],
            n_experts=self.n_experts, pieces=None if self.pieces is None else [p for p, k in zip(self.pieces, tok) if k],
            meta=meta)

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
            layers=list(first.layers), n_experts=first.n_experts, pieces=pieces, meta=_concat_meta(traces))

    def __add__(self, other: "RoutingTrace") -> "RoutingTrace":
        return RoutingTrace.concat([self, other])

    # ---- importers (parsing in moe_lab.routing.importers; each cites the producer's code)

    @classmethod
    def from_olmoe(cls, path: str | os.PathLike | Sequence[str | os.PathLike], *, n_experts: int | None = None,
                   domain: str | None = None, token_ids: str = "input",
                   max_docs: int | None = None) -> "RoutingTrace":
        """An id-only trace from the OLMoE study's routing files (``allenai/analysis_mixtral`` or
        ``allenai/analysis_olmoe``: ``c4_results*.jsonl``), one document per 2048-token window.
        Several paths give one trace; each file's dataset name (from its file name, the only place
        the study records it) becomes the domain of its documents unless ``domain`` is given.
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
        if len(paths) > 1:
            meta["files"] = [str(p) for p in paths]
        return cls(**importers.collect(docs, n_experts=n_experts, meta=meta))

    @classmethod
    def from_vllm(cls, outputs, *, n_experts: int, prompt_start: int = 0, layers: Sequence[int] | None = None,
                  domain: str | Sequence[str] = "", model: str | None = None, engine_version: str | None = None,
                  drop_unknown: bool = True) -> "RoutingTrace":
        """An id-only trace from vLLM ``RequestOutput`` objects (offline ``LLM.generate`` with
        ``enable_return_routed_experts=True``), the same fields as dicts, or OpenAI-server
        response dicts: one document per completion, prompt and generated tokens both kept
        (``meta["prompt_lengths"]``, :attr:`is_generated`). Every vLLM release with the feature
        (0.14-0.33) is read; format and options: :func:`moe_lab.routing.importers.read_vllm`."""
        docs = list(importers.read_vllm(outputs, n_experts=n_experts, prompt_start=prompt_start, layers=layers,
                                        domain=domain, drop_unknown=drop_unknown))
        if not docs:
            raise ValueError("no vLLM outputs to import")
        meta = {"source": "vLLM routed experts", "engine": "vllm", "engine_version": engine_version, "model": model,
                "ids_only": True, "requests": [d.info for d in docs],
                "unknown_rows": sum(d.info["unknown_rows"] for d in docs),
                "note": "the last sampled token of each sequence has no routing (never forwarded) and is not in "
                        "the trace"}
        return cls(**importers.collect(docs, n_experts=n_experts, layers=layers, meta=meta))

    @classmethod
    def from_sglang(cls, responses, *, n_layers: int, top_k: int, n_experts: int,
                    input_ids: Sequence[Sequence[int]] | None = None, start_len: int | Sequence[int] = 0,
                    layers: Sequence[int] | None = None, domain: str | Sequence[str] = "",
                    model: str | None = None, engine_version: str | None = None) -> "RoutingTrace":
        """An id-only trace from SGLang responses with ``return_routed_experts`` (``/generate``
        ``meta_info`` or the OpenAI endpoints' ``sglext``): one document per response. Format
        and options: :func:`moe_lab.routing.importers.read_sglang`."""
        docs = list(importers.read_sglang(responses, n_layers=n_layers, top_k=top_k, n_experts=n_experts,
                                          input_ids=input_ids, start_len=start_len, layers=layers, domain=domain))
        if not docs:
            raise ValueError("no SGLang responses to import")
        meta = {"source": "SGLang routed experts", "engine": "sglang", "engine_version": engine_version,
                "model": model, "ids_only": True}
        return cls(**importers.collect(docs, n_experts=n_experts, layers=layers, meta=meta))

    @classmethod
    def from_sglang_dump(cls, dump, *, top_k: int, n_experts: int, logical: bool = True, domain: str = "",
                         model: str | None = None) -> "RoutingTrace":
        """An id-only trace from a per-token dump of SGLang's expert-distribution recorder (the
        ``.pt`` file of ``/dump_expert_distribution_record``, or its loaded dict). Format, how
        sequences are rebuilt without request ids, and options:
        :func:`moe_lab.routing.importers.read_sglang_dump`."""
        docs = list(importers.read_sglang_dump(dump, top_k=top_k, n_experts=n_experts, logical=logical,
                                               domain=domain))
        if not docs:
            raise ValueError("the dump holds no tokens")
        meta = {"source": "SGLang expert-distribution recorder (per_token)", "engine": "sglang", "model": model,
                "ids_only": True, "expert_ids": "logical" if logical else "physical"}
        return cls(**importers.collect(docs, n_experts=n_experts, layers=docs[0].info["layers"], meta=meta))

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

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (a .safetensors file holding the arrays and, in its metadata, the JSON
        header). Atomic: a failed save leaves no file behind."""
        from safetensors.numpy import save_file

        path = Path(path)
        arrays = {"token_ids": self.token_ids, "doc_ids": self.doc_ids, "positions": self.positions,
                  "expert_ids": self.expert_ids}
        if self.weights is not None:
            arrays["weights"] = self.weights
        if self.router_logits is not None:
            arrays["router_logits"] = self.router_logits
        header = {"format_version": FORMAT_VERSION, "domains": self.domains, "layers": self.layers,
                  "n_experts": self.n_experts, "pieces": self.pieces, "meta": self.meta}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp,
                      metadata={"moe_lab_routing_trace": json.dumps(header)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RoutingTrace":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no routing trace at {path}")
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
        return cls(**arrays, domains=header["domains"], layers=header["layers"], n_experts=header["n_experts"],
                   pieces=header.get("pieces"), meta=header.get("meta", {}))


def _concat_meta(traces: Sequence[RoutingTrace]) -> dict:
    """The first trace's meta; per-document lists (prompt lengths) joined when every trace has them."""
    meta = dict(traces[0].meta)
    lengths = [t.meta.get("prompt_lengths") for t in traces]
    if all(n is not None and len(n) == t.n_docs for n, t in zip(lengths, traces)):
        meta["prompt_lengths"] = [int(x) for n in lengths for x in n]
    else:
        meta.pop("prompt_lengths", None)
    return meta
