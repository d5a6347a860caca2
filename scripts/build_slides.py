#!/usr/bin/env python
"""Build the workshop's slide deck from the notebooks' saved figures: docs/slides/index.html and slides.pdf.

    python scripts/build_slides.py              # the HTML deck and its PDF (needs Chromium + Playwright for the PDF)
    python scripts/build_slides.py --no-pdf     # the HTML deck only
    python scripts/build_slides.py --check      # exit 1 when docs/slides/index.html is not what this script builds

Every slide names its notebook and cell (by cell id, and its index as saved). A figure slide takes
the ``image/png`` output that ``scripts/execute_notebooks.py`` saved in that cell (the figures'
static form, already reduced to 256 colours and optimised there: 5-100 kB each) as it is, and
inlines it as a data: URI, so the deck is one offline HTML file: its own CSS and a few lines of JavaScript (arrow keys, space, Home/End, a slide
counter), nothing loaded from the network. Printed (or exported to PDF) it gives one slide per page.

The claims on the slides are the notebooks' own, worded short; a number on a slide is read from
the cell's saved output by a pattern (``value=``), never typed here. A cell that has lost its figure
(outputs cleared by an edit, not yet re-executed) makes the build fail and name the slide and cell;
``--allow-missing`` builds the deck anyway with that slide as text only.

The output is deterministic (same notebooks, same bytes; the PDF's dates are fixed), so rebuilding
after ``scripts/execute_notebooks.py`` shows in ``git diff`` only what changed in the figures.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "docs" / "slides"
REPO_URL = "../../notebooks"  # links from docs/slides/index.html to the notebooks


@dataclass
class Slide:
    title: str
    notebook: str = ""  # file stem; "" for the deck's own slides (title, agenda)
    cell: str = ""  # cell id; with a PNG output for a figure slide
    points: list[str] = field(default_factory=list)
    figure: bool = True
    value: str | None = None  # a regex with one group, read from the cell's saved text output into the points' "{}"


W = "3-hour workshop"
SLIDES: list[Slide] = [
    Slide("Mixture of experts, from the router up", points=[
        "A hands-on workshop on Mixtral-style MoEs with moe_lab: every figure in this deck comes from a "
        "notebook you can run, and each slide names the notebook and cell it comes from.",
        "Run the notebooks in fast mode (FAST = True in their first code cell) during the workshop."], figure=False),
    Slide("The plan", points=[
        "00 · which experts fire on your text (15 min)",
        "01 · the router, the MoE equation, parameter counts (35 min)",
        "04 · hooks, interventions and how many experts a token needs (30 min)",
        "06 · the Mixtral paper's routing claims, with baselines (35 min)",
        "07 · training a tiny MoE: load balancing and collapse (25 min)",
        "08 · causal experiments: ablation against a null, steering (20 min)",
        "The times per section, measured: docs/INSTRUCTORS.md."], figure=False),
    # ---- 00
    Slide("Every token, two experts", "00_quickstart", "10cfe94d", [
        "Each box is a token coloured by the router's first-choice expert; hover shows both experts and their weights.",
        "Mixtral's paper (Figure 8): routing follows syntax (self, indentation, 'Question') more than topic."]),
    Slide("How evenly are the experts used?", "00_quickstart", "0a432eca", [
        "Share of one prompt's (token, slot) assignments per expert and layer; 12.5% each would be perfectly even.",
        "One prompt is a small sample: notebook 06 asks the same question with baselines."]),
    Slide("Switch the busiest expert off: little changes", "00_quickstart", "b39b6765", [
        "An ablated expert's logit becomes −∞: its tokens take their next-best expert, often already their second choice.",
        "A small KL is not 'this expert does nothing': zero-ablation (no backup) is a different question (notebook 08)."]),
    # ---- 01
    Slide("The router: softmax, top-2, renormalise", "01_building_blocks", "5bdb27f8", [
        "Logits x·W_g → keep the 2 largest → softmax over those two: two experts get all the weight.",
        "The same experts whichever order (softmax then top-k, or top-k then softmax); only exact ties can differ."]),
    Slide("Sparse: compute of 2 experts, parameters of 8", "01_building_blocks", "2956d66a", [
        "y = Σ_i Softmax(Top2(x·W_g))_i · SwiGLU_i(x): six of the eight gates are exactly zero.",
        "moe_lab's MoE runs each expert once, on the tokens that chose it; the load per expert is rarely even."]),
    Slide("Why '8x7B' is 46.7B parameters, 12.9B per token", "01_building_blocks", "1f096e25", [
        "Only the feed-forward layers are replicated; embeddings, attention and norms are shared.",
        "Router and norms are tiny; exercises 01.4 and 01.5 count 8x22B and the KV cache."]),
    # ---- 04
    Slide("A routing trace, drawn", "04_routing_hooks", "9e4b2fab", [
        "model.trace(...) records every layer's top-k experts and weights; moe_lab's figures read the trace.",
        "The same API traces generation (trace_generation) with the KV cache."]),
    Slide("An intervention, and what it changes downstream", "04_routing_hooks", "9394af94", [
        "AblateExpert, ForceExpert, SetTopK, RouterTemperature act on the router logits before the top-k and are undone on exit.",
        "Changing one layer's routing changes what later routers see: count the tokens routed differently."]),
    Slide("More experts per token is not better", "04_routing_hooks", "e410d8ce", [
        "SetTopK(k) for k = 1 … 8 (k = 8: the dense mixture): the loss is lowest at the trained k = 2.",
        "Extra experts were never trained on these tokens; fewer change the vector every later layer was trained on."]),
    # ---- 06
    Slide("Figure 7: expert load per domain", "06_paper_routing_analysis", "1f4df147", [
        "The paper reads 'no clear domain specialisation' by eye; we compare each domain with shuffled domain labels.",
        "A distance above the shuffled baseline says the domain uses experts differently, not why (digits, whitespace)."]),
    Slide("Topic experts? Compare with Mixtral, not with intuition", "06_paper_routing_analysis", "6a510be4", [
        "The saved run says: {}.",
        "Where the demo model differs from Mixtral, its size, its languages' separate vocabularies and one domain "
        "per training sequence explain it, not how MoEs work.",
        "The methods transfer; the demo model's numbers do not."], figure=False,
        value=r"(\d+ of \d+ \(domain, layer\) pairs stand out[^;]*); about"),
    Slide("Figure 8: routing follows syntax", "06_paper_routing_analysis", "e1f5a807", [
        "Code coloured by first-choice expert, first and last layer: indentation and self share experts.",
        "Identical tokens routed alike is part of 'specialisation' — control for the token (section 6)."]),
    Slide("Table 5 / Figure 10: neighbours share experts", "06_paper_routing_analysis", "63fe5aaf", [
        "Repetition of the first expert between consecutive tokens, against uniform, marginal and shuffled baselines.",
        "Only a rate above both the marginal and the shuffled line says routing depends on the neighbour."]),
    Slide("Co-activation: which experts fire together", "06_paper_routing_analysis", "e0b14a3d", [
        "C[i, j]: share of expert i's tokens that also chose j; uniform (k−1)/(E−1) = 1/7 for top-2 of 8 (OLMoE's analysis)."]),
    Slide("Domain specialisation, OLMoE's measure", "06_paper_routing_analysis", "4b572a28", [
        "Share of a domain's tokens whose top-2 includes the expert (uniform 25%).",
        "OLMoE reaches 97.7% for one expert and domain; Mixtral 27-33% (derived from the OLMoE release)."]),
    Slide("Why locality matters: the expert cache", "06_paper_routing_analysis", "0b9b164e", [
        "Per-layer caches of every size under LRU, LFU and Belady's optimum, on generated text, against the same tokens shuffled.",
        "Repetition between neighbours is what offloading (notebook 09) can exploit."]),
    # ---- 07
    Slide("Training with the load-balancing loss", "07_training_a_tiny_moe", "b18ba63c", [
        "Share of the top-2 assignments per expert over training (layer 0): with the loss, no expert runs away."]),
    Slide("Without it: rich get richer", "07_training_a_tiny_moe", "8ac22cac", [
        "router_aux_loss_coef = 0: an expert that wins tokens early gets their gradient and wins more.",
        "A collapsed layer wastes parameters and leaves expert-parallel devices idle."]),
    Slide("Balance over training, both runs", "07_training_a_tiny_moe", "474bc718", [
        "Largest share and normalised entropy per layer (1 = balanced).",
        "How far collapse goes depends on seed, learning rate and length: compare the held-out loss too."]),
    Slide("Router saturation: routing settles early", "07_training_a_tiny_moe", "eeb4a4b6", [
        "OLMoE's measure: overlap of each checkpoint's top-2 with the final top-2 on fixed probe tokens."]),
    # ---- 08
    Slide("Which experts matter? Ablation against a null", "08_causal_experiments", "5263f9f8", [
        "One expert off at a time, Δ loss per domain with a bootstrap interval; the null: the same windows, "
        "the largest effect among the layer's other 7 experts.",
        "Count cells beyond the null against what chance gives, not single hits."]),
    Slide("Steering: a dose-response, not one forced rule", "08_causal_experiments", "c3175a00b", [
        "Offsets +d / −d on a layer's top python / english experts, d from 0 to 2, and SteerMoE's forced rule once.",
        "In-domain loss rises whatever the experts encode; a lower loss under steering is not a lever by itself."]),
    Slide("Why did this token go to that expert?", "08_causal_experiments", "d87bc917", [
        "The router logit splits exactly into one part per earlier component (norm scale frozen).",
        "A decomposition, not a causal effect: removing a component changes the norm and everything after it."]),
    Slide("How redundant are the experts?", "08_causal_experiments", "9983ce90", [
        "DeepSeekMoE's per-token test: mask each token's top experts, route to the rest; against masking random experts.",
        "'Ablation barely matters' means redundancy under rerouting, not that experts do nothing."]),
    Slide("Five misconceptions, and the cell that refutes each", points=[
        "Experts are topic specialists → 06 cell 6a510be4 against Mixtral's Figure 7; Figure 8 (06 cell e1f5a807): syntax.",
        "More experts per token is better → 04 cells e410d8ce / 172f1454: the loss is lowest at the trained k.",
        "Routing is per prompt → 00 cell 43cc4f16: one token id, several experts; 06 cell bd14af4b: neighbours vs shuffled.",
        "Ablation barely matters, so experts don't matter → 00 cell 4b18e9aa, 08 cells 9351f4e4 and bb1cde53: rerouting hides redundancy.",
        "Lower loss under steering means a lever → 08 cells c3175a00 / 19276535: a dose-response on the other domain, with a baseline."],
        figure=False),
    Slide("Take-aways", points=[
        "Experts are not topic specialists in Mixtral: routing follows tokens and syntax; test any 'specialisation' against shuffled labels.",
        "More experts per token is not better than the trained k; per-token routing is not per-prompt routing.",
        "Ablation under rerouting measures redundancy; a steering effect needs a dose-response and out-of-domain text.",
        "Next: notebook 09 (real MoEs, offloading), the capstone in docs/INSTRUCTORS.md."], figure=False),
]

CSS = """
*{box-sizing:border-box}html,body{margin:0;height:100%;background:#222;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
.slide{display:none;position:relative;width:1280px;height:720px;margin:0 auto;background:#fff;color:#222;padding:36px 56px 48px;overflow:hidden}
.slide.current{display:flex;flex-direction:column}
.nb{font-size:15px;color:#666;letter-spacing:.02em}
h1{font-size:36px;margin:6px 0 14px;color:#123}
h1.deck{font-size:48px;margin-top:180px}
.body{display:flex;gap:32px;flex:1;min-height:0;align-items:center}
.fig{flex:0 0 auto;max-width:760px;height:100%;display:flex;align-items:center;justify-content:center}
.fig img{max-width:760px;max-height:560px;object-fit:contain;border:1px solid #ddd}
ul{font-size:23px;line-height:1.4;margin:0;padding-left:26px}li{margin-bottom:12px}
.textonly ul{font-size:27px}
.src{position:absolute;bottom:14px;left:56px;right:56px;font-size:13px;color:#777;display:flex;justify-content:space-between}
.src a{color:#557}
@media print{@page{size:1280px 720px;margin:0}html,body{background:#fff}.slide{display:flex!important;flex-direction:column;page-break-after:always;break-after:page;margin:0}}
"""

JS = """
(function(){var s=document.querySelectorAll('.slide'),i=0;
function show(n){i=Math.max(0,Math.min(s.length-1,n));s.forEach(function(e,k){e.classList.toggle('current',k===i)});
location.hash='#'+(i+1);}
document.addEventListener('keydown',function(e){if(['ArrowRight','PageDown',' '].indexOf(e.key)>=0){show(i+1);e.preventDefault();}
else if(['ArrowLeft','PageUp'].indexOf(e.key)>=0){show(i-1);e.preventDefault();}else if(e.key==='Home')show(0);else if(e.key==='End')show(s.length-1);});
document.addEventListener('click',function(e){if(e.target.tagName!=='A')show(i+(e.clientX>innerWidth/2?1:-1));});
var h=parseInt(location.hash.slice(1),10);show(isNaN(h)?0:h-1);window.showSlide=show;})();
"""


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else (value or "")


def load(stem: str) -> dict:
    path = NOTEBOOKS / f"{stem}.ipynb"
    if not path.exists():
        raise SystemExit(f"build_slides: {path} does not exist (a slide names notebook {stem!r})")
    return json.loads(path.read_text(encoding="utf-8"))


def find_cell(nb: dict, stem: str, cell_id: str) -> tuple[int, dict]:
    for i, c in enumerate(nb["cells"]):
        if c.get("id") == cell_id:
            return i, c
    raise SystemExit(f"build_slides: notebooks/{stem}.ipynb has no cell with id {cell_id!r} "
                     "(a cell was removed or its id changed: update SLIDES in scripts/build_slides.py)")


def cell_png(cell: dict) -> bytes | None:
    for o in cell.get("outputs", []):
        png = (o.get("data") or {}).get("image/png")
        if png:
            return base64.b64decode(_text(png))
    return None


def slide_html(n: int, total: int, s: Slide, allow_missing: bool, warnings: list[str]) -> str:
    img, src = "", ""
    if s.notebook:
        nb = load(s.notebook)
        idx, cell = find_cell(nb, s.notebook, s.cell)
        title = next((ln[2:] for c in nb["cells"] if c["cell_type"] == "markdown"
                      for ln in _text(c["source"]).splitlines() if ln.startswith("# ")), s.notebook)
        src = (f'<div class="src"><span>notebooks/{s.notebook}.ipynb · cell <code>{s.cell}</code> [{idx}]</span>'
               f'<span>{n} / {total}</span></div>')
        header = f'<div class="nb">{html.escape(title)}</div>'
        if s.figure:
            png = cell_png(cell)
            if png is None:
                msg = f"slide {n} ({s.title!r}): notebooks/{s.notebook}.ipynb cell {s.cell} [{idx}] has no saved PNG figure"
                if not allow_missing:
                    raise SystemExit(f"build_slides: {msg}; run scripts/execute_notebooks.py on it, or --allow-missing")
                warnings.append(msg)
            else:
                data = base64.b64encode(png).decode("ascii")
                img = f'<div class="fig"><img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}"></div>'
    else:
        header = '<div class="nb">moe_lab workshop</div>'
        src = f'<div class="src"><span>moe_lab · docs/slides</span><span>{n} / {total}</span></div>'
    points = list(s.points)
    if s.value:
        text = "".join(_text(o.get("text")) + _text((o.get("data") or {}).get("text/plain")) for o in cell.get("outputs", []))
        m = re.search(s.value, text)
        if m is None:
            msg = (f"slide {n} ({s.title!r}): the saved output of notebooks/{s.notebook}.ipynb cell {s.cell} [{idx}] "
                   f"does not match {s.value!r}")
            if not allow_missing:
                raise SystemExit(f"build_slides: {msg} (re-execute it, or update SLIDES; --allow-missing drops the point)")
            warnings.append(msg)
            points = [p for p in points if "{}" not in p]
        else:
            points = [p.replace("{}", m.group(1)) for p in points]
    points = "".join(f"<li>{html.escape(p)}</li>" for p in points)
    h1 = f'<h1 class="deck">{html.escape(s.title)}</h1>' if n == 1 else f"<h1>{html.escape(s.title)}</h1>"
    cls = "slide" + ("" if img else " textonly")
    return (f'<section class="{cls}" id="s{n}" data-notebook="{s.notebook}" data-cell="{s.cell}">{header}{h1}'
            f'<div class="body">{img}<ul>{points}</ul></div>{src}</section>\n')


def build_html(allow_missing: bool = False) -> tuple[str, list[str]]:
    warnings: list[str] = []
    body = "".join(slide_html(n, len(SLIDES), s, allow_missing, warnings) for n, s in enumerate(SLIDES, 1))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            "<title>moe_lab workshop</title><style>" + CSS + "</style></head><body>\n" + body +
            "<script>" + JS + "</script></body></html>\n")
    return page, warnings


_PDF_DATE = re.compile(rb"D:\d{14}([+-]\d\d'\d\d'|Z)?")


def build_pdf(html_path: Path, pdf_path: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("file:", "data:")) else r.abort())
            page.goto(html_path.resolve().as_uri())
            page.emulate_media(media="print")
            pdf = page.pdf(width="1280px", height="720px", print_background=True, prefer_css_page_size=True)
        finally:
            browser.close()
    # fixed dates (same length, so the cross-reference offsets stay right): the same deck, the same bytes
    pdf = _PDF_DATE.sub(lambda m: b"D:20000101000000" + (m.group(1) or b""), pdf)
    pdf_path.write_bytes(pdf)


def find_chromium() -> str | None:
    import os
    import shutil

    if os.environ.get("MOE_LAB_CHROMIUM"):
        return shutil.which(os.environ["MOE_LAB_CHROMIUM"])
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-pdf", action="store_true")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when index.html is out of date")
    ap.add_argument("--allow-missing", action="store_true", help="a figure missing from its cell becomes a text slide")
    args = ap.parse_args(argv)
    page, warnings = build_html(args.allow_missing)
    for w in warnings:
        print("warning: " + w, file=sys.stderr)
    index = args.out / "index.html"
    if args.check:
        ok = index.exists() and index.read_text(encoding="utf-8") == page
        if not ok:
            print(f"{index} is out of date: run python scripts/build_slides.py", file=sys.stderr)
        return 0 if ok else 1
    args.out.mkdir(parents=True, exist_ok=True)
    index.write_text(page, encoding="utf-8")
    print(f"{index}: {len(SLIDES)} slides, {index.stat().st_size / 1e3:.0f} kB", file=sys.stderr)
    if not args.no_pdf:
        chromium = find_chromium()
        if chromium is None:
            raise SystemExit("build_slides: no Chromium for the PDF (bash scripts/install_browser.sh, or MOE_LAB_CHROMIUM); "
                             "--no-pdf builds the HTML only")
        build_pdf(index, args.out / "slides.pdf", chromium)
        print(f"{args.out / 'slides.pdf'}: {(args.out / 'slides.pdf').stat().st_size / 1e3:.0f} kB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
