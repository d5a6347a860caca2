"""vLLM and SGLang importers on the synthetic fixtures in data/fixtures/traces/ (each in the
engine's documented format; see scripts/make_trace_fixtures.py) and on hand-made bad input."""

from __future__ import annotations

import base64
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from moe_lab import RoutingTrace
from moe_lab import analysis as A

FIX = Path(__file__).resolve().parent.parent / "data" / "fixtures" / "traces"


@dataclass
class CompletionOutput:  # the fields of vllm.outputs.CompletionOutput that the importer reads
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None = None
    logprobs: object = None
    routed_experts: np.ndarray | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput (0.21 adds prompt_routed_experts)
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: object
    outputs: list
    finished: bool
    prompt_routed_experts: np.ndarray | None = None
    kwargs: dict = field(default_factory=dict)


def vllm_objects(dtype=np.uint8):
    data = json.loads((FIX / "vllm" / "request_outputs.json").read_text())
    return data, [RequestOutput(q["request_id"], None, q["prompt_token_ids"], None,
                                [CompletionOutput(o["index"], o["text"], o["token_ids"],
                                                  routed_experts=np.asarray(o["routed_experts"], dtype=dtype),
                                                  finish_reason=o["finish_reason"]) for o in q["outputs"]], True)
                  for q in data["request_outputs"]]


@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.uint8])  # 0.14-0.20, 0.21, 0.22+
def test_vllm_offline_objects(dtype):
    data, outs = vllm_objects(dtype)
    t = RoutingTrace.from_vllm(outs, n_experts=8, layers=[1, 2, 3], model="tiny-moe", engine_version="0.22.0")
    completions = [(q, o) for q in data["request_outputs"] for o in q["outputs"]]
    assert t.n_docs == len(completions) == 4 and t.layers == [1, 2, 3] and t.ids_only
    assert t.meta["prompt_lengths"] == [len(q["prompt_token_ids"]) for q, _ in completions]
    d = 1  # request 0, completion 1: prompt 7 + 3 generated, the last one without routing
    q, o = completions[d]
    doc = t.select(docs=[d])
    P, G = len(q["prompt_token_ids"]), len(o["token_ids"])
    assert doc.n_tokens == P + G - 1
    assert doc.token_ids.tolist() == (q["prompt_token_ids"] + o["token_ids"])[:-1]
    assert doc.is_generated.tolist() == [False] * P + [True] * (G - 1)
    rows = np.asarray(o["routed_experts"])  # [T, L, k]
    assert np.array_equal(doc.expert_ids, rows[:, 1:].transpose(1, 0, 2))
    assert t.meta["requests"][1]["request_id"] == "req-0" and t.meta["requests"][1]["completion"] == 1
    assert A.generated_only(t).n_tokens == sum(len(o["token_ids"]) - 1 for _, o in completions)
    full = RoutingTrace.from_vllm(outs, n_experts=8)  # the dense layer's zero rows kept when asked to
    assert full.layers == [0, 1, 2, 3] and (full.expert_ids[0] == 0).all()


def test_vllm_http_v022_base64_npy_equals_offline():
    _, outs = vllm_objects()
    http = json.loads((FIX / "vllm" / "completions_http_v0.22.json").read_text())
    a = RoutingTrace.from_vllm(outs, n_experts=8, layers=[1, 2, 3])
    b = RoutingTrace.from_vllm(http, n_experts=8, layers=[1, 2, 3])
    assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.token_ids, b.token_ids)
    assert a.meta["prompt_lengths"] == b.meta["prompt_lengths"]


def test_vllm_021_split_prompt_and_generated_rows():
    http21 = json.loads((FIX / "vllm" / "completions_http_v0.21.json").read_text())
    _, outs = vllm_objects()
    t = RoutingTrace.from_vllm(http21, n_experts=8)  # 0.21: MoE layers only, numbered 0..2
    ref = RoutingTrace.from_vllm(outs[1:], n_experts=8, layers=[1, 2, 3])
    assert np.array_equal(t.expert_ids, ref.expert_ids) and t.layers == [0, 1, 2]
    assert t.meta["prompt_lengths"] == ref.meta["prompt_lengths"]
    # the offline 0.21 objects: prompt_routed_experts on the RequestOutput
    q = outs[1]
    P = len(q.prompt_token_ids)
    rows = q.outputs[0].routed_experts[:, 1:].astype(np.int16)
    obj = RequestOutput(q.request_id, None, q.prompt_token_ids, None,
                        [CompletionOutput(0, "", q.outputs[0].token_ids, routed_experts=rows[P:])], True,
                        prompt_routed_experts=rows[:P])
    t2 = RoutingTrace.from_vllm([obj], n_experts=8)
    assert np.array_equal(t2.expert_ids, ref.select(docs=[0]).expert_ids)


def test_vllm_prefix_cache_sentinel_and_prompt_start():
    _, outs = vllm_objects(np.int16)
    o = outs[0].outputs[0]
    o.routed_experts = o.routed_experts.copy()
    o.routed_experts[:3] = -1  # cached positions marked as the docs describe
    t = RoutingTrace.from_vllm(outs[:1], n_experts=8, layers=[1, 2, 3])
    assert t.meta["unknown_rows"] == 3 and t.select(docs=[0]).positions[0] == 3
    with pytest.raises(ValueError, match="3 rows hold -1"):
        RoutingTrace.from_vllm(outs[:1], n_experts=8, drop_unknown=False)
    _, outs = vllm_objects()
    o = outs[2].outputs[0]
    o.routed_experts = o.routed_experts[4:]  # SamplingParams(routed_experts_prompt_start=4)
    t = RoutingTrace.from_vllm(outs[2:], n_experts=8, prompt_start=4)
    assert t.positions[0] == 4 and t.token_ids[0] == outs[2].prompt_token_ids[4]


def test_vllm_bad_input_names_request_expected_found():
    _, outs = vllm_objects()
    bad = copy.deepcopy(outs[:2])
    bad[1].outputs[0].routed_experts = bad[1].outputs[0].routed_experts[:-1]
    with pytest.raises(ValueError, match=r"request 'req-1', completion 0: routed_experts has 8 rows, expected 9 "
                                         r"\(prompt 4 \+ generated 6 - 1 - prompt_start 0\)"):
        RoutingTrace.from_vllm(bad, n_experts=8)
    with pytest.raises(ValueError, match=r"request 'req-0', completion 0: expert ids must be in \[0, 4\)"):
        RoutingTrace.from_vllm(outs, n_experts=4)
    bad = copy.deepcopy(outs[:2])
    bad[1].outputs[0].routed_experts = bad[1].outputs[0].routed_experts[:, :2]
    with pytest.raises(ValueError, match=r"req-1.*\[layers, top_k\] = \[2, 2\], expected \[4, 2\]"):
        RoutingTrace.from_vllm(bad, n_experts=8)
    bad = copy.deepcopy(outs[:1])
    bad[0].outputs[0].routed_experts = None
    with pytest.raises(ValueError, match="routed_experts is None.*enable_return_routed_experts"):
        RoutingTrace.from_vllm(bad, n_experts=8)
    http = json.loads((FIX / "vllm" / "completions_http_v0.22.json").read_text())
    http[0]["choices"][0]["routed_experts"] = http[0]["choices"][0]["routed_experts"][:40]  # truncated
    with pytest.raises(ValueError, match=r"request 'cmpl-req-0', completion 0: routed_experts is a string but not "
                                         r"base64 .npy bytes"):
        RoutingTrace.from_vllm(http, n_experts=8)


def sglang_rows(s, L=4, k=2):
    return np.frombuffer(base64.b64decode(s), dtype="<i4").reshape(-1, L, k)


def test_sglang_generate_and_openai_sglext():
    data = json.loads((FIX / "sglang" / "generate.json").read_text())
    t = RoutingTrace.from_sglang(data["responses"], n_layers=4, top_k=2, n_experts=8,
                                 input_ids=[r["input_ids"] for r in data["requests"]], layers=[1, 2, 3])
    assert t.n_docs == 2 and t.layers == [1, 2, 3] and t.ids_only
    r0, q0 = data["responses"][0], data["requests"][0]
    P, G = len(q0["input_ids"]), len(r0["output_ids"])
    doc = t.select(docs=[0])
    assert doc.n_tokens == P + G - 1 and doc.token_ids.tolist() == (q0["input_ids"] + r0["output_ids"])[:-1]
    assert np.array_equal(doc.expert_ids, sglang_rows(r0["meta_info"]["routed_experts"])[:, 1:].transpose(1, 0, 2))
    assert doc.is_generated.sum() == G - 1
    with pytest.raises(ValueError, match=r"response 0: token ids not found.*pass input_ids="):
        RoutingTrace.from_sglang(data["responses"], n_layers=4, top_k=2, n_experts=8)
    with pytest.raises(ValueError, match=r"response 0: routed_experts holds \d+ bytes, not a multiple of .* = 40"):
        RoutingTrace.from_sglang(data["responses"], n_layers=5, top_k=2, n_experts=8,
                                 input_ids=[r["input_ids"] for r in data["requests"]])
    comp = json.loads((FIX / "sglang" / "completion_sglext.json").read_text())
    start = comp["_request"]["routed_experts_start_len"]
    t2 = RoutingTrace.from_sglang([comp], n_layers=4, top_k=2, n_experts=8, start_len=start, layers=[1, 2, 3])
    ext = comp["sglext"]
    assert t2.positions[0] == start and t2.token_ids.tolist() == (ext["input_ids"] + ext["output_ids"][0])[start:-1]
    with pytest.raises(ValueError, match=r"response 0 \(id 'cmpl-sg'\): routed_experts has 5 tokens, expected 7 "
                                         r"\(prompt 5 \+ output 3 - 1 - start_len 0\)"):
        RoutingTrace.from_sglang([comp], n_layers=4, top_k=2, n_experts=8)


def test_sglang_per_token_dump(tmp_path):
    import torch

    path = next((FIX / "sglang").glob("expert_distribution_recorder_*.pt"))
    t = RoutingTrace.from_sglang_dump(path, top_k=2, n_experts=8)
    raw = torch.load(path, weights_only=True)
    assert t.layers == [1, 2, 3]  # layer 0 is -1 throughout (dense): dropped
    # documents: the two prefills; a decode pass of 2 tokens (unattributable: 2 one-token documents),
    # then two single-token decodes continuing the document whose last position came just before
    assert [int((t.doc_ids == d).sum()) for d in range(t.n_docs)] == [5, 3, 1, 3]
    assert t.positions[t.doc_ids == 3].tolist() == [3, 4, 5] and t.is_generated[t.doc_ids == 3].all()
    assert not t.is_generated[t.doc_ids == 0].any()
    rec = raw["records"][0]
    phys = rec["topk_ids_of_layer"].numpy()[1:, :5, :2]  # layers 1..3, request a, top-2 slots
    p2l = raw["last_physical_to_logical_map"].numpy()
    logical = p2l[np.arange(1, 4)[:, None, None], phys]
    assert np.array_equal(t.expert_ids[:, :5], logical) and t.expert_ids.max() < 8
    assert (phys >= 8).any()  # the fixture does route to replicas, so the mapping is exercised
    tp = RoutingTrace.from_sglang_dump(path, top_k=2, n_experts=10, logical=False)
    assert np.array_equal(tp.expert_ids[:, :5], phys)
    with pytest.raises(ValueError, match="slots beyond top_k=1 are not all -1"):
        RoutingTrace.from_sglang_dump(path, top_k=1, n_experts=8)
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"trunc.pt: not a readable torch.save file \(truncated\?\)"):
        RoutingTrace.from_sglang_dump(bad, top_k=2, n_experts=8)
    raw["records"][1]["positions"] = [5]
    with pytest.raises(ValueError, match=r"record 1 \(forward pass 1\): topk_ids_of_layer has shape \[4, 2, 8\], "
                                         r"expected \[layers, 2 tokens, >= 2\] \(input_ids 2, positions 1\)"):
        RoutingTrace.from_sglang_dump(raw, top_k=2, n_experts=8)
