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
    expert_ids: np.ndarray  # [T, L, k] integers, rank order (column 0 = first choice)
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
    ids = np.empty((L, sum(lengths), shape[1]), dtype=np.int64)  # [L, N, k], filled document by document
    start = 0
    for d, n in zip(docs, lengths):
        ids[:, start:start + n] = d.expert_ids.transpose(1, 0, 2)
        start += n
    meta = dict(meta or {})
    meta["prompt_lengths"] = [int(d.prompt_length) for d in docs]
    return dict(token_ids=np.concatenate([d.token_ids for d in docs]).astype(np.int64),
                doc_ids=np.repeat(np.arange(len(docs)), lengths),
                positions=np.concatenate([d.positions for d in docs]).astype(np.int64),
                expert_ids=ids, weights=None, router_logits=None,
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
            narrow = np.uint8 if n_experts <= 256 else np.int32  # 8x less memory while documents pile up
            yield RoutedDocument(token_ids=inp if token_ids == "input" else pred,
                                 expert_ids=ids.transpose(0, 2, 1).astype(narrow),  # [T, L, k]
                                 positions=np.arange(T), prompt_length=T, domain=domain, source=where)


def olmoe_meta(path: str | os.PathLike, k: int, L: int, token_ids: str) -> dict:
    info = olmoe_file_info(path)
    model, n_experts = OLMOE_STUDY_MODELS.get((k, L), (None, None))
    return {"source": "OLMoE study (allenai/OLMoE scripts/run_moe_analysis.py)", "engine": "transformers (fp32)",
            "file": str(path), "model": model, "checkpoint": info["checkpoint"], "dataset": info["domain"],
            "token_ids": token_ids, "ids_only": True,
            "note": "exp_ids = argsort of each layer's router logits (rank 0 = highest); 2048-token windows of "
                    "concatenated C4 validation documents (windows cross document boundaries)"}


# --------------------------------------------------------------------------------------------
# vLLM: LLM(enable_return_routed_experts=True) / vllm serve --enable-return-routed-experts


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Attribute of a vLLM object, or key of the same fields as a dict."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def decode_routed_experts(value: Any, where: str) -> np.ndarray | None:
    """A routed-experts field as vLLM hands it over: an ndarray (offline ``LLM``), nested lists
    (HTTP, vLLM 0.21) or a base64 string of ``.npy`` bytes (HTTP, vLLM 0.22+:
    ``np.load(io.BytesIO(base64.b64decode(s)))``, ``allow_pickle=False``)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return np.load(io.BytesIO(base64.b64decode(value, validate=True)), allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{where}: routed_experts is a string but not base64 .npy bytes "
                             f"(vLLM 0.22+ HTTP encoding): {e}") from None
    try:
        return np.asarray(value)
    except ValueError:
        raise ValueError(f"{where}: routed_experts is ragged; expected [tokens, layers, top_k]") from None


def read_vllm(outputs: Iterable[Any], *, n_experts: int, prompt_start: int = 0, layers: Sequence[int] | None = None,
              domain: str | Sequence[str] = "", drop_unknown: bool = True) -> Iterator[RoutedDocument]:
    """Documents of vLLM ``RequestOutput`` objects (or dicts with the same fields), one per
    completion: the prompt, then that completion's tokens, each with its routed experts.

    Followed (``vllm/outputs.py`` and ``vllm/model_executor/layers/fused_moe/routed_experts_capturer.py``
    of the released wheels 0.14.0 - 0.33.0; ``docs/training/routed_experts_replay.md``):

    * ``CompletionOutput.routed_experts``: ``np.ndarray`` ``[tokens, layers, top_k]`` (int32 in
      0.14-0.20, int16 in 0.21, uint8/uint16 from 0.22). Rows are token positions
      ``routed_experts_prompt_start`` (``prompt_start`` here, default 0) up to
      ``len(prompt) + len(output) - 2``: the last sampled token was never forwarded, so it has no
      routing and is left out of the trace.
    * vLLM 0.21 only: the prompt's rows are ``RequestOutput.prompt_routed_experts`` and
      ``routed_experts`` holds the generated tokens' rows (``split_routed_experts``; the
      generated part may be clipped to fewer rows under MTP).
    * HTTP responses (``choices[i].routed_experts`` as base64 ``.npy`` from 0.22, nested lists
      in 0.21 with ``prompt_routed_experts`` at the top level) are read too: pass the response
      dicts; ``prompt_token_ids`` and ``token_ids`` must be in them (``return_token_ids``).
    * Layer axis: every decoder layer, dense ones as rows of zeros (except 0.21: MoE layers
      only). ``layers=``: the rows to keep, which become the trace's model layers (e.g.
      ``range(1, 27)`` for a model whose layer 0 is dense); default all rows, numbered 0..L-1.
    * Prefix-cache rows: real values in every release read; the docs promise ``-1`` for cached
      positions (0.21), so a row holding ``-1`` is treated as unknown and its token dropped
      (``drop_unknown``; counted in ``meta["unknown_rows"]`` by :meth:`RoutingTrace.from_vllm`).
      vLLM 0.21's released code fills such rows with 0, which no importer can tell from expert 0.

    Expert ids are logical in 0.33 (captured before the EPLB map); 0.14-0.20 with EPLB enabled
    may record physical ids (inferred from code order, not confirmed).
    """
    domains = None if isinstance(domain, str) else list(domain)
    shape = None
    for r, out in enumerate(outputs):
        rid = _get(out, "request_id", _get(out, "id", r))
        completions = _get(out, "outputs")
        http = completions is None and _get(out, "choices") is not None
        if http:
            completions = _get(out, "choices")
        if completions is None:
            raise ValueError(f"request {rid!r}: neither 'outputs' (RequestOutput) nor 'choices' (HTTP response)")
        top_prompt = _get(out, "prompt_token_ids")
        prompt_re_all = decode_routed_experts(_get(out, "prompt_routed_experts"), f"request {rid!r}")
        for c in completions:
            idx = _get(c, "index", 0)
            where = f"request {rid!r}, completion {idx}"
            prompt = _get(c, "prompt_token_ids", None) if http else None
            prompt = top_prompt if prompt is None else prompt
            gen = _get(c, "token_ids")
            if prompt is None or gen is None:
                raise ValueError(f"{where}: needs prompt_token_ids and token_ids (HTTP: request them with "
                                 f"return_token_ids)")
            prompt, gen = np.asarray(prompt, dtype=np.int64), np.asarray(gen, dtype=np.int64)
            P, G = len(prompt), len(gen)
            rows = decode_routed_experts(_get(c, "routed_experts"), where)
            if rows is None and prompt_re_all is None:
                raise ValueError(f"{where}: routed_experts is None (engine started without "
                                 f"enable_return_routed_experts, or the request was aborted)")
            start = prompt_start
            if prompt_re_all is not None:  # vLLM 0.21: prompt and generated rows apart
                if len(prompt_re_all) != P:
                    raise ValueError(f"{where}: prompt_routed_experts has {len(prompt_re_all)} rows, expected {P} "
                                     f"(one per prompt token)")
                gen_rows = rows if rows is not None else prompt_re_all[:0]
                if len(gen_rows) > G:
                    raise ValueError(f"{where}: routed_experts has {len(gen_rows)} rows for {G} generated tokens")
                rows, start = np.concatenate([prompt_re_all, gen_rows]) if gen_rows.size else prompt_re_all, 0
                end = P + len(gen_rows)
            else:
                end = P + G - 1
                if rows.ndim == 3 and len(rows) != end - start:
                    raise ValueError(f"{where}: routed_experts has {len(rows)} rows, expected {end - start} "
                                     f"(prompt {P} + generated {G} - 1 - prompt_start {start})")
            if rows.ndim != 3:
                raise ValueError(f"{where}: routed_experts has shape {list(rows.shape)}, expected [tokens, layers, top_k]")
            if shape is None:
                shape = rows.shape[1:]
            elif rows.shape[1:] != shape:
                raise ValueError(f"{where}: routed_experts has [layers, top_k] = {list(rows.shape[1:])}, expected "
                                 f"{list(shape)} like the first request")
            ids = rows.astype(np.int64)
            if layers is not None:
                ids = ids[:, list(layers)]
            positions = np.arange(start, end)
            tokens = np.concatenate([prompt, gen])[start:end]
            unknown = (ids < 0).any((1, 2))
            if unknown.any():
                if not drop_unknown:
                    raise ValueError(f"{where}: {int(unknown.sum())} rows hold -1 (prefix-cached, routing unknown)")
                ids, positions, tokens = ids[~unknown], positions[~unknown], tokens[~unknown]
            _check_ids(ids, n_experts, where)
            yield RoutedDocument(token_ids=tokens, expert_ids=ids, positions=positions, prompt_length=P,
                                 domain=domain if domains is None else domains[r], source=where,
                                 info={"request_id": rid, "completion": idx, "unknown_rows": int(unknown.sum()),
                                       "finish_reason": _get(c, "finish_reason")})


# --------------------------------------------------------------------------------------------
# SGLang: --enable-return-routed-experts, and the expert-distribution recorder's per-token dumps


def decode_sglang_routed_experts(value: str, n_layers: int, top_k: int, where: str) -> np.ndarray:
    """SGLang's routed-experts string: base64 of raw little-endian int32 bytes, no header
    (``detokenizer_manager._b64_encode_per_request``), reshaped to ``[tokens, n_layers, top_k]``
    (``num_hidden_layers``, ``num_experts_per_tok`` of the model's config)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except Exception as e:
        raise ValueError(f"{where}: routed_experts is not base64: {e}") from None
    if len(raw) % (4 * n_layers * top_k):
        raise ValueError(f"{where}: routed_experts holds {len(raw)} bytes, not a multiple of 4 x n_layers x top_k "
                         f"= {4 * n_layers * top_k} (n_layers={n_layers}, top_k={top_k}: the model config's "
                         f"num_hidden_layers and num_experts_per_tok?)")
    return np.frombuffer(raw, dtype="<i4").reshape(-1, n_layers, top_k)


def read_sglang(responses: Iterable[dict], *, n_layers: int, top_k: int, n_experts: int,
                input_ids: Sequence[Sequence[int]] | None = None, start_len: int | Sequence[int] = 0,
                layers: Sequence[int] | None = None, domain: str | Sequence[str] = "") -> Iterator[RoutedDocument]:
    """Documents of SGLang responses with ``return_routed_experts: true``.

    Followed (sglang 0.5.7-0.5.23 wheels: ``srt/managers/detokenizer_manager.py``,
    ``srt/managers/scheduler_components/batch_result_processor.py``,
    ``srt/entrypoints/openai/protocol.py``): the field is ``meta_info["routed_experts"]`` on
    ``/generate`` and ``sglext["routed_experts"]`` on ``/v1/completions`` and
    ``/v1/chat/completions`` (0.5.9+); base64 of int32 ``[tokens, num_hidden_layers, top_k]``
    covering positions ``[routed_experts_start_len, len(prompt) + len(output) - 1)`` (the last
    token was never forwarded). Dense layers are rows of 0 (keep the MoE ones with ``layers=``);
    ids are logical (captured before the EPLB remap); prefix-cache hits read the stored values.

    Token ids: ``sglext.input_ids`` / ``sglext.output_ids`` (OpenAI endpoints), else
    ``output_ids`` of a ``/generate`` response plus ``input_ids`` that you pass (the request's
    prompt ids: ``/generate`` does not echo them).
    """
    domains = None if isinstance(domain, str) else list(domain)
    for r, resp in enumerate(responses):
        where = f"response {r}" + (f" (id {resp['id']!r})" if isinstance(resp, dict) and "id" in resp else "")
        ext = resp.get("sglext") or {}
        meta = resp.get("meta_info") or {}
        value = ext.get("routed_experts") if ext.get("routed_experts") is not None else meta.get("routed_experts")
        if value is None:
            raise ValueError(f"{where}: no routed_experts in sglext or meta_info (send return_routed_experts: true "
                             f"to a server started with --enable-return-routed-experts)")
        prompt = ext.get("input_ids")
        if prompt is None and input_ids is not None:
            prompt = input_ids[r]
        out = ext.get("output_ids")
        out = out[0] if out and isinstance(out[0], list) else out
        if out is None:
            out = resp.get("output_ids")
        if prompt is None or out is None:
            raise ValueError(f"{where}: token ids not found (looked for sglext.input_ids/output_ids and output_ids; "
                             f"pass input_ids= for /generate responses)")
        prompt, out = np.asarray(prompt, dtype=np.int64), np.asarray(out, dtype=np.int64)
        start = start_len if isinstance(start_len, int) else start_len[r]
        rows = decode_sglang_routed_experts(value, n_layers, top_k, where)
        P, G = len(prompt), len(out)
        end = P + G - 1
        if len(rows) != end - start:
            raise ValueError(f"{where}: routed_experts has {len(rows)} tokens, expected {end - start} "
                             f"(prompt {P} + output {G} - 1 - start_len {start})")
        ids = rows.astype(np.int64)
        if layers is not None:
            ids = ids[:, list(layers)]
        _check_ids(ids, n_experts, where)
        yield RoutedDocument(token_ids=np.concatenate([prompt, out])[start:end], expert_ids=ids,
                             positions=np.arange(start, end), prompt_length=P,
                             domain=domain if domains is None else domains[r], source=where,
                             info={"finish_reason": meta.get("finish_reason")})


def read_sglang_dump(dump: dict | str | os.PathLike, *, top_k: int, n_experts: int | None = None,
                     logical: bool = True, domain: str = "") -> Iterator[RoutedDocument]:
    """Documents of an expert-distribution-recorder dump in ``per_token`` mode
    (``--expert-distribution-recorder-mode per_token``, ``/dump_expert_distribution_record``).

    Followed: ``sglang/srt/eplb/expert_distribution.py`` (0.5.7-0.5.23): ``torch.save`` of
    ``dict(records=[...], last_physical_to_logical_map=Tensor[num_layers, num_physical_experts])``;
    each record (one forward pass) has ``input_ids``, ``positions`` (flattened batch),
    ``extend_seq_lens`` (None for decode), ``forward_mode`` and ``topk_ids_of_layer``, an int32
    tensor ``[num_layers, num_tokens, 8]`` (width fixed at 8, unused slots and non-MoE layers
    ``-1``) of **physical** expert ids, mapped here to logical ones with the dump's (last) map
    unless ``logical=False``.

    The dump has no request ids, so sequences are rebuilt from what it does say: each request's
    extend (prefill) segment starts a document; a decode pass of **one** token whose position
    follows the last document's end continues it; other decode tokens (batched decoding, which
    the dump cannot attribute) become documents of their own. Layers that are -1 throughout
    (dense) are dropped; ``layers`` of the trace are the remaining layer indices.
    """
    if not isinstance(dump, dict):
        import torch

        path = Path(dump)
        try:
            dump = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable torch.save file (truncated?): {e}") from None
        src = str(path)
    else:
        src = "dump"
    if not isinstance(dump, dict) or "records" not in dump:
        raise ValueError(f"{src}: expected dict(records=..., last_physical_to_logical_map=...), found "
                         f"{sorted(dump) if isinstance(dump, dict) else type(dump).__name__}")
    p2l = dump.get("last_physical_to_logical_map")
    p2l = None if p2l is None else np.asarray(p2l)
    docs: list[dict] = []
    moe_rows = None
    for i, rec in enumerate(dump["records"]):
        where = f"{src}, record {i} (forward pass {rec.get('forward_pass_id')})"
        ids = np.asarray(rec["topk_ids_of_layer"]).astype(np.int64)  # [L, n, 8]
        tok, pos = np.asarray(rec["input_ids"], np.int64), np.asarray(rec["positions"], np.int64)
        if ids.ndim != 3 or ids.shape[1] != len(tok) or len(pos) != len(tok) or ids.shape[2] < top_k:
            raise ValueError(f"{where}: topk_ids_of_layer has shape {list(ids.shape)}, expected "
                             f"[layers, {len(tok)} tokens, >= {top_k}] (input_ids {len(tok)}, positions {len(pos)})")
        if np.any(ids[:, :, top_k:] != -1):
            raise ValueError(f"{where}: slots beyond top_k={top_k} are not all -1: is top_k right?")
        ids = ids[:, :, :top_k]
        used = ~(ids == -1).all((1, 2))  # MoE layers
        moe_rows = used if moe_rows is None else moe_rows | used
        if logical and p2l is not None:
            if p2l.ndim != 2 or len(p2l) != len(ids) or (ids.size and ids.max() >= p2l.shape[1]):
                raise ValueError(f"{where}: last_physical_to_logical_map has shape {list(p2l.shape)}, expected "
                                 f"[{len(ids)} layers, > {int(ids.max()) if ids.size else 0} physical experts]")
            safe = np.where(ids < 0, 0, ids)
            ids = np.where(ids < 0, -1, p2l[np.arange(len(p2l))[:, None, None], safe])  # physical -> logical
        seqs = rec.get("extend_seq_lens")
        if seqs is not None:
            bounds = np.concatenate([[0], np.cumsum(seqs)])
            if bounds[-1] != len(tok):
                raise ValueError(f"{where}: extend_seq_lens sum to {bounds[-1]}, expected {len(tok)} tokens")
            for a, b in zip(bounds[:-1], bounds[1:]):
                docs.append({"tok": [tok[a:b]], "pos": [pos[a:b]], "ids": [ids[:, a:b]], "prompt": int(pos[b - 1]) + 1,
                             "src": where})
        elif len(tok) == 1 and docs and docs[-1]["pos"][-1][-1] + 1 == pos[0]:
            d = docs[-1]
            d["tok"].append(tok)
            d["pos"].append(pos)
            d["ids"].append(ids)
        else:
            for j in range(len(tok)):
                docs.append({"tok": [tok[j:j + 1]], "pos": [pos[j:j + 1]], "ids": [ids[:, j:j + 1]],
                             "prompt": int(pos[j]), "src": where})
    keep = np.flatnonzero(moe_rows) if moe_rows is not None else np.zeros(0, int)
    for d in docs:
        ids = np.concatenate(d["ids"], axis=1)[keep].transpose(1, 0, 2)  # [T, L_moe, k]
        if (ids < 0).any():
            raise ValueError(f"{d['src']}: a MoE layer has -1 expert ids inside the top_k={top_k} slots")
        if n_experts is not None:
            _check_ids(ids, n_experts, d["src"])
        yield RoutedDocument(token_ids=np.concatenate(d["tok"]), expert_ids=ids, positions=np.concatenate(d["pos"]),
                             prompt_length=d["prompt"], domain=domain, source=d["src"],
                             info={"layers": keep.tolist()})
