"""Collect routing traces at scale with vLLM: run its offline ``LLM`` with routed-expert return
over a JSONL corpus and write a moe_lab trace directory in shards as it goes.

    python scripts/trace_with_vllm.py --model mistralai/Mixtral-8x7B-Instruct-v0.1 \\
        --corpus prompts.jsonl --out traces/mixtral --tensor-parallel-size 2 \\
        [--part 0/1] [--max-tokens 128] [--temperature 0] [--batch-size 256] \\
        [--shard-tokens 1000000] [--text-key text] [--domain-key domain] [--layers 0-31] [--limit N]

then, anywhere (no GPU needed)::

    trace = moe_lab.RoutingTrace.load("traces/mixtral")   # memory-mapped
    moe_lab.analysis.repetition(trace)                     # Table 5 / Figure 10, over every token

**MoE layers.** vLLM returns one row per decoder layer, dense layers as zeros (DeepSeek's
``first_k_dense_replace``, Llama 4's interleaved layers, Qwen's ``mlp_only_layers``). The script
reads the model's config from vLLM (``llm.llm_engine.model_config.hf_text_config``) and keeps
exactly the MoE layers it names, labelled with their decoder index (``RoutingTrace.from_vllm(...,
config=)``); the same config says whether the router's top-k comes back sorted, which the trace
records as ``rank_ordered``. ``--layers`` overrides the config with rows of your choice.

Corpus: one JSON object per line, with the prompt as text (``--text-key``, default ``text``) or
as token ids (``prompt_token_ids``), and optionally a domain label (``--domain-key``). Every
completion becomes one document of the trace: its prompt and generated tokens (flagged), with
the experts vLLM routed them to (ids only: vLLM does not return weights or logits; see
``RoutingTrace.from_vllm`` for the format of each release).

Resuming: each shard records the corpus lines it holds; a rerun with the same ``--out``
continues after the last complete shard. Nothing is half-written (see moe_lab.routing.store).
The manifest records the model, the vLLM version, the sampling settings, the parallel sizes and
the corpus file's SHA-256.

``--tensor-parallel-size`` is passed to ``vllm.LLM`` with ``enable_return_routed_experts=True``.
**Data parallelism** is not run inside one process: vLLM's offline ``LLM`` refuses
``data_parallel_size > 1`` (``ValueError`` in every release 0.14-0.34, ``entrypoints/llm.py``), so
``--data-parallel-size`` above 1 is refused here too. Do it the vLLM way, one process per rank:
start N copies, each on its own GPUs (``CUDA_VISIBLE_DEVICES``), with ``--part i/N`` (corpus
lines ``i, i+N, i+2N, ...``) and its own ``--out``; each directory is a trace of its part.
Each shard records, per completion, the corpus line, vLLM's request id, the completion index
and its finish reason (``manifest.json``, ``shards[i].info.requests``); completions that came
back without routing are listed with the cause (``info.skipped``).

What was and was not run: this script was NOT run against vLLM (the project's machine has no
GPU and vLLM is not installed). Its logic -- corpus reading, batching, shard writing, resuming
after an interruption, the metadata -- is tested in tests/test_trace_with_vllm.py with a stand-in
``LLM`` whose outputs have vLLM's documented fields (``RequestOutput.prompt_token_ids``,
``CompletionOutput.token_ids`` and ``.routed_experts`` ``[tokens, layers, top_k]``). The vLLM
call itself (``main`` -> ``make_llm``) is the only untested part.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from moe_lab.routing.importers import read_vllm  # noqa: E402
from moe_lab.routing.store import TraceWriter  # noqa: E402

#: config keys holding the number of routed experts, by model family
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True, type=Path, help="JSONL, one prompt per line")
    ap.add_argument("--out", required=True, type=Path, help="trace directory (created, or resumed)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--data-parallel-size", type=int, default=1,
                    help="only 1: run one process per rank with --part instead (see the docstring)")
    ap.add_argument("--part", default="0/1", help="i/N: this process traces corpus lines i, i+N, ... (data parallel)")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1, help="completions per prompt")
    ap.add_argument("--batch-size", type=int, default=256, help="prompts per LLM.generate call")
    ap.add_argument("--shard-tokens", type=int, default=1_000_000, help="write a shard once this many tokens wait")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--domain-key", default="domain")
    ap.add_argument("--layers", default=None, help="rows of the layer axis to keep, e.g. 1-26 (default: the MoE "
                                                   "layers the model config names)")
    ap.add_argument("--n-experts", type=int, default=None, help="default: from the model config")
    ap.add_argument("--limit", type=int, default=None, help="only the first N corpus lines")
    ap.add_argument("--max-model-len", type=int, default=None)
    return ap.parse_args(argv)


def parse_layers(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def read_corpus(path: Path, text_key: str, domain_key: str, limit: int | None = None) -> list[dict]:
    """[{"line": i, "prompt": str | {"prompt_token_ids": [...]}, "domain": str}], with clear
    errors for lines that are not JSON or hold no prompt."""
    items = []
    with open(path) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i + 1}: not JSON: {e}") from None
            if "prompt_token_ids" in rec:
                prompt = {"prompt_token_ids": [int(t) for t in rec["prompt_token_ids"]]}
            elif text_key in rec:
                prompt = str(rec[text_key])
            else:
                raise ValueError(f"{path}, line {i + 1}: no {text_key!r} or 'prompt_token_ids' key (found {sorted(rec)})")
            items.append({"line": i, "prompt": prompt, "domain": str(rec.get(domain_key, ""))})
    return items


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_of(llm) -> dict:
    """The model's transformers config as vLLM loaded it (``model_config.hf_text_config``)."""
    cfg = llm.llm_engine.model_config.hf_text_config
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))


def n_experts_of(llm, override: int | None) -> int:
    if override:
        return override
    cfg = config_of(llm)
    for key in EXPERT_KEYS:
        if cfg.get(key):
            return int(cfg[key])
    raise ValueError(f"cannot find the number of experts in the model config (tried {EXPERT_KEYS}); pass --n-experts")


def parse_part(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--part must be i/N (e.g. 0/4), got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part {spec}: expected 0 <= i < N")
    return i, n


def collect(args: argparse.Namespace, llm, sampling_params, engine_version: str, progress: bool = True) -> Path:
    """The collection loop, given an ``LLM``-like object (``generate(prompts, sampling_params)``
    returning ``RequestOutput``-like objects with routed experts)."""
    from tqdm.auto import tqdm

    items = read_corpus(args.corpus, args.text_key, args.domain_key, args.limit)
    part, n_parts = parse_part(args.part)
    items = [it for it in items if it["line"] % n_parts == part]
    layers = parse_layers(args.layers)
    n_experts = n_experts_of(llm, args.n_experts)
    config = None if layers else config_of(llm)
    writer = None
    done = 0
    if (args.out / "manifest.json").exists():  # resume: lines already in complete shards
        shards = json.loads((args.out / "manifest.json").read_text())["shards"]
        done = max((s["info"]["lines"][1] for s in shards if "lines" in s.get("info", {})), default=0)
    todo = [it for it in items if it["line"] >= done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="tracing with vLLM", unit="prompt",
               disable=not progress)
    buf_start = todo[0]["line"] if todo else done
    requests: list[dict] = []
    skipped: list[dict] = []
    for b in range(0, len(todo), args.batch_size):
        batch = todo[b:b + args.batch_size]
        outputs = llm.generate([it["prompt"] for it in batch], sampling_params)
        line_of = {str(getattr(o, "request_id", r)): it["line"] for r, (o, it) in enumerate(zip(outputs, batch))}
        report: dict = {}
        docs = list(read_vllm(outputs, n_experts=n_experts, layers=layers, config=config,
                              domain=[it["domain"] for it in batch], engine_version=engine_version, report=report))
        if docs and writer is None:
            _, L, k = docs[0].expert_ids.shape
            meta = run_meta(args, sampling_params, engine_version)
            meta.update(rank_order_reason=report.get("rank_order_reason"), layer_note=report.get("layer_note"),
                        config=report.get("layout"))
            writer = TraceWriter(args.out, n_experts=n_experts, top_k=k, layers=docs[0].info["layers"],
                                 model=args.model, engine="vllm", shard_tokens=1 << 62, meta=meta,
                                 rank_ordered=report.get("rank_ordered"))
        for doc in docs:
            doc.info["corpus_line"] = line_of.get(str(doc.info["request_id"]))
            requests.append({k: doc.info.get(k) for k in ("corpus_line", "request_id", "completion", "finish_reason",
                                                          "unknown_rows")})
            writer.add(doc)
        skipped += [{**s, "corpus_line": line_of.get(str(s["request_id"]))} for s in report.get("skipped", [])]
        end = batch[-1]["line"] + 1
        if writer is not None and (writer.buffered_tokens >= args.shard_tokens or b + args.batch_size >= len(todo)):
            writer.flush({"lines": [buf_start, end], "requests": requests, "skipped": skipped})  # on a batch boundary
            buf_start, requests, skipped = end, [], []
        bar.update(len(batch))
    bar.close()
    if writer is not None:
        writer.update_meta(finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return args.out


def run_meta(args, sampling_params, engine_version: str) -> dict:
    sp = {k: getattr(sampling_params, k, None) for k in ("n", "temperature", "top_p", "max_tokens", "seed")}
    return {"source": "scripts/trace_with_vllm.py", "engine": "vllm", "engine_version": engine_version, "sampling": sp,
            "tensor_parallel_size": args.tensor_parallel_size, "part": args.part,
            "corpus": str(args.corpus), "corpus_sha256": sha256(args.corpus), "argv": sys.argv,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "ids_only": True}


def make_llm(args):  # pragma: no cover -- needs vLLM and a GPU
    import vllm
    from vllm import LLM, SamplingParams

    kwargs = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    llm = LLM(model=args.model, tensor_parallel_size=args.tensor_parallel_size, enable_return_routed_experts=True,
              seed=args.seed, **kwargs)
    sp = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                        seed=args.seed)
    return llm, sp, vllm.__version__


def main(argv=None, make: Callable = make_llm) -> Path:
    args = parse_args(argv)
    if args.data_parallel_size != 1:
        raise SystemExit(f"--data-parallel-size {args.data_parallel_size}: vLLM's offline LLM does not run data "
                         f"parallelism in one process (LLM(data_parallel_size=N) raises ValueError, vLLM 0.14-0.34 "
                         f"entrypoints/llm.py). Run one process per rank instead: N copies of this script, each on its "
                         f"own GPUs (CUDA_VISIBLE_DEVICES), with --part i/N and its own --out.")
    parse_part(args.part)
    llm, sp, version = make(args)
    out = collect(args, llm, sp, version)
    print(f"trace in {out}; open it with moe_lab.RoutingTrace.load({str(out)!r})")
    return out


if __name__ == "__main__":
    main()
