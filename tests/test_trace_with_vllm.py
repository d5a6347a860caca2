"""scripts/trace_with_vllm.py with a stand-in for vllm.LLM (vLLM is not installed and there is
no GPU here): the stand-in returns RequestOutput-like objects with vLLM's documented fields,
routed_experts [prompt + generated - 1, layers, top_k] uint8 (vLLM 0.22+)."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moe_lab import RoutingTrace, open_store
from moe_lab import analysis as A

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "trace_with_vllm.py"
spec = importlib.util.spec_from_file_location("trace_with_vllm", SCRIPT)
tv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tv)

L, K, E = 4, 2, 8


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: object
    routed_experts: np.ndarray | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: object
    outputs: list
    finished: bool


def routing_of(tokens: list[int], dense: tuple = ()) -> np.ndarray:
    """A deterministic function of the token ids, so that the test can recompute it; ``dense``
    layers are rows of zeros, as vLLM returns them (routed_experts_capturer.py, 0.14-0.34)."""
    t = np.asarray(tokens)[:, None, None]
    out = ((t * 3 + np.arange(L)[None, :, None] + np.arange(K)[None, None, :] * 5) % E).astype(np.uint8)
    out[:, list(dense)] = 0
    return out


MIXTRAL_CFG = {"model_type": "mixtral", "num_hidden_layers": L, "num_local_experts": E, "num_experts_per_tok": K}
DEEPSEEK_CFG = {"model_type": "deepseek_v2", "num_hidden_layers": L, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                "n_routed_experts": E, "num_experts_per_tok": K, "n_group": 1, "topk_group": 1}


class FakeLLM:
    """generate() as vLLM's offline LLM with enable_return_routed_experts=True; fails on call
    number ``fail_on`` to simulate a crash."""

    def __init__(self, fail_on: int | None = None, config: dict = MIXTRAL_CFG, stop_string_on: int | None = None):
        self.calls, self.fail_on, self.prompts = 0, fail_on, []
        self.dense = tuple(range(config.get("first_k_dense_replace", 0)))
        self.stop_string_on = stop_string_on  # this prompt ends by a stop string: no routing (vLLM 0.14-0.21)
        cfg = SimpleNamespace(**config)  # (a transformers PretrainedConfig in vLLM; to_dict() is used when present)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(hf_text_config=cfg))

    def generate(self, prompts, sampling_params):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("GPU fell off the bus")
        outs = []
        for p in prompts:
            self.prompts.append(p)
            ids = p["prompt_token_ids"] if isinstance(p, dict) else [1] + [3 + ord(c) % 90 for c in p]
            comps = []
            for i in range(sampling_params.n):
                gen = [(sum(ids) + 7 * j + i) % 97 + 3 for j in range(sampling_params.max_tokens)]
                if len(self.prompts) == self.stop_string_on:
                    comps.append(CompletionOutput(i, "", gen, None, None, None, "stop", "\n\n"))
                else:
                    comps.append(CompletionOutput(i, "", gen, None, None, routing_of(ids + gen[:-1], self.dense),
                                                  "length"))
            outs.append(RequestOutput(f"req-{len(self.prompts)}", None if isinstance(p, dict) else p, ids, None, comps,
                                      True))
        return outs


def write_corpus(path: Path, n: int) -> Path:
    lines = []
    for i in range(n):
        rec = {"prompt_token_ids": [1, 10 + i, 11 + i]} if i % 4 == 3 else {"text": f"prompt number {i}"}
        rec["domain"] = "code" if i % 2 else "prose"
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(tmp_path, llm, *extra):
    """The script's main() with the stand-in in place of make_llm (which imports vllm)."""
    argv = ["--model", "tiny-moe", "--corpus", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "t"),
            "--tensor-parallel-size", "2", "--batch-size", "3", "--shard-tokens", "40", "--max-tokens", "4", *extra]

    def make(args):
        sp = SimpleNamespace(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                             seed=args.seed)
        return llm, sp, "0.33.0"

    return tv.main(argv, make=make)


def test_collects_every_prompt_with_metadata(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 10)
    llm = FakeLLM()
    store = open_store(run(tmp_path, llm))
    assert store.n_docs == 10 and llm.calls == 4  # batches of 3
    m = store.manifest
    assert m["model"] == "tiny-moe" and m["engine"] == "vllm" and m["meta"]["engine_version"] == "0.33.0"
    assert m["meta"]["sampling"]["max_tokens"] == 4 and m["meta"]["tensor_parallel_size"] == 2
    assert len(m["meta"]["corpus_sha256"]) == 64 and "finished" in m["meta"]
    assert all(s["info"]["lines"][0] < s["info"]["lines"][1] for s in m["shards"])
    assert store.domains == ["code" if i % 2 else "prose" for i in range(10)]
    t = store.to_trace()
    doc = t.select(docs=[3])  # given as token ids
    gen = [(sum([1, 13, 14]) + 7 * j) % 97 + 3 for j in range(4)]
    assert doc.token_ids.tolist() == [1, 13, 14] + gen[:-1]
    assert np.array_equal(doc.expert_ids, routing_of([1, 13, 14] + gen[:-1]).transpose(1, 0, 2))
    assert doc.is_generated.tolist() == [False] * 3 + [True] * 3
    assert A.expert_load(store).shape == (L, E) and not store.has_weights


def test_interrupted_run_resumes_without_redoing_or_losing_prompts(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 10)
    with pytest.raises(RuntimeError, match="bus"):
        run(tmp_path, FakeLLM(fail_on=3))
    partial = open_store(tmp_path / "t")
    done = partial.manifest["shards"][-1]["info"]["lines"][1]
    assert 0 < partial.n_docs == done < 10  # only whole shards survive
    llm = FakeLLM()
    store = open_store(run(tmp_path, llm))
    assert store.n_docs == 10 and len(llm.prompts) == 10 - done  # the rest, and only the rest
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    write_corpus(fresh / "c.jsonl", 10)
    ref = open_store(run(fresh, FakeLLM())).to_trace()
    t = store.to_trace()
    assert np.array_equal(t.expert_ids, ref.expert_ids) and np.array_equal(t.token_ids, ref.token_ids)
    assert t.meta["prompt_lengths"] == ref.meta["prompt_lengths"]


def test_n_completions_layers_and_bad_corpus(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 4)
    store = open_store(run(tmp_path, FakeLLM(), "--n", "2", "--layers", "1-3"))
    assert store.n_docs == 8 and store.layers == [1, 2, 3]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: no 'text' or 'prompt_token_ids' key \(found \['txt'\]\)"):
        tv.read_corpus(tmp_path / "bad.jsonl", "text", "domain")
    assert tv.parse_layers("0,2-4") == [0, 2, 3, 4]


def test_moe_layers_from_the_model_config_rank_order_and_request_metadata(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 6)
    with pytest.warns(UserWarning, match=r"request 'req-5', completion 0: skipped, it came back without routing "
                                         r"\(finish_reason 'stop' by the stop string"):
        out = run(tmp_path, FakeLLM(config=DEEPSEEK_CFG, stop_string_on=5))
    t = RoutingTrace.load(out)
    assert t.layers == [1, 2, 3]  # layer 0 is dense (first_k_dense_replace=1): its zero rows are not routing
    assert (t.expert_ids != 0).any() and t.n_docs == 5 and not t.rank_ordered
    assert "grouped" in t.meta["rank_order_reason"] and t.meta["config"]["moe_layers"] == [1, 2, 3]
    with pytest.raises(ValueError, match="not rank-ordered"):
        A.repetition(t, "first")
    infos = [r for s in t.manifest["shards"] for r in s["info"]["requests"]]
    assert [r["request_id"] for r in infos] == ["req-1", "req-2", "req-3", "req-4", "req-6"]
    assert [r["corpus_line"] for r in infos] == [0, 1, 2, 3, 5] and all(r["finish_reason"] == "length" for r in infos)
    skipped = [r for s in t.manifest["shards"] for r in s["info"]["skipped"]]
    assert [(r["request_id"], r["corpus_line"], r["finish_reason"]) for r in skipped] == [("req-5", 4, "stop")]


def test_data_parallel_is_one_process_per_rank(tmp_path):
    write_corpus(tmp_path / "c.jsonl", 7)
    with pytest.raises(SystemExit, match=r"--data-parallel-size 2: vLLM's offline LLM does not run data parallelism "
                                         r"in one process .* --part i/N"):
        run(tmp_path, FakeLLM(), "--data-parallel-size", "2")
    parts = []
    for i in range(2):
        argv_out = tmp_path / f"part{i}"
        llm = FakeLLM()
        argv = ["--model", "tiny-moe", "--corpus", str(tmp_path / "c.jsonl"), "--out", str(argv_out),
                "--part", f"{i}/2", "--max-tokens", "4"]
        tv.main(argv, make=lambda a, llm=llm: (llm, SimpleNamespace(n=1, temperature=0.0, top_p=1.0, max_tokens=4,
                                                                    seed=0), "0.34.0"))
        parts.append(RoutingTrace.load(argv_out))
    lines = [[r["corpus_line"] for s in p.manifest["shards"] for r in s["info"]["requests"]] for p in parts]
    assert lines == [[0, 2, 4, 6], [1, 3, 5]]
    with pytest.raises(ValueError, match=r"--part must be i/N"):
        tv.parse_part("half")
