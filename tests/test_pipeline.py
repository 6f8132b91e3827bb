"""Issue 2: the two-stage pipeline end to end, on a tiny random BERT and small real files."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

import pipeline as bc
from pipeline import plots
from pipeline.checkpoint import load_checkpoint
from pipeline.data import load_corpus
from pipeline.encoder import Encoder
from pipeline.poolings import build_features, pooling_features
from pipeline.store import FeatureStore
from conftest import default_splits, make_texts, write_split_files
from helpers import child_env, ok, one_line_error, run


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory):
    return write_split_files(str(tmp_path_factory.mktemp("csv")), "csv", default_splits())


@pytest.fixture(scope="module")
def cache(tiny_model, csv_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("features") / "f.h5")
    return bc.extract(tiny_model, csv_data, out, precision="fp32", layers=2, progress=False)


# -- data sources --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_file_format_loads_the_same_rows(tmp_path, fmt):
    splits = default_splits(n_train=20, n_val=6, n_test=6)
    corpus = load_corpus(write_split_files(str(tmp_path), fmt, splits))
    assert list(corpus.splits) == ["train", "validation", "test"]
    for name, rows in splits.items():
        assert list(corpus.splits[name].texts) == [t for t, _ in rows]  # parquet: a TextColumn
        assert corpus.splits[name].labels.tolist() == [y for _, y in rows]
    assert corpus.label_names == ["0", "1"]


def test_save_to_disk_with_classlabel_names(saved_dataset):
    corpus = load_corpus(saved_dataset)
    assert corpus.label_names == ["负向评价", "正向评价"]
    assert set(corpus.splits) == {"train", "validation", "test"}


def test_save_to_disk_texts_stay_in_arrow_and_match_the_same_rows_as_jsonl(tmp_path, tiny_model):
    import datasets
    from pipeline.data import TextColumn
    from pipeline.fingerprints import data_fingerprint
    rows = make_texts(40, seed=5)
    texts = [t for t, _ in rows]
    texts[3], texts[17], texts[30] = "   ", None, "\t\n"  # blank or missing: skipped either way
    labels = [y for _, y in rows]
    # A shuffled selection: the folder keeps an indices mapping that reading must honour.
    order = list(range(40))[::-1]
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels}).select(order)
    ds.save_to_disk(str(tmp_path / "saved"))
    with open(tmp_path / "train.jsonl", "w", encoding="utf-8") as f:
        for i in order:
            f.write(json.dumps({"text": texts[i], "label": labels[i]}, ensure_ascii=False) + "\n")
    arrow, plain = (load_corpus(str(p)).splits["train"] for p in (tmp_path / "saved", tmp_path / "train.jsonl"))
    assert isinstance(arrow.texts, TextColumn) and isinstance(plain.texts, list)
    assert list(arrow.texts) == plain.texts and len(plain.texts) == 37
    assert arrow.texts[5] == plain.texts[5] and arrow.texts[-1] == plain.texts[-1]
    assert list(arrow.texts[10:20]) == plain.texts[10:20]
    assert arrow.labels.tolist() == plain.labels.tolist() and arrow.rows.tolist() == plain.rows.tolist()
    assert data_fingerprint(arrow.texts, arrow.labels, arrow.rows) == data_fingerprint(plain.texts, plain.labels,
                                                                                        plain.rows)
    a = bc.extract(tiny_model, str(tmp_path / "saved"), str(tmp_path / "a.h5"), precision="fp32", progress=False,
                   chunk_rows=8)
    with FeatureStore(a) as store:
        assert store.rows("train") == 37


def test_single_dataset_file_and_dev_alias(tmp_path):
    import datasets
    rows = make_texts(10)
    datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).save_to_disk(
        str(tmp_path / "single"))
    assert list(load_corpus(str(tmp_path / "single")).splits) == ["train"]
    write_split_files(str(tmp_path / "dev"), "jsonl", {"train": rows, "dev": rows[:4]})
    assert list(load_corpus(str(tmp_path / "dev")).splits) == ["train", "validation"]
    one = write_split_files(str(tmp_path / "one"), "csv", {"reviews": rows})
    assert list(load_corpus(os.path.join(one, "reviews.csv")).splits) == ["train"]


def test_string_labels_sorted_or_fixed_by_label_names(tmp_path):
    names = {0: "neg", 1: "pos"}
    folder = write_split_files(str(tmp_path), "jsonl", default_splits(n_train=10, n_val=4, n_test=4),
                               label_fn=lambda y: names[y])
    assert load_corpus(folder).label_names == ["neg", "pos"]
    corpus = load_corpus(folder, label_names=["pos", "neg"])
    assert corpus.label_names == ["pos", "neg"]
    raw = [y for _, y in default_splits(n_train=10, n_val=4, n_test=4)["train"]]
    assert corpus.splits["train"].labels.tolist() == [1 - y for y in raw]


def test_unlabelled_test_rows_are_cached_and_left_out_of_metrics(tiny_model, tmp_path):
    splits = default_splits(n_train=40, n_val=10, n_test=10)
    folder = write_split_files(str(tmp_path / "d"), "jsonl", splits)
    with open(os.path.join(folder, "test.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "今天不错", "label": -1}) + "\n")
        f.write(json.dumps({"text": "我爱北京", "label": None}) + "\n")
    path = bc.extract(tiny_model, folder, str(tmp_path / "f.h5"), precision="fp32", progress=False)
    with FeatureStore(path) as store:
        assert store.rows("test") == 12
        assert (store.labels("test") == -1).sum() == 2
    ckpt, metrics = bc.fit_head(path, str(tmp_path / "ck"), epochs=5)
    assert metrics["test"]["n"] == 10
    assert bc.evaluate(ckpt)["n"] == 10


# -- extraction ----------------------------------------------------------------------------------

def test_cache_layout_and_metadata(cache, tiny_model):
    with h5py.File(cache) as f:
        assert f.attrs["format"] == "bertcache-features" and bool(f.attrs["complete"])
        settings = json.loads(f.attrs["settings"])
        assert settings["model"] == tiny_model and settings["precision"] == "fp32"
        assert settings["max_length"] == 128  # capped by the tiny model's 128 positions
        assert settings["layers"] == [2, 3] and len(settings["model_fingerprint"]) == 32
        assert json.loads(f.attrs["feature_names"]) == ["cls", "mean", "last", "cls_2", "mean_2", "last_2"]
        for split, n in [("train", 160), ("validation", 40), ("test", 40)]:
            assert f[split]["cls"].shape == (n, 32) and f[split]["mean_2"].shape == (n, 32)
            assert f[split]["label"].shape == (n,) and f[split].attrs["rows_done"] == n
            assert f[split]["cls"].dtype == np.float32
    assert not os.path.exists(cache + ".partial")


def test_cached_vectors_match_a_plain_forward_pass(cache, tiny_model, csv_data):
    """[CLS] is last_hidden_state[:, 0] and mean is the attention-masked mean, for one text alone."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(tiny_model), AutoModel.from_pretrained(tiny_model).eval()
    text = load_corpus(csv_data).splits["train"].texts[5]
    with torch.no_grad():
        h = model(**tok(text, return_tensors="pt")).last_hidden_state[0]
    with FeatureStore(cache) as store:
        f = store.features("train", ["cls", "mean"])
    np.testing.assert_allclose(f["cls"][5], h[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(f["mean"][5], h.mean(0).numpy(), atol=1e-5)


def test_padding_independence(tiny_model):
    """A text's vector does not depend on how long its batch neighbours are."""
    enc = Encoder(tiny_model, precision="fp32", device="cpu", layers=2)
    target = "好棒赞这个东西"
    short_batch = [target, "好", "差"]
    long_batch = [target, "这个东西我们买了一次觉得真的很" * 8, "差烂坏" * 30]
    a, b = enc.encode(short_batch), enc.encode(long_batch)
    alone = enc.encode([target])
    for name in enc.feature_names():
        np.testing.assert_allclose(a[name][0], b[name][0], atol=1e-5)
        np.testing.assert_allclose(a[name][0], alone[name][0], atol=1e-5)
    # and the long neighbours really were padded together with it: one batch of width > target
    assert max(len(s) for s in enc.tokenize(long_batch)) > len(enc.tokenize([target])[0]) + 20


def test_token_budget_batches_restore_order(tiny_model):
    enc = Encoder(tiny_model, precision="fp32", device="cpu", batch_tokens=40)
    texts = [t for t, _ in make_texts(30)]
    together = enc.encode(texts)["mean"]
    one_by_one = np.stack([enc.encode([t])["mean"][0] for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_duplicate_texts_get_identical_vectors(tiny_model, tmp_path):
    rows = make_texts(30)
    splits = {"train": rows + rows[:5], "test": rows[:7]}
    folder = write_split_files(str(tmp_path / "d"), "jsonl", splits)
    path = bc.extract(tiny_model, folder, str(tmp_path / "f.h5"), precision="fp32", chunk_rows=8, progress=False)
    with FeatureStore(path) as store:
        train, test = store.features("train")["cls"], store.features("test")["cls"]
    np.testing.assert_array_equal(train[30:35], train[:5])
    np.testing.assert_array_equal(test, train[:7])



def test_first_occurrence_points_every_repeat_at_its_first_text():
    from pipeline.extract import first_occurrence
    splits = [["a", "b", "a", "c"], ["b", "d", "a"], [], ["d"]]
    flat = [t for texts in splits for t in texts]
    expected = [flat.index(t) for t in flat]
    assert first_occurrence(splits).tolist() == expected
    assert first_occurrence([[]]).tolist() == []


def test_files_are_read_row_by_row(tmp_path):
    from pipeline.data import read_file
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('text,label\n"two\nlines, and a comma",1\nplain,0\n', encoding="utf-8")
    assert read_file(str(csv_path), "csv") == {"text": ["two\nlines, and a comma", "plain"], "label": ["1", "0"]}
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "extra": 2}\n', encoding="utf-8")
    assert read_file(str(jsonl), "jsonl") == {"text": ["a", "b"], "label": [1, None], "extra": [None, 2]}
    array = tmp_path / "train.json"
    array.write_text('\ufeff  [{"text": "a", "label": 0}]', encoding="utf-8")
    assert read_file(str(array), "json") == {"text": ["a"], "label": [0]}
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(bc.UserError, match="line 2"):
        read_file(str(jsonl), "jsonl")

# -- heads, parity, many classes -----------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["cls", "mean", "cls+mean-avg2"])
def test_predict_matches_head_on_cached_vectors(cache, csv_data, tmp_path, pooling):
    ckpt, _ = bc.fit_head(cache, str(tmp_path / "ck"), pooling=pooling, epochs=20)
    _, head = load_checkpoint(ckpt)
    with FeatureStore(cache) as store:
        layers = store.settings["layers"]
        X = build_features(store.features("test", pooling_features(pooling, layers)), pooling, layers)
    cached = head.predict_proba(X)
    texts = load_corpus(csv_data).splits["test"].texts
    live = bc.Predictor(ckpt, device="cpu").predict_proba(texts)
    np.testing.assert_allclose(live, cached, atol=1e-4)


def test_eight_classes(tiny_model, tmp_path):
    folder = write_split_files(str(tmp_path / "d"), "parquet", default_splits(8, 320, 80, 80))
    path = bc.extract(tiny_model, folder, str(tmp_path / "f.h5"), precision="fp32", progress=False)
    ckpt, metrics = bc.fit_head(path, str(tmp_path / "ck"), pooling="mean", epochs=100)
    report = bc.evaluate(ckpt)
    assert len(report["confusion_matrix"]) == 8 and report["n"] == 80
    assert report["accuracy"] > 0.5  # chance is 0.125: the head learned the class marks
    probs = bc.Predictor(ckpt, device="cpu").predict_proba(["一一一"])
    assert probs.shape == (1, 8)


def test_checkpoint_files_and_metrics(cache, tmp_path):
    ckpt, metrics = bc.fit_head(cache, str(tmp_path / "ck"), epochs=15, patience=None)
    pictures = ["curves.png"] if plots.available() else []
    assert sorted(os.listdir(ckpt)) == sorted(["best.safetensors", "config.json", "last.safetensors", "metrics.json"]
                                              + pictures)
    saved = json.load(open(os.path.join(ckpt, "metrics.json")))
    assert len(saved["history"]) == 15 and 1 <= saved["best_epoch"] <= 15
    best = saved["history"][saved["best_epoch"] - 1]["val_accuracy"]
    assert best == max(h["val_accuracy"] for h in saved["history"])
    config = json.load(open(os.path.join(ckpt, "config.json")))
    assert config["head"] == {"type": "linear", "in_features": 32, "num_classes": 2, "hidden": None}
    assert config["encoder"]["max_length"] == 128 and config["label_names"] == ["0", "1"]
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


# -- the CLI -------------------------------------------------------------------------------------

def test_cli_round_trip(tiny_model, saved_dataset, tmp_path):
    feats, ckpt = str(tmp_path / "f.h5"), str(tmp_path / "ck")
    out = ok("extract", "--model", tiny_model, "--data", saved_dataset, "--out", feats, "--precision", "fp32",
             "--json")
    info = json.loads(out.stdout)
    assert info["splits"]["train"]["rows"] == 160 and info["label_names"] == ["负向评价", "正向评价"]
    fit = json.loads(ok("fit-head", "--features", feats, "--out", ckpt, "--pooling", "mean", "--head", "mlp",
                        "--epochs", 40, "--json").stdout)
    report = json.loads(ok("evaluate", "--checkpoint", ckpt, "--json").stdout)
    assert {"accuracy", "macro_f1", "confusion_matrix", "n", "per_class"} <= set(report)
    about = json.loads(ok("info", ckpt, "--json").stdout)
    # One word for the class names in every JSON output.
    assert fit["label_names"] == report["label_names"] == about["label_names"] == info["label_names"]
    # extract / info of a cache list the stored vectors as `feature_names`; `features` is the {path,
    # fingerprint} object of the file a checkpoint was trained on.
    assert "features" not in info and {"cls", "mean"} <= set(info["feature_names"])
    assert about["features"] == {"path": os.path.abspath(feats), "fingerprint": info["fingerprint"]}
    # what each command wrote or describes is `path`
    assert (info["path"], fit["path"], about["path"]) == (feats, ckpt, ckpt) and "checkpoint" not in fit
    assert report["n"] == 40 and sum(map(sum, report["confusion_matrix"])) == 40
    lines = ok("predict", "--checkpoint", ckpt, "--json", "好棒赞", "差烂坏").stdout.splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["text"] for r in results] == ["好棒赞", "差烂坏"]
    for r in results:
        assert r["label"] in ("负向评价", "正向评价") and r["label"] == ["负向评价", "正向评价"][r["label_id"]]
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-5
    # the same texts through --file and through stdin give the same answers
    (tmp_path / "texts.txt").write_text("好棒赞\n差烂坏\n", encoding="utf-8")
    assert ok("predict", "-c", ckpt, "--json", "--file", tmp_path / "texts.txt").stdout.splitlines() == lines
    assert ok("predict", "-c", ckpt, "--json", input="好棒赞\n差烂坏\n").stdout.splitlines() == lines
    plain = ok("predict", "-c", ckpt, "好棒赞").stdout.strip().split("\t")
    assert plain[0] == results[0]["label"] and plain[2] == "好棒赞"


# -- bad input -----------------------------------------------------------------------------------

def test_missing_model_path(csv_data, tmp_path):
    result = run("extract", "--model", str(tmp_path / "no-such-model"), "--data", csv_data, "--out", tmp_path / "f.h5")
    one_line_error(result, "no-such-model")
    assert not os.listdir(tmp_path)


def test_hub_model_unreachable_is_one_line(csv_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("extract", "--model", "nobody-xyz/no-such-model", "--data", csv_data, "--out", tmp_path / "f.h5")
    one_line_error(result, "nobody-xyz/no-such-model")


def test_missing_column_lists_the_columns(tiny_model, csv_data, tmp_path):
    result = run("extract", "-m", tiny_model, "-d", csv_data, "-o", tmp_path / "f.h5", "--text-column", "review")
    one_line_error(result, "review", "text, label")
    assert not os.path.exists(tmp_path / "f.h5")


def test_missing_split(tiny_model, cache, tmp_path):
    folder = tmp_path / "nosplits"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    one_line_error(run("extract", "-m", tiny_model, "-d", folder, "-o", tmp_path / "f.h5"), "train")
    ckpt, _ = bc.fit_head(cache, str(tmp_path / "ck"), epochs=2)
    one_line_error(run("evaluate", "-c", ckpt, "--split", "holdout"), "holdout", "train, validation, test",
                   "choose one with --split")


def test_labels_that_are_not_integers_or_names(tiny_model, tmp_path):
    rows = make_texts(10)
    folder = write_split_files(str(tmp_path / "d"), "jsonl", {"train": rows}, label_fn=lambda y: [0.5, "pos"][y])
    one_line_error(run("extract", "-m", tiny_model, "-d", folder, "-o", tmp_path / "f.h5"), "0.5")
    mixed = write_split_files(str(tmp_path / "m"), "jsonl", {"train": rows}, label_fn=lambda y: [0, "pos"][y])
    one_line_error(run("extract", "-m", tiny_model, "-d", mixed, "-o", tmp_path / "f.h5"), "mix")
    assert not os.path.exists(tmp_path / "f.h5")


def test_empty_dataset(tiny_model, tmp_path):
    folder = write_split_files(str(tmp_path / "d"), "csv", {"train": [], "test": []})
    one_line_error(run("extract", "-m", tiny_model, "-d", folder, "-o", tmp_path / "f.h5"), "empty")
    assert not os.path.exists(tmp_path / "f.h5") and not os.path.exists(str(tmp_path / "f.h5") + ".partial")


def test_checkpoint_with_features_of_another_model(cache, other_model, csv_data, tmp_path):
    ckpt, _ = bc.fit_head(cache, str(tmp_path / "ck"), epochs=2)
    other = bc.extract(other_model, csv_data, str(tmp_path / "other.h5"), precision="fp32", layers=2,
                       progress=False)
    one_line_error(run("evaluate", "-c", ckpt, "--features", other), "fingerprint")
    one_line_error(run("predict", "-c", ckpt, "--model", other_model, "好"), "fingerprint")


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "evaluate", "-c", tmp_path / "nothing")
    assert result.exit_code != 0 and isinstance(result.exception, bc.UserError)


@pytest.mark.slow
def test_predict_shows_a_bar_on_a_terminal_for_a_long_run(cache, tmp_path):
    """Thousands of texts take a minute: on a terminal a bar counts them (cleared after), the results on stdout."""
    import fcntl
    import pty
    import struct
    import subprocess
    import re
    import sys
    import termios
    import threading
    ckpt, _ = bc.fit_head(cache, str(tmp_path / "ck"), epochs=2)
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(f"好棒赞 {i}\n" for i in range(40)), encoding="utf-8")
    # Every encoded batch takes 0.3 s here (a real model's pace): the run lasts past the bar's half-second delay.
    code = ("import sys, time\nfrom pipeline.encoder import Encoder\nencode = Encoder.encode\n"
            "def slow(self, texts, on_progress=None, **kw):\n"
            "    return encode(self, texts, on_progress=lambda n: (time.sleep(0.3), on_progress and on_progress(n)), **kw)\n"
            "Encoder.encode = slow\nfrom pipeline.cli import main\n"
            f"sys.argv = ['bertcache', 'predict', '-c', {ckpt!r}, '--file', {str(texts)!r}, '--batch-tokens', '64']\n"
            "main()\n")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size: tqdm draws in it
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env=child_env(), close_fds=True)
    os.close(slave)
    chunks = []

    def drain():  # read the terminal as it is written, or the child blocks on a full pty
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            chunks.append(chunk)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out = proc.communicate(timeout=300)[0].decode()
        reader.join(timeout=10)
    finally:
        proc.kill()
        os.close(master)
    seen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, seen[-2000:]
    assert len(out.splitlines()) == 40 and "predict:" not in out
    assert re.search(r"predict: +\d+%\|.*\d+/40 ", seen), seen[-2000:]


@pytest.mark.slow
def test_interactive_predict_loop_quits_on_q(cache, tmp_path):
    """With no texts on a terminal, predict reads lines at a prompt until `q`."""
    import pty
    import subprocess
    import sys
    import time
    ckpt, _ = bc.fit_head(cache, str(tmp_path / "ck"), epochs=2)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "predict", "-c", ckpt], stdin=slave, stdout=slave,
                            stderr=slave, env=child_env(), close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120):
        nonlocal seen
        deadline = time.time() + timeout
        while marker not in seen and time.time() < deadline:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
        return marker in seen

    try:
        assert read_until(b"> ")
        os.write(master, "好棒赞\n".encode())
        assert read_until("\t好棒赞".encode())
        os.write(master, b"q\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
