"""The demo page at `/`, in a real browser: headless Chromium loads it from `bertcache serve`, input is
typed and sent with a mouse click, and what the page shows is read back and compared with what POST
/predict answers for the same input: a classifier's label and bars (then a basic accessibility check:
every input labelled, text contrast >= 4.5:1 from the page's computed colours), a pair head's two text
boxes, a multi-label head's labels over their thresholds, a regression head's score, and each task's
own test metrics in the model panel. The classifier's screenshot is kept in tests/artifacts/demo.png
(and the test's tmp folder)."""
import json
import os
import shutil
import subprocess
import urllib.request
import warnings
from contextlib import contextmanager

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("websockets", reason="the DevTools client needs websockets (pip install 'bertcache[test]')")

import pipeline as bc  # noqa: E402
from cdp import TEXT_COLOURS_JS, UNLABELLED_JS, Browser, contrast_ratio, find_chromium  # noqa: E402
from conftest import LABEL_NAMES  # noqa: E402
from helpers import start_server  # noqa: E402
from test_tasks import paired_texts, scored_texts, tagged_texts, write_jsonl  # noqa: E402

ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
LABELS = LABEL_NAMES
SENTENCE = "这个东西真的很好，推荐"
NONE = "无 · none over its threshold"  # the page's answer when no label is over its threshold


@pytest.fixture(scope="module")
def checkpoint(named_checkpoint):
    return named_checkpoint


def cjk_fonts() -> set[str]:
    """Font families fontconfig says cover Chinese (empty when fc-list is absent)."""
    if not shutil.which("fc-list"):
        return set()
    out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True).stdout
    return {name.strip() for line in out.splitlines() for name in line.split(",")}


def task_checkpoint(tiny_model, folder, rows, fit, **extract_options) -> str:
    """A checkpoint of the tiny model over `rows(n, seed)` (a few rows per split), trained by `fit(features,
    out)`: a head of another task or shape than the classifier's, quickly."""
    for split, n, seed in (("train", 60, 1), ("validation", 20, 2), ("test", 20, 3)):
        write_jsonl(str(folder / "data" / f"{split}.jsonl"), rows(n, seed))
    features = bc.extract(tiny_model, str(folder / "data"), str(folder / "f.h5"), precision="fp32", device="cpu",
                          progress=False, **extract_options)
    return fit(features, str(folder / "ck"))


@pytest.fixture(scope="module")
def pair_checkpoint(tiny_model, one_thread, tmp_path_factory):
    """A classifier of sentence pairs encoded apart (pair_mode bi): same kind of mark or not."""
    return task_checkpoint(tiny_model, tmp_path_factory.mktemp("demo-pairs"), paired_texts,
                           lambda f, out: bc.fit_head(f, out, pooling="cos:mean+pair:mean", epochs=5, device="cpu")[0],
                           text_column="a", text_pair_column="b", pair_mode="bi")


@pytest.fixture(scope="module")
def multilabel_checkpoint(tiny_model, one_thread, tmp_path_factory):
    """A multi-label head (neg, pos): the sweep's winner, an ensemble here (the head the page described as
    "ensemble undefined")."""
    return task_checkpoint(tiny_model, tmp_path_factory.mktemp("demo-multilabel"), tagged_texts,
                           lambda f, out: bc.sweep(f, out, poolings=["mean", "cls"], heads=["linear"], lrs=[1e-2],
                                                   epochs=10, progress=False, device="cpu", folds=1)[0])


@pytest.fixture(scope="module")
def regression_checkpoint(tiny_model, one_thread, tmp_path_factory):
    return task_checkpoint(tiny_model, tmp_path_factory.mktemp("demo-regression"), scored_texts,
                           lambda f, out: bc.fit_head(f, out, pooling="mean", epochs=10, device="cpu")[0])


def get_json(url: str, body: dict | None = None) -> dict:
    """GET url, or POST body as JSON to it; the answer's JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.load(r)


@contextmanager
def demo_page(checkpoint: str):
    """`bertcache serve CHECKPOINT` and a headless Chromium on its demo page, once the model panel is filled:
    yields (browser, server url). Skips where no Chromium is installed."""
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine: apt-get install chromium (.ci/run installs it), or set $CHROMIUM")
    proc, url, _ = start_server(checkpoint)
    try:
        with Browser(binary) as browser:
            browser.goto(url + "/")
            browser.wait_for("document.getElementById('model').dataset.loaded === '1'")
            yield browser, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ask(browser: Browser, url: str, text: str, pair: str | None = None) -> tuple[dict, dict]:
    """Type `text` (and `pair` into the second box), click the button, wait for the answer; returns what the
    page shows (answer, bars {name: percent}, chosen bars, history, page text) and POST /predict's answer to
    the same input. The page shows no error, no "undefined" and no "NaN"."""
    browser.evaluate("document.querySelectorAll('textarea').forEach(box => { box.value = ''; })")
    browser.click("#text")
    browser.type(text)
    if pair is not None:
        browser.click("#pair")
        browser.type(pair)
    # The page rebuilds its history list after each answer: emptied here, it fills again when the answer is in.
    browser.evaluate("document.getElementById('history').textContent = ''")
    browser.click("#go")
    browser.wait_for("document.querySelectorAll('#history li').length > 0 || !document.getElementById('error').hidden")
    error = browser.evaluate("(e => e.hidden ? '' : e.textContent)(document.getElementById('error'))")
    assert not error, error
    shown = browser.evaluate("""({answer: document.getElementById('answer').textContent,
        bars: Object.fromEntries([...document.querySelectorAll('#bars .row')].map(r =>
              [r.querySelector('.name').textContent, r.querySelector('.pct').textContent])),
        chosen: [...document.querySelectorAll('#bars .row.on .name')].map(n => n.textContent),
        history: document.getElementById('history').innerText, page: document.body.innerText})""")
    assert "undefined" not in shown["page"] and "NaN" not in shown["page"], shown["page"]
    want = get_json(url + "/predict", {"pairs": [[text, pair]]} if pair is not None else {"texts": [text]})
    return shown, want["predictions"][0]


def percents(probabilities: dict) -> dict:
    return {name: f"{100 * p:.1f}%" for name, p in probabilities.items()}


def model_panel(browser: Browser, url: str, *names: str) -> str:
    """The model panel's text, checked against /info: every test metric by `names` with its value, the row count,
    the head's shape (an ensemble's member count) and no "undefined" / "NaN"."""
    model = browser.evaluate("document.getElementById('model').innerText")
    info = get_json(url + "/info")
    values = {k: v for k, v in info["test"].items() if k != "n"}
    assert len(values) == len(names)
    for name, value in zip(names, values.values()):
        assert f"test {name}\n{value:.4f}" in model, (name, model)
    assert f"test rows\n{info['test']['n']}" in model
    head = info["head"]
    assert (f"ensemble of {len(head['members'])} heads → {head['num_classes']}" if head["type"] == "ensemble"
            else f"{head['type']} {head['in_features']} → {head['num_classes']}") in model
    assert "undefined" not in model and "NaN" not in model, model
    return model


def assert_accessible(browser: Browser) -> None:
    """Labelled inputs, WCAG AA text contrast, bars distinguishable from their track."""
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


@pytest.mark.slow
def test_demo_page_in_headless_chromium(checkpoint, tmp_path):
    with demo_page(checkpoint) as (browser, url):
        assert browser.evaluate("document.documentElement.lang") == "zh"
        # The model and its test metrics, from /info.
        model = model_panel(browser, url, "accuracy", "macro-F1")
        assert "cls+mean" in model and "classification" in model
        assert browser.evaluate("document.getElementById('pairrow').hidden")  # one text box

        shown, want = ask(browser, url, SENTENCE)
        assert browser.evaluate("document.getElementById('text').value") == SENTENCE
        assert shown["answer"] == want["label"]
        assert shown["bars"] == percents(want["probabilities"]) and shown["chosen"] == [want["label"]]
        assert SENTENCE in shown["history"] and f"{want['label']} ({100 * want['probabilities'][want['label']]:.1f}%)" \
            in shown["history"]
        screenshot = browser.screenshot(str(tmp_path / "demo.png"))

        # Chinese is drawn with a font that has the glyphs (not boxes), where fontconfig knows one.
        used = {f["familyName"] for f in browser.fonts_for("#answer") if f["glyphCount"]}
        if cjk_fonts():
            assert used & cjk_fonts(), f"the label was drawn with {used}, none of which covers Chinese"
        else:
            warnings.warn("no Chinese font installed (fc-list :lang=zh is empty): apt-get install "
                          "fonts-wqy-microhei; the page would show boxes")
        assert_accessible(browser)
    os.makedirs(ARTIFACTS, exist_ok=True)
    shutil.copyfile(screenshot, os.path.join(ARTIFACTS, "demo.png"))
    assert os.path.getsize(screenshot) > 5000


@pytest.mark.slow
def test_demo_page_sends_a_pair_to_a_pair_head(pair_checkpoint):
    with demo_page(pair_checkpoint) as (browser, url):
        model = model_panel(browser, url, "accuracy", "macro-F1")
        assert "pairs (bi)" in model
        assert not browser.evaluate("document.getElementById('pairrow').hidden")  # a second, labelled text box
        shown, want = ask(browser, url, "好棒赞喜欢", "满意推荐")
        assert (want["text"], want["text_pair"]) == ("好棒赞喜欢", "满意推荐")
        assert shown["answer"] == want["label"] and shown["bars"] == percents(want["probabilities"])
        assert "好棒赞喜欢 | 满意推荐" in shown["history"]
        assert_accessible(browser)
        # From the history, both texts come back.
        browser.evaluate("document.getElementById('text').value = ''; document.getElementById('pair').value = ''")
        browser.click("#history button")
        assert browser.evaluate("[document.getElementById('text').value, document.getElementById('pair').value]") \
            == ["好棒赞喜欢", "满意推荐"]


@pytest.mark.slow
def test_demo_page_shows_a_multilabel_heads_labels(multilabel_checkpoint):
    with demo_page(multilabel_checkpoint) as (browser, url):
        model = model_panel(browser, url, "micro-F1", "macro-F1", "subset accuracy")
        assert "multilabel" in model and "thresholds" in model
        assert get_json(url + "/info")["head"]["type"] == "ensemble", "the sweep was meant to pick an ensemble"
        shown, want = ask(browser, url, "好棒赞喜欢满意")
        assert want["labels"], "the input was meant to get at least one label"
        assert shown["answer"] == ", ".join(want["labels"])
        assert shown["bars"] == percents(want["probabilities"]) and shown["chosen"] == want["labels"]
        for name in want["labels"]:
            assert f"{name} ({100 * want['probabilities'][name]:.1f}%)" in shown["history"]
        # Another input: the labels over their thresholds (if none, the page says so).
        shown, want = ask(browser, url, "差烂坏糟")
        assert shown["answer"] == (", ".join(want["labels"]) or NONE) and shown["chosen"] == want["labels"]
        assert shown["history"].index("差烂坏糟") < shown["history"].index("好棒赞喜欢满意")  # newest first


@pytest.mark.slow
def test_demo_page_shows_a_regression_heads_score(regression_checkpoint):
    with demo_page(regression_checkpoint) as (browser, url):
        model_panel(browser, url, "spearman", "pearson", "mse", "mae")
        assert browser.evaluate("document.getElementById('go').textContent") == "打分 · Score"
        shown, want = ask(browser, url, "好棒赞差")
        assert shown["answer"] == f"{want['score']:.4f}" and shown["bars"] == {}
        assert f"好棒赞差 → {want['score']:.4f}" in shown["history"]
