"""Write the SYNTHETIC routing-trace fixtures in data/fixtures/traces/ (made by this project, not
real routing data): small files in the exact formats that the OLMoE study, vLLM and SGLang write,
for the importers' tests and for notebooks that need a file in those formats.

    python scripts/make_trace_fixtures.py            # rewrites data/fixtures/traces/

Deterministic (seeded). The routing is generated, not measured: Zipf-like expert frequencies,
first choices that persist from one token to the next more often than chance, a few token ids
that prefer one expert. Good for checking that an importer reads the right axis and that an
analysis finds the structure it should, never as a statement about a real model.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "data" / "fixtures" / "traces"


def synthetic_routing(rng, T: int, L: int, k: int, E: int, token_ids: np.ndarray, stick: float = 0.12) -> np.ndarray:
    """[T, L, k] expert ids in rank order, distinct within a token. Per layer: Zipf-like expert
    popularity (a random permutation per layer), the first choice repeated from the previous
    token with probability ``stick``, and token ids that are multiples of 7 sent to expert
    ``token % E`` first."""
    out = np.zeros((T, L, k), dtype=np.int64)
    for l in range(L):
        p = 1.0 / np.arange(1, E + 1) ** 0.8
        p = p[rng.permutation(E)]
        p /= p.sum()
        for t in range(T):
            if token_ids[t] % 7 == 0:
                first = int(token_ids[t] % E)
            elif t > 0 and rng.random() < stick:
                first = int(out[t - 1, l, 0])
            else:
                first = int(rng.choice(E, p=p))
            q = p.copy()
            q[first] = 0
            rest = rng.choice(E, size=k - 1, replace=False, p=q / q.sum()) if k > 1 else []
            out[t, l] = [first, *rest]
    return out


def olmoe_windows(rng, n_windows: int, T: int, k: int, L: int, E: int, vocab: int):
    """Records of the OLMoE study's writer (scripts/run_moe_analysis.py): windows cut from
    concatenated documents (each starting with BOS id 1), so a window may hold several."""
    for _ in range(n_windows):
        ids = rng.integers(3, vocab, T)
        starts = np.flatnonzero(rng.random(T) < 1 / 40)
        ids[starts] = 1  # a document starts here (the tokenizer's BOS)
        ids[0] = 1 if rng.random() < 0.5 else ids[0]
        exp = synthetic_routing(rng, T, L, k, E, ids)  # [T, L, k]
        pred = np.roll(ids, -1)
        pred[rng.random(T) < 0.4] = rng.integers(3, vocab)  # the "model" is right ~60% of the time
        yield {"input_ids": ids.tolist(), "predicted_token_ids": pred.tolist(),
               "exp_ids": exp.transpose(0, 2, 1).tolist()}  # [token, rank, layer], as the study writes it


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")  # default separators, as the study's writer


def npy_b64(arr: np.ndarray) -> str:
    """vLLM 0.22+ HTTP encoding (vllm/utils/serial_utils.py numpy2base64): base64 of .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def int32_b64(arr: np.ndarray) -> str:
    """SGLang encoding (detokenizer_manager._b64_encode_per_request): base64 of raw int32 bytes."""
    return base64.b64encode(arr.astype("<i4").tobytes()).decode("utf-8")


#: transformers config.json of the fixtures' tiny model, in two families: DeepSeek-V2's layout
#: (layer 0 dense through first_k_dense_replace; grouped top-k, so engine traces are not rank-ordered)
#: and Qwen2-MoE's (layer 0 dense through mlp_only_layers; softmax top-k, sorted)
CONFIGS = {
    "deepseek_v2_tiny.json": {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
                              "num_hidden_layers": 4, "first_k_dense_replace": 1, "moe_layer_freq": 1,
                              "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                              "topk_method": "greedy", "n_shared_experts": 2, "hidden_size": 64,
                              "_note": "SYNTHETIC tiny model, DeepSeek-V2-Lite's layout"},
    "qwen2_moe_tiny.json": {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
                            "num_hidden_layers": 4, "mlp_only_layers": [0], "decoder_sparse_step": 1,
                            "num_experts": 8, "num_experts_per_tok": 2, "hidden_size": 64,
                            "_note": "SYNTHETIC tiny model, Qwen2-MoE's layout"},
}


def config_fixtures(out: Path) -> None:
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for name, cfg in CONFIGS.items():
        (out / "configs" / name).write_text(json.dumps(cfg, indent=1) + "\n")


def vllm_fixtures(rng, out: Path) -> None:
    """A tiny MoE (4 decoder layers, top-2 of 8; layer 0 dense, so its rows are zeros as vLLM
    writes them) answering 3 prompts, n=2 completions for the first."""
    L, k, E = 4, 2, 8
    reqs = []
    for r, (P, gens) in enumerate([(7, [5, 3]), (4, [6]), (9, [1])]):
        prompt = [1] + rng.integers(3, 32000, P - 1).tolist()
        outs = []
        for i, G in enumerate(gens):
            toks = rng.integers(3, 32000, G).tolist()
            full = np.array(prompt + toks)
            rows = synthetic_routing(rng, P + G - 1, L, k, E, full)  # the last token was never forwarded
            rows[:, 0] = 0  # dense layer 0: zero rows
            outs.append({"index": i, "text": "", "token_ids": toks, "finish_reason": "length", "routed_experts": rows})
        reqs.append({"request_id": f"req-{r}", "prompt_token_ids": prompt, "outputs": outs})
    # offline LLM.generate (0.22+: uint8 arrays); JSON holds them as nested lists
    offline = [{**q, "outputs": [{**o, "routed_experts": o["routed_experts"].tolist()} for o in q["outputs"]]}
               for q in reqs]
    (out / "vllm").mkdir(parents=True, exist_ok=True)
    (out / "vllm" / "request_outputs.json").write_text(json.dumps(
        {"_note": "SYNTHETIC. RequestOutput fields as dicts (vllm/outputs.py); routed_experts as nested lists "
                  "[prompt+generated-1, layers, top_k] (an np.ndarray in the real object)",
         "n_experts": E, "layers": L, "top_k": k, "request_outputs": offline}))
    # HTTP /v1/completions, 0.22+: choices[i].routed_experts = base64 .npy (uint8)
    http = [{"id": f"cmpl-{q['request_id']}", "object": "text_completion", "model": "tiny-moe",
             "choices": [{"index": o["index"], "text": "", "token_ids": o["token_ids"],
                          "prompt_token_ids": q["prompt_token_ids"], "finish_reason": o["finish_reason"],
                          "routed_experts": npy_b64(o["routed_experts"].astype(np.uint8))} for o in q["outputs"]]}
            for q in reqs]
    (out / "vllm" / "completions_http_v0.22.json").write_text(json.dumps(http))
    # HTTP, 0.21 (completion/protocol.py, routed_experts_capturer.py 0.21.0): prompt rows at the top
    # level, generated rows on the choice (nested lists of int16 ids). Layer axis = MoE ordinal
    # (FusedMoE.moe_layer_id), with _count_moe_layers ignoring first_k_dense_replace: DeepSeek's
    # layout gives num_hidden_layers rows, the 3 MoE layers first, then one trailing zero row. The
    # host buffer is np.zeros, so prefix-cached prompt rows read 0: the second request's first 2.
    http21 = []
    for j, q in enumerate(reqs[1:]):  # n=1 requests
        o = q["outputs"][0]
        P = len(q["prompt_token_ids"])
        moe = np.concatenate([o["routed_experts"][:, 1:], np.zeros_like(o["routed_experts"][:, :1])], axis=1)
        if j == 1:
            moe[:2] = 0  # prefix-cached rows (zeros in the released 0.21.0, no -1 sentinel)
        http21.append({"id": f"cmpl-{q['request_id']}", "object": "text_completion", "model": "tiny-moe",
                       "prompt_routed_experts": moe[:P].tolist(),
                       "choices": [{"index": 0, "text": "", "token_ids": o["token_ids"],
                                    "prompt_token_ids": q["prompt_token_ids"], "finish_reason": "length",
                                    "routed_experts": moe[P:].tolist() or None}]})
    (out / "vllm" / "completions_http_v0.21.json").write_text(json.dumps(http21))


def sglang_fixtures(rng, out: Path) -> None:
    """SGLang: /generate responses and an OpenAI completion with sglext (4 layers, layer 0 dense,
    top-2 of 8), and a per_token expert-distribution dump (torch.save) of the same model with
    EPLB: 10 physical experts (experts 0 and 3 replicated)."""
    import torch

    L, k, E = 4, 2, 8
    (out / "sglang").mkdir(parents=True, exist_ok=True)
    requests, responses = [], []
    for r, (P, G) in enumerate([(6, 4), (3, 2)]):
        prompt = [1] + rng.integers(3, 32000, P - 1).tolist()
        toks = rng.integers(3, 32000, G).tolist()
        rows = synthetic_routing(rng, P + G - 1, L, k, E, np.array(prompt + toks))
        rows[:, 0] = 0
        requests.append({"input_ids": prompt, "sampling_params": {"max_new_tokens": G}, "return_routed_experts": True})
        responses.append({"text": "", "output_ids": toks,
                          "meta_info": {"id": f"sg-{r}", "prompt_tokens": P, "completion_tokens": G,
                                        "finish_reason": {"type": "length", "length": G},
                                        "routed_experts": int32_b64(rows)}})
    # /generate with return_prompt_token_ids (0.5.23 tokenizer_manager.py): prompt ids at the top level
    responses[1]["prompt_token_ids"] = requests[1]["input_ids"]
    (out / "sglang" / "generate.json").write_text(json.dumps(
        {"_note": "SYNTHETIC. /generate requests and responses (meta_info.routed_experts: base64 int32 "
                  "[prompt+output-1, num_hidden_layers, top_k]); the second response was requested with "
                  "return_prompt_token_ids", "requests": requests, "responses": responses}))
    # OpenAI endpoints (srt/entrypoints/openai/protocol.py, serving_completions.py, serving_chat.py):
    # sglext.routed_experts at the response level (first choice only); token ids where 0.5.23 puts them
    P, G, start = 5, 3, 2
    prompt = [1] + rng.integers(3, 32000, P - 1).tolist()
    toks = rng.integers(3, 32000, G).tolist()
    rows = synthetic_routing(rng, P + G - 1, L, k, E, np.array(prompt + toks))[start:]
    rows[:, 0] = 0
    usage = {"prompt_tokens": P, "completion_tokens": G, "total_tokens": P + G}
    b64 = int32_b64(rows)
    openai = {
        "_note": "SYNTHETIC. The same request (prompt_ids, output_ids below; routed_experts_start_len=2) as each "
                 "OpenAI endpoint of each release returns it",
        "prompt_ids": prompt, "output_ids": toks, "routed_experts_start_len": start,
        # 0.5.23 /v1/completions with return_token_ids: on the choice
        "completions_0.5.23": {"id": "cmpl-sg", "object": "text_completion", "model": "tiny-moe",
                               "choices": [{"index": 0, "text": "", "finish_reason": "length",
                                            "token_ids": toks, "prompt_token_ids": prompt}],
                               "usage": usage, "sglext": {"routed_experts": b64}},
        # 0.5.23 /v1/chat/completions with return_token_ids: choices[i].prompt_token_ids / response_token_ids
        "chat_0.5.23": {"id": "chatcmpl-sg", "object": "chat.completion", "model": "tiny-moe",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                     "finish_reason": "length", "prompt_token_ids": prompt,
                                     "response_token_ids": toks}],
                        "usage": usage, "sglext": {"routed_experts": b64}},
        # 0.5.23 chat with return_input_ids_in_sglext / return_output_ids_in_sglext
        "chat_sglext_ids_0.5.23": {"id": "chatcmpl-sg2", "object": "chat.completion", "model": "tiny-moe",
                                   "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                                "finish_reason": "length"}],
                                   "usage": usage, "sglext": {"routed_experts": b64, "input_ids": prompt,
                                                              "output_ids": [toks]}},
        # 0.5.9 /v1/completions: sglext.routed_experts, no token ids anywhere
        "completions_0.5.9": {"id": "cmpl-sg3", "object": "text_completion", "model": "tiny-moe",
                              "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                              "usage": usage, "sglext": {"routed_experts": b64}},
    }
    (out / "sglang" / "openai_endpoints.json").write_text(json.dumps(openai))
    # per_token dump. physical 0..9: 0..7 are experts 0..7, 8 is a replica of 0, 9 of 3
    p2l = torch.tensor([list(range(8)) + [0, 3]] * L, dtype=torch.int64)
    # (the real map has a row for every layer, an identity-like one for dense layers too)
    l2p_extra = {0: 8, 3: 9}

    def physical(logical_ids):  # route some tokens to the replicas
        phys = logical_ids.copy()
        for e, p in l2p_extra.items():
            mask = (phys == e) & (rng.random(phys.shape) < 0.5)
            phys[mask] = p
        return phys

    def record(pass_id, tok, pos, seqs, mode):
        ids = synthetic_routing(rng, len(tok), L, k, E, np.array(tok)).transpose(1, 0, 2)  # [L, n, k]
        topk = np.full((L, len(tok), 8), -1, dtype=np.int32)
        topk[1:, :, :k] = physical(ids[1:])
        return {"forward_pass_id": pass_id, "rank": 0, "gatherer_key": "primary", "input_ids": list(tok),
                "positions": list(pos), "extend_seq_lens": seqs, "forward_mode": mode,
                "topk_ids_of_layer": torch.from_numpy(topk), "misc_objects": [],
                "global_physical_count": torch.zeros((L, 10), dtype=torch.int32)}

    a, b = [1] + rng.integers(3, 32000, 4).tolist(), [1] + rng.integers(3, 32000, 2).tolist()
    recs = [record(0, a + b, list(range(5)) + list(range(3)), [5, 3], 1),  # EXTEND: two prompts
            record(1, rng.integers(3, 32000, 2).tolist(), [5, 3], None, 2),  # DECODE, batch of 2
            record(2, rng.integers(3, 32000, 1).tolist(), [4], None, 2),  # DECODE, one sequence left
            record(3, rng.integers(3, 32000, 1).tolist(), [5], None, 2)]
    # pass 2 continues request b (prompt positions 0..2, decode at 3 in pass 1, then 4, 5)
    torch.save({"records": recs, "last_physical_to_logical_map": p2l},
               out / "sglang" / "expert_distribution_recorder_1764000000.0_0.pt")
    # two requests of the same length decoding together: their tokens cannot be told apart
    c, d = [1] + rng.integers(3, 32000, 3).tolist(), [1] + rng.integers(3, 32000, 3).tolist()
    amb = [record(0, c + d, list(range(4)) * 2, [4, 4], 1),
           record(1, rng.integers(3, 32000, 2).tolist(), [4, 4], None, 2)]
    torch.save({"records": amb, "last_physical_to_logical_map": p2l},
               out / "sglang" / "expert_distribution_recorder_1764000001.0_0.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    out = args.out
    rng = np.random.default_rng(2024)
    # OLMoE study, Mixtral data: allenai/analysis_mixtral c4_results.jsonl has (2048, 2, 32) records;
    # ours are 128-token windows with the same axes (the importer takes T from the record).
    write_jsonl(out / "olmoe_study" / "mixtral" / "c4_results.jsonl",
                olmoe_windows(rng, n_windows=6, T=128, k=2, L=32, E=8, vocab=32000))
    # OLMoE data: (2048, 8, 16) records in allenai/analysis_olmoe; here 2 windows of 32 tokens, step 5000.
    write_jsonl(out / "olmoe_study" / "olmoe" / "c4_results_5000.jsonl",
                olmoe_windows(rng, n_windows=2, T=32, k=8, L=16, E=64, vocab=50280))
    config_fixtures(out)
    vllm_fixtures(np.random.default_rng(7), out)
    sglang_fixtures(np.random.default_rng(8), out)
    print(f"wrote fixtures under {out}")


if __name__ == "__main__":
    main()
