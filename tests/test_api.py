"""The Python API in the ecosystem's shape: one string or a list, the sweep's checks in the API, the ranges
of the command's numeric options checked by the functions too, the extraction bar in tokens, and `bertcache
quickstart` (its steps on the tiny model and a tiny corpus)."""
from __future__ import annotations

import json
import re

import click
import numpy as np
import pytest

from pipeline import defaults as D
from pipeline.cli import QUICKSTART_TEXTS, cli
from pipeline.errors import UserError
from pipeline.extract import extract
from pipeline.predict import Predictor, evaluate
from pipeline.sweep import sweep
from pipeline.train import fit_head
from pipeline.tuned import fit_tuned
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
    with pytest.raises(UserError, match=r"lrs \(--sweep-lrs\) must be a number greater than 0, not -0.001"):
        sweep(cache, str(tmp_path / "c"), lrs=[-1e-3], **common)
    with pytest.raises(UserError, match="rnn"):
        sweep(cache, str(tmp_path / "c"), heads="linear,rnn", **common)


# What the command's click options refuse, the functions refuse too (docs/api.md: the same one-line UserError):
# (function, its arguments, the parameter the message names, the bad value it shows).
OUT_OF_RANGE = [
    ("fit_head", dict(head="mlp", hidden=0), "hidden", "0"),
    ("fit_head", dict(patience=-1), "patience", "-1"),
    ("fit_head", dict(head="mlp", dropout=1.5), "dropout", "1.5"),
    ("fit_head", dict(label_smoothing=2), "label_smoothing", "2"),
    ("fit_head", dict(weight_decay=-1), "weight_decay", "-1"),
    ("fit_head", dict(epochs=0), "epochs", "0"),
    ("fit_head", dict(epochs=2.5), "epochs", "2.5"),
    ("fit_head", dict(lr=0.0), "lr", "0.0"),
    ("fit_head", dict(batch_size=0), "batch_size", "0"),
    ("sweep", dict(lrs=[1e-3, -1e-3]), "every value of lrs (--sweep-lrs)", "-0.001"),
    ("sweep", dict(weight_decays="0,-0.1"), "every value of weight_decays (--sweep-weight-decays)", "-0.1"),
    ("sweep", dict(dropout=1.0), "dropout", "1.0"),
    ("sweep", dict(patience=-2), "patience", "-2"),
    ("fit_tuned", dict(layer_lr=0), "layer_lr", "0"),
    ("fit_tuned", dict(head_lr=-1e-4), "head_lr", "-0.0001"),
    ("fit_tuned", dict(batch_tokens=0), "batch_tokens", "0"),
    ("fit_tuned", dict(epochs=0), "epochs", "0"),
    ("fit_tuned", dict(hidden=0), "hidden", "0"),  # an option of the probe
    ("evaluate", dict(errors=-1), "errors", "-1"),
]


@pytest.mark.parametrize("function, options, name, value", OUT_OF_RANGE)
def test_functions_refuse_what_the_command_refuses(cache, predictor, tmp_path, function, options, name, value):
    out = tmp_path / "out"
    call = {"fit_head": lambda: fit_head(cache, str(out), **{"epochs": 3, **options}),
            "sweep": lambda: sweep(cache, str(out), progress=False, **{"epochs": 2, **options}),
            "fit_tuned": lambda: fit_tuned(cache, 1, str(out), **options),
            "evaluate": lambda: evaluate(predictor.checkpoint, **options)}[function]
    with pytest.raises(UserError) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{name} must be ") and message.endswith(f", not {value}")
    assert not out.exists()  # refused before any work


def test_the_ends_of_each_range_are_taken(cache, predictor, tmp_path):
    _, metrics = fit_head(cache, str(tmp_path / "a"), pooling="mean", head="mlp", hidden=1, dropout=0.0, epochs=3,
                          weight_decay=0, batch_size=1, patience=0, label_smoothing=0.0)
    assert metrics["epochs_run"] == 3  # patience 0: never stop early
    _, metrics = fit_head(cache, str(tmp_path / "b"), pooling="mean", epochs=2, patience=None, lr=1e-9)
    assert metrics["epochs_run"] == 2
    assert "errors" not in evaluate(predictor.checkpoint, errors=0)


def test_the_command_takes_its_ranges_from_the_same_bounds():
    """Every numeric click option named in defaults.BOUNDS refuses what the Python check refuses."""
    seen = set()
    for command in cli.commands.values():
        for param in command.params:
            bound = D.BOUNDS.get(param.name)
            if bound is None or not isinstance(param.type, click.types._NumberRangeBase):
                continue
            t = param.type
            assert (t.min, t.max, t.min_open, t.max_open) == (bound.low, bound.high, bound.low_open, bound.high_open)
            assert isinstance(t, click.IntRange if bound.kind is int else click.FloatRange), param.name
            seen.add(param.name)
    assert seen == set(D.BOUNDS) - {"lrs", "weight_decays", "validation_fraction"}  # the sweep's grids are text


def test_extract_bar_counts_tokens(tiny_model, data, tmp_path, capfd):
    extract(tiny_model, data, str(tmp_path / "f.h5"), precision="fp32", progress=True, chunk_rows=64)
    err = capfd.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    # tokens done / tokens in all: the estimate of the total is exact once every chunk is tokenized
    m = re.search(r"extract: 100%.*?([\d.]+k?)/([\d.]+k?) \[.*tok/s, 160/160 texts saved\]", last)
    assert m and m.group(1) == m.group(2), last


def test_extract_bar_into_a_log_file_draws_a_frame_seldom(tiny_model, data, tmp_path, capfd, monkeypatch):
    """stderr not a terminal: not tqdm's ten frames a second (thousands of \r-joined frames in a long run's log)."""
    import time

    from pipeline.encoder import Encoder
    original = Encoder.encode_ids

    def slow(self, ids, on_progress=None, **kwargs):  # every batch 0.15 s: as a real model on real data
        def tick(n):
            time.sleep(0.15)
            on_progress(n)
        return original(self, ids, on_progress=tick if on_progress else None, **kwargs)
    monkeypatch.setattr(Encoder, "encode_ids", slow)
    extract(tiny_model, data, str(tmp_path / "f.h5"), precision="fp32", progress=True, batch_tokens=128)
    err = capfd.readouterr().err
    assert err.count("\r") <= 8, err  # the bar's start, a frame per chunk of rows written (4 here), the end


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


def test_numpy_numbers_are_taken_as_their_python_numbers(cache, tmp_path):
    """A script's np.int64 (from np.arange, a DataFrame) as epochs or seed: the checkpoint's JSON holds the number
    (json refused numpy's integers after the training ran)."""
    ckpt, metrics = fit_head(cache, str(tmp_path / "np"), pooling="mean", epochs=np.int64(2), seed=np.int64(1))
    assert metrics["epochs_run"] == 2
    config = json.loads((tmp_path / "np" / "config.json").read_text())
    assert config["training"]["epochs"] == 2 and config["training"]["seed"] == 1
