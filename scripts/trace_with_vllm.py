"""Collect routing traces at scale with vLLM: run its offline ``LLM`` with routed-expert return
over a JSONL corpus and write a moe_lab trace directory in shards as it goes.

    python scripts/trace_with_vllm.py --model mistralai/Mixtral-8x7B-Instruct-v0.1 \\
        --corpus prompts.jsonl --out traces/mixtral --tensor-parallel-size 2 \\
        [--data-parallel-size 1] [--max-tokens 128] [--temperature 0] [--batch-size 256] \\
        [--shard-tokens 1000000] [--text-key text] [--domain-key domain] [--layers 0-31] [--limit N]

then, anywhere (no GPU needed)::

    store = moe_lab.open_store("traces/mixtral")
    moe_lab.analysis.repetition(store)           # Table 5 / Figure 10, over every token

Corpus: one JSON object per line, with the prompt as text (``--text-key``, default ``text``) or
as token ids (``prompt_token_ids``), and optionally a domain label (``--domain-key``). Every
completion becomes one document of the trace: its prompt and generated tokens (flagged), with
the experts vLLM routed them to (ids only: vLLM does not return weights or logits; see
``RoutingTrace.from_vllm`` for the format of each release).

Resuming: each shard records the corpus lines it holds; a rerun with the same ``--out``
continues after the last complete shard. Nothing is half-written (see moe_lab.routing.store).
The manifest records the model, the vLLM version, the sampling settings, the parallel sizes and
the corpus file's SHA-256.

``--tensor-parallel-size`` and ``--data-parallel-size`` are passed to ``vllm.LLM`` as they are,
with ``enable_return_routed_experts=True``; vLLM spreads the model over GPUs (and nodes, with
its own launcher) and returns the routing of every request to this process.

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
    ap.add_argument("--data-parallel-size", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1, help="completions per prompt")
    ap.add_argument("--batch-size", type=int, default=256, help="prompts per LLM.generate call")
    ap.add_argument("--shard-tokens", type=int, default=1_000_000, help="write a shard once this many tokens wait")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--domain-key", default="domain")
    ap.add_argument("--layers", default=None, help="rows of the layer axis to keep, e.g. 1-26 (dense layers are zeros)")
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


def n_experts_of(llm, override: int | None) -> int:
    if override:
        return override
    cfg = llm.llm_engine.model_config.hf_text_config
    for key in EXPERT_KEYS:
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot find the number of experts in the model config (tried {EXPERT_KEYS}); pass --n-experts")


def collect(args: argparse.Namespace, llm, sampling_params, engine_version: str, progress: bool = True) -> Path:
    """The collection loop, given an ``LLM``-like object (``generate(prompts, sampling_params)``
    returning ``RequestOutput``-like objects with routed experts)."""
    from tqdm.auto import tqdm

    items = read_corpus(args.corpus, args.text_key, args.domain_key, args.limit)
    layers = parse_layers(args.layers)
    n_experts = n_experts_of(llm, args.n_experts)
    writer = None
    done = 0
    if (args.out / "manifest.json").exists():  # resume: lines already in complete shards
        shards = json.loads((args.out / "manifest.json").read_text())["shards"]
        done = max((s["info"]["lines"][1] for s in shards if "lines" in s.get("info", {})), default=0)
    todo = [it for it in items if it["line"] >= done]
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="tracing with vLLM", unit="prompt",
               disable=not progress)
    buf_start = todo[0]["line"] if todo else done
    for b in range(0, len(todo), args.batch_size):
        batch = todo[b:b + args.batch_size]
        outputs = llm.generate([it["prompt"] for it in batch], sampling_params)
        docs = list(read_vllm(outputs, n_experts=n_experts, layers=layers, domain=[it["domain"] for it in batch]))
        if writer is None:
            _, L, k = docs[0].expert_ids.shape
            writer = TraceWriter(args.out, n_experts=n_experts, top_k=k, layers=layers or range(L),
                                 model=args.model, engine="vllm", shard_tokens=1 << 62,
                                 meta=run_meta(args, sampling_params, engine_version))
        for doc, it in zip_docs(docs, batch):
            doc.info["corpus_line"] = it["line"]
            writer.add(doc)
        end = batch[-1]["line"] + 1
        if writer.buffered_tokens >= args.shard_tokens or b + args.batch_size >= len(todo):
            writer.flush({"lines": [buf_start, end]})  # a shard ends on a batch boundary
            buf_start = end
        bar.update(len(batch))
    bar.close()
    if writer is not None:
        writer.update_meta(finished=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return args.out


def zip_docs(docs, batch):
    """Documents come one per completion, in request order (n completions per prompt)."""
    per = len(docs) // len(batch)
    if per * len(batch) != len(docs):
        raise ValueError(f"{len(docs)} completions for {len(batch)} prompts: expected a multiple")
    for i, doc in enumerate(docs):
        yield doc, batch[i // per]


def run_meta(args, sampling_params, engine_version: str) -> dict:
    sp = {k: getattr(sampling_params, k, None) for k in ("n", "temperature", "top_p", "max_tokens", "seed")}
    return {"source": "scripts/trace_with_vllm.py", "engine_version": engine_version, "sampling": sp,
            "tensor_parallel_size": args.tensor_parallel_size, "data_parallel_size": args.data_parallel_size,
            "corpus": str(args.corpus), "corpus_sha256": sha256(args.corpus), "argv": sys.argv,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "ids_only": True}


def make_llm(args):  # pragma: no cover -- needs vLLM and a GPU
    import vllm
    from vllm import LLM, SamplingParams

    kwargs = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    llm = LLM(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
              data_parallel_size=args.data_parallel_size, enable_return_routed_experts=True, seed=args.seed, **kwargs)
    sp = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                        seed=args.seed)
    return llm, sp, vllm.__version__


def main(argv=None, make: Callable = make_llm) -> Path:
    args = parse_args(argv)
    llm, sp, version = make(args)
    out = collect(args, llm, sp, version)
    print(f"trace in {out}; open it with moe_lab.open_store({str(out)!r})")
    return out


if __name__ == "__main__":
    main()
