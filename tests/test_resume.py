"""Resumable extraction: a real `python -m pipeline extract` killed with SIGKILL at random points,
resumed each time, ends with the same file as an uninterrupted run (bitwise, CPU fp32)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

import pipeline as bc
from conftest import make_texts, write_split_files
from helpers import child_env
from pipeline.errors import UserError

CHUNK = 48

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # SIGKILLed subprocesses


def _env():
    # One thread: the same kernels in every run (bitwise equality), and no spinning on shared cores.
    return child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _args(model, data, out):
    return [sys.executable, "-m", "pipeline", "extract", "--model", model, "--data", data, "--out", out,
            "--device", "cpu", "--precision", "fp32", "--chunk-rows", str(CHUNK)]


def _rows_done(partial: str) -> int:
    """Rows recorded as written so far, read while the writer runs (-1 while unreadable)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return sum(int(f[s].attrs["rows_done"]) for s in f)
    except Exception:  # the file may not exist yet, or be mid-creation
        return -1


def _dump(path: str) -> dict:
    """Every attribute and dataset of a features file, as plain values."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/"] = {k: f.attrs[k] for k in f.attrs}

        def visit(name, obj):
            out[name + "@attrs"] = {k: obj.attrs[k] for k in obj.attrs}
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj[()].tobytes())
        f.visititems(visit)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = make_texts(3000, seed=7)  # short texts: many repeat, within and across splits
    data = str(tmp_path_factory.mktemp("resume") / "data")
    return write_split_files(data, "jsonl", {"train": rows[:2400], "validation": rows[2400:2700],
                                             "test": rows[2700:]})


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tiny_model, corpus, tmp_path):
    # The uninterrupted run, in this process (one thread, like the subprocesses): the same code, one
    # interpreter start fewer.
    ref = bc.extract(tiny_model, corpus, str(tmp_path / "ref.h5"), device="cpu", precision="fp32", chunk_rows=CHUNK,
                     progress=False)
    with h5py.File(ref, "r") as f:
        total = sum(int(f[s].attrs["rows"]) for s in f)

    out = str(tmp_path / "killed.h5")
    partial = out + ".partial"
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    targets = sorted(rng.sample(range(0, total - 8 * CHUNK), 3))  # rows done when each kill fires
    kills, log = 0, []
    for target in targets:
        proc = subprocess.Popen(_args(tiny_model, corpus, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        stderr = []
        reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 240
        while proc.poll() is None and _rows_done(partial) < target and time.monotonic() < deadline:
            time.sleep(0.003)
        time.sleep(rng.uniform(0, 0.03))  # land anywhere in a chunk: encoding, writing, flushing
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        log.append((target, proc.returncode, "".join(stderr)[-300:]))
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            assert not os.path.exists(out), "a killed run left a file under the final name"
            with pytest.raises(UserError, match="did not finish; run extract again to resume"):
                bc.FeatureStore(out)
            if os.path.exists(partial):
                with pytest.raises(UserError, match="incomplete extraction"):
                    bc.FeatureStore(partial)
    assert kills >= 2, f"the runs finished before they could be killed: {log}"

    done = subprocess.run(_args(tiny_model, corpus, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr or "writing" in done.stderr
    assert not os.path.exists(partial)
    a, b = _dump(ref), _dump(out)
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("@attrs") or key == "/":
            assert a[key].keys() == b[key].keys(), key
            for k in a[key]:
                assert np.array_equal(a[key][k], b[key][k]), (key, k)
        else:
            assert a[key] == b[key], f"{key} differs after {kills} kills at rows {targets}: {log}"


def test_resume_keeps_the_chunk_size_the_file_was_started_with(tiny_model, tmp_path):
    """Chunks (and so batches) stay those of the first run, whatever --chunk-rows the resume gets."""
    rows = make_texts(300, seed=3)
    data = write_split_files(str(tmp_path / "d"), "jsonl", {"train": rows})
    enc = bc.Encoder(tiny_model, device="cpu", precision="fp32")
    out = str(tmp_path / "f.h5")
    full = bc.extract(tiny_model, data, str(tmp_path / "full.h5"), chunk_rows=32, progress=False, encoder=enc)

    class Stop(Exception):
        pass

    calls = []

    def stop_after_two(*a, **k):  # interrupt the run inside its third chunk
        calls.append(1)
        if len(calls) == 3:
            raise Stop
        return original(*a, **k)

    original = enc.encode_ids
    enc.encode_ids = stop_after_two
    with pytest.raises(Stop):
        bc.extract(tiny_model, data, out, chunk_rows=32, progress=False, encoder=enc)
    enc.encode_ids = original
    with h5py.File(out + ".partial", "r") as f:
        assert int(f["train"].attrs["rows_done"]) == 64
    notes = []
    bc.extract(tiny_model, data, out, chunk_rows=100, progress=False, encoder=enc, log=notes.append)
    assert any("resuming" in n and "64 of 300" in n for n in notes), notes
    with h5py.File(out, "r") as f, h5py.File(full, "r") as g:
        assert f.attrs["chunk_rows"] == 32
        for name in ("cls", "mean", "label", "row"):
            assert np.array_equal(f["train"][name][:], g["train"][name][:])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing-dataset", "rows-done-past-end"])
def test_a_damaged_partial_is_started_over(tiny_model, tmp_path, damage):
    rows = make_texts(200, seed=4)
    data = write_split_files(str(tmp_path / "d"), "jsonl", {"train": rows[:150], "test": rows[150:]})
    enc = bc.Encoder(tiny_model, device="cpu", precision="fp32")
    ref = bc.extract(tiny_model, data, str(tmp_path / "ref.h5"), chunk_rows=40, progress=False, encoder=enc)
    out = str(tmp_path / "f.h5")
    partial = out + ".partial"
    bc.extract(tiny_model, data, out, chunk_rows=40, progress=False, encoder=enc)
    os.replace(out, partial)  # a complete layout under the temporary name, then damaged
    if damage == "truncate":
        os.truncate(partial, os.path.getsize(partial) // 2)
    elif damage == "garbage":
        with open(partial, "r+b") as fh:
            fh.write(os.urandom(512))
    else:
        with h5py.File(partial, "r+") as f:
            f.attrs["complete"] = False
            if damage == "missing-dataset":
                del f["test/row"]
            else:
                f["train"].attrs["rows_done"] = 10_000
    notes = []
    bc.extract(tiny_model, data, out, chunk_rows=40, progress=False, encoder=enc, log=notes.append)
    assert any(n.startswith("starting") and "could not be resumed" in n for n in notes), notes
    a, b = _dump(ref), _dump(out)
    for key in a:
        if not key.endswith("@attrs") and key != "/":
            assert a[key] == b[key], key
