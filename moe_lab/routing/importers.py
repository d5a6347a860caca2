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

    token_ids: np.ndarray  # [T] integers
    expert_ids: np.ndarray  # [T, L, k] integers, in the order the producer wrote them
    positions: np.ndarray  # [T] integers, position in the sequence
    prompt_length: int  # tokens at positions >= prompt_length were generated
    domain: str = ""
    source: str = ""  # "file, line 3" or "request 'abc'": used in error messages
    info: dict = field(default_factory=dict)


def _known_rows(p: dict, unknown: np.ndarray, n_experts: int, labels, ordered: bool) -> RoutedDocument:
    """An engine request ``p`` (parsed: ids [T, L, k], tokens, positions, P, domain, where, info) as a
    document without its ``unknown`` rows (prefix-cached or not computed: no routing to read)."""
    keep = ~unknown
    ids = p["ids"][keep]
    _check_ids(ids, n_experts, p["where"])
    return RoutedDocument(token_ids=p["tokens"][keep], expert_ids=ids, positions=p["positions"][keep],
                          prompt_length=p["P"], domain=p["domain"], source=p["where"],
                          info={**p["info"], "unknown_rows": int(unknown.sum()), "layers": list(labels),
                                "rank_ordered": bool(ordered)})


def _check_ids(ids: np.ndarray, n_experts: int, where: str) -> None:
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
        bad = ids[(ids < 0) | (ids >= n_experts)]
        raise ValueError(f"{where}: expert ids must be in [0, {n_experts}) for n_experts={n_experts}, "
                         f"found {int(bad[0])} (values {int(ids.min())}..{int(ids.max())})")


def id_dtype(n_experts: int, signed: bool = False) -> np.dtype:
    """The smallest dtype that holds expert ids 0..n_experts-1 (vLLM's rule: uint8 up to 256), or
    with ``signed`` also -1 (the padding of SetTopK): int8 up to 128 experts, else int16/int32."""
    if signed:
        return np.dtype(np.int8 if n_experts <= 128 else np.int16 if n_experts <= 32768 else np.int32)
    return np.dtype(np.uint8 if n_experts <= 256 else np.uint16 if n_experts <= 65536 else np.int32)


def collect(docs: Iterable[RoutedDocument], *, n_experts: int, layers: Sequence[int] | None = None,
            meta: dict | None = None) -> dict:
    """Join documents into the keyword arguments of ``RoutingTrace`` (ids-only: no weights).
    ``expert_ids`` becomes layer-major ``[L, N, k]`` in the smallest dtype; ``meta["prompt_lengths"]``
    holds each document's prompt length (so ``RoutingTrace.is_generated`` and
    ``analysis.generated_only`` work). ``layers``: default the documents' own
    (``info["layers"]``, set by the engine readers), else 0..L-1. ``rank_ordered``: False if any
    document says its engine's top-k is not known to be sorted (``info["rank_ordered"]``)."""
    docs = list(docs)
    if not docs:
        raise ValueError("no documents to import")
    shape = docs[0].expert_ids.shape[1:]
    for d in docs:
        if d.expert_ids.shape[1:] != shape:
            raise ValueError(f"{d.source}: expert ids have [layers, top_k] = {list(d.expert_ids.shape[1:])}, "
                             f"expected {list(shape)} like the first document ({docs[0].source})")
        if d.info.get("layers") is not None and d.info["layers"] != docs[0].info.get("layers"):
            raise ValueError(f"{d.source}: MoE layers {d.info['layers']}, expected {docs[0].info.get('layers')} like "
                             f"the first document ({docs[0].source})")
    L = shape[0]
    if layers is None:
        layers = docs[0].info.get("layers")
    layers = list(range(L)) if layers is None else list(layers)
    if len(layers) != L:
        raise ValueError(f"layers lists {len(layers)} layers but the documents have {L}")
    lengths = [len(d.token_ids) for d in docs]
    signed = any(d.expert_ids.size and int(d.expert_ids.min()) < 0 for d in docs)
    ids = np.empty((L, sum(lengths), shape[1]), dtype=id_dtype(n_experts, signed))  # [L, N, k]
    start = 0
    for d, n in zip(docs, lengths):
        ids[:, start:start + n] = d.expert_ids.transpose(1, 0, 2)
        start += n
    meta = dict(meta or {})
    meta["prompt_lengths"] = [int(d.prompt_length) for d in docs]
    ordered = all(d.info.get("rank_ordered", True) for d in docs)
    return dict(token_ids=np.concatenate([d.token_ids for d in docs]).astype(np.int32),
                doc_ids=np.repeat(np.arange(len(docs), dtype=np.int32), lengths),
                positions=np.concatenate([d.positions for d in docs]).astype(np.int32),
                expert_ids=ids, weights=None, router_logits=None,
                domains=[d.domain for d in docs], layers=layers, n_experts=int(n_experts), meta=meta,
                rank_ordered=ordered)


# --------------------------------------------------------------------------------------------
# The model's config: which decoder layers are MoE, and whether the engine's top-k is sorted

#: config keys holding the number of routed experts / experts per token, by model family
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_k", "top_k", "moe_topk")

#: model families whose engine router is a plain softmax top-k (vLLM ``fused_topk`` /
#: SGLang ``fused_topk``: the kernel picks the k largest in order, so column 0 is the first
#: choice), or PhiMoE's sparsemixer (first choice, then second). Every other family, and any
#: config naming groups, a score-correction bias or a sigmoid score, is not rank-ordered: vLLM's
#: ``grouped_topk`` (``router/grouped_topk_router.py`` 0.34, l.147-167: ``torch.topk(sorted=
#: VLLM_BATCH_INVARIANT)``) and SGLang's ``(biased_)grouped_topk`` (``srt/layers/moe/topk.py``
#: 0.5.23, l.1410-1425: ``sorted=False``) return the top-k unsorted.
SORTED_ROUTER_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "granitemoe", "jamba",
                          "phimoe", "gpt_oss", "minimax"}
GROUPED_KEYS = ("n_group", "topk_group", "topk_method", "e_score_correction_bias")
#: families the engines always route with grouped_topk / biased_grouped_topk (unsorted top-k)
GROUPED_ROUTER_FAMILIES = {"deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2", "kimi_k25", "glm4_moe",
                           "glm4v_moe", "glm4_moe_lite", "minimax_m2", "dots1", "longcat_flash", "bailing_moe",
                           "ernie4_5_moe"}


@dataclass
class ModelLayout:
    """What a transformers ``config.json`` says about routing: the decoder layers with a router
    (``moe_layers``, decoder indices), the sizes, and whether an engine's top-k comes out sorted."""

    model_type: str
    num_hidden_layers: int
    moe_layers: list[int]
    n_experts: int | None
    top_k: int | None
    rank_ordered: bool
    rank_order_reason: str
    rule: str  # which config keys decided the MoE layers

    def meta(self) -> dict:
        return {"model_type": self.model_type, "num_hidden_layers": self.num_hidden_layers,
                "moe_layers": list(self.moe_layers), "moe_layer_rule": self.rule,
                "rank_order_reason": self.rank_order_reason}


def load_config(config: Any) -> dict:
    """A transformers config as a dict: a dict, a ``PretrainedConfig`` (``to_dict``), or the path
    of a ``config.json`` (or of the directory holding it). A multimodal config's
    ``text_config`` is the language model's (Llama 4)."""
    if config is None:
        return None
    if hasattr(config, "to_dict") and not isinstance(config, dict):
        config = config.to_dict()
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"config=: no model config at {path} (expected a transformers config.json)")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config=: {path} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise TypeError(f"config= must be a config.json path, a dict or a transformers config, got "
                        f"{type(config).__name__}")
    text = config.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in config:
        config = {**text, "model_type": text.get("model_type", config.get("model_type"))}
    return config


def model_layout(config: Any) -> ModelLayout:
    """The MoE layers of a model, from its config (the rules of transformers' and vLLM's model
    code for every family moe_lab's bridge supports, and the other common ones):

    * DeepSeek-V2/V3, Kimi-K2, GLM-4.5 (``first_k_dense_replace``, ``moe_layer_freq``): layer i
      is MoE when ``i >= first_k_dense_replace and i % moe_layer_freq == 0``;
    * Qwen2/3-MoE (``mlp_only_layers``, ``decoder_sparse_step``): when i is not in
      ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``;
    * Llama 4 (``moe_layers``, else ``interleave_moe_layer_step``): the listed layers, else
      ``(i + 1) % step == 0``;
    * Jamba (``expert_layer_period``, ``expert_layer_offset``): ``i % period == offset``;
    * ERNIE-4.5-MoE (``moe_layer_start_index``, ``moe_layer_end_index``, ``moe_layer_interval``):
      ``start <= i <= end and (i + 1) % interval == 0``;
    * a ``layers_block_type`` / ``layer_types`` list naming ``"moe"`` per layer;
    * otherwise (Mixtral, OLMoE, FlexOlmo, MiniMax, Granite-MoE, GPT-OSS, PhiMoE, ...) every layer.
    """
    cfg = load_config(config)
    mt = str(cfg.get("model_type") or "")
    if "num_hidden_layers" not in cfg:
        raise ValueError(f"config=: no num_hidden_layers in the model config (model_type {mt!r}); is it a "
                         f"transformers config.json? found keys {sorted(cfg)[:20]}")
    L = int(cfg["num_hidden_layers"])
    n_experts = next((int(cfg[k]) for k in EXPERT_KEYS if cfg.get(k)), None)
    top_k = next((int(cfg[k]) for k in TOPK_KEYS if isinstance(cfg.get(k), int) and cfg.get(k)), None)
    layers = range(L)
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:
        fk, freq = int(cfg.get("first_k_dense_replace") or 0), int(cfg.get("moe_layer_freq") or 1)
        moe, rule = [i for i in layers if i >= fk and i % freq == 0], \
            f"first_k_dense_replace={fk}, moe_layer_freq={freq}"
    elif "mlp_only_layers" in cfg or "decoder_sparse_step" in cfg:
        only, step = set(cfg.get("mlp_only_layers") or []), int(cfg.get("decoder_sparse_step") or 1)
        moe = [i for i in layers if i not in only and (i + 1) % step == 0 and (n_experts or 1) > 0]
        rule = f"mlp_only_layers={sorted(only)}, decoder_sparse_step={step}"
    elif cfg.get("moe_layers") is not None:
        moe, rule = sorted(int(i) for i in cfg["moe_layers"]), "moe_layers"
    elif "interleave_moe_layer_step" in cfg:
        step = int(cfg["interleave_moe_layer_step"] or 1)
        moe, rule = [i for i in layers if (i + 1) % step == 0], f"interleave_moe_layer_step={step}"
    elif "expert_layer_period" in cfg:
        per, off = int(cfg["expert_layer_period"]), int(cfg.get("expert_layer_offset", 0))
        moe, rule = [i for i in layers if i % per == off], f"expert_layer_period={per}, expert_layer_offset={off}"
    elif "moe_layer_start_index" in cfg or "moe_layer_interval" in cfg:
        a, iv = cfg.get("moe_layer_start_index", 0), int(cfg.get("moe_layer_interval") or 1)
        b = cfg.get("moe_layer_end_index", L - 1)
        a = a[0] if isinstance(a, list) else a
        b = L - 1 if b in (None, -1) else (b[0] if isinstance(b, list) else b)
        moe = [i for i in layers if a <= i <= b and (i + 1) % iv == 0]
        rule = f"moe_layer_start_index={a}, moe_layer_end_index={b}, moe_layer_interval={iv}"
    elif isinstance(cfg.get("layers_block_type") or cfg.get("layer_types"), list) and any(
            "moe" in str(x) for x in (cfg.get("layers_block_type") or cfg.get("layer_types"))):
        kinds = cfg.get("layers_block_type") or cfg.get("layer_types")
        moe, rule = [i for i, x in enumerate(kinds) if "moe" in str(x)], "layers_block_type"
    else:
        moe, rule = list(layers), "every layer (no dense-layer key in the config)"
    grouped = [k for k in GROUPED_KEYS if cfg.get(k) not in (None, 1, False)] + \
        (["scoring_func=sigmoid"] if cfg.get("scoring_func") == "sigmoid" else [])
    if top_k == 1:
        ordered, why = True, "top_k = 1: a single choice per token"
    elif grouped or mt in GROUPED_ROUTER_FAMILIES:
        keys = "" if mt in GROUPED_ROUTER_FAMILIES else f" (config: {', '.join(grouped)})"
        ordered, why = False, (f"{mt or 'this model'} routes with a grouped/biased top-k{keys}; vLLM's grouped_topk "
                               f"and SGLang's (biased_)grouped_topk return it unsorted")
    elif mt in SORTED_ROUTER_FAMILIES:
        ordered, why = True, f"{mt}: softmax top-k, returned sorted by vLLM's and SGLang's fused_topk"
    else:
        ordered, why = False, f"model_type {mt!r} is not a family whose engine top-k is known to be sorted"
    return ModelLayout(model_type=mt, num_hidden_layers=L, moe_layers=moe, n_experts=n_experts, top_k=top_k,
                       rank_ordered=ordered, rank_order_reason=why, rule=rule)


def _repeated(ids: np.ndarray) -> np.ndarray:
    """[T, L, k] -> [T, L] bool: the row names an expert twice (never a real top-k with k >= 2:
    the zero placeholder rows of dense layers and of 0.21's prefix-cached tokens)."""
    if ids.shape[-1] < 2:
        return np.zeros(ids.shape[:-1], dtype=bool)
    s = np.sort(ids, axis=-1)
    return (s[..., 1:] == s[..., :-1]).any(-1)


def select_moe_rows(ids: np.ndarray, where: str, *, layout: ModelLayout | None, rows: Sequence[int] | None,
                    axis: str = "decoder", labels: Sequence[int] | None = None):
    """The MoE layers of an engine's ``[T, rows, k]`` ids, and their labels.

    ``axis="decoder"``: row i is decoder layer i (vLLM 0.14-0.20 and 0.22+, SGLang), dense
    layers as zero rows; ``"moe_ordinal"`` (vLLM 0.21): row j is the j-th MoE layer, then
    trailing zero rows. With ``layout`` (from ``config=``): exactly its MoE layers, labelled with
    their decoder index (a dense row holding real-looking ids is a config that does not fit:
    error). With ``rows`` (the old ``layers=``): those rows, labelled by ``labels`` or themselves.
    Without either: layers all of whose rows repeat an expert are dropped with a warning; with
    k = 1 that cannot be told from expert 0, so the caller is asked for ``config=``.
    Returns (ids [T, L', k], layer labels, dropped labels, note)."""
    import warnings

    R, k = ids.shape[1], ids.shape[2]
    if rows is not None:
        rows = list(rows)
        bad = [r for r in rows if not 0 <= r < R]
        if bad:
            raise ValueError(f"{where}: layers={rows} asks for rows {bad}, but routed_experts has {R} layer rows")
        placeholder = [r for r in rows if k >= 2 and len(ids) and _repeated(ids[:, r]).all()]
        if placeholder:
            raise ValueError(f"{where}: layers={rows} keeps rows {placeholder}, in which every row repeats an expert "
                             f"(a dense layer's zero placeholder, not routing); leave them out, or pass config=")
        return ids[:, rows], list(labels) if labels is not None else rows, [], "rows chosen with layers="
    if layout is not None:
        moe = layout.moe_layers
        if axis == "moe_ordinal":
            if R < len(moe):
                raise ValueError(f"{where}: routed_experts has {R} layer rows, but config= names {len(moe)} MoE layers "
                                 f"({layout.rule}); vLLM 0.21 returns one row per MoE layer")
            extra = ids[:, len(moe):]
            if extra.size and not (_repeated(extra).all() or (extra == 0).all()):
                raise ValueError(f"{where}: rows {len(moe)}..{R - 1} hold routing, but config= names only {len(moe)} "
                                 f"MoE layers ({layout.rule}): is it this model's config?")
            return ids[:, :len(moe)], list(moe), [], (f"vLLM 0.21 MoE-ordinal rows mapped to decoder layers with "
                                                       f"config= ({layout.rule}); {R - len(moe)} trailing zero rows dropped")
        if R != layout.num_hidden_layers:
            raise ValueError(f"{where}: routed_experts has {R} layer rows, expected num_hidden_layers = "
                             f"{layout.num_hidden_layers} from config= (model_type {layout.model_type!r})")
        dense = [i for i in range(R) if i not in set(moe)]
        if dense and k >= 2:
            live = [i for i in dense if not _repeated(ids[:, i]).all()]
        else:
            live = [i for i in dense if (ids[:, i] != 0).any()]
        if live:
            raise ValueError(f"{where}: config= says layers {live} are dense ({layout.rule}), but their rows hold "
                             f"routing (distinct expert ids): is config= this model's?")
        return ids[:, moe], list(moe), dense, f"MoE layers from config= ({layout.rule})"
    if k < 2:
        raise ValueError(f"{where}: top_k = 1, so a dense layer's zero rows cannot be told from tokens routed to "
                         f"expert 0: pass config= (the model's config.json path or dict) to name the MoE layers")
    rep = _repeated(ids)  # [T, R]
    dense = [i for i in range(R) if len(ids) and rep[:, i].all()]
    keep = [i for i in range(R) if i not in dense]
    lab = list(labels) if labels is not None else list(range(R))
    if dense:
        kind = "MoE ordinals" if axis == "moe_ordinal" else "layers"
        warnings.warn(f"{where}: dropped {kind} {[lab[i] for i in dense]}: every row repeats an expert (a dense "
                      f"layer's zero placeholder, never routing); pass config= to name the MoE layers from the model",
                      stacklevel=4)
    note = ("layers inferred without config=: those whose rows all repeat an expert were dropped"
            + ("; vLLM 0.21 rows are MoE ordinals, not decoder layers (pass config= to map them)"
               if axis == "moe_ordinal" else ""))
    return ids[:, keep], [lab[i] for i in keep], [lab[i] for i in dense], note


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
            yield RoutedDocument(token_ids=(inp if token_ids == "input" else pred).astype(np.int32),
                                 expert_ids=ids.transpose(0, 2, 1).astype(id_dtype(n_experts)),  # [T, L, k]
                                 positions=np.arange(T, dtype=np.int32), prompt_length=T, domain=domain, source=where,
                                 info={"checkpoint": info["checkpoint"], "file": str(path), "line": i,
                                       "rank_ordered": True})


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


def _parsed_layers(parsed: list[dict], *, layout: ModelLayout | None, rows: Sequence[int] | None) -> tuple:
    """Decide the MoE layers once for a batch of parsed engine outputs (``p["ids"]`` [T, R, k],
    ``p["axis"]``, ``p["where"]``): with ``config=`` or ``layers=`` per output; without, a layer
    is dropped when every row of every output repeats an expert (see :func:`select_moe_rows`).
    Sets ``p["ids"]`` to the kept layers and returns (labels, dropped, note)."""
    if not parsed:
        return [], [], ""
    axes = {p["axis"] for p in parsed}
    if len(axes) > 1:
        raise ValueError(f"{parsed[0]['where']}: the outputs mix vLLM 0.21's prompt_routed_experts (MoE-ordinal "
                         f"rows) with other releases' outputs; import them separately")
    axis = axes.pop()
    if layout is None and rows is None:
        R, k = parsed[0]["ids"].shape[1:]
        if k >= 2:
            dense = np.ones(R, dtype=bool)
            for p in parsed:
                if len(p["ids"]):
                    dense &= _repeated(p["ids"]).all(0)
            rows = [i for i in range(R) if not dense[i]]
            if dense.any():
                import warnings

                kind = "MoE ordinals" if axis == "moe_ordinal" else "layers"
                warnings.warn(f"{parsed[0]['where']} and the rest of this batch: dropped {kind} "
                              f"{np.flatnonzero(dense).tolist()}: every row repeats an expert (a dense layer's zero "
                              f"placeholder, never routing); pass config= (the model's config.json) to name the MoE "
                              f"layers", stacklevel=4)
            note = ("MoE layers inferred without config= (layers whose rows all repeat an expert dropped: "
                    f"{np.flatnonzero(dense).tolist()})"
                    + ("; vLLM 0.21 rows are MoE ordinals, not decoder layers: pass config= to map them"
                       if axis == "moe_ordinal" else ""))
            for p in parsed:
                p["ids"] = p["ids"][:, rows]
            return rows, np.flatnonzero(dense).tolist(), note
    out = None
    for p in parsed:
        p["ids"], labels, dropped, note = select_moe_rows(p["ids"], p["where"], layout=layout, rows=rows, axis=axis)
        out = (labels, dropped, note)
    return out


def _unknown_rows(ids: np.ndarray, cached: int) -> np.ndarray:
    """[T] bool: tokens whose routing is not known: a -1 (documented sentinel), a row that
    repeats an expert in a MoE layer (0.21's zero-filled prefix-cached rows), or one of the
    first ``cached`` rows (0.21: ``RequestOutput.num_cached_tokens``)."""
    unknown = (ids < 0).any((1, 2)) | _repeated(np.where(ids < 0, 0, ids)).any(1)
    unknown[:cached] = True
    return unknown


def _finish_cause(c: Any) -> str:
    fr, sr = _get(c, "finish_reason"), _get(c, "stop_reason")
    if fr == "stop" and isinstance(sr, str):
        return (f"finish_reason 'stop' by the stop string {sr!r}: vLLM 0.14-0.21 attach routing only to requests "
                f"the scheduler stops, and a stop string ends the request in the output processor "
                f"(v1/engine/output_processor.py), so routed_experts is None")
    if fr == "abort":
        return "the request was aborted before its routing was gathered"
    return (f"finish_reason {fr!r}: the engine returned no routing (started without "
            f"enable_return_routed_experts, aborted, or a stop string in vLLM 0.14-0.21)")


def read_vllm(outputs: Iterable[Any], *, n_experts: int | None = None, prompt_start: int = 0,
              layers: Sequence[int] | None = None, config: Any = None, domain: str | Sequence[str] = "",
              drop_unknown: bool = True, engine_version: str | None = None,
              report: dict | None = None) -> Iterator[RoutedDocument]:
    """Documents of vLLM ``RequestOutput`` objects (or dicts with the same fields), one per
    completion: the prompt, then that completion's tokens, each with its routed experts.

    Followed (``vllm/outputs.py``, ``model_executor/layers/fused_moe/routed_experts_capturer.py``,
    ``v1/core/sched/scheduler.py``, ``v1/engine/output_processor.py`` and
    ``distributed/aux_output_connector/connector.py`` of the released wheels 0.14.0 - 0.34.0):

    * ``CompletionOutput.routed_experts``: ``np.ndarray`` ``[tokens, layers, top_k]`` (int32 in
      0.14-0.20, int16 in 0.21, uint8/uint16 from 0.22). Rows are token positions
      ``routed_experts_prompt_start`` (``prompt_start`` here, default 0) up to
      ``len(prompt) + len(output) - 2``: the last sampled token was never forwarded, so it has no
      routing and is left out of the trace.
    * vLLM 0.21 only: the prompt's rows are ``RequestOutput.prompt_routed_experts`` and
      ``routed_experts`` holds the generated tokens' rows (``split_routed_experts``). Its layer
      axis is the **MoE-layer ordinal** (``FusedMoE.moe_layer_id``; ``_count_moe_layers``
      ignores ``first_k_dense_replace``, so DeepSeek has trailing zero rows): ``config=`` maps
      the rows to decoder layers. Its prefix-cached prompt rows are zeros (``np.zeros`` host
      buffer): the first ``RequestOutput.num_cached_tokens`` rows, and any row repeating an
      expert, are unknown (dropped, counted in ``info["unknown_rows"]``), never expert 0.
    * HTTP responses (``choices[i].routed_experts`` as base64 ``.npy`` from 0.22, nested lists
      in 0.21 with ``prompt_routed_experts`` at the top level) are read too; ``prompt_token_ids``
      and ``token_ids`` must be in them (``return_token_ids``).
    * Layer axis: every decoder layer, **dense layers as rows of zeros** (except 0.21). With
      ``config=`` (the model's ``config.json`` path or dict, see :func:`model_layout`) exactly
      its MoE layers are kept, labelled with their decoder index. Without it, a row that repeats
      an expert is never routing: layers made only of such rows are dropped with a warning, and
      with top_k = 1 (zeros ambiguous) a ValueError asks for ``config=``. ``layers=`` (rows to
      keep) is still accepted.
    * A completion without routing (``routed_experts`` None: 0.14-0.21 attach none to a request
      ended by a stop string) is skipped with a warning naming it and the cause, and listed in
      ``report["skipped"]``.
    * Rank order: vLLM returns the kernel's top-k order, sorted only for plain softmax routers;
      ``info["rank_ordered"]`` comes from ``config=`` (:func:`model_layout`), else False.

    Expert ids are logical from 0.22 (captured before the EPLB map); 0.14-0.20 with EPLB enabled
    record physical ids.
    """
    import warnings

    layout = model_layout(config) if config is not None else None
    if n_experts is None:
        n_experts = layout.n_experts if layout is not None else None
    if n_experts is None:
        raise ValueError("read_vllm needs n_experts= or config= (the model's config.json, which names it)")
    v021 = engine_version is not None and str(engine_version).startswith("0.21")
    domains = None if isinstance(domain, str) else list(domain)
    parsed: list[dict] = []
    skipped: list[dict] = []
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
        cached = int(_get(out, "num_cached_tokens") or 0)
        for c in completions:
            idx = _get(c, "index", 0)
            where = f"request {rid!r}, completion {idx}"
            prompt = _get(c, "prompt_token_ids", None) if http else None
            prompt = top_prompt if prompt is None else prompt
            gen = _get(c, "token_ids")
            if prompt is None or gen is None:
                raise ValueError(f"{where}: needs prompt_token_ids and token_ids (HTTP: request them with "
                                 f"return_token_ids), found {'neither' if prompt is None and gen is None else 'only one'}")
            prompt, gen = np.asarray(prompt, dtype=np.int64), np.asarray(gen, dtype=np.int64)
            P, G = len(prompt), len(gen)
            rows = decode_routed_experts(_get(c, "routed_experts"), where)
            if rows is None and prompt_re_all is None:
                cause = _finish_cause(c)
                warnings.warn(f"{where}: skipped, it came back without routing ({cause})", stacklevel=3)
                skipped.append({"request_id": rid, "completion": idx, "finish_reason": _get(c, "finish_reason"),
                                "cause": cause})
                continue
            start, axis = prompt_start, "decoder"
            if prompt_re_all is not None or v021:  # vLLM 0.21: prompt and generated rows apart, MoE ordinals
                axis = "moe_ordinal"
                pre = prompt_re_all if prompt_re_all is not None else None
                if pre is not None and len(pre) != P:
                    raise ValueError(f"{where}: prompt_routed_experts has {len(pre)} rows, expected {P} "
                                     f"(one per prompt token)")
                if pre is None:
                    pre = np.zeros((0, *rows.shape[1:]), dtype=rows.dtype) if rows is not None and rows.ndim == 3 else None
                gen_rows = rows if rows is not None else pre[:0]
                if gen_rows.ndim != 3 or pre.ndim != 3:
                    raise ValueError(f"{where}: routed_experts has shape {list(gen_rows.shape)}, expected "
                                     f"[tokens, layers, top_k]")
                if len(gen_rows) > G:
                    raise ValueError(f"{where}: routed_experts has {len(gen_rows)} rows for {G} generated tokens")
                rows, start = np.concatenate([pre, gen_rows]), P - len(pre)
                end = P + len(gen_rows)
            else:
                end = P + G - 1
                if rows.ndim == 3 and len(rows) != end - start:
                    raise ValueError(f"{where}: routed_experts has {len(rows)} rows, expected {end - start} "
                                     f"(prompt {P} + generated {G} - 1 - prompt_start {start})")
            if rows.ndim != 3:
                raise ValueError(f"{where}: routed_experts has shape {list(rows.shape)}, expected [tokens, layers, top_k]")
            if parsed and rows.shape[1:] != parsed[0]["ids"].shape[1:]:
                raise ValueError(f"{where}: routed_experts has [layers, top_k] = {list(rows.shape[1:])}, expected "
                                 f"{list(parsed[0]['ids'].shape[1:])} like the first request")
            parsed.append({"where": where, "ids": rows.astype(np.int64), "axis": axis,
                           "tokens": np.concatenate([prompt, gen])[start:end], "positions": np.arange(start, end),
                           "P": P, "cached": max(0, cached - start) if axis == "moe_ordinal" else 0,
                           "domain": domain if domains is None else domains[r],
                           "info": {"request_id": rid, "completion": idx, "finish_reason": _get(c, "finish_reason")}})
    if parsed and parsed[0]["ids"].shape[2] < 2 and layout is None and layers is None:
        raise ValueError(f"{parsed[0]['where']}: top_k = 1, so a dense layer's zero rows cannot be told from tokens "
                         f"routed to expert 0: pass config= (the model's config.json path or dict) to name the MoE "
                         f"layers")
    labels, dropped, note = _parsed_layers(parsed, layout=layout, rows=layers)
    k = parsed[0]["ids"].shape[2] if parsed else 0
    ordered = layout.rank_ordered if layout is not None else k == 1
    why = layout.rank_order_reason if layout is not None else (
        "top_k = 1" if k == 1 else "no config=: the model's router, and so whether vLLM returns its top-k sorted, "
                                   "is unknown")
    if report is not None:
        report.update(skipped=skipped, layers=labels, dropped_layers=dropped, layer_note=note, rank_ordered=ordered,
                      rank_order_reason=why, layout=None if layout is None else layout.meta())
    for p in parsed:
        unknown = _unknown_rows(p["ids"], p["cached"])
        if unknown.any() and not drop_unknown:
            raise ValueError(f"{p['where']}: {int(unknown.sum())} rows hold -1 or repeat an expert (prefix-cached "
                             f"or not computed: routing unknown)")
        yield _known_rows(p, unknown, n_experts, labels, ordered)


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


def _sglang_token_ids(resp: dict, where: str) -> tuple[Any, Any, str]:
    """(prompt ids, output ids, where they were found) of one SGLang response, per endpoint
    (0.5.23; ``srt/entrypoints/openai/{protocol,serving_completions,serving_chat}.py``,
    ``srt/managers/tokenizer_manager.py``). None where the response carries none."""
    ext = resp.get("sglext") or {}
    choices = resp.get("choices")
    c0 = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    if choices is None:  # /generate: top-level output_ids, prompt_token_ids with return_prompt_token_ids
        meta = resp.get("meta_info") or {}
        prompt = resp.get("prompt_token_ids", meta.get("prompt_token_ids"))
        return prompt, resp.get("output_ids"), "/generate output_ids" + (" and prompt_token_ids" if prompt else "")
    if ext.get("input_ids") is not None or ext.get("output_ids") is not None:  # chat, *_in_sglext flags
        out = ext.get("output_ids")
        out = out[0] if out and isinstance(out[0], list) else out  # one list per choice
        return ext.get("input_ids"), out, "sglext.input_ids / sglext.output_ids"
    prompt = c0.get("prompt_token_ids", resp.get("prompt_token_ids"))
    if "response_token_ids" in c0:  # /v1/chat/completions
        return prompt, c0.get("response_token_ids"), "choices[0].prompt_token_ids / response_token_ids"
    out = c0.get("token_ids")  # /v1/completions with return_token_ids
    return prompt, out, "choices[0].prompt_token_ids / token_ids"


def read_sglang(responses: Iterable[dict], *, n_layers: int | None = None, top_k: int | None = None,
                n_experts: int | None = None, config: Any = None,
                input_ids: Sequence[Sequence[int]] | None = None, output_ids: Sequence[Sequence[int]] | None = None,
                start_len: int | Sequence[int] = 0, layers: Sequence[int] | None = None,
                domain: str | Sequence[str] = "", report: dict | None = None) -> Iterator[RoutedDocument]:
    """Documents of SGLang responses with ``return_routed_experts: true``.

    Followed (sglang 0.5.7, 0.5.9 and 0.5.23 wheels: ``srt/managers/detokenizer_manager.py``,
    ``srt/managers/scheduler_components/batch_result_processor.py``,
    ``srt/entrypoints/openai/{protocol,serving_completions,serving_chat,utils}.py``): the field is
    ``meta_info["routed_experts"]`` on ``/generate`` and the response-level
    ``sglext["routed_experts"]`` on ``/v1/completions`` and ``/v1/chat/completions`` (0.5.9+,
    taken from the **first** choice only); base64 of int32 ``[tokens, num_hidden_layers,
    top_k]`` covering positions ``[routed_experts_start_len, len(prompt) + len(output) - 1)``.
    Dense layers are rows of 0: ``config=`` keeps exactly the MoE layers (see :func:`read_vllm`
    for the rule without it). Ids are logical (captured before the EPLB remap).

    Token ids, where each endpoint puts them (0.5.23):

    * ``/generate``: top-level ``output_ids``, and ``prompt_token_ids`` when the request set
      ``return_prompt_token_ids`` (else pass the prompt's ids as ``input_ids=``);
    * ``/v1/completions`` with ``return_token_ids``: ``choices[i].token_ids`` and
      ``prompt_token_ids``;
    * ``/v1/chat/completions``: ``choices[i].prompt_token_ids`` / ``response_token_ids``, or
      ``sglext.input_ids`` / ``output_ids`` with ``return_input_ids_in_sglext`` /
      ``return_output_ids_in_sglext``.

    SGLang 0.5.9's OpenAI endpoints return **no** token ids: pass ``input_ids=`` (the prompt's
    ids, e.g. ``tokenizer.apply_chat_template(..., tokenize=True)``) and ``output_ids=`` (the
    completion's text tokenized) for each response. ``n_layers`` / ``top_k`` / ``n_experts``
    default to the config's.
    """
    layout = model_layout(config) if config is not None else None
    n_layers = n_layers or (layout.num_hidden_layers if layout else None)
    top_k = top_k or (layout.top_k if layout else None)
    n_experts = n_experts or (layout.n_experts if layout else None)
    missing = [n for n, v in (("n_layers", n_layers), ("top_k", top_k), ("n_experts", n_experts)) if v is None]
    if missing:
        raise ValueError(f"read_sglang needs {', '.join(m + '=' for m in missing)} or config= (the model's "
                         f"config.json: num_hidden_layers, num_experts_per_tok and the expert count)")
    domains = None if isinstance(domain, str) else list(domain)
    parsed = []
    for r, resp in enumerate(responses):
        if not isinstance(resp, dict):
            raise TypeError(f"response {r}: expected the response's JSON as a dict, got {type(resp).__name__}")
        where = f"response {r}" + (f" (id {resp['id']!r})" if "id" in resp else "")
        ext = resp.get("sglext") or {}
        meta = resp.get("meta_info") or {}
        value = ext.get("routed_experts") if ext.get("routed_experts") is not None else meta.get("routed_experts")
        if value is None:
            raise ValueError(f"{where}: no routed_experts in sglext or meta_info (send return_routed_experts: true "
                             f"to a server started with --enable-return-routed-experts)")
        prompt, out, found = _sglang_token_ids(resp, where)
        if input_ids is not None:
            prompt = input_ids[r]
        if output_ids is not None:
            out = output_ids[r]
        if prompt is None or out is None:
            endpoint = "/generate" if resp.get("choices") is None else (
                "/v1/chat/completions" if resp.get("object") == "chat.completion" else "/v1/completions")
            what = " and ".join(n for n, v in (("prompt", prompt), ("output", out)) if v is None)
            hint = ("pass the prompt's ids as input_ids= (or request return_prompt_token_ids)" if endpoint == "/generate"
                    else "request return_token_ids (0.5.23)" + (" or return_input_ids_in_sglext / "
                                                                "return_output_ids_in_sglext" if "chat" in endpoint else "")
                    + "; SGLang 0.5.9's OpenAI endpoints return no token ids at all: pass input_ids= (prompt ids) "
                      "and output_ids= (completion ids, the text tokenized with the model's tokenizer)")
            raise ValueError(f"{where} ({endpoint}): no {what} token ids (looked in {found}); {hint}")
        prompt, out = np.asarray(prompt, dtype=np.int64), np.asarray(out, dtype=np.int64)
        start = start_len if isinstance(start_len, int) else start_len[r]
        rows = decode_sglang_routed_experts(value, n_layers, top_k, where)
        P, G = len(prompt), len(out)
        end = P + G - 1
        if len(rows) != end - start:
            raise ValueError(f"{where}: routed_experts has {len(rows)} tokens, expected {end - start} "
                             f"(prompt {P} + output {G} - 1 - start_len {start}; token ids from {found})")
        fr = meta.get("finish_reason")
        if fr is None and isinstance(resp.get("choices"), list) and resp["choices"]:
            fr = resp["choices"][0].get("finish_reason")
        parsed.append({"where": where, "ids": rows.astype(np.int64), "axis": "decoder",
                       "tokens": np.concatenate([prompt, out])[start:end], "positions": np.arange(start, end), "P": P,
                       "domain": domain if domains is None else domains[r],
                       "info": {"request_id": resp.get("id", meta.get("id")), "finish_reason": fr,
                                "token_ids_from": found,
                                "choices": len(resp["choices"]) if isinstance(resp.get("choices"), list) else 1}})
    if parsed and top_k < 2 and layout is None and layers is None:
        raise ValueError(f"{parsed[0]['where']}: top_k = 1, so a dense layer's zero rows cannot be told from tokens "
                         f"routed to expert 0: pass config= (the model's config.json path or dict) to name the MoE "
                         f"layers")
    labels, dropped, note = _parsed_layers(parsed, layout=layout, rows=layers)
    ordered = layout.rank_ordered if layout is not None else top_k == 1
    why = layout.rank_order_reason if layout is not None else (
        "top_k = 1" if top_k == 1 else "no config=: the model's router, and so whether SGLang returns its top-k "
                                       "sorted, is unknown")
    if report is not None:
        report.update(layers=labels, dropped_layers=dropped, layer_note=note, rank_ordered=ordered,
                      rank_order_reason=why, layout=None if layout is None else layout.meta())
    for p in parsed:
        yield _known_rows(p, _unknown_rows(p["ids"], 0), n_experts, labels, ordered)


#: ForwardMode values of ``sglang/srt/model_executor/forward_batch_info.py`` read by the dump reader
_EXTEND, _DECODE, _MIXED, _IDLE = 1, 2, 3, 4


def read_sglang_dump(dump: dict | str | os.PathLike, *, top_k: int | None = None, n_experts: int | None = None,
                     logical: bool = True, domain: str = "", config: Any = None,
                     report: dict | None = None) -> Iterator[RoutedDocument]:
    """Documents of an expert-distribution-recorder dump in ``per_token`` mode
    (``--expert-distribution-recorder-mode per_token``, ``/dump_expert_distribution_record``).

    Followed: ``sglang/srt/eplb/expert_distribution.py`` (0.5.7, 0.5.9, 0.5.23: the same keys):
    ``torch.save`` of ``dict(records=[...], last_physical_to_logical_map=Tensor[num_layers,
    num_physical_experts])``; each record (one forward pass) has ``input_ids``, ``positions``
    (flattened batch), ``extend_seq_lens`` (None for decode), ``forward_mode`` and
    ``topk_ids_of_layer``, an int32 tensor ``[num_layers, num_tokens, 8]`` (width fixed at 8,
    unused slots and non-MoE layers ``-1``) of **physical** expert ids, mapped here to logical
    ones with the dump's (last) map unless ``logical=False``. The other modes are refused by
    name: ``per_pass`` records hold only counts, ``stat`` dumps only ``logical_count``.

    The dump has **no request ids**, so sequences are rebuilt from positions: a segment (an
    extend segment of ``extend_seq_lens``, or one decode token) at position 0 starts a sequence;
    one at position p continues the sequence whose next position is p (a prompt chunk only a
    sequence still in its prompt: chunked prefill), not one already extended in this pass, and
    of several such sequences the one that ran most recently. Where that leaves two candidates
    that ran in the same pass (two requests of the same length decoding together), or none for a
    decode token, the dump is ambiguous and a ValueError says so: decode tokens are never turned
    into one-token documents. A prompt segment at p > 0 with no sequence waiting starts one
    there (a prefix-cache hit). Layers that are -1 throughout (dense) are dropped; ``layers``
    of the trace are the remaining layer indices. Rank order: SGLang's top-k (see
    :func:`model_layout`); with ``config=`` from the model, else unknown (False).
    """
    if not isinstance(dump, dict):
        import torch

        path = Path(dump)
        if not path.exists():
            raise FileNotFoundError(f"no SGLang expert-distribution dump at {path}")
        try:
            dump = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable torch.save file (truncated?): {e}") from None
        src = str(path)
    else:
        src = "dump"
    if isinstance(dump, dict) and "records" not in dump and "logical_count" in dump:
        raise ValueError(f"{src}: this is a 'stat' mode dump (logical_count per layer and expert, no per-token ids); "
                         f"record with --expert-distribution-recorder-mode per_token to trace tokens")
    if not isinstance(dump, dict) or "records" not in dump:
        raise ValueError(f"{src}: expected dict(records=..., last_physical_to_logical_map=...) of the per_token mode, "
                         f"found {sorted(dump) if isinstance(dump, dict) else type(dump).__name__}")
    records = dump["records"]
    if records and "topk_ids_of_layer" not in records[0]:
        raise ValueError(f"{src}: this is a 'per_pass' mode dump (records hold {sorted(records[0])}: counts per pass, "
                         f"no per-token ids); record with --expert-distribution-recorder-mode per_token")
    layout = model_layout(config) if config is not None else None
    top_k = top_k or (layout.top_k if layout else None)
    n_experts = n_experts or (layout.n_experts if layout else None)
    if top_k is None:
        raise ValueError("read_sglang_dump needs top_k= or config= (the dump pads every token to 8 slots)")
    p2l = dump.get("last_physical_to_logical_map")
    p2l = None if p2l is None else np.asarray(p2l)
    seqs: list[dict] = []
    moe_rows = None
    for i, rec in enumerate(records):
        where = f"{src}, record {i} (forward pass {rec.get('forward_pass_id')})"
        if "topk_ids_of_layer" not in rec:
            raise ValueError(f"{where}: no topk_ids_of_layer (found {sorted(rec)}): not a per_token record")
        ids = np.asarray(rec["topk_ids_of_layer"]).astype(np.int64)  # [L, n, 8]
        tok, pos = np.asarray(rec["input_ids"], np.int64), np.asarray(rec["positions"], np.int64)
        if ids.ndim != 3 or ids.shape[1] != len(tok) or len(pos) != len(tok) or ids.shape[2] < top_k:
            raise ValueError(f"{where}: topk_ids_of_layer has shape {list(ids.shape)}, expected "
                             f"[layers, {len(tok)} tokens, >= {top_k}] (input_ids {len(tok)}, positions {len(pos)})")
        if not len(tok):
            continue
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
        mode = rec.get("forward_mode")
        lens = rec.get("extend_seq_lens")
        if mode not in (_EXTEND, _DECODE, _MIXED, _IDLE, None):
            raise ValueError(f"{where}: forward_mode {mode} (speculative verify/draft passes) is not read; record "
                             f"without speculative decoding")
        if lens is not None:
            bounds = np.concatenate([[0], np.cumsum(lens)]).astype(int)
            if bounds[-1] != len(tok):
                raise ValueError(f"{where}: extend_seq_lens sum to {bounds[-1]}, expected {len(tok)} tokens")
            segs = [(a, b, mode != _MIXED or b - a > 1 or pos[a] == 0) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        else:
            segs = [(j, j + 1, False) for j in range(len(tok))]
        taken: set[int] = set()
        for a, b, is_prompt in segs:
            p0 = int(pos[a])
            if np.any(pos[a:b] != np.arange(p0, p0 + b - a)):
                raise ValueError(f"{where}: positions {pos[a:b].tolist()} of one segment are not consecutive")
            cands = [s for s, d in enumerate(seqs) if d["next"] == p0 and s not in taken
                     and (not is_prompt or d["in_prompt"])] if p0 > 0 else []
            if len(cands) > 1:
                last = max(seqs[s]["last"] for s in cands)
                cands = [s for s in cands if seqs[s]["last"] == last]
            if len(cands) > 1:
                raise ValueError(f"{where}: {len(cands)} sequences wait for position {p0} and ran in the same pass "
                                 f"(record {seqs[cands[0]]['last']}): the dump has no request ids, so which token is "
                                 f"whose is ambiguous. Record with one request at a time (--max-running-requests 1), "
                                 f"or use the returned routing (--enable-return-routed-experts, RoutingTrace.from_sglang)")
            if not cands:
                if not is_prompt:
                    raise ValueError(f"{where}: a decode token at position {p0} continues no sequence in the dump "
                                     f"(recording started mid-request?); it is not turned into a one-token document")
                seqs.append({"tok": [], "pos": [], "ids": [], "prompt": p0, "next": p0, "in_prompt": True,
                             "src": where, "last": i})
                s = len(seqs) - 1
            else:
                s = cands[0]
            d = seqs[s]
            d["tok"].append(tok[a:b])
            d["pos"].append(pos[a:b])
            d["ids"].append(ids[:, a:b])
            d["next"], d["last"] = p0 + b - a, i
            if is_prompt and d["in_prompt"]:
                d["prompt"] = p0 + b - a
            else:
                d["in_prompt"] = False
            taken.add(s)
    keep = np.flatnonzero(moe_rows) if moe_rows is not None else np.zeros(0, int)
    if layout is not None:
        if moe_rows is not None and len(moe_rows) != layout.num_hidden_layers:
            raise ValueError(f"{src}: topk_ids_of_layer has {len(moe_rows)} layers, config= says num_hidden_layers = "
                             f"{layout.num_hidden_layers}")
        extra = sorted(set(keep.tolist()) - set(layout.moe_layers))
        if extra:
            raise ValueError(f"{src}: layers {extra} hold routing but config= says they are dense ({layout.rule})")
        keep = np.asarray(layout.moe_layers, dtype=int)
    ordered = layout.rank_ordered if layout is not None else top_k == 1
    if report is not None:
        report.update(layers=keep.tolist(), rank_ordered=ordered, sequences=len(seqs),
                      rank_order_reason=layout.rank_order_reason if layout is not None else
                      ("top_k = 1" if top_k == 1 else "no config=: whether SGLang's top-k is sorted is unknown"))
    for d in seqs:
        ids = np.concatenate(d["ids"], axis=1)[keep].transpose(1, 0, 2)  # [T, L_moe, k]
        if (ids < 0).any():
            raise ValueError(f"{d['src']}: a MoE layer has -1 expert ids inside the top_k={top_k} slots")
        if n_experts is not None:
            _check_ids(ids, n_experts, d["src"])
        yield RoutedDocument(token_ids=np.concatenate(d["tok"]), expert_ids=ids, positions=np.concatenate(d["pos"]),
                             prompt_length=d["prompt"], domain=domain, source=d["src"],
                             info={"layers": keep.tolist(), "rank_ordered": bool(ordered)})
