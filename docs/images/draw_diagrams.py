"""Draw the diagrams of notebooks 00 and 01 (static PNGs that render everywhere).

    pip install matplotlib          # in the dev extra; moe_lab itself never imports it
    python docs/images/draw_diagrams.py

Writes
* ``docs/images/moe_block.png``: one Mixtral MoE block (RMSNorm -> router -> top-2 -> two of eight
  SwiGLU experts -> weighted sum -> residual add), the paper's Figure 1 in moe_lab's colours;
* ``docs/images/router_path.png``: one token through the router: 8 logits -> softmax -> top-2 ->
  renormalised weights -> the two experts' outputs mixed. The numbers are computed by
  ``moe_lab.topk_softmax_routing`` (the function the model runs) on fixed example logits.

The notebooks embed these PNGs as markdown attachments (see ``embed_in_notebooks``), so the picture
travels inside the ``.ipynb`` (GitHub, Colab, nbviewer, offline HTML). Run with ``--embed`` after
redrawing to refresh the attachments.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from moe_lab import topk_softmax_routing  # noqa: E402
from moe_lab.viz import expert_color  # noqa: E402

OUT = ROOT / "docs" / "images"
GREY, INK, LIGHT = "#8c959f", "#24292f", "#eaeef2"
E, K = 8, 2
EXAMPLE_LOGITS = [0.4, -1.1, 2.3, 0.1, -0.6, 1.7, -0.2, 0.8]  # one token's router logits (illustrative)
CHOSEN = (2, 5)  # the top-2 of EXAMPLE_LOGITS, checked in router_path()

# which notebook shows which diagram (in a markdown cell containing ![...](attachment:NAME))
EMBED = [("00_quickstart.ipynb", "moe_block.png"), ("01_building_blocks.ipynb", "moe_block.png"),
         ("01_building_blocks.ipynb", "router_path.png")]


def _box(ax, x, y, w, h, text, fc="white", ec=INK, lw=1.4, ls="-", fontsize=11, color=INK, weight="normal"):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=fc, ec=ec, lw=lw, ls=ls))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=color, weight=weight)


def _arrow(ax, a, b, color=INK, lw=1.4, ls="-", rad=0.0, text=None, text_offset=(0, 0.12), fontsize=10):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=13, color=color, lw=lw, ls=ls,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
    if text:
        ax.text((a[0] + b[0]) / 2 + text_offset[0], (a[1] + b[1]) / 2 + text_offset[1], text, ha="center",
                va="center", fontsize=fontsize, color=color)


def moe_block(path: Path) -> Path:
    """One MoE block: the residual stream, RMSNorm, the router, 8 experts of which 2 run, the sum."""
    fig, ax = plt.subplots(figsize=(11, 5.6))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 5.6)
    ax.axis("off")
    y0 = 0.55  # the residual stream
    ax.plot([0.3, 10.3], [y0, y0], color=GREY, lw=3, zorder=0)
    ax.text(0.3, y0 - 0.32, "residual stream x (one token's vector, dim D)", fontsize=10, color=GREY, ha="left")
    _arrow(ax, (10.0, y0), (10.6, y0), color=GREY, lw=3)
    _box(ax, 1.3, 2.2, 1.5, 0.7, "RMSNorm")
    _arrow(ax, (1.3, y0), (1.3, 1.85))
    # router
    _box(ax, 3.4, 4.6, 2.0, 0.8, "router  $W_g$\n8 logits", fc="#fff8c5", ec="#9a6700")
    _arrow(ax, (1.55, 2.55), (2.6, 4.25), rad=-0.2)
    _box(ax, 6.0, 4.6, 2.2, 0.8, "softmax → top-2\n→ renormalise", fc="#fff8c5", ec="#9a6700")
    _arrow(ax, (4.4, 4.6), (4.9, 4.6))
    # experts
    xs = [3.0 + 0.62 * e for e in range(E)]
    for e, x in enumerate(xs):
        on = e in CHOSEN
        _box(ax, x, 2.2, 0.52, 1.2, f"E{e}", fc=expert_color(e) if on else LIGHT, ec=INK if on else GREY,
             ls="-" if on else "--", color="white" if on else GREY, weight="bold" if on else "normal", fontsize=10)
    _arrow(ax, (2.05, 2.2), (xs[0] - 0.3, 2.2))
    # weights to the chosen experts
    for e, w in zip(CHOSEN, ("$g_1$", "$g_2$")):
        _arrow(ax, (6.0, 4.2), (xs[e], 2.85), color=expert_color(e), rad=0.1 if e < 4 else -0.1)
        ax.text(xs[e] + (0.35 if e > 3 else -0.35), 3.35, w, color=expert_color(e), fontsize=12, ha="center")
    # weighted sum and residual add
    ax.add_patch(plt.Circle((8.75, 2.2), 0.42, fc="white", ec=INK, lw=1.4))
    ax.text(8.75, 2.2, "Σ", ha="center", va="center", fontsize=16)
    for e, y_bus, x_in in zip(CHOSEN, (1.08, 0.93), (8.55, 8.95)):  # outputs run under the other experts
        c = expert_color(e)
        ax.plot([xs[e], xs[e], x_in], [1.6, y_bus, y_bus], color=c, lw=1.4)
        _arrow(ax, (x_in, y_bus), (x_in, 1.83), color=c)
    ax.text(8.75, 2.95, "$g_1\\,E_2(x) + g_2\\,E_5(x)$", ha="center", fontsize=11)
    ax.add_patch(plt.Circle((9.6, y0), 0.25, fc="white", ec=INK, lw=1.4))
    ax.text(9.6, y0, "+", ha="center", va="center", fontsize=14)
    _arrow(ax, (9.0, 1.85), (9.55, y0 + 0.27), rad=-0.2)
    ax.text(10.45, y0 + 0.28, "to the next layer", fontsize=9, color=GREY, ha="center")
    ax.set_title("One Mixtral MoE block: a router picks 2 of 8 experts per token, their outputs are mixed\n"
                 "(8 SwiGLU experts; only the 2 chosen ones run for this token, the dashed ones do not)",
                 fontsize=12, color=INK)
    return _save(fig, path)


def router_path(path: Path) -> Path:
    """One token through the router, with the numbers moe_lab's routing function gives."""
    logits = torch.tensor([EXAMPLE_LOGITS])
    probs, idx, weights = topk_softmax_routing(logits, K)  # the function every moe_lab model runs
    chosen = idx[0].tolist()
    assert sorted(chosen) == sorted(CHOSEN), chosen
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.9), gridspec_kw=dict(width_ratios=[3, 3, 1.6, 2.2], wspace=0.45))
    experts = list(range(E))
    colors = [expert_color(e) if e in chosen else LIGHT for e in experts]
    edges = [INK if e in chosen else GREY for e in experts]
    ax = axes[0]
    ax.bar(experts, logits[0].tolist(), color=colors, edgecolor=edges)
    ax.axhline(0, color=GREY, lw=0.8)
    ax.set_title("1. router logits\n$z = W_g\\,x$ (any real numbers)", fontsize=11)
    ax = axes[1]
    ax.bar(experts, probs[0].tolist(), color=colors, edgecolor=edges)
    for e in chosen:
        ax.text(e, float(probs[0, e]) + 0.01, f"{float(probs[0, e]):.2f}", ha="center", fontsize=9)
    ax.set_title("2. softmax over all 8\nkeep the top 2", fontsize=11)
    ax.set_ylim(0, float(probs.max()) * 1.25)
    for ax in axes[:2]:
        ax.set_xticks(experts)
        ax.set_xlabel("expert")
    ax = axes[2]
    ax.bar([0, 1], weights[0].tolist(), color=[expert_color(e) for e in chosen], edgecolor=INK)
    for i, w in enumerate(weights[0].tolist()):
        ax.text(i, w + 0.02, f"{w:.2f}", ha="center", fontsize=9)
    ax.set_xticks([0, 1], [f"E{e}" for e in chosen])
    ax.set_ylim(0, 1.05)
    ax.set_title("3. renormalise:\nthe 2 weights sum to 1", fontsize=11)
    ax = axes[3]
    ax.axis("off")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    w = weights[0].tolist()
    for i, (e, y) in enumerate(zip(chosen, (0.72, 0.32))):
        _box(ax, 0.22, y, 0.34, 0.2, f"E{e}(x)", fc=expert_color(e), ec=INK, color="white", weight="bold")
        _arrow(ax, (0.4, y), (0.7, 0.52), color=expert_color(e), text=f"× {w[i]:.2f}",
               text_offset=(0, 0.09 if i == 0 else -0.09))
    ax.add_patch(plt.Circle((0.8, 0.52), 0.09, fc="white", ec=INK, lw=1.4, transform=ax.transData))
    ax.text(0.8, 0.52, "Σ", ha="center", va="center", fontsize=14)
    ax.set_title("4. run the 2 experts,\nmix their outputs", fontsize=11)
    fig.suptitle("A token's path through the router (mistral-inference's order, top-2 logits → softmax over 2, "
                 "gives the same experts and weights)", fontsize=11, y=1.04)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Write the PNG atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", facecolor="white")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def embed_in_notebooks(out: Path = OUT, notebooks: Path = ROOT / "notebooks") -> list[str]:
    """Refresh the attachments of the markdown cells that show ``![...](attachment:NAME)``."""
    changed = []
    for nb_name, png in EMBED:
        nb_path = notebooks / nb_name
        nb = json.loads(nb_path.read_text())
        data = base64.b64encode((out / png).read_bytes()).decode()
        cells = [c for c in nb["cells"] if c["cell_type"] == "markdown" and f"attachment:{png}" in "".join(c["source"])]
        if not cells:
            raise SystemExit(f"{nb_name}: no markdown cell shows attachment:{png}")
        for c in cells:
            c.setdefault("attachments", {})[png] = {"image/png": data}
        tmp = nb_path.with_suffix(".ipynb.tmp")
        tmp.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n")  # as nbformat writes
        os.replace(tmp, nb_path)
        changed.append(f"{nb_name}:{png}")
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--embed", action="store_true", help="also refresh the notebooks' attachments")
    a = ap.parse_args(argv)
    for p in (moe_block(a.out / "moe_block.png"), router_path(a.out / "router_path.png")):
        print(f"wrote {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p} ({p.stat().st_size // 1024} KB)")
    if a.embed:
        print("embedded:", ", ".join(embed_in_notebooks(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
