#!/usr/bin/env python
"""Measured times per notebook section, written into the instructor's guide (docs/INSTRUCTORS.md).

    python scripts/instructor_times.py                 # full mode from the saved notebooks -> the guide
    python scripts/instructor_times.py --fast          # first run every notebook in fast mode on a copy, then write
    python scripts/instructor_times.py --fast 00 04    # fast mode for the named notebooks only (others keep theirs)
    python scripts/instructor_times.py --check         # exit 1 when the guide is not what this script would write

Nothing here is typed by hand. A section is a notebook's markdown "## " heading and every cell up to
the next one (cells before the first "## " are the "(title)" section). A cell's time is what the
kernel recorded when the notebook was executed (nbclient's ``metadata.execution``: from
``iopub.execute_input`` to ``shell.execute_reply``), so:

* **full mode** comes from the committed notebooks, which ``scripts/execute_notebooks.py`` executes
  in full mode (nbclient keeps the timing metadata; that script keeps it in the saved file);
* **fast mode** comes from a fast run this script does on request (``--fast``): each notebook is
  executed in memory with ``MOE_LAB_FAST=1`` (the kernel's environment of execute_notebooks.py, in
  the notebook's folder); the executed copy goes to a temporary folder, never over the committed
  notebook, and the per-section seconds go to ``docs/instructor_times_fast.json`` (committed, with
  the date and the machine), from which later runs write the fast column.

A code cell without timing metadata (never executed, or its outputs cleared by an edit) is counted
as "not timed" in its section's row, never as zero seconds. The guide holds one block per notebook
between ``<!-- times NAME -->`` and ``<!-- /times -->`` (NAME: the notebook's file stem), plus a
summary between ``<!-- times summary -->`` and ``<!-- /times -->``. A notebook without a block in the
guide, or a block without a notebook, is reported (the block then says the notebook is missing).

The model answers quote the demo model's numbers the same way: ``<!-- value NB CELL /REGEX/ -->``
... ``<!-- /value -->`` is filled with the first group of REGEX searched in the saved text output
(streams and text/plain) of cell id CELL of ``notebooks/NB.ipynb`` (NB may be ``solutions/07_solutions``).
A value that is not in the saved outputs (cell not executed, text changed) is written as such and
reported, never guessed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
GUIDE = ROOT / "docs" / "INSTRUCTORS.md"
FAST_JSON = ROOT / "docs" / "instructor_times_fast.json"
TITLE = "(title)"
_BLOCK = re.compile(r"(<!-- times ([\w.-]+) -->\n)(.*?)(<!-- /times -->)", re.S)
_H2 = re.compile(r"^## +(.+?)\s*$", re.M)
_VALUE = re.compile(r"(<!-- value (\S+) (\S+) /(.+?)/ -->)(.*?)(<!-- /value -->)", re.S)


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def _stamp(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def cell_seconds(cell: dict) -> float | None:
    """Seconds a code cell took when it was last executed (``shell.execute_reply`` minus
    ``iopub.execute_input`` in its metadata), or None when the cell carries no timing."""
    timing = (cell.get("metadata") or {}).get("execution") or {}
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not start or not end:
        return None
    try:
        return max(0.0, (_stamp(end) - _stamp(start)).total_seconds())
    except ValueError as e:
        raise ValueError(f"cell {cell.get('id')!r}: timing metadata {timing!r} is not ISO 8601 ({e})") from None


def section_names(nb: dict) -> list[str]:
    """The notebook's "## " headings in order, after the "(title)" section of the cells before the first."""
    names = [TITLE]
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            names += [m.group(1) for m in _H2.finditer(_text(cell.get("source")))]
    return names


def section_times(nb: dict) -> list[dict]:
    """One row per section: {"section", "cells" (code cells), "seconds" (sum over timed cells), "untimed"}."""
    rows = [{"section": TITLE, "cells": 0, "seconds": 0.0, "untimed": 0}]
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for m in _H2.finditer(_text(cell.get("source"))):
                rows.append({"section": m.group(1), "cells": 0, "seconds": 0.0, "untimed": 0})
        elif cell.get("cell_type") == "code":
            row = rows[-1]
            row["cells"] += 1
            s = cell_seconds(cell)
            if s is None:
                row["untimed"] += 1
            else:
                row["seconds"] += s
    return rows


def fmt(seconds: float | None, untimed: int = 0) -> str:
    """"4 s", "1.5 min", "12 min"; "n/a" when nothing was timed; "+ k not timed" when some cells were not."""
    if seconds is None:
        return "n/a"
    if seconds < 90:
        text = f"{seconds:.0f} s" if seconds >= 1 else "< 1 s"
    elif seconds < 600:
        text = f"{seconds / 60:.1f} min"
    else:
        text = f"{seconds / 60:.0f} min"
    return text + (f" (+{untimed} cells not timed)" if untimed else "")


# ---------------------------------------------------------------- the blocks in the guide

def notebook_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(NOTEBOOKS.glob("*.ipynb"))}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _fast_rows(fast: dict, stem: str) -> dict[str, dict]:
    return {r["section"]: r for r in fast.get("notebooks", {}).get(stem, {}).get("sections", [])}


def notebook_block(stem: str, nb: dict | None, fast: dict) -> str:
    if nb is None:
        return (f"*Notebook `{stem}.ipynb` is not in this checkout yet: run `python scripts/instructor_times.py` "
                "once it is, to measure it.*\n")
    full_rows, fast_rows = section_times(nb), _fast_rows(fast, stem)
    lines = ["| section | code cells | fast mode | full mode |", "|---|---:|---:|---:|"]
    for r in full_rows:
        if r["section"] == TITLE and r["cells"] == 0:
            continue
        f = fast_rows.get(r["section"])
        fast_text = fmt(f["seconds"], f["untimed"]) if f and f["cells"] == r["cells"] else (
            "n/a" if not f else fmt(f["seconds"], f["untimed"]) + " (cells changed since)")
        full_text = fmt(r["seconds"] if r["cells"] > r["untimed"] or r["cells"] == 0 else None, r["untimed"])
        lines.append(f"| {r['section'].replace('|', '/')} | {r['cells']} | {fast_text} | {full_text} |")
    tot_full = sum(r["seconds"] for r in full_rows)
    untimed = sum(r["untimed"] for r in full_rows)
    tot_fast = sum(r["seconds"] for r in fast_rows.values()) if fast_rows else None
    lines.append(f"| **whole notebook** | {sum(r['cells'] for r in full_rows)} | **{fmt(tot_fast)}** | "
                 f"**{fmt(tot_full, untimed)}** |")
    return "\n".join(lines) + "\n"


# The 3-hour workshop's slots: (slot, notebook, the last section it uses). Learners run a notebook
# from the top, so a slot's run time is every section up to and including that one.
WORKSHOP = [
    ("1", "00_quickstart", None),
    ("2", "01_building_blocks", "7."),
    ("3", "04_routing_hooks", "6."),
    ("4", "06_paper_routing_analysis", "8."),
    ("5", "07_training_a_tiny_moe", "4."),
    ("6", "08_causal_experiments", "3."),
]


def _through(rows: list[dict], last: str | None) -> tuple[list[dict], str]:
    if last is None:
        return rows, "all"
    idx = [i for i, r in enumerate(rows) if r["section"].startswith(last + " ") or r["section"] == last]
    if not idx:
        raise ValueError(f"no section starting with {last!r} in {[r['section'] for r in rows]}")
    return rows[: idx[0] + 1], f"through § {rows[idx[0]]['section']}"


def workshop_block(nbs: dict[str, dict], fast: dict) -> str:
    lines = ["| slot | notebook | runs | fast mode | full mode |", "|---|---|---|---:|---:|"]
    tot_fast = tot_full = 0.0
    for slot, stem, last in WORKSHOP:
        if stem not in nbs:
            lines.append(f"| {slot} | `{stem}` | (notebook missing) | n/a | n/a |")
            continue
        try:
            full_rows, label = _through(section_times(nbs[stem]), last)
        except ValueError as e:  # a section renamed: say so in the guide (the test names it too)
            print(f"warning: workshop slot {slot}, {stem}: {e}", file=sys.stderr)
            lines.append(f"| {slot} | `{stem}` | (no section {last!r}: update WORKSHOP in scripts/instructor_times.py) | n/a | n/a |")
            continue
        names = {r["section"] for r in full_rows}
        fast_rows = [r for r in _fast_rows(fast, stem).values() if r["section"] in names]
        f = sum(r["seconds"] for r in fast_rows) if fast_rows else None
        g = sum(r["seconds"] for r in full_rows)
        tot_fast += f or 0.0
        tot_full += g
        lines.append(f"| {slot} | `{stem}` | {label.replace('|', '/')} | {fmt(f)} | "
                     f"{fmt(g, sum(r['untimed'] for r in full_rows))} |")
    lines.append(f"| | **all slots** | | **{fmt(tot_fast)}** | **{fmt(tot_full)}** |")
    return "\n".join(lines) + "\n"


def summary_block(nbs: dict[str, dict], fast: dict) -> str:
    lines = ["| notebook | fast mode | fast run's wall time (kernel start included) | full mode | full mode executed on |",
             "|---|---:|---:|---:|---|"]
    for stem, nb in nbs.items():
        rows = section_times(nb)
        fr = _fast_rows(fast, stem)
        stamps = [c["metadata"]["execution"]["iopub.execute_input"][:10] for c in nb.get("cells", [])
                  if c.get("cell_type") == "code" and (c.get("metadata") or {}).get("execution", {}).get("iopub.execute_input")]
        run = fast.get("notebooks", {}).get(stem, {})
        wall = fmt(run["wall_s"]) if "wall_s" in run else "n/a"
        if "load" in run:
            wall += f" (load {run['load']:g}, {run.get('date', '?')})"
        lines.append(f"| `{stem}` | {fmt(sum(r['seconds'] for r in fr.values()) if fr else None)} | {wall} | "
                     f"{fmt(sum(r['seconds'] for r in rows), sum(r['untimed'] for r in rows))} | "
                     f"{max(stamps) if stamps else 'n/a'} |")
    meta = fast.get("measured")
    if meta:
        lines.append("")
        lines.append(f"Fast mode last measured {meta.get('date', '?')} on {meta.get('machine', '?')} "
                     f"(`python scripts/instructor_times.py --fast`); full mode from the saved notebooks' cell timings "
                     "(`python scripts/execute_notebooks.py`). Section times are kernel time; the wall time adds the "
                     "kernel's start. On a shared machine the same notebook's times vary with the load (the wall "
                     "column gives the 1-minute load average when a run ended, where recorded), up to about 2x on 2 cores.")
    return "\n".join(lines) + "\n"


def render(guide: str, nbs: dict[str, dict], fast: dict) -> tuple[str, list[str]]:
    """The guide with every times block rewritten, and the problems found (notebooks without a block,
    blocks without a notebook)."""
    seen, problems = set(), []

    def put(m):
        name = m.group(2)
        seen.add(name)
        if name == "summary":
            body = summary_block(nbs, fast)
        elif name == "workshop":
            body = workshop_block(nbs, fast)
        else:
            if name not in nbs:
                problems.append(f"the guide has a times block for {name!r} but notebooks/{name}.ipynb does not exist")
            body = notebook_block(name, nbs.get(name), fast)
        return m.group(1) + body + m.group(4)

    out = _BLOCK.sub(put, guide)
    out = _VALUE.sub(lambda m: m.group(1) + quote(m.group(2), m.group(3), m.group(4), problems) + m.group(6), out)
    problems += [f"notebooks/{s}.ipynb has no '<!-- times {s} -->' block in the guide" for s in nbs if s not in seen]
    if "summary" not in seen:
        problems.append("the guide has no '<!-- times summary -->' block")
    return out, problems


def output_text(cell: dict) -> str:
    return "".join(_text(o.get("text")) + _text((o.get("data") or {}).get("text/plain")) for o in cell.get("outputs", []))


def quote(nb_name: str, cell_id: str, pattern: str, problems: list[str]) -> str:
    """The first group of ``pattern`` in the saved output of cell ``cell_id`` of notebooks/``nb_name``.ipynb."""
    path = NOTEBOOKS / f"{nb_name}.ipynb"
    where = f"notebooks/{nb_name}.ipynb cell {cell_id}"
    if not path.exists():
        problems.append(f"value: {path} does not exist")
        return f"*(not measured: {nb_name}.ipynb is missing)*"
    cell = next((c for c in load(path)["cells"] if c.get("id") == cell_id), None)
    if cell is None:
        problems.append(f"value: {where}: no cell with that id")
        return f"*(not measured: no cell {cell_id} in {nb_name})*"
    m = re.search(pattern, output_text(cell))
    if m is None:
        problems.append(f"value: {where}: its saved output does not match /{pattern}/ (not executed?)")
        return f"*(not in the saved outputs yet: re-execute {nb_name})*"
    return re.sub(r"\s+", " ", (m.group(1) if m.groups() else m.group(0)).strip())  # one line in the guide


# ---------------------------------------------------------------- a fast run, on a copy

def run_fast(paths: list[Path], out_dir: Path, timeout: int = 1200, failed: list[str] | None = None) -> dict[str, dict]:
    """Execute each notebook in fast mode in memory (kernel in its folder), save the executed copy
    to ``out_dir``, return its per-section times. The committed notebooks are never written. A
    notebook that fails is left out of the result and its name appended to ``failed``."""
    failed = [] if failed is None else failed
    import nbformat
    from nbclient import NotebookClient

    sys.path.insert(0, str(ROOT / "scripts"))
    from execute_notebooks import kernel_env  # the same kernel environment as the saved notebooks'

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    results = {}
    saved_env = dict(os.environ)
    try:
        os.environ.update(kernel_env(fast=True))
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            bar = tqdm(total=sum(c.cell_type == "code" for c in nb.cells), desc=path.name, unit="cell",
                       file=sys.stderr) if tqdm else None
            t0 = time.perf_counter()
            client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                                    resources={"metadata": {"path": str(path.parent)}},
                                    on_cell_executed=(lambda **kw: bar.update()) if bar else None)
            try:
                client.execute()
            except Exception as e:  # one failing notebook keeps its old fast times; the others go on
                print(f"{path.name}: the fast run failed, its fast times are kept as they were "
                      f"(partly executed copy: {out_dir / path.name}):\n{str(e)[-2000:]}", file=sys.stderr)
                failed.append(path.name)
                continue
            finally:
                if bar:
                    bar.close()
                nbformat.write(nb, out_dir / path.name)
            wall = time.perf_counter() - t0
            results[path.stem] = {"sections": section_times(json.loads(nbformat.writes(nb))), "wall_s": round(wall, 1),
                                  "load": round(os.getloadavg()[0], 1),
                                  "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")}
            print(f"{path.name}: fast run {wall:.0f} s (copy: {out_dir / path.name})", file=sys.stderr)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    return results


def resolve(names: list[str], known: dict[str, Path]) -> list[Path]:
    if not names:
        return list(known.values())
    out = []
    for name in names:
        hits = [p for s, p in known.items() if s == name or s.startswith(name) or p.name == name]
        if len(hits) != 1:
            raise SystemExit(f"notebook {name!r}: expected one of {sorted(known)} (or a number prefix), found {len(hits)} matches")
        out.append(hits[0])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", help="with --fast: the notebooks to run (number, stem or file name); default all")
    ap.add_argument("--fast", action="store_true", help="run the notebooks in fast mode on a copy first")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when the guide is out of date")
    ap.add_argument("--guide", type=Path, default=GUIDE)
    ap.add_argument("--fast-json", type=Path, default=FAST_JSON)
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell in the fast run")
    ap.add_argument("--notebooks-dir", type=Path, default=None, help="the notebooks' folder (default: this checkout's)")
    args = ap.parse_args(argv)
    if args.notebooks_dir is not None:
        global NOTEBOOKS
        if not args.notebooks_dir.is_dir():
            raise SystemExit(f"--notebooks-dir {args.notebooks_dir}: not a folder")
        NOTEBOOKS = args.notebooks_dir

    known = notebook_paths()
    fast = json.loads(args.fast_json.read_text(encoding="utf-8")) if args.fast_json.exists() else {}
    if args.fast:
        out_dir = Path(tempfile.mkdtemp(prefix="instructor_times_fast_"))
        failed: list[str] = []
        measured = run_fast(resolve(args.notebooks, known), out_dir, args.timeout, failed)
        fast.setdefault("notebooks", {}).update(measured)
        fast["measured"] = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
                            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                                       f"load average {os.getloadavg()[0]:.1f} at the end"}
        args.fast_json.write_text(json.dumps(fast, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"fast-mode times -> {args.fast_json}", file=sys.stderr)
    if not args.guide.exists():
        raise SystemExit(f"{args.guide}: the guide does not exist (expected the file with the '<!-- times ... -->' blocks)")
    guide = args.guide.read_text(encoding="utf-8")
    new, problems = render(guide, {s: load(p) for s, p in known.items()}, fast)
    for p in problems:
        print("warning: " + p, file=sys.stderr)
    if args.fast and failed:
        print(f"the fast run failed for {failed}: their fast times are the old ones", file=sys.stderr)
    if args.check:
        if new != guide:
            print(f"{args.guide} is out of date: run python scripts/instructor_times.py", file=sys.stderr)
            return 1
        return 0
    if new != guide:
        args.guide.write_text(new, encoding="utf-8")
        print(f"wrote the measured times into {args.guide}", file=sys.stderr)
    return 1 if args.fast and failed else 0


if __name__ == "__main__":
    sys.exit(main())
