"""Read routing traces that other tools recorded: the OLMoE study's files, vLLM, SGLang.

Each reader follows the producer's own code (cited in its docstring) and yields one
:class:`RoutedDocument` per sequence: the token ids, the expert ids of every token
(token-major ``[T, L, k]``, as the engines write them), positions and the prompt length.
:func:`collect` turns documents into the fields of a :class:`~moe_lab.RoutingTrace`, which the
``RoutingTrace.from_*`` classmethods build; :class:`~moe_lab.routing.store.TraceWriter` takes the
same documents to write a trace too large for memory to disk.

This module imports nothing from ``trace.py`` (``trace.py`` imports it): parsing here, the
trace object there. Every reader checks what it reads and names the file and line, or the
request, with the expected and found values, when something does not fit.

Engines record **expert ids only** (no weights, no router logits), so the traces built from
them are id-only (``weights=None``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np


@dataclass
class RoutedDocument:
    """One sequence's routing as an engine or study recorded it."""

    token_ids: np.ndarray  # [T] int64
    expert_ids: np.ndarray  # [T, L, k] int64, rank order (column 0 = first choice)
    positions: np.ndarray  # [T] int64, position in the sequence
    prompt_length: int  # tokens at positions >= prompt_length were generated
    domain: str = ""
    source: str = ""  # "file, line 3" or "request 'abc'": used in error messages
    info: dict = field(default_factory=dict)


def _check_ids(ids: np.ndarray, n_experts: int, where: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        bad = ids[(ids < 0) | (ids >= n_experts)]
        raise ValueError(f"{where}: expert ids must be in [0, {n_experts}) for n_experts={n_experts}, "
                         f"found {int(bad[0])} (values {int(ids.min())}..{int(ids.max())})")


def collect(docs: Iterable[RoutedDocument], *, n_experts: int, layers: Sequence[int] | None = None,
            meta: dict | None = None) -> dict:
    """Join documents into the keyword arguments of ``RoutingTrace`` (ids-only: no weights).
    ``expert_ids`` becomes layer-major ``[L, N, k]``; ``meta["prompt_lengths"]`` holds each
    document's prompt length (so ``RoutingTrace.is_generated`` and ``analysis.generated_only``
    work)."""
    docs = list(docs)
    if not docs:
        raise ValueError("no documents to import")
    shape = docs[0].expert_ids.shape[1:]
    for d in docs:
        if d.expert_ids.shape[1:] != shape:
            raise ValueError(f"{d.source}: expert ids have [layers, top_k] = {list(d.expert_ids.shape[1:])}, "
                             f"expected {list(shape)} like the first document ({docs[0].source})")
    L = shape[0]
    layers = list(range(L)) if layers is None else list(layers)
    if len(layers) != L:
        raise ValueError(f"layers lists {len(layers)} layers but the documents have {L}")
    lengths = [len(d.token_ids) for d in docs]
    ids = np.concatenate([d.expert_ids for d in docs]).astype(np.int64, copy=False)  # [N, L, k]
    meta = dict(meta or {})
    meta["prompt_lengths"] = [int(d.prompt_length) for d in docs]
    return dict(token_ids=np.concatenate([d.token_ids for d in docs]).astype(np.int64),
                doc_ids=np.repeat(np.arange(len(docs)), lengths),
                positions=np.concatenate([d.positions for d in docs]).astype(np.int64),
                expert_ids=np.ascontiguousarray(ids.transpose(1, 0, 2)), weights=None, router_logits=None,
                domains=[d.domain for d in docs], layers=layers, n_experts=int(n_experts), meta=meta)


# --------------------------------------------------------------------------------------------
# OLMoE study: allenai/OLMoE scripts/run_moe_analysis.py -> allenai/analysis_{olmoe,mixtral}

#: (top_k, n_layers) of the two models in the study -> (model, n_experts)
OLMOE_STUDY_MODELS = {(8, 16): ("allenai/OLMoE-1B-7B-0924", 64), (2, 32): ("mistralai/Mixtral-8x7B-v0.1", 8)}


def olmoe_file_info(path: str | os.PathLike) -> dict:
    """Dataset and checkpoint named by an OLMoE-study file name: ``c4_results.jsonl`` is the
    final checkpoint on C4, ``c4_results_5000.jsonl`` the checkpoint at step 5000 (the writer
    puts the dataset name in the file name and nowhere else)."""
    name = Path(path).name
    m = re.match(r"(?P<domain>.+?)_results(?:_(?P<step>\d+))?\.jsonl$", name)
    if not m:
        return {"domain": Path(path).stem, "checkpoint": None}
    return {"domain": m["domain"], "checkpoint": "main" if m["step"] is None else f"step{m['step']}"}


def read_olmoe(path: str | os.PathLike, *, n_experts: int | None = None, domain: str | None = None,
               token_ids: str = "input", max_docs: int | None = None) -> Iterator[RoutedDocument]:
    """Documents of an OLMoE-study routing file (JSON Lines, one 2048-token window per line).

    Format, from ``allenai/OLMoE`` ``scripts/run_moe_analysis.py`` (``run``, lines 76-112 at
    ``357454f4``): each line is ``json.dumps({"input_ids": [T], "predicted_token_ids": [T],
    "exp_ids": [T][k][L]})`` -- note the axis order **[token, rank, layer]** --, with
    ``exp_ids = np.stack([np.argsort(-logits, -1)[:, :k] ...], -1)`` over each layer's router
    logits: rank 0 is the highest router logit. Shapes asserted by the writer: (2048, 8, 16) for
    OLMoE-1B-7B (64 experts), (2048, 2, 32) for Mixtral 8x7B (8 experts). No weights, no model
    name, no domain: the dataset is only in the file name (``c4_results.jsonl``; intermediate
    checkpoints ``c4_results_{step}.jsonl``). Windows are cut from concatenated C4 documents and
    cross document boundaries, so a window is one "document" here (positions 0..2047).

    ``token_ids="predicted"`` puts the model's argmax prediction at each position (for the
    next token) in place of the input token (OLMoE's vocabulary specialisation looks at both).
    ``n_experts``: inferred from (k, L) for the study's two models, required otherwise.
    """
    path = Path(path)
    if token_ids not in ("input", "predicted"):
        raise ValueError(f"token_ids must be 'input' or 'predicted', got {token_ids!r}")
    if not path.exists():
        raise FileNotFoundError(f"no OLMoE routing file at {path}")
    info = olmoe_file_info(path)
    domain = info["domain"] if domain is None else domain
    shape = None
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            if max_docs is not None and i > max_docs:
                return
            where = f"{path}, line {i}"
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (the file ends mid-record: truncated download?)" if not line.endswith(b"\n") else ""
                raise ValueError(f"{where}: not a JSON object{hint}: {e}") from None
            missing = {"input_ids", "predicted_token_ids", "exp_ids"} - set(rec)
            if missing:
                raise ValueError(f"{where}: missing key(s) {sorted(missing)}; an OLMoE-study record has "
                                 f"input_ids, predicted_token_ids and exp_ids, found {sorted(rec)}")
            inp = np.asarray(rec["input_ids"], dtype=np.int64)
            pred = np.asarray(rec["predicted_token_ids"], dtype=np.int64)
            try:
                ids = np.asarray(rec["exp_ids"], dtype=np.int64)  # [T, k, L]
            except ValueError:
                raise ValueError(f"{where}: exp_ids is ragged; expected a [tokens][top_k][layers] array") from None
            T = len(inp)
            if ids.ndim != 3 or ids.shape[0] != T:
                raise ValueError(f"{where}: exp_ids has shape {list(ids.shape)}, expected [{T}, top_k, layers] "
                                 f"([token, rank, layer], {T} = len(input_ids))")
            if len(pred) != T:
                raise ValueError(f"{where}: predicted_token_ids has {len(pred)} entries, expected {T} "
                                 f"(= len(input_ids))")
            if shape is None:
                shape = ids.shape[1:]
                if n_experts is None:
                    if shape not in OLMOE_STUDY_MODELS:
                        raise ValueError(f"{where}: exp_ids has top_k={shape[0]}, layers={shape[1]}, which is "
                                         f"neither OLMoE (8, 16) nor Mixtral (2, 32); pass n_experts=")
                    n_experts = OLMOE_STUDY_MODELS[shape][1]
            elif ids.shape[1:] != shape:
                raise ValueError(f"{where}: exp_ids has [top_k, layers] = {list(ids.shape[1:])}, expected "
                                 f"{list(shape)} like line 1")
            _check_ids(ids, n_experts, where)
            yield RoutedDocument(token_ids=inp if token_ids == "input" else pred,
                                 expert_ids=ids.transpose(0, 2, 1),  # [T, L, k]
                                 positions=np.arange(T), prompt_length=T, domain=domain, source=where)


def olmoe_meta(path: str | os.PathLike, k: int, L: int, token_ids: str) -> dict:
    info = olmoe_file_info(path)
    model, n_experts = OLMOE_STUDY_MODELS.get((k, L), (None, None))
    return {"source": "OLMoE study (allenai/OLMoE scripts/run_moe_analysis.py)", "engine": "transformers (fp32)",
            "file": str(path), "model": model, "checkpoint": info["checkpoint"], "dataset": info["domain"],
            "token_ids": token_ids, "ids_only": True,
            "note": "exp_ids = argsort of each layer's router logits (rank 0 = highest); 2048-token windows of "
                    "concatenated C4 validation documents (windows cross document boundaries)"}
