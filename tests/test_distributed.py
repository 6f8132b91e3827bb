"""Issue 7: distributed extraction under torchrun (CPU, gloo), joined shards, streamed fit-head, `info`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import pipeline as bc
from pipeline import rows as R, training as T
from pipeline.checkpoint import load_checkpoint
from pipeline.distributed import shard_range
from pipeline.store import FeatureStore
from conftest import make_texts, write_split_files
from helpers import child_env, run



@given(st.integers(0, 50), st.integers(1, 9))
def test_shards_cover_every_row_once_in_order_without_padding(n, size):
    ranges = [shard_range(n, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
    sizes = [hi - lo for lo, hi in ranges]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1  # nobody pads, nobody is more than one row ahead


def _datasets(path):
    with h5py.File(path, "r") as f:
        return {f"{s}/{k}": f[s][k][:] for s in json.loads(f.attrs["splits"]) for k in f[s]}


def _torchrun(args, cwd, ok=True):
    # One thread per process in both runs: CPU kernels may split reductions differently with more threads.
    env = child_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipeline", "extract", *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_torchrun_two_ranks_join_equals_single_process_extract(tiny_model, tmp_path):
    # Uneven shards (7 rows of train on 2 ranks: 4 + 3), a split smaller than the number of ranks
    # (1 row of validation: rank 1's shard of it is empty), repeats within and across splits and shards.
    splits = {"train": make_texts(7, seed=11), "validation": make_texts(1, seed=12), "test": make_texts(5, seed=13)}
    splits["train"][5] = splits["train"][1]
    splits["test"][1] = splits["train"][0]
    data = write_split_files(str(tmp_path / "data"), "jsonl", splits)
    out = tmp_path / "out" / "f.h5"
    # Exact equality holds because --batch-tokens 1 puts one text in each batch (no padding, so the
    # float reductions are the same whichever rank, chunk or batch a text lands in), both runs use fp32
    # on one CPU thread, and a repeated text gets the vector of an identical computation.
    args = ["--model", tiny_model, "--data", data, "--out", out, "--precision", "fp32", "--batch-tokens", 1,
            "--device", "cpu", "--layers", 2]
    _torchrun(args, tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = bc.extract(tiny_model, data, str(tmp_path / "single.h5"), precision="fp32", batch_tokens=1,
                            device="cpu", layers=2, progress=False)
    finally:
        torch.set_num_threads(threads)

    joined, expected = _datasets(out), _datasets(single)
    assert sorted(joined) == sorted(expected)
    for key in expected:
        assert joined[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(joined[key], expected[key], err_msg=key)
    assert list(joined["train/row"]) == list(range(7)) and list(joined["validation/row"]) == [0]
    with h5py.File(out, "r") as f, h5py.File(single, "r") as g:
        assert f["train/cls"].is_virtual
        for key in ("fingerprint", "settings", "splits", "feature_names", "label_names", "store_dtype"):
            assert f.attrs[key] == g.attrs[key], key
        for split in ("train", "validation", "test"):
            assert dict(f[split].attrs) == dict(g[split].attrs), split
        shards = json.loads(f.attrs["shards"])
    assert [s["rows"] for s in shards] == [{"train": [0, 4], "validation": [0, 1], "test": [0, 3]},
                                           {"train": [4, 7], "validation": [1, 1], "test": [3, 5]}]
    with h5py.File(tmp_path / "out" / shards[1]["file"], "r") as s:
        assert s["validation/cls"].shape == (0, 32)  # the empty shard

    # FeatureStore reads the joined file from another working directory like any cache.
    with FeatureStore(str(out)) as store:
        np.testing.assert_array_equal(store.features("test")["mean_2"], expected["test/mean_2"])

    # A killed run resumes per shard: lose rank 1's shard and the joined file; rank 0's complete shard
    # is kept untouched and only rank 1's rows are encoded again.
    shard0, shard1 = (tmp_path / "out" / s["file"] for s in shards)
    before = os.stat(shard0).st_mtime_ns
    os.remove(shard1)
    with pytest.raises(bc.UserError, match="missing"):  # rather than HDF5's silent zeros for its rows
        FeatureStore(str(out))
    os.remove(out)
    _torchrun(args, tmp_path)
    assert os.stat(shard0).st_mtime_ns == before
    again = _datasets(out)
    for key in expected:
        np.testing.assert_array_equal(again[key], expected[key], err_msg=key)

    # Other settings over an existing cache: every rank stops with rank 0's one-line error (none hangs).
    result = _torchrun([*args[:-1], 1], tmp_path, ok=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "different settings" in errors[0] and "--restart" in errors[0]


# -- fit-head past memory ---------------------------------------------------------------------------

def test_moments_of_chunks_equal_whole_array_statistics():
    X = np.random.default_rng(0).normal(5.0, 0.1, size=(2500, 7)).astype(np.float32)
    mean, std = R.moments([X[:3], X[3:1800], X[1800:1800], X[1800:]])
    np.testing.assert_allclose(mean, X.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, X.astype(np.float64).std(0), rtol=1e-9)


def test_epoch_order_is_a_permutation_that_keeps_blocks_within_windows():
    gen = torch.Generator().manual_seed(0)
    order = T.epoch_order(103, gen, block=10, window=40).numpy()
    assert sorted(order) == list(range(103))
    windows = [set(order[start:start + 40] // 10) for start in range(0, 103, 40)]
    # A window draws from a few blocks (it may cut one at each end), so a streamed read is a few runs.
    assert all(len(blocks) <= 40 // 10 + 2 for blocks in windows)
    assert set.union(*windows) == set(range(11))
    assert T.epoch_order(30, torch.Generator().manual_seed(1), 10, 40).tolist() != list(range(30))


@pytest.fixture(scope="module")
def big_cache(tiny_model, tmp_path_factory):
    """300 train rows, 40 test rows and a 2-layer cache, for fits in memory and streamed."""
    folder = tmp_path_factory.mktemp("stream")
    splits = {"train": make_texts(300, seed=21), "test": make_texts(40, seed=23)}
    data = write_split_files(str(folder / "data"), "jsonl", splits)
    return bc.extract(tiny_model, data, str(folder / "f.h5"), precision="fp32", layers=2, progress=False)


@pytest.mark.parametrize("kw", [dict(pooling="cls+mean-avg2", head="mlp", class_weights="balanced"),
                                dict(pooling="mean", head="linear", label_smoothing=0.1)])
def test_streamed_fit_head_equals_in_memory_fit(big_cache, tmp_path, kw):
    # Small shuffle blocks / windows so that a streamed epoch reads many windows of a few blocks each;
    # the order depends on the seed only, so both paths train on the same batches.
    common = dict(epochs=6, patience=None, batch_size=48, shuffle_block=16, shuffle_window=64, device="cpu", **kw)
    logs = []
    _, mem = bc.fit_head(big_cache, str(tmp_path / "mem"), **common)
    _, streamed = bc.fit_head(big_cache, str(tmp_path / "stream"), max_memory="64K", log=logs.append, **common)
    assert not mem["streamed"] and streamed["streamed"]
    assert any("streaming" in line for line in logs)
    for a, b in zip(mem["history"], streamed["history"]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    assert mem["best_epoch"] == streamed["best_epoch"]
    assert mem["test"]["confusion_matrix"] == streamed["test"]["confusion_matrix"]
    for weights in ("best", "last"):
        _, head_a = load_checkpoint(str(tmp_path / "mem"), weights)
        _, head_b = load_checkpoint(str(tmp_path / "stream"), weights)
        for (name, a), b in zip(head_a.state_dict().items(), head_b.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_streamed_fit_head_from_the_cli_and_a_bad_size(big_cache, tmp_path):
    out = tmp_path / "ck"
    result = run("fit-head", "-f", big_cache, "-o", str(out), "--epochs", "3",
                                      "--max-memory", "64K", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["streamed"] is True
    result = run("fit-head", "-f", big_cache, "--max-memory", "lots")
    assert result.exit_code == 2 and "error: cannot read --max-memory 'lots'" in result.output


# -- info -------------------------------------------------------------------------------------------

def test_info_describes_a_cache_and_a_checkpoint(big_cache, tmp_path):
    ckpt, _ = bc.fit_head(big_cache, str(tmp_path / "ck"), epochs=2, pooling="cls_2")
    result = run("info", big_cache, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    with h5py.File(big_cache, "r") as f:
        assert info["fingerprint"] == f.attrs["fingerprint"]
        assert info["splits"] == {s: {"rows": len(f[s]["label"]), "labelled": int((f[s]["label"][:] >= 0).sum())}
                                  for s in ("train", "test")}
    assert info["dims"] == {"cls": 32, "mean": 32, "cls_2": 32, "mean_2": 32} and info["shards"] == []
    text = run("info", ckpt).output
    assert "checkpoint, linear head 32 -> 2" in text and "pooling      cls_2" in text
    result = run("info", str(tmp_path / "nothing.h5"))
    assert result.exit_code == 2 and result.output.startswith("error: ")
