"""The demo page at `/`, in a real browser: headless Chromium loads it from `bertcache serve`, a Chinese
sentence is typed and sent with a mouse click, and the label shown is read back; then a basic
accessibility check (every input labelled, text contrast >= 4.5:1 from the page's computed colours).
The screenshot is kept in tests/artifacts/demo.png (and the test's tmp folder)."""
import os
import shutil
import subprocess
import warnings

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("websockets", reason="the DevTools client needs websockets (pip install 'bertcache[test]')")

import pipeline as bc  # noqa: E402
from cdp import TEXT_COLOURS_JS, UNLABELLED_JS, Browser, contrast_ratio, find_chromium  # noqa: E402
from conftest import LABEL_NAMES  # noqa: E402
from helpers import start_server  # noqa: E402

ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
LABELS = LABEL_NAMES
SENTENCE = "这个东西真的很好，推荐"


@pytest.fixture(scope="module")
def checkpoint(named_checkpoint):
    return named_checkpoint


def cjk_fonts() -> set[str]:
    """Font families fontconfig says cover Chinese (empty when fc-list is absent)."""
    if not shutil.which("fc-list"):
        return set()
    out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True).stdout
    return {name.strip() for line in out.splitlines() for name in line.split(",")}


@pytest.mark.slow
def test_demo_page_in_headless_chromium(checkpoint, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (.ci/run installs it), or set $CHROMIUM")
    want = bc.Predictor(checkpoint, device="cpu").predict([SENTENCE])[0]
    proc, url, _ = start_server(checkpoint)
    try:
        with Browser(binary) as browser:
            browser.goto(url + "/")
            assert browser.evaluate("document.documentElement.lang") == "zh"
            # The model and its test metrics, from /info.
            browser.wait_for("document.getElementById('model').dataset.loaded === '1'")
            model = browser.evaluate("document.getElementById('model').innerText")
            assert "test accuracy" in model and "cls+mean" in model

            browser.click("#text")
            browser.type(SENTENCE)
            assert browser.evaluate("document.getElementById('text').value") == SENTENCE
            browser.click("#go")
            shown = browser.wait_for("(t => t !== '—' && t)(document.getElementById('answer').textContent)")
            assert shown == want["label"]
            bars = browser.evaluate("[...document.querySelectorAll('#bars .row')].map(r => "
                                    "[r.querySelector('.name').textContent, r.querySelector('.pct').textContent])")
            assert {name: pct for name, pct in bars} == {n: f"{100 * p:.1f}%" for n, p in want["probabilities"].items()}
            history = browser.evaluate("document.getElementById('history').innerText")
            assert SENTENCE in history and f"({100 * want['probabilities'][want['label']]:.1f}%)" in history
            screenshot = browser.screenshot(str(tmp_path / "demo.png"))

            # Chinese is drawn with a font that has the glyphs (not boxes), where fontconfig knows one.
            used = {f["familyName"] for f in browser.fonts_for("#answer") if f["glyphCount"]}
            if cjk_fonts():
                assert used & cjk_fonts(), f"the label was drawn with {used}, none of which covers Chinese"
            else:
                warnings.warn("no Chinese font installed (fc-list :lang=zh is empty): apt-get install "
                              "fonts-wqy-microhei; the page would show boxes")

            # Accessibility basics: labelled inputs, WCAG AA text contrast, bars distinguishable from their track.
            assert browser.evaluate(UNLABELLED_JS) == []
            colours = browser.evaluate(TEXT_COLOURS_JS)
            assert len(colours) > 10
            low = [(round(contrast_ratio(c["fg"], c["bg"]), 2), c) for c in colours
                   if contrast_ratio(c["fg"], c["bg"]) < 4.5]
            assert not low, low
            fill, track = browser.evaluate(
                "['.fill', '.bar'].map(s => (getComputedStyle(document.querySelector(s)).backgroundColor"
                ".match(/[\\d.]+/g) || []).map(Number))")
            assert contrast_ratio(fill, track) >= 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    os.makedirs(ARTIFACTS, exist_ok=True)
    shutil.copyfile(screenshot, os.path.join(ARTIFACTS, "demo.png"))
    assert os.path.getsize(screenshot) > 5000
