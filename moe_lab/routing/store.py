"""Routing traces too large for memory: a directory of ``.npy`` columns, written in shards.

A 10-million-token trace of Mixtral (32 layers, top-2) is 640 MB of one-byte expert ids, 5 GB as
``int64``. On disk it is::

    trace_dir/
      manifest.json              format, model, engine, n_experts, top_k, layers, rank_ordered, dtypes,
                                 domains, the shard list (tokens and documents in each), provenance (meta)
      pieces.json                (optional) the display string of every token, when the trace has them
      shard-000000/
        expert_ids.npy           [n, L, k]  int8 (E <= 128; -1 = empty slot), uint8 (E <= 256) or wider:
                                            token-major, as engines write it
        token_ids.npy            [n]        int32
        positions.npy            [n]        int32  position in the document
        generated.npy            [n]        bool   True for generated tokens, False for the prompt
        doc_lengths.npy          [d]        int64  tokens of each document (documents never span shards)
        doc_domains.npy          [d]        int16  index into the manifest's "domains"
        doc_prompt_lengths.npy   [d]        int64  (-1: not recorded)
        weights.npy              [n, L, k]  float32, only when the trace has them
        router_logits.npy        [n, L, E]  float32, only when the trace has them
      shard-000001/ ...

Nothing is ever half-written: a shard is written into a hidden temporary directory and renamed
into place, then the manifest is rewritten through a temporary file and ``os.replace``. A
reader trusts only the shards the manifest lists, so a writer killed at any moment leaves the
trace as it was after its last complete shard, and :class:`TraceWriter` resumes from there.

:class:`TraceStore` opens the directory with ``np.load(mmap_mode="r")``: nothing is read until
used. It **is** a :class:`~moe_lab.RoutingTrace` (what ``RoutingTrace.load`` returns for a
directory, and what ``RoutingTrace.save`` writes): its ``token_ids``, ``expert_ids`` ... are
memory-mapped on first use (zero-copy for a single shard), and
:meth:`TraceStore.iter_chunks` yields in-memory ``RoutingTrace`` chunks of whole documents,
which is how every analysis in :mod:`moe_lab.analysis` runs over it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from .importers import RoutedDocument
from .importers import id_dtype as _id_dtype
from .trace import CHUNKED, DOC_META, RoutingTrace, default_rank_ordered, layer_row

STORE_FORMAT = "moe_lab.routing_store"
STORE_VERSION = 1
TOKEN_COLUMNS = ("expert_ids", "token_ids", "positions", "generated")
DOC_COLUMNS = ("doc_lengths", "doc_domains", "doc_prompt_lengths")
OPTIONAL_COLUMNS = ("weights", "router_logits")


def id_dtype(n_experts: int) -> np.dtype:
    """The dtype of a store's expert ids: up to 128 experts ``int8``, as small as ``uint8`` and able
    to hold -1, an empty slot (a token a capacity dropped, expert choice, ``SetTopK``); more experts
    ``uint8`` up to 256 (vLLM's rule), then wider, with no empty slots."""
    return _id_dtype(n_experts, signed=n_experts <= 128)


def write_pieces(path: str | os.PathLike, pieces: Sequence[str]) -> None:
    """Store the display string of every token beside the manifest (``pieces.json``)."""
    path = Path(path)
    manifest = _read_manifest(path)
    if len(pieces) != manifest["n_tokens"]:
        raise ValueError(f"{len(pieces)} pieces for a store of {manifest['n_tokens']} tokens")
    _atomic_json(path / "pieces.json", {"pieces": list(pieces)})


def _atomic_json(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_manifest(path: Path) -> dict:
    mf = path / "manifest.json"
    if not mf.exists():
        raise FileNotFoundError(f"{path} is not a moe_lab trace store (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mf} is not valid JSON: {e}") from None
    if manifest.get("format") != STORE_FORMAT:
        raise ValueError(f"{mf} has format {manifest.get('format')!r}, expected {STORE_FORMAT!r}")
    if manifest.get("format_version") != STORE_VERSION:
        raise ValueError(f"{mf} has format_version {manifest.get('format_version')}; this moe_lab reads "
                         f"version {STORE_VERSION}")
    return manifest


# --------------------------------------------------------------------------------------------
# Writing


class TraceWriter:
    """Append documents to a trace directory, one shard every ``shard_tokens`` tokens.

    ``with TraceWriter(path, n_experts=8, top_k=2, layers=range(32), model=..., engine=...) as w:``
    then ``w.add(doc)`` (a :class:`~moe_lab.routing.importers.RoutedDocument`) or
    ``w.add_trace(trace)``; ``w.flush(info)`` closes the current shard early and records ``info``
    (e.g. which corpus lines it holds) in the manifest. If ``path`` already holds a store with the
    same shape, writing continues after its last complete shard (``w.shards`` lists them with
    their ``info``: that is how a collection script knows where to resume).
    """

    def __init__(self, path: str | os.PathLike, *, n_experts: int, top_k: int, layers: Iterable[int],
                 model: str | None = None, engine: str | None = None, meta: dict | None = None,
                 shard_tokens: int = 1 << 20, with_weights: bool = False, with_logits: bool = False,
                 rank_ordered: bool | None = None):
        self.path = Path(path)
        self.rank_ordered = rank_ordered
        self.layers = [int(l) for l in layers]
        self.n_experts, self.top_k, self.shard_tokens = int(n_experts), int(top_k), int(shard_tokens)
        self.with_weights, self.with_logits = with_weights, with_logits
        self._buf: list[tuple[RoutedDocument, np.ndarray | None, np.ndarray | None]] = []
        self._buf_tokens = 0
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / "manifest.json").exists():
            self.manifest = _read_manifest(self.path)
            want = {"n_experts": self.n_experts, "top_k": self.top_k, "layers": self.layers,
                    "with_weights": with_weights, "with_logits": with_logits}
            if rank_ordered is not None:
                want["rank_ordered"] = bool(rank_ordered)
            self.rank_ordered = self.manifest.get("rank_ordered", rank_ordered)
            for key, value in want.items():
                if self.manifest.get(key) != value:
                    raise ValueError(f"{self.path} already holds a trace with {key}={self.manifest[key]}, "
                                     f"cannot append one with {key}={value}")
        else:
            L, k = len(self.layers), self.top_k
            columns = {"expert_ids": {"dtype": id_dtype(n_experts).str, "shape": ["n", L, k]},
                       "token_ids": {"dtype": "<i4", "shape": ["n"]}, "positions": {"dtype": "<i4", "shape": ["n"]},
                       "generated": {"dtype": "|b1", "shape": ["n"]},
                       "doc_lengths": {"dtype": "<i8", "shape": ["d"]}, "doc_domains": {"dtype": "<i2", "shape": ["d"]},
                       "doc_prompt_lengths": {"dtype": "<i8", "shape": ["d"]}}
            if with_weights:
                columns["weights"] = {"dtype": "<f4", "shape": ["n", L, k]}
            if with_logits:
                columns["router_logits"] = {"dtype": "<f4", "shape": ["n", L, n_experts]}
            self.manifest = {"format": STORE_FORMAT, "format_version": STORE_VERSION, "model": model,
                             "engine": engine, "n_experts": self.n_experts, "top_k": self.top_k,
                             "n_layers": L, "layers": self.layers, "with_weights": with_weights,
                             "rank_ordered": None if rank_ordered is None else bool(rank_ordered),
                             "with_logits": with_logits, "columns": columns, "domains": [],
                             "n_tokens": 0, "n_docs": 0, "shards": [], "meta": dict(meta or {})}
            _atomic_json(self.path / "manifest.json", self.manifest)
        listed = {s["name"] for s in self.manifest["shards"]}
        for p in self.path.iterdir():  # leftovers of an interrupted write: never listed, never read
            if p.is_dir() and (p.name.startswith(".tmp-") or (p.name.startswith("shard-") and p.name not in listed)):
                shutil.rmtree(p)

    @property
    def shards(self) -> list[dict]:
        return list(self.manifest["shards"])

    @property
    def buffered_tokens(self) -> int:
        """Tokens added but not yet written (they are lost if the process dies now)."""
        return self._buf_tokens

    def add(self, doc: RoutedDocument, weights: np.ndarray | None = None, logits: np.ndarray | None = None) -> None:
        """Buffer one document (expert ids [T, L, k]); write a shard once ``shard_tokens`` are buffered."""
        T = len(doc.token_ids)
        expect = (T, len(self.layers), self.top_k)
        if doc.expert_ids.shape != expect:
            raise ValueError(f"{doc.source or 'document'}: expert ids have shape {list(doc.expert_ids.shape)}, "
                             f"expected {list(expect)} ([tokens, layers, top_k])")
        if len(doc.positions) != T:
            raise ValueError(f"{doc.source or 'document'}: {len(doc.positions)} positions for {T} tokens")
        ids = doc.expert_ids
        if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= self.n_experts):
            raise ValueError(f"{doc.source or 'document'}: expert ids must be in [0, {self.n_experts}) or -1 (an "
                             f"empty slot), found {int(ids.min())}..{int(ids.max())}")
        ordered = doc.info.get("rank_ordered")
        if ordered is not None:
            if self.rank_ordered is None:
                self.rank_ordered = bool(ordered)
                self.manifest["rank_ordered"] = self.rank_ordered
            elif bool(ordered) != self.rank_ordered:
                raise ValueError(f"{doc.source or 'document'}: rank_ordered={bool(ordered)}, but this store holds "
                                 f"rank_ordered={self.rank_ordered} documents")
        if self.with_weights != (weights is not None) or self.with_logits != (logits is not None):
            raise ValueError(f"{doc.source or 'document'}: this store {'has' if self.with_weights else 'has no'} "
                             f"weights and {'has' if self.with_logits else 'has no'} logits; the document must match")
        self._buf.append((doc, weights, logits))
        self._buf_tokens += T
        if self._buf_tokens >= self.shard_tokens:
            self.flush()

    def add_trace(self, trace: RoutingTrace, progress: bool = False) -> None:
        """Add every document of an in-memory trace (documents must be contiguous in ``doc_ids``)."""
        if list(trace.layers) != self.layers or trace.top_k != self.top_k or trace.n_experts != self.n_experts:
            raise ValueError(f"trace has layers/top_k/n_experts {trace.layers}/{trace.top_k}/{trace.n_experts}, "
                             f"the store {self.layers}/{self.top_k}/{self.n_experts}")
        if trace.n_tokens and np.any(np.diff(trace.doc_ids) < 0):
            raise ValueError("add_trace needs the tokens of each document together, in document order")
        bounds = np.searchsorted(trace.doc_ids, np.arange(trace.n_docs + 1))
        lengths = trace.meta.get("prompt_lengths")
        known = lengths is not None and len(lengths) == trace.n_docs
        for d in tqdm(range(trace.n_docs), desc="writing trace", disable=not progress, unit="doc"):
            s, e = bounds[d], bounds[d + 1]
            doc = RoutedDocument(token_ids=trace.token_ids[s:e], expert_ids=trace.expert_ids[:, s:e].transpose(1, 0, 2),
                                 positions=trace.positions[s:e], prompt_length=int(lengths[d]) if known else -1,
                                 domain=trace.domains[d], source=f"document {d}",
                                 info={"rank_ordered": trace.rank_ordered})
            self.add(doc, None if trace.weights is None else trace.weights[:, s:e].transpose(1, 0, 2),
                     None if trace.router_logits is None else trace.router_logits[:, s:e].transpose(1, 0, 2))

    def _expert_ids(self, docs) -> np.ndarray:
        ids = np.concatenate([d.expert_ids for d in docs])
        dtype = np.dtype(self.manifest["columns"]["expert_ids"]["dtype"])  # an older store may be uint8
        if ids.size and ids.min() < 0 and dtype.kind == "u":
            bad = next(d for d in docs if d.expert_ids.size and d.expert_ids.min() < 0)
            raise ValueError(f"{self.path}: expert ids are stored as {dtype} ({self.n_experts} experts), which has no "
                             f"-1 for an empty slot, but {bad.source or 'a document'} (domain {bad.domain!r}) holds "
                             "empty slots; write such a trace to a new store (up to 128 experts: int8) or keep it "
                             "in memory")
        return ids.astype(dtype)

    def flush(self, info: dict | None = None) -> None:
        """Write the buffered documents as one shard (tmp dir + rename), then the manifest."""
        if self.manifest.get("rank_ordered") is None and self.rank_ordered is not None:
            self.manifest["rank_ordered"] = bool(self.rank_ordered)
        if not self._buf:
            if info:  # record progress even when nothing was buffered (e.g. all requests empty)
                self.manifest["shards"].append({"name": None, "n_tokens": 0, "n_docs": 0, "info": info})
                _atomic_json(self.path / "manifest.json", self.manifest)
            return
        docs = [b[0] for b in self._buf]
        domains = self.manifest["domains"]
        for d in docs:
            if d.domain not in domains:
                domains.append(d.domain)
        index = {name: i for i, name in enumerate(domains)}
        n_named = sum(1 for s in self.manifest["shards"] if s["name"])
        name = f"shard-{n_named:06d}"
        lengths = np.array([len(d.token_ids) for d in docs], dtype=np.int64)
        prompt = np.array([d.prompt_length for d in docs], dtype=np.int64)
        positions = np.concatenate([d.positions for d in docs]).astype(np.int64)
        cols = {
            "expert_ids": self._expert_ids(docs),
            "token_ids": np.concatenate([d.token_ids for d in docs]).astype(np.int32),
            "positions": positions.astype(np.int32),
            "generated": (positions >= np.repeat(prompt, lengths)) & np.repeat(prompt >= 0, lengths),
            "doc_lengths": lengths, "doc_domains": np.array([index[d.domain] for d in docs], dtype=np.int16),
            "doc_prompt_lengths": prompt,
        }
        if self.with_weights:
            cols["weights"] = np.concatenate([b[1] for b in self._buf]).astype(np.float32)
        if self.with_logits:
            cols["router_logits"] = np.concatenate([b[2] for b in self._buf]).astype(np.float32)
        tmp = Path(tempfile.mkdtemp(dir=self.path, prefix=".tmp-"))
        try:
            for col, arr in cols.items():
                np.save(tmp / f"{col}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            os.replace(tmp, self.path / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.manifest["shards"].append({"name": name, "n_tokens": int(lengths.sum()), "n_docs": len(docs),
                                        "info": dict(info or {})})
        self.manifest["n_tokens"] += int(lengths.sum())
        self.manifest["n_docs"] += len(docs)
        _atomic_json(self.path / "manifest.json", self.manifest)
        self._buf, self._buf_tokens = [], 0

    def update_meta(self, **meta) -> None:
        self.manifest["meta"].update(meta)
        _atomic_json(self.path / "manifest.json", self.manifest)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # on an error, buffered documents are dropped: the store stays consistent
            self.close()


def save_store(trace: RoutingTrace, path: str | os.PathLike, *, shard_tokens: int = 1 << 20,
               progress: bool = False) -> Path:
    """Write an in-memory trace as a trace directory (see the module docstring). ``path`` must not
    hold a store yet."""
    path = Path(path)
    if (path / "manifest.json").exists():
        raise FileExistsError(f"{path} already holds a trace store")
    meta = dict(trace.meta)
    meta.pop("prompt_lengths", None)  # per document, in the shards
    with TraceWriter(path, n_experts=trace.n_experts, top_k=trace.top_k, layers=trace.layers,
                     model=meta.get("model"), engine=meta.get("engine"), meta=meta, shard_tokens=shard_tokens,
                     with_weights=trace.weights is not None, with_logits=trace.router_logits is not None,
                     rank_ordered=trace.rank_ordered) as w:
        w.add_trace(trace, progress=progress)
    return path


# --------------------------------------------------------------------------------------------
# Reading


class TraceStore(RoutingTrace):
    """A trace directory, memory-mapped: a :class:`~moe_lab.RoutingTrace` read from disk
    (``RoutingTrace.load(dir)`` and ``open_store(dir)`` return one). Sizes, ``layers``,
    ``domains``, ``meta`` and ``rank_ordered`` come from the manifest; ``token_ids``,
    ``positions``, ``doc_ids``, ``expert_ids`` ([L, N, k]), ``weights`` and ``router_logits`` are
    memory-mapped on first use (zero-copy when the store has one shard, as ``RoutingTrace.save``
    writes it; joined in memory otherwise). The analyses in :mod:`moe_lab.analysis` read it
    chunk by chunk (:meth:`iter_chunks`), so a 10-million-token trace never sits in memory."""

    def __init__(self, path: str | os.PathLike):  # (not the dataclass __init__: fields come from disk)
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        m = self.manifest
        self.layers: list[int] = list(m["layers"])
        self.n_experts, self._top_k = int(m["n_experts"]), int(m["top_k"])
        self.meta = dict(m.get("meta") or {})
        ordered = m.get("rank_ordered")
        self.rank_ordered = default_rank_ordered({"engine": m.get("engine"), **self.meta}) if ordered is None \
            else bool(ordered)
        self._shards = [s for s in m["shards"] if s["name"]]
        self._cols: dict[tuple[int, str], np.ndarray] = {}
        self._whole: dict[str, np.ndarray] = {}
        self._pieces = None
        doc_dom, doc_prompt, doc_len = [], [], []
        for i, s in enumerate(self._shards):
            lengths, doms, prompt = (self._col(i, c) for c in DOC_COLUMNS)
            if len(lengths) != s["n_docs"] or int(lengths.sum()) != s["n_tokens"]:
                raise ValueError(f"{self.path / s['name']}: {len(lengths)} documents of {int(lengths.sum())} tokens, "
                                 f"the manifest says {s['n_docs']} documents of {s['n_tokens']} tokens")
            doc_len.append(np.asarray(lengths))
            doc_dom.append(np.asarray(doms))
            doc_prompt.append(np.asarray(prompt))
        self.doc_lengths = np.concatenate(doc_len) if doc_len else np.zeros(0, np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum(self.doc_lengths)]).astype(np.int64)  # [D + 1]
        self._doc_domains = np.concatenate(doc_dom) if doc_dom else np.zeros(0, np.int16)
        self.prompt_lengths = np.concatenate(doc_prompt) if doc_prompt else np.zeros(0, np.int64)
        self._shard_docs = np.concatenate([[0], np.cumsum([s["n_docs"] for s in self._shards])]).astype(np.int64)
        if len(self.prompt_lengths) and (self.prompt_lengths >= 0).all():
            self.meta["prompt_lengths"] = self.prompt_lengths.tolist()

    # ---- the RoutingTrace fields, memory-mapped on first use

    def _whole_column(self, name: str) -> np.ndarray | None:
        """A token column over the whole store: the memory map itself for one shard, else the
        shards joined (in memory, kept)."""
        if name in OPTIONAL_COLUMNS and not self.manifest["with_" + ("weights" if name == "weights" else "logits")]:
            return None
        if name not in self._whole:
            if len(self._shards) == 1:
                self._whole[name] = self._col(0, name)
            else:
                dtype = np.dtype(self.manifest["columns"][name]["dtype"])
                shape = {"expert_ids": (self.n_layers, self.top_k), "weights": (self.n_layers, self.top_k),
                         "router_logits": (self.n_layers, self.n_experts)}.get(name, ())
                parts = [np.asarray(self._col(i, name)) for i in range(len(self._shards))]
                self._whole[name] = np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)
                for i in range(len(self._shards)):
                    self._release(i)
        return self._whole[name]

    @property
    def token_ids(self) -> np.ndarray:
        return self._whole_column("token_ids")

    @property
    def positions(self) -> np.ndarray:
        return self._whole_column("positions")

    @property
    def doc_ids(self) -> np.ndarray:
        if "doc_ids" not in self._whole:
            self._whole["doc_ids"] = np.repeat(np.arange(self.n_docs, dtype=np.int32), self.doc_lengths)
        return self._whole["doc_ids"]

    @property
    def expert_ids(self) -> np.ndarray:
        """[L, N, k]: a transposed view of the token-major column on disk."""
        return self._whole_column("expert_ids").transpose(1, 0, 2)

    @property
    def weights(self) -> np.ndarray | None:
        w = self._whole_column("weights")
        return None if w is None else w.transpose(1, 0, 2)

    @property
    def router_logits(self) -> np.ndarray | None:
        z = self._whole_column("router_logits")
        return None if z is None else z.transpose(1, 0, 2)

    @property
    def pieces(self) -> list[str] | None:
        f = self.path / "pieces.json"
        if self._pieces is None and f.exists():
            self._pieces = json.loads(f.read_text())["pieces"]
        return self._pieces

    @property
    def top_k(self) -> int:
        return self._top_k

    @property
    def is_generated(self) -> np.ndarray:
        """[N] bool: generated tokens (the ``generated`` column)."""
        return self.column("generated")

    def _col(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._cols:
            f = self.path / self._shards[shard]["name"] / f"{name}.npy"
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise FileNotFoundError(f"{f} is missing (the manifest lists shard {self._shards[shard]['name']})") from None
            except ValueError as e:
                raise ValueError(f"{f} is not a readable .npy file (truncated?): {e}") from None
            n = self._shards[shard]["n_tokens"] if name in TOKEN_COLUMNS + OPTIONAL_COLUMNS else self._shards[shard]["n_docs"]
            if arr.shape[0] != n:
                raise ValueError(f"{f} has {arr.shape[0]} rows, the manifest says {n}")
            self._cols[key] = arr
        return self._cols[key]

    # ---- sizes, as RoutingTrace

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.manifest["n_docs"])

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def has_weights(self) -> bool:
        return bool(self.manifest["with_weights"])

    @property
    def ids_only(self) -> bool:
        return not (self.manifest["with_weights"] or self.manifest["with_logits"])

    @property
    def domains(self) -> list[str]:
        names = self.manifest["domains"]
        return [names[i] for i in self._doc_domains.tolist()]

    @property
    def domain_names(self) -> list[str]:
        names = self.manifest["domains"]
        return [names[i] for i in dict.fromkeys(self._doc_domains.tolist())]

    def layer_index(self, layer: int) -> int:
        return layer_row(self.layers, layer)

    def __repr__(self):
        return (f"TraceStore({str(self.path)!r}, tokens={self.n_tokens}, docs={self.n_docs}, "
                f"layers={len(self.layers)}, experts={self.n_experts}, top_k={self.top_k}, "
                f"shards={len(self._shards)}, ids_only={self.ids_only}, rank_ordered={self.rank_ordered})")

    # ---- chunks

    def _chunk_plan(self, chunk_tokens: int) -> list[tuple[int, int, int]]:
        """(shard, first doc in shard, end doc in shard): whole documents, about chunk_tokens each."""
        plan = []
        for i, s in enumerate(self._shards):
            d0, d1 = self._shard_docs[i], self._shard_docs[i + 1]
            ends = np.cumsum(self.doc_lengths[d0:d1])
            start = 0
            while start < d1 - d0:
                base = ends[start - 1] if start else 0
                stop = int(np.searchsorted(ends, base + chunk_tokens, side="right"))
                stop = max(stop, start + 1)  # a document longer than a chunk is a chunk of its own
                plan.append((i, start, stop))
                start = stop
        return plan

    def iter_chunks(self, chunk_tokens: int = 1 << 18, *, layers: Sequence[int] | None = None,
                    progress: bool = True, desc: str = "reading trace") -> Iterator[tuple[RoutingTrace, int, int]]:
        """Yield ``(chunk, first_doc, first_token)``: an in-memory ``RoutingTrace`` of whole
        documents (about ``chunk_tokens`` tokens, local ``doc_ids`` 0..d-1) and the global index of
        its first document and first token. ``layers``: read only these model layers."""
        rows = None if layers is None else [self.layer_index(l) for l in layers]
        names = self.manifest["domains"]
        plan = self._chunk_plan(chunk_tokens)
        bar = tqdm(total=self.n_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress)
        current = None
        try:
            for shard, a, b in plan:
                if shard != current:  # unmap the shard just read: its pages leave this process
                    self._release(current)
                    current = shard
                g0 = int(self._shard_docs[shard])
                tok0 = int(self.doc_offsets[g0 + a] - self.doc_offsets[g0])
                tok1 = int(self.doc_offsets[g0 + b] - self.doc_offsets[g0])
                yield self._chunk(shard, g0 + a, g0 + b, tok0, tok1, rows, names), g0 + a, int(self.doc_offsets[g0 + a])
                bar.update(tok1 - tok0)
        finally:
            self._release(current)
            bar.close()

    def _release(self, shard: int | None) -> None:
        """Drop the memory maps of a shard's token columns (reopened on demand). Without this a
        pass over a 640 MB store would leave 640 MB of file pages mapped into the process."""
        if shard is not None:
            for name in TOKEN_COLUMNS + OPTIONAL_COLUMNS:
                self._cols.pop((shard, name), None)

    def _chunk(self, shard, d0, d1, t0, t1, rows, names) -> RoutingTrace:
        ids = self._col(shard, "expert_ids")[t0:t1]  # [n, L, k] one byte an id
        if rows is not None:
            ids = ids[:, rows]
        lengths = self.doc_lengths[d0:d1]
        opt = {}
        for col in OPTIONAL_COLUMNS:
            if self.manifest["with_" + ("weights" if col == "weights" else "logits")]:
                arr = self._col(shard, col)[t0:t1]
                opt[col] = (arr if rows is None else arr[:, rows]).transpose(1, 0, 2)
        meta = dict(self.meta)
        for key in DOC_META:
            if len(meta.get(key) or []) == self.n_docs:
                meta[key] = meta[key][d0:d1]
        prompt = self.prompt_lengths[d0:d1]
        if (prompt >= 0).all():
            meta["prompt_lengths"] = prompt.tolist()
        else:
            meta.pop("prompt_lengths", None)
        return RoutingTrace(
            token_ids=self._col(shard, "token_ids")[t0:t1], doc_ids=np.repeat(np.arange(d1 - d0), lengths),
            positions=self._col(shard, "positions")[t0:t1],
            expert_ids=np.ascontiguousarray(ids.transpose(1, 0, 2)),  # [L, n, k], still uint8: cheap to widen
            weights=opt.get("weights"), router_logits=opt.get("router_logits"),
            domains=[names[i] for i in self._doc_domains[d0:d1].tolist()],
            layers=self.layers if rows is None else [self.layers[r] for r in rows], n_experts=self.n_experts, meta=meta,
            rank_ordered=self.rank_ordered)

    def column(self, name: str, layer: int | None = None, progress: bool = False) -> np.ndarray:
        """A whole token column in memory (``token_ids``, ``positions``, ``generated``), or with
        ``layer`` the ``[N, k]`` expert ids of one layer (int64; 160 MB for 10M tokens, top-2)."""
        parts = []
        for i in tqdm(range(len(self._shards)), desc=f"reading {name}", disable=not progress):
            arr = self._col(i, name)
            if layer is not None:
                arr = arr[:, self.layer_index(layer)]
            parts.append(np.array(arr, dtype=np.int64 if name == "expert_ids" else arr.dtype))  # a copy
            self._release(i)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def to_trace(self, max_tokens: int | None = None, docs: Sequence[int] | None = None) -> RoutingTrace:
        """An in-memory trace of the first documents holding at most ``max_tokens`` tokens (at
        least one document), or of the documents ``docs`` (global indices, ascending)."""
        if docs is None:
            n = self.n_docs if max_tokens is None else max(1, int(np.searchsorted(self.doc_offsets[1:], max_tokens, "right")))
            docs = range(min(n, self.n_docs))
        docs = np.asarray(list(docs), dtype=np.int64)
        if docs.size and (docs.min() < 0 or docs.max() >= self.n_docs or np.any(np.diff(docs) <= 0)):
            raise IndexError(f"docs must be ascending indices in [0, {self.n_docs})")
        parts = []
        names = self.manifest["domains"]
        for i in range(len(self._shards)):
            d0, d1 = self._shard_docs[i], self._shard_docs[i + 1]
            mine = docs[(docs >= d0) & (docs < d1)]
            if mine.size == 0:
                continue
            # runs of consecutive documents become one chunk each
            breaks = np.flatnonzero(np.diff(mine) > 1) + 1
            for run in np.split(mine, breaks):
                a, b = int(run[0]), int(run[-1]) + 1
                t0 = int(self.doc_offsets[a] - self.doc_offsets[d0])
                t1 = int(self.doc_offsets[b] - self.doc_offsets[d0])
                parts.append(self._chunk(i, a, b, t0, t1, None, names))
        if not parts:
            raise ValueError("no documents selected")
        out = RoutingTrace.concat(parts)
        if self.pieces is not None:
            out.pieces = [p for d in docs.tolist() for p in self.pieces[self.doc_offsets[d]:self.doc_offsets[d + 1]]]
        out.meta["store"] = str(self.path)
        return out

    # ---- export

    def iter_pandas(self, chunk_tokens: int = 1 << 16, progress: bool = True):
        """DataFrames of :meth:`RoutingTrace.to_pandas` (one row per token, layer and rank), chunk
        by chunk, with ``doc`` as the global document index."""
        for chunk, d0, _ in self.iter_chunks(chunk_tokens, progress=progress, desc="exporting"):
            df = chunk.to_pandas()
            df["doc"] += d0
            yield df

    def to_parquet(self, path: str | os.PathLike, chunk_tokens: int = 1 << 16, progress: bool = True) -> Path:
        """Write the long table (see :meth:`iter_pandas`) to one Parquet file, one row group per
        chunk, through a temporary file (needs pyarrow: ``pip install pyarrow``)."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("TraceStore.to_parquet needs pyarrow, which is not installed: "
                              "pip install pyarrow (or use iter_pandas / the .npy columns directly)") from None
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        writer = None
        try:
            for df in self.iter_pandas(chunk_tokens, progress=progress):
                table = pa.Table.from_pandas(df, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            if writer is not None:
                writer.close()
            os.replace(tmp, path)
        except BaseException:
            if writer is not None:
                writer.close()
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def open_store(path: str | os.PathLike) -> TraceStore:
    """Open a trace directory written by :func:`save_store` or :class:`TraceWriter`."""
    return TraceStore(path)


# RoutingTrace.save / RoutingTrace.load write and read this form (trace.py cannot import this module)
CHUNKED.update(save=save_store, pieces=write_pieces, open=TraceStore)
