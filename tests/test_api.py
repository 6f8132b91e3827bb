"""The Python API in the ecosystem's shape: one string or a list, the sweep's checks in the API, the
extraction bar in tokens, and `bertcache quickstart` (its steps on the tiny model and a tiny corpus)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pipeline.cli import QUICKSTART_TEXTS
from pipeline.errors import UserError
from pipeline.extract import extract
from pipeline.predict import Predictor
from pipeline.sweep import sweep
from pipeline.train import fit_head
from conftest import default_splits, write_split_files
from helpers import ok, python_lines

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split_files(str(tmp_path_factory.mktemp("data")), "jsonl", default_splits(n_train=80))


@pytest.fixture(scope="module")
def cache(tiny_model, data, tmp_path_factory):
    return extract(tiny_model, data, str(tmp_path_factory.mktemp("f") / "f.h5"), precision="fp32", layers=2,
                   progress=False)


@pytest.fixture(scope="module")
def predictor(cache, tmp_path_factory):
    ckpt, _ = fit_head(cache, str(tmp_path_factory.mktemp("ck") / "ck"), pooling="mean", epochs=5)
    return Predictor(ckpt, device="cpu")


def test_one_string_gives_one_result(predictor):
    text = "这个东西好棒"
    one = predictor.predict(text)
    assert isinstance(one, dict) and one["text"] == text and one["label"] in predictor.label_names
    listed = predictor.predict([text])
    assert isinstance(listed, list) and listed == [one]
    proba = predictor.predict_proba(text)
    assert proba.shape == (2,) and np.isclose(proba.sum(), 1, atol=1e-6)
    assert np.allclose(proba, predictor.predict_proba([text])[0])
    texts = ["好棒", "差烂坏", "我们买了"]
    assert [r["text"] for r in predictor.predict(t for t in texts)] == texts  # any iterable, order kept
    assert predictor.predict_proba(tuple(texts)).shape == (3, 2)
    assert predictor.predict([]) == [] and predictor.predict_proba([]).shape == (0, 2)
    for bad in (None, 3, ["好", 4], b"bytes"):
        with pytest.raises(UserError):
            predictor.predict(bad)


def test_sweep_takes_lists_or_comma_strings_and_checks_them(cache, tmp_path):
    common = dict(epochs=2, progress=False)
    _, ranked, _ = sweep(cache, str(tmp_path / "a"), poolings="mean, cls", heads="linear", lrs="1e-2,1e-3",
                         weight_decays="0", **common)
    _, again, _ = sweep(cache, str(tmp_path / "b"), poolings=["mean", "cls"], heads=["linear"], lrs=[1e-2, 1e-3],
                        weight_decays=[0.0], **common)
    ranked, again = ([r for r in rows if r["head"] != "ensemble"] for rows in (ranked, again))
    assert len(ranked) == 4 and [(r["pooling"], r["lr"]) for r in ranked] == [(r["pooling"], r["lr"]) for r in again]
    with pytest.raises(UserError, match="--sweep-lrs"):
        sweep(cache, str(tmp_path / "c"), lrs="fast", **common)
    with pytest.raises(UserError, match="positive"):
        sweep(cache, str(tmp_path / "c"), lrs=[-1e-3], **common)
    with pytest.raises(UserError, match="rnn"):
        sweep(cache, str(tmp_path / "c"), heads="linear,rnn", **common)


def test_extract_bar_counts_tokens(tiny_model, data, tmp_path, capfd):
    extract(tiny_model, data, str(tmp_path / "f.h5"), precision="fp32", progress=True, chunk_rows=64)
    err = capfd.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    # tokens done / tokens in all: the estimate of the total is exact once every chunk is tokenized
    m = re.search(r"extract: 100%.*?([\d.]+k?)/([\d.]+k?) \[.*tok/s, 160/160 texts\]", last)
    assert m and m.group(1) == m.group(2), last


def test_quickstart_runs_its_steps(tiny_model, data, tmp_path):
    features, ckpt = tmp_path / "f.h5", tmp_path / "sweep"
    result = ok("quickstart", "--model", tiny_model, "--data", data, "--prefix", "这", "--layers", 2,
                "--features", features, "--checkpoint", ckpt)
    out, err = result.stdout, result.stderr
    assert [line for line in err.splitlines() if line.startswith("== ")] == [
        f"== 1/4 extract: {tiny_model} over the {data} texts (once; a rerun resumes or skips)",
        "== 2/4 fit-head --sweep: poolings x heads x learning rates, picked by validation",
        "== 3/4 evaluate on test", "== 4/4 predict"]
    assert f"{features}: train 80, validation 40, test 40 rows" in out  # extract's summary
    assert re.search(r"^ +1  \S+ +(linear|mlp|logreg|ensemble) ", out, re.M)  # the sweep's ranked table
    assert re.search(r"^split test: n 40  accuracy [\d.]+  macro-F1", out, re.M)  # evaluate
    predictions = [line.split("\t") for line in out.splitlines() if line.count("\t") == 2]
    assert [p[2] for p in predictions] == list(QUICKSTART_TEXTS)
    assert (ckpt / "sweep.json").exists() and "table of the sweep" in err


def test_predict_on_raw_text_leaves_h5py_unimported(predictor):
    """A one-off `predict` pays its imports on every call: it reads no features file, so h5py (0.15 s) stays out."""
    code = ("import sys; from pipeline.predict import Predictor; "
            f"print(Predictor({predictor.checkpoint!r}, device='cpu').predict(['很好'])[0]['label'] is not None, "
            "'h5py' in sys.modules)")
    assert python_lines(code, HF_HUB_OFFLINE="1")[-1].split() == ["True", "False"]
