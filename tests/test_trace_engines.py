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
DEEPSEEK = FIX / "configs" / "deepseek_v2_tiny.json"  # layer 0 dense (first_k_dense_replace=1), grouped top-k
QWEN = FIX / "configs" / "qwen2_moe_tiny.json"  # layer 0 dense (mlp_only_layers=[0]), softmax top-k (sorted)


@dataclass
class CompletionOutput:  # the fields of vllm.outputs.CompletionOutput that the importer reads
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None = None
    logprobs: object = None
    routed_experts: np.ndarray | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput (0.21 adds prompt_routed_experts)
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    prompt_logprobs: object
    outputs: list
    finished: bool
    prompt_routed_experts: np.ndarray | None = None
    num_cached_tokens: int | None = None  # (vllm/outputs.py 0.21.0: RequestOutput.num_cached_tokens)
    kwargs: dict = field(default_factory=dict)


def vllm_objects(dtype=np.uint8):
    data = json.loads((FIX / "vllm" / "request_outputs.json").read_text())
    return data, [RequestOutput(q["request_id"], None, q["prompt_token_ids"], None,
                                [CompletionOutput(o["index"], o["text"], o["token_ids"],
                                                  routed_experts=np.asarray(o["routed_experts"], dtype=dtype),
                                                  finish_reason=o["finish_reason"]) for o in q["outputs"]], True)
                  for q in data["request_outputs"]]


@pytest.mark.parametrize("dtype", [np.int32, np.int16, np.uint8])  # 0.14-0.20, 0.21, 0.22+
def test_vllm_offline_objects_config_keeps_moe_layers(dtype):
    # vllm/outputs.py CompletionOutput.routed_experts [P+G-1, num_hidden_layers, top_k]; dense layer 0 is zeros
    # (fused_moe/routed_experts_capturer.py 0.14.0-0.34.0: a zero-filled buffer, written only by MoE layers)
    data, outs = vllm_objects(dtype)
    t = RoutingTrace.from_vllm(outs, config=DEEPSEEK, model="tiny-moe", engine_version="0.22.0")
    completions = [(q, o) for q in data["request_outputs"] for o in q["outputs"]]
    assert t.n_docs == len(completions) == 4 and t.layers == [1, 2, 3] and t.ids_only and t.n_experts == 8
    assert t.meta["config"]["moe_layers"] == [1, 2, 3] and t.meta["dropped_layers"] == [0]
    assert t.expert_ids.dtype == np.uint8 and t.token_ids.dtype == np.int32
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
    assert t.meta["requests"][1]["finish_reason"] == "length"
    assert A.generated_only(t).n_tokens == sum(len(o["token_ids"]) - 1 for _, o in completions)
    # no expert 0 from the dense layer: its load is not in the trace at all
    assert 0 not in t.layers and np.allclose(A.expert_load(t).sum(1), 1)
    # DeepSeek routes with grouped_topk (unsorted top-k): not rank-ordered; Qwen2-MoE's softmax top-k is
    assert not t.rank_ordered and "grouped" in t.meta["rank_order_reason"]
    q2 = RoutingTrace.from_vllm(outs, config=QWEN)
    assert q2.rank_ordered and q2.layers == [1, 2, 3] and np.array_equal(q2.expert_ids, t.expert_ids)


def test_vllm_without_config_drops_dense_layers_with_a_warning_and_refuses_top1():
    _, outs = vllm_objects()
    with pytest.warns(UserWarning, match=r"dropped layers \[0\]: every row repeats an expert .* pass config="):
        t = RoutingTrace.from_vllm(outs, n_experts=8)
    assert t.layers == [1, 2, 3] and not t.rank_ordered and "no config=" in t.meta["rank_order_reason"]
    # the old layers= still picks rows, but never a dense layer's placeholder rows
    assert RoutingTrace.from_vllm(outs, n_experts=8, layers=[1, 2, 3]).layers == [1, 2, 3]
    with pytest.raises(ValueError, match=r"request 'req-0', completion 0: layers=\[0, 1, 2, 3\] keeps rows \[0\], in "
                                         r"which every row repeats an expert"):
        RoutingTrace.from_vllm(outs, n_experts=8, layers=[0, 1, 2, 3])
    top1 = copy.deepcopy(outs)
    for q in top1:
        for o in q.outputs:
            o.routed_experts = o.routed_experts[:, :, :1]
    with pytest.raises(ValueError, match=r"request 'req-0', completion 0: top_k = 1, so a dense layer's zero rows "
                                         r"cannot be told from tokens routed to expert 0: pass config="):
        RoutingTrace.from_vllm(top1, n_experts=8)
    cfg = {**json.loads(QWEN.read_text()), "num_experts_per_tok": 1}
    t1 = RoutingTrace.from_vllm(top1, config=cfg)
    assert t1.layers == [1, 2, 3] and t1.rank_ordered  # one choice per token: trivially in rank order
    # a config that does not fit the rows: a "dense" layer that routes
    with pytest.raises(ValueError, match=r"config= says layers \[1\] are dense .* is config= this model's"):
        RoutingTrace.from_vllm(outs, config={**json.loads(DEEPSEEK.read_text()), "first_k_dense_replace": 2})
    with pytest.raises(ValueError, match=r"routed_experts has 4 layer rows, expected num_hidden_layers = 5"):
        RoutingTrace.from_vllm(outs, config={**json.loads(DEEPSEEK.read_text()), "num_hidden_layers": 5})


def test_vllm_http_v022_base64_npy_equals_offline():
    # entrypoints/openai/completion/protocol.py + utils/serial_utils.py numpy2base64 (0.23.0, 0.34.0)
    _, outs = vllm_objects()
    http = json.loads((FIX / "vllm" / "completions_http_v0.22.json").read_text())
    a = RoutingTrace.from_vllm(outs, config=DEEPSEEK)
    b = RoutingTrace.from_vllm(http, config=DEEPSEEK)
    assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.token_ids, b.token_ids)
    assert a.meta["prompt_lengths"] == b.meta["prompt_lengths"] and b.layers == [1, 2, 3]


def test_vllm_021_moe_ordinals_mapped_with_config_and_cached_zeros_unknown():
    # 0.21.0 routed_experts_capturer.py: rows are FusedMoE.moe_layer_id (MoE ordinals; _count_moe_layers ignores
    # first_k_dense_replace, so DeepSeek's layout has a trailing zero row); cached prompt rows are np.zeros
    http21 = json.loads((FIX / "vllm" / "completions_http_v0.21.json").read_text())
    _, outs = vllm_objects()
    t = RoutingTrace.from_vllm(http21, config=DEEPSEEK)
    assert t.layers == [1, 2, 3]  # ordinals 0..2 -> decoder layers 1..3; the trailing zero row dropped
    ref = RoutingTrace.from_vllm(outs[1:], config=DEEPSEEK)
    assert t.meta["unknown_rows"] == 2 and t.meta["requests"][1]["unknown_rows"] == 2
    keep = np.ones(ref.n_tokens, bool)
    keep[np.flatnonzero(ref.doc_ids == 1)[:2]] = False  # the second request's two prefix-cached rows
    assert np.array_equal(t.expert_ids, ref.expert_ids[:, keep]) and (t.expert_ids >= 0).all()
    assert t.select(docs=[1]).positions[0] == 2  # unknown, not expert 0
    with pytest.warns(UserWarning, match=r"dropped MoE ordinals \[3\]"):
        t0 = RoutingTrace.from_vllm(http21, n_experts=8)
    assert t0.layers == [0, 1, 2] and "MoE ordinals" in t0.meta["layer_note"]
    # the offline 0.21 objects: prompt_routed_experts on the RequestOutput, num_cached_tokens marks cached rows
    q = outs[1]
    P = len(q.prompt_token_ids)
    rows = np.concatenate([q.outputs[0].routed_experts[:, 1:], np.zeros_like(q.outputs[0].routed_experts[:, :1])],
                          axis=1).astype(np.int16)
    rows[:1] = 0
    obj = RequestOutput(q.request_id, None, q.prompt_token_ids, None,
                        [CompletionOutput(0, "", q.outputs[0].token_ids, routed_experts=rows[P:])], True,
                        prompt_routed_experts=rows[:P], num_cached_tokens=1)
    t2 = RoutingTrace.from_vllm([obj], config=DEEPSEEK)
    assert np.array_equal(t2.expert_ids, ref.select(docs=[0]).expert_ids[:, 1:]) and t2.meta["unknown_rows"] == 1


def test_vllm_prefix_cache_sentinel_and_prompt_start():
    _, outs = vllm_objects(np.int16)
    o = outs[0].outputs[0]
    o.routed_experts = o.routed_experts.copy()
    o.routed_experts[:3] = -1  # cached positions marked as the docs describe
    t = RoutingTrace.from_vllm(outs[:1], config=DEEPSEEK)
    assert t.meta["unknown_rows"] == 3 and t.select(docs=[0]).positions[0] == 3
    with pytest.raises(ValueError, match="3 rows hold -1 or repeat an expert"):
        RoutingTrace.from_vllm(outs[:1], config=DEEPSEEK, drop_unknown=False)
    _, outs = vllm_objects()
    o = outs[2].outputs[0]
    o.routed_experts = o.routed_experts[4:]  # SamplingParams(routed_experts_prompt_start=4)
    t = RoutingTrace.from_vllm(outs[2:], config=DEEPSEEK, prompt_start=4)
    assert t.positions[0] == 4 and t.token_ids[0] == outs[2].prompt_token_ids[4]


def test_vllm_stop_string_request_skipped_with_warning():
    # vLLM 0.14-0.21 (v1/core/sched/scheduler.py: routing gathered only `if stopped` by the scheduler; a stop
    # string ends the request in v1/engine/output_processor.py): routed_experts is None
    _, outs = vllm_objects()
    c = outs[1].outputs[0]
    c.routed_experts, c.finish_reason, c.stop_reason = None, "stop", "###"
    with pytest.warns(UserWarning, match=r"request 'req-1', completion 0: skipped, it came back without routing "
                                         r"\(finish_reason 'stop' by the stop string '###'"):
        t = RoutingTrace.from_vllm(outs, config=DEEPSEEK)
    assert t.n_docs == 3 and [r["request_id"] for r in t.meta["requests"]] == ["req-0", "req-0", "req-2"]
    assert t.meta["skipped"] == [{"request_id": "req-1", "completion": 0, "finish_reason": "stop",
                                  "cause": t.meta["skipped"][0]["cause"]}]
    only = copy.deepcopy(outs[1:2])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="all 1 completions came back without routing"):
        RoutingTrace.from_vllm(only, config=DEEPSEEK)


def test_vllm_bad_input_names_request_expected_found():
    _, outs = vllm_objects()
    bad = copy.deepcopy(outs[:2])
    bad[1].outputs[0].routed_experts = bad[1].outputs[0].routed_experts[:-1]
    with pytest.raises(ValueError, match=r"request 'req-1', completion 0: routed_experts has 8 rows, expected 9 "
                                         r"\(prompt 4 \+ generated 6 - 1 - prompt_start 0\)"):
        RoutingTrace.from_vllm(bad, config=DEEPSEEK)
    with pytest.raises(ValueError, match=r"request 'req-0', completion 0: expert ids must be in \[0, 4\)"):
        RoutingTrace.from_vllm(outs, n_experts=4, config=DEEPSEEK)
    bad = copy.deepcopy(outs[:2])
    bad[1].outputs[0].routed_experts = bad[1].outputs[0].routed_experts[:, :2]
    with pytest.raises(ValueError, match=r"req-1.*\[layers, top_k\] = \[2, 2\], expected \[4, 2\]"):
        RoutingTrace.from_vllm(bad, config=DEEPSEEK)
    with pytest.raises(ValueError, match="needs n_experts= or config="):
        RoutingTrace.from_vllm(outs)
    with pytest.raises(FileNotFoundError, match="config=: no model config at"):
        RoutingTrace.from_vllm(outs, config=FIX / "nope.json")
    http = json.loads((FIX / "vllm" / "completions_http_v0.22.json").read_text())
    http[0]["choices"][0]["routed_experts"] = http[0]["choices"][0]["routed_experts"][:40]  # truncated
    with pytest.raises(ValueError, match=r"request 'cmpl-req-0', completion 0: routed_experts is a string but not "
                                         r"base64 .npy bytes"):
        RoutingTrace.from_vllm(http, config=DEEPSEEK)


def test_model_layout_families():
    from moe_lab.routing.importers import model_layout

    cases = [  # (config, MoE layers, rank-ordered) -- the rules of transformers' / vLLM's model code
        ({"model_type": "deepseek_v3", "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
          "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4}, list(range(3, 61)), False),
        ({"model_type": "deepseek_v2", "num_hidden_layers": 6, "first_k_dense_replace": 1, "moe_layer_freq": 2,
          "n_routed_experts": 64, "num_experts_per_tok": 6}, [2, 4], False),
        ({"model_type": "glm4_moe", "num_hidden_layers": 5, "first_k_dense_replace": 1, "n_routed_experts": 160,
          "num_experts_per_tok": 8}, [1, 2, 3, 4], False),
        ({"model_type": "qwen3_moe", "num_hidden_layers": 6, "mlp_only_layers": [1], "decoder_sparse_step": 2,
          "num_experts": 128, "num_experts_per_tok": 8}, [3, 5], True),
        ({"model_type": "llama4_text", "num_hidden_layers": 6, "interleave_moe_layer_step": 2,
          "num_local_experts": 128, "num_experts_per_tok": 1}, [1, 3, 5], True),
        ({"model_type": "llama4", "text_config": {"model_type": "llama4_text", "num_hidden_layers": 4,
          "moe_layers": [0, 2], "num_local_experts": 16, "num_experts_per_tok": 1}}, [0, 2], True),
        ({"model_type": "jamba", "num_hidden_layers": 8, "expert_layer_period": 2, "expert_layer_offset": 1,
          "num_experts": 16, "num_experts_per_tok": 2}, [1, 3, 5, 7], True),
        ({"model_type": "ernie4_5_moe", "num_hidden_layers": 6, "moe_layer_start_index": 1, "moe_layer_end_index": 4,
          "moe_layer_interval": 1, "moe_num_experts": 64, "moe_k": 6}, [1, 2, 3, 4], False),
        ({"model_type": "mixtral", "num_hidden_layers": 3, "num_local_experts": 8, "num_experts_per_tok": 2},
         [0, 1, 2], True),
        ({"model_type": "something_new", "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2},
         [0, 1], False),
    ]
    for cfg, moe, ordered in cases:
        lay = model_layout(cfg)
        assert (lay.moe_layers, lay.rank_ordered) == (moe, ordered), cfg["model_type"]
    with pytest.raises(ValueError, match="no num_hidden_layers"):
        model_layout({"model_type": "x"})


def sglang_rows(s, L=4, k=2):
    return np.frombuffer(base64.b64decode(s), dtype="<i4").reshape(-1, L, k)


def test_sglang_generate():
    # srt/managers/detokenizer_manager.py (base64 int32), tokenizer_manager.py (meta_info, output_ids,
    # prompt_token_ids with return_prompt_token_ids), 0.5.23
    data = json.loads((FIX / "sglang" / "generate.json").read_text())
    t = RoutingTrace.from_sglang(data["responses"], config=DEEPSEEK,
                                 input_ids=[r["input_ids"] for r in data["requests"]])
    assert t.n_docs == 2 and t.layers == [1, 2, 3] and t.ids_only and not t.rank_ordered
    r0, q0 = data["responses"][0], data["requests"][0]
    P, G = len(q0["input_ids"]), len(r0["output_ids"])
    doc = t.select(docs=[0])
    assert doc.n_tokens == P + G - 1 and doc.token_ids.tolist() == (q0["input_ids"] + r0["output_ids"])[:-1]
    assert np.array_equal(doc.expert_ids, sglang_rows(r0["meta_info"]["routed_experts"])[:, 1:].transpose(1, 0, 2))
    assert doc.is_generated.sum() == G - 1
    # the second response carries prompt_token_ids itself
    t1 = RoutingTrace.from_sglang(data["responses"][1:], config=QWEN)
    assert t1.token_ids.tolist() == t.select(docs=[1]).token_ids.tolist() and t1.rank_ordered
    with pytest.raises(ValueError, match=r"response 0 \(/generate\): no prompt token ids .* pass the prompt's ids "
                                         r"as input_ids="):
        RoutingTrace.from_sglang(data["responses"], config=DEEPSEEK)
    with pytest.raises(ValueError, match=r"response 0: routed_experts holds \d+ bytes, not a multiple of .* = 40"):
        RoutingTrace.from_sglang(data["responses"], n_layers=5, top_k=2, n_experts=8,
                                 input_ids=[r["input_ids"] for r in data["requests"]])


@pytest.mark.parametrize("key", ["completions_0.5.23", "chat_0.5.23", "chat_sglext_ids_0.5.23"])
def test_sglang_openai_endpoints_token_ids(key):
    # srt/entrypoints/openai/protocol.py (SglExt, response-level), serving_completions.py / serving_chat.py
    # (0.5.23): token ids on the choice (return_token_ids) or in sglext (return_*_ids_in_sglext)
    data = json.loads((FIX / "sglang" / "openai_endpoints.json").read_text())
    start = data["routed_experts_start_len"]
    t = RoutingTrace.from_sglang([data[key]], config=DEEPSEEK, start_len=start)
    assert t.positions[0] == start and t.layers == [1, 2, 3]
    assert t.token_ids.tolist() == (data["prompt_ids"] + data["output_ids"])[start:-1]
    assert np.array_equal(t.expert_ids, sglang_rows(data[key]["sglext"]["routed_experts"])[:, 1:].transpose(1, 0, 2))
    with pytest.raises(ValueError, match=r"routed_experts has 5 tokens, expected 7 \(prompt 5 \+ output 3 - 1 - "
                                         r"start_len 0"):
        RoutingTrace.from_sglang([data[key]], config=DEEPSEEK)


def test_sglang_059_openai_has_no_token_ids():
    # 0.5.9 serving_completions.py: sglext.routed_experts only; no token ids in any OpenAI response
    data = json.loads((FIX / "sglang" / "openai_endpoints.json").read_text())
    resp = data["completions_0.5.9"]
    with pytest.raises(ValueError, match=r"response 0 \(id 'cmpl-sg3'\) \(/v1/completions\): no prompt and output "
                                         r"token ids .*SGLang 0.5.9's OpenAI endpoints return no token ids at all: "
                                         r"pass input_ids= \(prompt ids\) and output_ids="):
        RoutingTrace.from_sglang([resp], config=DEEPSEEK, start_len=2)
    t = RoutingTrace.from_sglang([resp], config=DEEPSEEK, start_len=2, input_ids=[data["prompt_ids"]],
                                 output_ids=[data["output_ids"]])
    assert t.token_ids.tolist() == (data["prompt_ids"] + data["output_ids"])[2:-1]


def test_sglang_per_token_dump(tmp_path):
    # srt/eplb/expert_distribution.py (0.5.7, 0.5.9, 0.5.23): _DetailSinglePassGatherer + _DetailAccumulator.dump
    import torch

    path = FIX / "sglang" / "expert_distribution_recorder_1764000000.0_0.pt"
    t = RoutingTrace.from_sglang_dump(path, top_k=2, n_experts=8)
    raw = torch.load(path, weights_only=True)
    assert t.layers == [1, 2, 3]  # layer 0 is -1 throughout (dense): dropped
    # two prefills (positions 0..4 and 0..2), then decode passes: [5, 3] (one token each, by position),
    # [4] and [5] (the second request: the first one waits for 6) -- two documents, no one-token ones
    assert t.n_docs == 2 and [int((t.doc_ids == d).sum()) for d in range(2)] == [6, 6]
    assert t.positions[t.doc_ids == 1].tolist() == [0, 1, 2, 3, 4, 5]
    assert t.is_generated[t.doc_ids == 1].tolist() == [False] * 3 + [True] * 3
    assert t.meta["prompt_lengths"] == [5, 3]
    rec = raw["records"][0]
    phys = rec["topk_ids_of_layer"].numpy()[1:, :5, :2]  # layers 1..3, request a, top-2 slots
    p2l = raw["last_physical_to_logical_map"].numpy()
    logical = p2l[np.arange(1, 4)[:, None, None], phys]
    assert np.array_equal(t.expert_ids[:, :5], logical) and t.expert_ids.max() < 8
    assert (phys >= 8).any()  # the fixture does route to replicas, so the mapping is exercised
    dec = raw["records"][1]["topk_ids_of_layer"].numpy()[1:, :, :2]  # decode pass [5, 3]
    assert np.array_equal(t.expert_ids[:, 5], p2l[np.arange(1, 4)[:, None], dec[:, 0]])  # a's token at 5
    assert np.array_equal(t.expert_ids[:, 6 + 3], p2l[np.arange(1, 4)[:, None], dec[:, 1]])  # b's token at 3
    tc = RoutingTrace.from_sglang_dump(path, config=DEEPSEEK)
    assert tc.layers == [1, 2, 3] and not tc.rank_ordered and np.array_equal(tc.expert_ids, t.expert_ids)
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


def test_sglang_dump_ambiguous_and_other_modes():
    import torch

    amb = FIX / "sglang" / "expert_distribution_recorder_1764000001.0_0.pt"  # two 4-token prompts decoding together
    with pytest.raises(ValueError, match=r"record 1 \(forward pass 1\): 2 sequences wait for position 4 and ran in "
                                         r"the same pass .* no request ids.*--max-running-requests 1"):
        RoutingTrace.from_sglang_dump(amb, top_k=2, n_experts=8)
    raw = torch.load(amb, weights_only=True)
    raw["records"][1]["positions"] = [9, 9]
    with pytest.raises(ValueError, match=r"a decode token at position 9 continues no sequence .* not turned into a "
                                         r"one-token document"):
        RoutingTrace.from_sglang_dump(raw, top_k=2, n_experts=8)
    # per_pass mode: _DetailAccumulator with a count-only gatherer (no topk_ids_of_layer)
    per_pass = {"records": [{k: v for k, v in r.items() if k != "topk_ids_of_layer"} for r in raw["records"]],
                "last_physical_to_logical_map": raw["last_physical_to_logical_map"]}
    with pytest.raises(ValueError, match=r"dump: this is a 'per_pass' mode dump .* record with "
                                         r"--expert-distribution-recorder-mode per_token"):
        RoutingTrace.from_sglang_dump(per_pass, top_k=2, n_experts=8)
    # stat mode: _StatAccumulator.dump writes {rank, logical_count, average_utilization_rate_over_window}
    stat = {"rank": 0, "logical_count": torch.zeros((1, 4, 8)), "average_utilization_rate_over_window": None}
    with pytest.raises(ValueError, match=r"dump: this is a 'stat' mode dump .* per_token"):
        RoutingTrace.from_sglang_dump(stat, top_k=2, n_experts=8)


def test_sglang_dump_chunked_prefill_and_mixed_batches():
    # srt/eplb/expert_distribution.py _DetailSinglePassGatherer.on_forward_pass_start (input_ids, positions,
    # extend_seq_lens, forward_mode) and srt/model_executor/forward_batch_info.py ForwardMode (EXTEND=1, DECODE=2,
    # MIXED=3: a prefill chunk and running requests' decode tokens, each an extend segment of length 1), 0.5.23
    import torch

    def rec(i, pos, lens, mode):
        n = len(pos)
        topk = np.full((2, n, 8), -1, dtype=np.int32)  # layer 0 dense (-1 throughout)
        topk[1, :, 0], topk[1, :, 1] = np.arange(n) % 4, np.arange(n) % 4 + 4
        return {"forward_pass_id": i, "rank": 0, "gatherer_key": "primary", "input_ids": [100 + i * 10 + j for j in
                range(n)], "positions": pos, "extend_seq_lens": lens, "forward_mode": mode,
                "topk_ids_of_layer": torch.from_numpy(topk), "misc_objects": [],
                "global_physical_count": torch.zeros((2, 8), dtype=torch.int32)}

    dump = {"records": [rec(0, [0, 1, 2, 3, 0, 1, 2], [4, 3], 1),  # a's first prompt chunk, b's whole prompt
                        rec(1, [4, 5, 3], [2, 1], 3),  # MIXED: a's last chunk, b's first decode token
                        rec(2, [6, 4], None, 2)],  # DECODE: one token each
            "last_physical_to_logical_map": torch.arange(8).repeat(2, 1)}
    t = RoutingTrace.from_sglang_dump(dump, top_k=2, n_experts=8)
    assert t.n_docs == 2 and t.layers == [1]
    assert t.positions[t.doc_ids == 0].tolist() == list(range(7)) and t.meta["prompt_lengths"] == [6, 3]
    assert t.token_ids[t.doc_ids == 0].tolist() == [100, 101, 102, 103, 110, 111, 120]
    assert t.token_ids[t.doc_ids == 1].tolist() == [104, 105, 106, 112, 121]
    assert t.is_generated[t.doc_ids == 1].tolist() == [False] * 3 + [True] * 2


def test_vllm_chat_response_and_caller_asserted_rank_order():
    # vLLM 0.34 entrypoints/openai/chat_completion/protocol.py + serving.py with return_token_ids: top-level
    # prompt_token_ids, choices[i].token_ids, choices[i].routed_experts base64 .npy (utils/serial_utils.py)
    http = json.loads((FIX / "vllm" / "completions_http_v0.22.json").read_text())
    chat = [{"id": f"chatcmpl-{r['id']}", "object": "chat.completion", "model": r["model"],
             "prompt_token_ids": r["choices"][0]["prompt_token_ids"],
             "choices": [{"index": c["index"], "message": {"role": "assistant", "content": ""},
                          "finish_reason": c["finish_reason"], "token_ids": c["token_ids"],
                          "routed_experts": c["routed_experts"]} for c in r["choices"]]} for r in http]
    a = RoutingTrace.from_vllm(http, config=DEEPSEEK)
    b = RoutingTrace.from_vllm(chat, config=DEEPSEEK)
    assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.token_ids, b.token_ids)
    assert b.meta["requests"][0]["request_id"] == "chatcmpl-cmpl-req-0"
    c = RoutingTrace.from_vllm(chat, config=DEEPSEEK, rank_ordered=True)  # the caller knows the kernel sorts
    assert c.rank_ordered and c.meta["rank_order_reason"] == "set by the caller (rank_ordered=)"
    assert A.repetition(c, "first", n_boot=10).n_pairs > 0
