"""Peak memory of ``load_model`` and of the streaming forward, against checkpoint size.

Generates random checkpoints with an increasing number of layers (a moderately wide config:
~78 MB per layer in fp32), then, each in a fresh subprocess, measures the growth of peak
resident memory (``VmHWM`` after minus before, so the interpreter's and torch's own
baseline is left out) for:

* ``load_model``: should stay below 1.25 x the checkpoint's size S (each tensor is copied
  once from the memory map, and the mapped pages are released as it goes);
* a naive load for comparison (``safetensors.torch.load_file`` + ``load_state_dict``), which
  holds the mapped file *and* the copies: about 2 x S;
* ``StreamingMixtral`` forward over a batch: about one layer + embeddings + activations,
  independent of the number of layers.

Run:  .venv/bin/python benchmarks/bench_loading.py [--layers 2 4 8] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = dict(dim=512, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536, vocab_size=8192, n_experts=8,
              experts_per_token=2, max_seq_len=4096)

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(2)
import moe_lab
from moe_lab import load_model, StreamingMixtral
from moe_lab.checkpoints.layouts import meta_model
mode, path = sys.argv[1], sys.argv[2]
def kib():
    # VmHWM: this process' peak RSS. (Not ru_maxrss: on Linux it carries over the parent's
    # high-water mark through fork + exec.) Writing 5 to clear_refs resets it to the current RSS.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
# Warm-up: the first nn.Module built on the meta device makes torch import torch._dynamo & co
# (~70 MB, once per process, whatever the model's size): part of the baseline, not of loading.
meta_model(moe_lab.ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8, vocab_size=8, n_experts=2))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kib()
t0 = time.perf_counter()
if mode == "load":
    m = load_model(path)
elif mode == "naive":
    from safetensors.torch import load_file
    from moe_lab.checkpoints.convert import from_hf_state_dict, args_from_hf_config
    args = args_from_hf_config(json.load(open(path + "/config.json")))
    sd = from_hf_state_dict(load_file(path + "/model.safetensors"), args)
    m = meta_model(args)
    m.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    del sd
elif mode == "stream":
    sm = StreamingMixtral(path)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, sm.args.vocab_size, (4, 256), generator=g)
    logits = sm(tokens)
print(json.dumps({"base_kib": base, "peak_kib": kib(), "seconds": time.perf_counter() - t0}))
"""


def layer_bytes(args) -> int:
    D, I, E, hd = args.dim, args.hidden_dim, args.n_experts, args.head_dim
    attn = D * args.n_heads * hd * 2 + D * args.n_kv_heads * hd * 2
    return 4 * (attn + 2 * D + E * D + 3 * E * D * I)


def measure(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{mode} {path} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    import torch

    from moe_lab import ModelArgs, save_model
    from moe_lab.checkpoints.layouts import to_mistral_state_dict, params_dict
    from moe_lab.model import Mixtral

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--dir", default=None, help="where to write the temporary checkpoints (default: system temp)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive-load comparison")
    opts = ap.parse_args()

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench_loading_", dir=opts.dir))
    rows = []
    try:
        for n in opts.layers:
            args = ModelArgs(n_layers=n, **CONFIG)
            torch.manual_seed(0)
            with torch.device("meta"):
                model = Mixtral(args)
            model.to_empty(device="cpu")
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
            hf = save_model(model, work / f"hf-{n}")
            rel = work / f"release-{n}"  # the original Mistral release: .pt files, stacked experts
            rel.mkdir()
            sd = to_mistral_state_dict(model.state_dict(), args, stacked=True)
            for L in range(n):
                part = {k: v.contiguous() for k, v in sd.items() if k.startswith(f"layers.{L}.")}
                if L == 0:
                    part.update({k: v for k, v in sd.items() if not k.startswith("layers.")})
                torch.save(part, rel / f"consolidated.{L:02d}.pt")
            (rel / "params.json").write_text(json.dumps(params_dict(args)))
            S = sum(v.numel() * v.element_size() for v in model.state_dict().values())
            del model, sd, part
            r = {"layers": n, "S": S, "layer": layer_bytes(args)}
            for mode, path in (("load", hf), ("load-pt", rel), ("naive", hf), ("stream", hf)):
                if mode == "naive" and opts.no_naive:
                    continue
                res = measure("load" if mode == "load-pt" else mode, path)
                r[mode] = (res["peak_kib"] - res["base_kib"]) * 1024
                r[mode + "_s"] = res["seconds"]
                r["base"] = res["base_kib"] * 1024
            rows.append(r)
            shutil.rmtree(work / f"hf-{n}")
            shutil.rmtree(rel)
            print(f"  measured {n} layers", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = lambda b: f"{b / 1e6:8.1f}"
    print(f"\nconfig: {CONFIG}, fp32; one layer = {rows[0]['layer'] / 1e6:.1f} MB; "
          f"interpreter + torch baseline RSS ~{rows[0]['base'] / 1e6:.0f} MB (left out of the figures)")
    print("peak RSS growth while loading (MB) and its ratio to the checkpoint size S\n")
    head = (f"{'layers':>6} {'S (MB)':>9} | {'load_model':>10} {'/S':>5} {'s':>5} | {'.pt release':>11} {'/S':>5} "
            f"{'s':>5} | {'naive':>8} {'/S':>5} | {'streaming fwd':>13} {'/layer':>6} {'s':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        naive = f"{mb(r['naive'])} {r['naive'] / r['S']:5.2f}" if "naive" in r else f"{'-':>8} {'-':>5}"
        print(f"{r['layers']:>6} {mb(r['S']):>9} | {mb(r['load']):>10} {r['load'] / r['S']:5.2f} {r['load_s']:5.1f} | "
              f"{mb(r['load-pt']):>11} {r['load-pt'] / r['S']:5.2f} {r['load-pt_s']:5.1f} | {naive} | "
              f"{mb(r['stream']):>13} {r['stream'] / r['layer']:6.2f} {r['stream_s']:5.1f}")
    print("\nstreaming: batch 4 x 256 tokens; '/layer' = peak growth / one layer's bytes (embeddings, output head\n"
          "and activations included), flat in the number of layers.")


if __name__ == "__main__":
    main()
