"""The workshop deck in a real browser (issue 27, item 4): headless Chromium (the system's, as in
test_browser_explorer.py) opens docs/slides/index.html from disk and checks that every slide renders
(visible, non-empty text, its figure loaded with a real size), that nothing is requested from the
network, and that the deck is what scripts/build_slides.py builds today (deterministic, up to date).
Skipped, with the reason, where no Chromium or Playwright can be found."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DECK = ROOT / "docs" / "slides" / "index.html"
PDF = ROOT / "docs" / "slides" / "slides.pdf"
spec = importlib.util.spec_from_file_location("build_slides", ROOT / "scripts" / "build_slides.py")
bs = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bs  # dataclasses look their module up
spec.loader.exec_module(bs)


def chromium() -> str | None:
    if os.environ.get("MOE_LAB_CHROMIUM"):
        return shutil.which(os.environ["MOE_LAB_CHROMIUM"])
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")) if p), None)


def test_the_deck_is_built_from_the_notebooks_and_up_to_date():
    assert len(bs.SLIDES) >= 15
    unnamed = [s.title for s in bs.SLIDES[2:-1] if not s.notebook and not re.search(r"\b0\d cells? [0-9a-f]{8}", " ".join(s.points))]
    assert not unnamed, f"every content slide names its notebook and cell: {unnamed}"
    assert sum(bool(s.notebook and s.figure) for s in bs.SLIDES) >= 15, "the workshop deck has at least 15 figures"
    page, _ = bs.build_html(allow_missing=True)
    assert page == bs.build_html(allow_missing=True)[0], "the build is not deterministic"
    assert DECK.exists(), "run python scripts/build_slides.py"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_slides.py"), "--check", "--allow-missing"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert DECK.stat().st_size < 2_000_000, f"the deck is {DECK.stat().st_size} bytes: shrink its figures"
    assert PDF.exists() and PDF.read_bytes()[:5] == b"%PDF-" and PDF.stat().st_size < 4_000_000
    for url in ("http://", "https://", "//cdn"):
        assert f'src="{url}' not in page and f"href=\"{url}" not in page


def test_a_slide_naming_a_missing_cell_fails_clearly(monkeypatch):
    monkeypatch.setattr(bs, "SLIDES", [bs.Slide("x", "00_quickstart", "no-such-id", ["p"])])
    with pytest.raises(SystemExit, match="no cell with id 'no-such-id'"):
        bs.build_html()


def test_every_slide_renders_offline():
    path = chromium()
    if path is None:
        pytest.skip("no Chromium found (bash scripts/install_browser.sh, or MOE_LAB_CHROMIUM=/path/to/chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (the browser extra)")
    requests, errors = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(DECK.resolve().as_uri())
            n = page.locator("section.slide").count()
            assert n == len(bs.SLIDES) >= 15
            for i in range(n):
                if i:
                    page.keyboard.press("ArrowRight")
                slide = page.locator("section.slide.current")
                assert slide.count() == 1 and slide.get_attribute("id") == f"s{i + 1}", f"slide {i + 1} is not shown"
                box = slide.bounding_box()
                assert box and box["width"] > 1000 and box["height"] > 600, f"slide {i + 1}: {box}"
                text = slide.inner_text()
                assert len(text.strip()) > 40 and slide.locator("h1").inner_text().strip(), f"slide {i + 1} is empty"
                nb, cell = slide.get_attribute("data-notebook"), slide.get_attribute("data-cell")
                if nb:
                    assert f"notebooks/{nb}.ipynb" in text and cell in text, f"slide {i + 1} does not name its source"
                for img in slide.locator("img").all():
                    ok = img.evaluate("e => e.complete && e.naturalWidth > 100 && e.naturalHeight > 100")
                    assert ok, f"slide {i + 1}: its figure did not load"
                    assert img.bounding_box()["width"] > 300, f"slide {i + 1}: its figure is drawn too small"
        finally:
            browser.close()
    remote = [u for u in requests if not u.startswith(("file:", "data:"))]
    assert not remote, f"the deck requested {remote}"
    assert not errors, errors


def test_a_value_not_in_the_saved_output_fails_or_is_dropped(monkeypatch):
    slide = bs.Slide("x", "06_paper_routing_analysis", "6a510be4", ["saved: {}.", "kept"], figure=False,
                     value=r"(no such text \d+)")
    monkeypatch.setattr(bs, "SLIDES", [bs.Slide("t", points=["title"], figure=False), slide])
    with pytest.raises(SystemExit, match="does not match"):
        bs.build_html()
    page, warnings = bs.build_html(allow_missing=True)
    assert "kept" in page and "saved:" not in page and len(warnings) == 1
