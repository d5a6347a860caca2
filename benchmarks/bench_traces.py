"""Routing analyses over a trace on disk: 10 million tokens with Mixtral's shape, ids only.

    python benchmarks/bench_traces.py [--tokens 10000000] [--json benchmarks/results/traces.json]
                                      [--only repetition_first,...] [--keep DIR]

1. **Write** a synthetic trace with Mixtral's shape (32 layers, 8 experts, top-2) to a temporary
   directory with :class:`moe_lab.TraceWriter`: Zipf-like expert frequencies (a different
   popularity order per layer), first choices that persist from one token to the next with
   probability 0.1, documents of 512-4095 tokens whose last eighth is "generated", three domains.
   The directory is removed at the end (``--keep`` keeps it).
2. **Time and peak memory of each analysis** over the whole trace, opened with
   ``RoutingTrace.load`` (memory-mapped), each in a fresh subprocess:
   wall time, and peak RSS (``VmHWM``) minus the RSS of the same subprocess after its
   imports, before the analysis (what the analysis adds). Targets: <= 60 s and <= 1.5 GB each.
   The peer in the same run: one plain pass reading every chunk (``read_pass``), so each time is
   also given as a multiple of the cost of just reading the trace.
3. **Identity**: on a 100k-token slice (the first documents), every analysis computed from a
   store (read in chunks of 2**13 tokens, so documents sit in many chunks and shards) equals the
   in-memory ``RoutingTrace`` result exactly (``np.array_equal``, DataFrames equal).

Machine and load are recorded (CPU model, cores, load average): the machine is shared, so rerun
on a quiet machine before trusting a time near a target.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import environment, markdown_table, write_json  # noqa: E402

L, E, K = 32, 8, 2
TIME_TARGET_S, MEM_TARGET_MB = 60.0, 1536.0
LAYER = 15  # the layer of the single-layer analyses (the paper's middle layer)

#: name -> code run in the child (``A`` = moe_lab.analysis, ``st`` = the TraceStore)
ANALYSES = {
    "read_pass": "sum(c.n_tokens for c, _, _ in st.iter_chunks(A.stats.CHUNK_TOKENS, desc='read'))",
    "expert_load": "A.expert_load(st)",
    "expert_load_by_domain": "A.expert_load_by_domain(st)",
    "repetition_first": "A.repetition(st, 'first')",
    "repetition_any": "A.repetition(st, 'any')",
    "coactivation": f"A.coactivation(st, {LAYER})",
    "domain_specialization": f"A.domain_specialization(st, {LAYER})",
    "vocabulary_specialization": f"A.vocabulary_specialization(st, {LAYER})",
    "cache_hit_rates": f"A.cache_hit_rates(st, sizes=[4], layers=[{LAYER}], generated=True)",
}


def zipf_routing(rng, n: int, stick: float = 0.1) -> np.ndarray:
    """[n, L, K] uint8 expert ids: per layer a Zipf(0.8) popularity over a random expert order,
    sticky first choices, a second choice different from the first."""
    out = np.empty((n, L, K), dtype=np.uint8)
    p = 1.0 / np.arange(1, E + 1) ** 0.8
    p /= p.sum()
    cdf = np.cumsum(p)
    for l in range(L):
        order = rng.permutation(E)
        first = order[np.minimum(np.searchsorted(cdf, rng.random(n)), E - 1)]
        keep = rng.random(n) < stick  # repeat the previous token's first choice
        src = np.where(keep, 0, np.arange(n))
        np.maximum.accumulate(src, out=src)
        first = first[src]
        out[:, l, 0] = first
        out[:, l, 1] = (first + 1 + rng.integers(0, E - 1, n)) % E
    return out


def write_synthetic(path: str, n_tokens: int, seed: int = 0, shard_tokens: int = 1 << 20) -> None:
    from tqdm.auto import tqdm

    from moe_lab import TraceWriter
    from moe_lab.routing.importers import RoutedDocument

    rng = np.random.default_rng(seed)
    doms = ["web", "code", "math"]
    written = 0
    with TraceWriter(path, n_experts=E, top_k=K, layers=range(L), model="synthetic (Mixtral shape)",
                     engine="benchmarks/bench_traces.py", shard_tokens=shard_tokens, rank_ordered=True,
                     meta={"note": "SYNTHETIC: Zipf-like experts, sticky first choices"}) as w, \
            tqdm(total=n_tokens, desc="writing synthetic trace", unit="tok", unit_scale=True) as bar:
        while written < n_tokens:
            block = min(shard_tokens, n_tokens - written)
            ids = zipf_routing(rng, block)
            tok = (rng.zipf(1.3, block) % 32000).astype(np.int64)
            start = 0
            while start < block:
                T = min(int(rng.integers(512, 4096)), block - start)
                tok[start] = 1  # BOS
                w.add(RoutedDocument(token_ids=tok[start:start + T], expert_ids=ids[start:start + T],
                                     positions=np.arange(T), prompt_length=T - T // 8,
                                     domain=doms[int(rng.integers(0, 3))], source="synthetic"))
                start += T
            written += block
            bar.update(block)


def _vm_hwm_mb() -> float:
    """Peak RSS of this process (VmHWM; unlike ru_maxrss it is not inherited through fork+exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(store_path: str, name: str) -> None:
    """Run one analysis; print {"seconds", "base_mb", "peak_mb", "anon_base_mb", "anon_peak_mb"}
    as JSON on the last line. Peak RSS (VmHWM) counts the pages of the memory-mapped store
    too; the anonymous peak (sampled every 5 ms) is the memory the analysis allocates."""
    import threading

    import psutil

    from moe_lab import RoutingTrace
    from moe_lab import analysis as A

    st = RoutingTrace.load(store_path)  # memory-mapped: the one trace type, read from disk
    base = psutil.Process().memory_info().rss / 2**20
    anon = {"base": _rss_anon_mb(), "peak": 0.0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon["peak"] = max(anon["peak"], _rss_anon_mb())
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    eval(ANALYSES[name], {"A": A, "st": st})
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = _vm_hwm_mb()
    print(json.dumps({"seconds": seconds, "base_mb": base, "peak_mb": peak, "anon_base_mb": anon["base"],
                      "anon_peak_mb": max(anon["peak"], _rss_anon_mb())}))


def run_child(store_path: str, name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, __file__, "--child", name, "--store", store_path], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["added_mb"] = res["peak_mb"] - res["base_mb"]
    res["added_anon_mb"] = res["anon_peak_mb"] - res["anon_base_mb"]
    return res


def identity(store_path: str, tmp: str, n_tokens: int = 100_000) -> dict:
    """Every chunked analysis on a store of the first ~100k tokens == the in-memory result."""
    import pandas as pd

    from moe_lab import analysis as A
    from moe_lab import RoutingTrace, open_store, save_store
    from moe_lab.analysis import stats

    trace = RoutingTrace.load(store_path).to_trace(max_tokens=n_tokens)
    small = open_store(save_store(trace, os.path.join(tmp, "slice"), shard_tokens=1 << 15))
    old = stats.CHUNK_TOKENS
    stats.CHUNK_TOKENS = 1 << 13  # many chunks per shard
    checks = {}
    try:
        def same(a, b):
            if isinstance(a, pd.DataFrame):
                return a.equals(b)
            if isinstance(a, dict):
                return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
            if isinstance(a, (tuple, list)):
                return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
            if isinstance(a, str):
                return a == b
            if isinstance(a, A.Repetition):
                return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in
                           ("rate", "ci_low", "ci_high", "marginal", "shuffled")) and a.n_pairs == b.n_pairs
            return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)

        for name, code in ANALYSES.items():
            if name == "read_pass":
                continue
            a = eval(code, {"A": A, "st": small})
            b = eval(code, {"A": A, "st": trace})
            checks[name] = bool(same(a, b))
    finally:
        stats.CHUNK_TOKENS = old
    return {"tokens": trace.n_tokens, "docs": trace.n_docs, "identical": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "traces.json"))
    ap.add_argument("--only", default=None, help="comma-separated analyses")
    ap.add_argument("--keep", default=None, help="write (or reuse) the synthetic trace here and keep it")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.store, args.child)

    tmp = tempfile.mkdtemp(prefix="bench_traces_")
    try:
        path = args.keep or os.path.join(tmp, "trace")
        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(path, "manifest.json")):
            write_synthetic(path, args.tokens)
        write_s = time.perf_counter() - t0
        size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20
        names = list(ANALYSES) if not args.only else ["read_pass"] + [n for n in args.only.split(",") if n != "read_pass"]
        results = {}
        for name in names:
            results[name] = run_child(path, name)
            r = results[name]
            print(f"{name:28s} {r['seconds']:7.1f} s   +{r['added_mb']:7.0f} MB RSS  +{r['added_anon_mb']:7.0f} MB anon",
                  flush=True)
        ident = identity(path, tmp)
    finally:  # (a --keep trace lives outside tmp; the identity slice in tmp always goes)
        shutil.rmtree(tmp, ignore_errors=True)
    read = results["read_pass"]["seconds"]
    rows = []
    for name, r in results.items():
        ok = r["seconds"] <= TIME_TARGET_S and r["added_mb"] <= MEM_TARGET_MB
        rows.append([name, f"{r['seconds']:.1f}", f"{r['seconds'] / read:.1f}x", f"{r['added_mb']:.0f}",
                     f"{r['added_anon_mb']:.0f}",
                     "-" if name == "read_pass" else ("yes" if ident["identical"].get(name) else "NO"),
                     "ok" if ok else "OVER"])
    env = environment()
    env["load_average"] = os.getloadavg()
    table = markdown_table(["analysis", "seconds", "x read pass", "peak RSS MB above baseline", "of which anonymous",
                            "identical on 100k slice", "target (60 s, 1.5 GB)"], rows)
    print(f"\n{args.tokens:,} tokens x {L} layers x top-{K} of {E} (ids only, {size_mb:.0f} MB on disk, "
          f"written in {write_s:.0f} s); {env['processor']}, {env['cpus']} cores, load {env['load_average']}")
    print(table)
    write_json(args.json, {"tokens": args.tokens, "shape": {"layers": L, "experts": E, "top_k": K},
                           "disk_mb": size_mb, "write_seconds": write_s, "results": results, "identity": ident,
                           "targets": {"seconds": TIME_TARGET_S, "added_mb": MEM_TARGET_MB},
                           "environment": env, "table": table})


if __name__ == "__main__":
    main()
