"""Render the README's PNG images from the same figures the notebooks draw.

    pip install kaleido            # static export for plotly (kaleido 1.x drives a Chrome/Chromium:
    apt-get install chromium       # on Debian/Ubuntu; or `plotly_get_chrome`)
    python docs/images/render_readme_images.py

Writes docs/images/{tokens_by_expert,expert_load,repetition}.png from the demo model
(data/tiny-mixtral) on the held-out documents of moe_lab's corpus, as in notebooks 05 and 06.
Refuses to run on the random fallback model unless --allow-random is given (README images of an
untrained model would show arbitrary routing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "images"
MAX_BYTES = 300_000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--allow-random", action="store_true", help="use a random tiny model if the demo model is missing")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)

    import plotly.io as pio

    import moe_lab
    from moe_lab import viz
    from moe_lab.corpus import build_corpus

    demo = ROOT / "data" / "tiny-mixtral"
    if demo.exists():
        model, name = moe_lab.load_model(demo).eval(), "demo model"
    elif a.allow_random:
        torch.manual_seed(0)
        model, name = moe_lab.Mixtral(moe_lab.ModelArgs.from_name("tiny")).eval(), "RANDOM tiny model"
        print("warning: data/tiny-mixtral not found; rendering from a random model", file=sys.stderr)
    else:
        print("data/tiny-mixtral not found (use --allow-random to render from a random model)", file=sys.stderr)
        return 1
    tok = moe_lab.load_tokenizer()
    corpus = build_corpus(size="small", progress=False)
    heldout: dict[str, list[str]] = {}
    for doc in corpus.heldout:
        heldout.setdefault(doc.domain, []).append(doc.text)
    trace = moe_lab.trace_routing(model, heldout, tokenizer=tok, progress=False, max_len=1024)

    last = trace.layers[-1]
    doc = trace.domains.index("python")
    figs = {
        "tokens_by_expert": viz.token_figure(trace, doc=doc, layers=[last], max_tokens=110, line_chars=72,
                                             title=f"Python tokens coloured by first-choice expert ({name})"),
        "expert_load": viz.load_heatmap(trace, title=f"Expert load per layer on held-out text ({name}); uniform 12.5%"),
        "repetition": viz.repetition_figure(trace, kinds=("first",), by_domain=False,
                                            title=f"Consecutive tokens with the same first expert ({name})"),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    for stem, fig in figs.items():
        path = a.out / f"{stem}.png"
        pio.write_image(fig, path, format="png", scale=1)
        size = path.stat().st_size
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {size / 1024:.0f} KiB")
        if size > MAX_BYTES:
            print(f"warning: {path.name} is over {MAX_BYTES // 1000} kB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
