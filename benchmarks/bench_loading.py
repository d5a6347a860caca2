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

``--mixtral-scale N`` (heavy: ~3 GB of bf16 per layer written to disk) measures the streaming
forward at real scale instead: a checkpoint with Mixtral 8x7B's exact shapes (dim 4096, 8
experts of 14336, vocab 32000) and N layers, in bf16 and in the HF sharded layout (one shard per
layer), written to a temporary directory and removed afterwards. Default N = 3: 9.3 GB, more
than a quarter of a 24 GB machine. It reports

* the peak memory growth of a streaming forward over a batch, against its budget: one layer +
  the resident globals (embeddings, output head) + activations, + 25%;
* the forward's wall time against the time to read the same bytes once with plain ``read()``
  calls (the ceiling: streaming must read every byte), both with the page cache *cold* for
  the checkpoint's files (evicted with ``posix_fadvise(DONTNEED)``, checked with ``fincore``)
  and *warm* (read once before). Target: within 1.5x of the ceiling. Each forward runs in a
  fresh process (init and the globals' bytes included), so its first layer is read into
  fresh memory; the later layers reuse that buffer. Two batches (``--tokens``): the headline
  is a decode-like 1 x 8 tokens, where reading dominates; 1 x 128 is compute-bound on a small
  CPU (3 full-size layers of compute alone can exceed the warm read ceiling), shown second.

Run:  .venv/bin/python benchmarks/bench_loading.py --mixtral-scale 3 [--tokens 8 128] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

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
elif mode == "stream-big":  # the real-scale checkpoint: bf16, one batch of 1 x T tokens
    sm = StreamingMixtral(path, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, sm.args.vocab_size, (1, int(sys.argv[3])), generator=g)
    logits = sm(tokens)  # timed from before StreamingMixtral(): the globals' bytes count too
    assert torch.isfinite(logits.float()).all()
    parts = {"first_s": time.perf_counter() - t0}
    t = time.perf_counter()  # a second forward in the same process: the layer buffer already touched
    assert torch.equal(sm(tokens), logits)
    parts["second_s"] = time.perf_counter() - t
elif mode == "stream-parts":  # the same work in the documented manual loop, each part timed
    parts = {"init_s": 0.0, "read_layers_s": 0.0, "compute_s": 0.0}
    sm = StreamingMixtral(path, dtype=torch.bfloat16)
    parts["init_s"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, sm.args.vocab_size, (1, int(sys.argv[3])), generator=g)
    with torch.no_grad():
        t = time.perf_counter()
        x, *block_inputs = sm.prepare(tokens)  # (x, cos, sin, mask), or (x, ctx) where prepare is Mixtral.embed
        parts["compute_s"] += time.perf_counter() - t
        for i in range(len(sm.layer_ids)):
            t = time.perf_counter()
            block = sm.load_block(i)
            t1 = time.perf_counter()
            x, _ = block(x, *block_inputs)
            t2 = time.perf_counter()
            sm.free_block(i)
            parts["read_layers_s"] += t1 - t + time.perf_counter() - t2
            parts["compute_s"] += t2 - t1
        t = time.perf_counter()
        logits = sm.finish(x)
        parts["compute_s"] += time.perf_counter() - t
elif mode == "copy":  # why streaming is slower than reading: a layer-sized copy out of the mapped
    # file into a buffer allocated fresh each time (as each streamed layer is) vs one reused buffer
    import ctypes, mmap, os
    f, n = sys.argv[3], (os.path.getsize(sys.argv[3]) // 4096) * 4096
    reused = torch.empty(n, dtype=torch.uint8).fill_(0)
    def copy(dst):
        with open(f, "rb") as fh:
            m = mmap.mmap(fh.fileno(), n, access=mmap.ACCESS_READ)
            src = torch.frombuffer(m, dtype=torch.uint8)
            dst = torch.empty(n, dtype=torch.uint8) if dst is None else dst
            dst.copy_(src)
            del src, dst
            m.close()
        ctypes.CDLL(None).malloc_trim(0)
    parts = {}
    for name, dst in (("fresh_GBps", None), ("reused_GBps", reused), ("fresh_GBps_2", None), ("reused_GBps_2", reused)):
        t = time.perf_counter()
        copy(dst)
        parts[name] = n / (time.perf_counter() - t) / 1e9
elif mode == "read":  # the ceiling: every byte of the checkpoint's files read once, plain read()
    buf = bytearray(64 << 20)
    for f in sys.argv[3:]:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
print(json.dumps({"base_kib": base, "peak_kib": kib(), "seconds": time.perf_counter() - t0,
                  **(parts if mode in ("stream-big", "stream-parts", "copy") else {})}))
"""


def layer_bytes(args) -> int:
    D, I, E, hd = args.dim, args.hidden_dim, args.n_experts, args.head_dim
    attn = D * args.n_heads * hd * 2 + D * args.n_kv_heads * hd * 2
    return 4 * (attn + 2 * D + E * D + 3 * E * D * I)


def measure(mode: str, path: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), *extra], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{mode} {path} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Real scale: Mixtral 8x7B's shapes, a few layers, bf16, on disk


def write_mixtral_shaped(path: Path, n_layers: int) -> tuple[Path, list[Path], object]:
    """Random bf16 checkpoint with Mixtral 8x7B's shapes and ``n_layers`` layers, HF sharded
    layout (one ``model-*.safetensors`` per layer, the globals in the last; 64-byte aligned like
    ``save_model``'s files, so the streaming forward can use the mapped weights without copying
    them: zero-copy, see ``moe_lab.checkpoints.streaming``), written one tensor
    at a time so that writing it needs ~one expert of memory, not the model."""
    import torch
    from tqdm.auto import tqdm

    from moe_lab import ModelArgs
    from moe_lab.checkpoints.convert import hf_config_dict
    from moe_lab.checkpoints.files import save_aligned_safetensors

    args = ModelArgs.from_name("mixtral-8x7b", n_layers=n_layers)
    D, I, E, hd = args.dim, args.hidden_dim, args.n_experts, args.head_dim
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    path.mkdir(parents=True)
    n_files = n_layers + 1
    files, weight_map, total = [], {}, 0
    for f in tqdm(range(n_files), desc="writing shards", unit="shard"):
        name = f"model-{f + 1:05d}-of-{n_files:05d}.safetensors"
        if f < n_layers:
            p = f"model.layers.{f}."
            shapes = {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                      p + "self_attn.q_proj.weight": (args.n_heads * hd, D), p + "self_attn.k_proj.weight": (args.n_kv_heads * hd, D),
                      p + "self_attn.v_proj.weight": (args.n_kv_heads * hd, D), p + "self_attn.o_proj.weight": (D, args.n_heads * hd),
                      p + "block_sparse_moe.gate.weight": (E, D)}
            for e in range(E):
                shapes.update({p + f"block_sparse_moe.experts.{e}.w1.weight": (I, D),
                               p + f"block_sparse_moe.experts.{e}.w3.weight": (I, D),
                               p + f"block_sparse_moe.experts.{e}.w2.weight": (D, I)})
        else:
            shapes = {"model.embed_tokens.weight": (args.vocab_size, D), "model.norm.weight": (D,),
                      "lm_head.weight": (args.vocab_size, D)}
        tensors = {k: (torch.ones(s, dtype=torch.bfloat16) if k.endswith("norm.weight") else rand(*s)) for k, s in shapes.items()}
        save_aligned_safetensors(tensors, path / name, metadata={"format": "pt"})  # as save_model writes
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        files.append(path / name)
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = hf_config_dict(args)
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    return path, files, args


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the kernel's page cache (no root needed: clean pages only)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_bytes(files: list[Path]) -> int | None:
    """Bytes of the files now in the page cache (``fincore``; None when it is missing)."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout
        return sum(int(x) for x in out.split())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


def activation_bytes(args, B: int, T: int) -> int:
    """Generous estimate of a block's live activations in bf16 (2 bytes), plus fp32 logits:
    residual, normed input, q/k/v/out, the fp32 attention matrix, the router's fp32 softmax,
    each expert's two [n, I] intermediates for all tokens at once (upper bound), the output."""
    N, D, I, hd = B * T, args.dim, args.hidden_dim, args.head_dim
    per_block = 2 * N * (4 * D + (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd + 3 * I)
    per_block += 4 * B * args.n_heads * T * T + 4 * N * args.n_experts * 2
    return per_block + 4 * N * args.vocab_size


def mixtral_scale(n_layers: int, token_counts: list[int], where: str | None) -> None:
    from common import environment

    work = Path(tempfile.mkdtemp(prefix="bench_mixtral_scale_", dir=where))
    T0 = token_counts[0]  # the headline batch (decode-like: reading dominates)
    try:
        free = shutil.disk_usage(work).free
        need = n_layers * 2.91e9 + 0.53e9
        if free < need * 1.1:
            raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need {need / 1e9:.1f} GB")
        path, files, args = write_mixtral_shaped(work / "ckpt", n_layers)
        S = sum(f.stat().st_size for f in files)
        layer = layer_bytes(args) // 2  # bf16
        glob = 2 * 2 * args.vocab_size * args.dim + 2 * args.dim
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        rows = []
        runs = [("read", None)] + [("stream-big", T) for T in token_counts]
        for state in ("cold", "warm", "cold", "warm"):  # interleaved, twice
            for mode, T in runs:
                if state == "cold":
                    evict(files)
                else:
                    measure("read", path, *map(str, files))  # warm the page cache
                before = cached_bytes(files)
                extra = [str(T)] if mode == "stream-big" else list(map(str, files))
                res = measure(mode, path, *extra)
                rows.append({"mode": mode, "tokens": T, "state": state, "cached_before": before,
                             "seconds": res.get("first_s", res["seconds"]), "second_s": res.get("second_s"),
                             "peak": (res["peak_kib"] - res["base_kib"]) * 1024})
                label = mode if T is None else f"{mode} 1x{T}"
                print(f"  {label:18} {state}: {rows[-1]['seconds']:.1f} s, peak +{rows[-1]['peak'] / 1e9:.2f} GB "
                      f"(cached before: {'?' if before is None else f'{before / 1e9:.2f} GB'})", file=sys.stderr)
        for state in ("cold", "warm"):  # where the streaming time goes (init = globals + model skeleton)
            if state == "cold":
                evict(files)
            else:
                measure("read", path, *map(str, files))
            res = measure("stream-parts", path, str(T0))
            rows.append({"mode": "stream-parts", "tokens": T0, "state": state, **res})
            print(f"  stream-parts {state}: " + ", ".join(f"{k} {res[k]:.1f}" for k in ("init_s", "read_layers_s", "compute_s")),
                  file=sys.stderr)
        measure("read", path, *map(str, files))
        res = measure("copy", path, str(files[0]))  # one layer's shard, page cache warm
        rows.append({"mode": "copy", "state": "warm", **res})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    env = environment()
    print(f"\nmachine: {env['processor']}, {env['cpus']} CPUs, torch {env['torch']} ({env['threads']} threads), "
          f"{mem_total / 2**30:.1f} GiB RAM; disk: the filesystem of {where or tempfile.gettempdir()}")
    print(f"checkpoint: Mixtral 8x7B shapes, {n_layers} layers, bf16, HF sharded layout: {S / 1e9:.2f} GB "
          f"({S / mem_total:.0%} of RAM); one layer {layer / 1e9:.2f} GB, resident globals {glob / 1e9:.2f} GB; "
          f"each forward in a fresh process: its first layer goes to fresh memory, the others reuse that buffer\n")
    best = lambda state, T, key="seconds": min(r[key] for r in rows if r["mode"] == ("read" if T is None else "stream-big")
                                               and r["state"] == state and r["tokens"] == T)
    for state in ("cold", "warm"):
        t_read = best(state, None)
        print(f"page cache {state}: read ceiling {t_read:.1f} s ({S / t_read / 1e9:.2f} GB/s); best of 2 each")
        for T in token_counts:
            act = activation_bytes(args, 1, T)
            budget = 1.25 * (layer + glob + act)
            t_stream = best(state, T)
            peak = max(r["peak"] for r in rows if r["mode"] == "stream-big" and r["state"] == state and r["tokens"] == T)
            kind = "decode-like, I/O-bound: the headline" if T == T0 else "compute-bound on this CPU"
            print(f"  batch 1 x {T} ({kind}): streaming forward {t_stream:.1f} s ({S / t_stream / 1e9:.2f} GB/s) = "
                  f"{t_stream / t_read:.2f} x the ceiling (target <= 1.5: {'met' if t_stream <= 1.5 * t_read else 'MISSED'})"
                  + (f"; a 2nd forward in the same process (buffer already touched): {best(state, T, 'second_s'):.1f} s = "
                     f"{best(state, T, 'second_s') / t_read:.2f} x" if state == "warm" else ""))
            print(f"    peak memory growth {peak / 1e9:.2f} GB = {peak / layer:.2f} x one layer; budget 1.25 x (layer + "
                  f"globals + activations {act / 1e6:.0f} MB) = {budget / 1e9:.2f} GB: {'met' if peak <= budget else 'MISSED'}; "
                  f"without the globals: 1.25 x (layer + activations) = {1.25 * (layer + act) / 1e9:.2f} GB: "
                  f"{'met' if peak <= 1.25 * (layer + act) else 'missed'}")
    for r in rows:
        if r["mode"] == "stream-parts":
            print(f"where the time goes ({r['state']}, 1 x {r['tokens']}, manual loop over the same blocks): init "
                  f"(globals + skeleton) {r['init_s']:.1f} s, reading + freeing layers {r['read_layers_s']:.1f} s, "
                  f"compute {r['compute_s']:.1f} s; total {r['seconds']:.1f} s")
        if r["mode"] == "copy":
            print(f"copying one layer's shard out of the mapped file (warm): into a freshly allocated buffer "
                  f"{max(r['fresh_GBps'], r['fresh_GBps_2']):.2f} GB/s, into a reused one "
                  f"{max(r['reused_GBps'], r['reused_GBps_2']):.2f} GB/s (a fresh buffer is first touched page by page)")
    print("\nraw rows:", json.dumps(rows))


def main():
    import torch

    from moe_lab import ModelArgs, save_model
    from moe_lab.checkpoints.layouts import to_mistral_state_dict, params_dict
    from moe_lab.model import Mixtral

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--dir", default=None, help="where to write the temporary checkpoints (default: system temp)")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive-load comparison")
    ap.add_argument("--mixtral-scale", type=int, default=None, metavar="N",
                    help="instead: a Mixtral-8x7B-shaped bf16 checkpoint of N layers (~3 GB each), streaming forward")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 128],
                    help="--mixtral-scale: batches of 1 x T tokens to stream; the first is the headline")
    opts = ap.parse_args()
    if opts.mixtral_scale:
        return mixtral_scale(opts.mixtral_scale, opts.tokens, opts.dir)

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
