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
    print(f"wrote fixtures under {out}")


if __name__ == "__main__":
    main()
