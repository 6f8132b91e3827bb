"""Distributed extraction under torchrun (CPU, gloo): shard ranges, joined shards (distributed.py)."""
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
from pipeline.distributed import shard_range
from pipeline.store import FeatureStore
from conftest import make_texts, write_split_files
from helpers import child_env



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
        for split, rows in splits.items():  # the shards' texts, joined in order (rank 1's validation is empty)
            assert store.texts(split) == [t for t, _ in rows]

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


@pytest.mark.slow
def test_a_rank_that_fails_stops_every_rank_with_one_line_each(tiny_model, tmp_path):
    # Rank 1's shard exists, made with other settings: rank 1 refuses it at once, while rank 0 encodes its
    # shard and then waits at the barrier for it. Started without torchrun's agent (which would SIGTERM
    # rank 0), rank 0 must still end by itself, with a line of its own rather than gloo's RuntimeError.
    import socket
    data = write_split_files(str(tmp_path / "data"), "jsonl", {"train": make_texts(6, seed=1)})
    out = tmp_path / "f.h5"
    bc.extract(tiny_model, data, str(out) + ".shard-1-of-2.h5", precision="fp32", device="cpu", layers=2,
               progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--model", tiny_model, "--data", data,
                               "--out", str(out), "--device", "cpu", "--precision", "fp32"], cwd=tmp_path,
                              env=child_env(OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stderr.close()
    for code, stderr in results:
        assert code == 2, stderr[-2000:]
        assert len([line for line in stderr.splitlines() if "error:" in line]) == 1, stderr[-2000:]
        assert "Traceback" not in stderr and "unexpected" not in stderr, stderr[-2000:]
    assert "different settings" in results[1][1]
    assert "another rank stopped" in results[0][1]


def test_a_distributed_extract_says_what_one_process_says_of_the_corpus(tiny_model, tmp_path, monkeypatch):
    # The blank texts skipped and the corpus' notes, once (rank 0), as a one-process extract says them; then
    # "already complete". A world of one rank, in this process: distributed.extract as a torchrun rank runs it.
    from pipeline import distributed
    rows = make_texts(6, seed=3)
    rows[2] = ("   ", 1)
    data = write_split_files(str(tmp_path / "data"), "jsonl", {"train": rows, "test": make_texts(3, seed=4)})
    with open(os.path.join(data, "test.jsonl"), "w", encoding="utf-8") as f:  # no label column: a note
        f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t, _ in make_texts(3, seed=4))
    one_rank_world(monkeypatch)
    for run in range(2):
        said = []
        distributed.extract(tiny_model, data, str(tmp_path / "f.h5"), device="cpu", precision="fp32",
                            progress=False, log=said.append)
        assert len([m for m in said if "skipped 1 blank text" in m]) == 1, said
        assert len([m for m in said if m.startswith("note:") and "no label column" in m]) == 1, said
    assert said[-1].endswith("f.h5 is already complete"), said


def test_the_join_copies_the_shards_texts_a_piece_at_a_time(tiny_model, tmp_path, monkeypatch):
    # 100M short texts are 10-20 GB: rank 0 must not read every shard's texts into memory (twice) to join them.
    import random
    import tracemalloc
    from pipeline import distributed
    from pipeline.data import load_corpus
    from pipeline.extract import split_specs
    rng = random.Random(0)
    chars = "这个东西我们买了一次觉得真的很还是不可以好棒赞喜欢满意推荐快美差烂坏慢贵失望退糟破"
    rows = [("".join(rng.choice(chars) for _ in range(1000)), i % 2) for i in range(120)]
    data = write_split_files(str(tmp_path / "data"), "jsonl", {"train": rows})
    corpus = load_corpus(data)
    out = str(tmp_path / "f.h5")
    shards = []
    for rank in range(2):
        path = distributed.shard_path(out, rank, 2)
        bc.extract(tiny_model, data, path, corpus=distributed.shard_corpus(corpus, rank, 2), precision="fp32",
                   device="cpu", max_length=8, progress=False)
        shards.append({"file": os.path.basename(path), "rows": {"train": list(distributed.shard_range(120, rank, 2))}})
    total = sum(len(t.encode("utf-8")) for t, _ in rows)  # 360 kB
    monkeypatch.setattr(distributed, "TEXT_PIECE", 4096, raising=False)
    tracemalloc.start()
    try:
        distributed.write_joined(out, shards, split_specs(corpus), "f")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < total / 4, (peak, total)
    with FeatureStore(out) as store:
        assert store.texts("train") == [t for t, _ in rows]


def test_running_again_encodes_a_lost_shard_and_joins_again(tiny_model, tmp_path, monkeypatch):
    # The joined file stays, one of its shards is lost: the same command again encodes that shard (not
    # "already complete" over a file every reader refuses). A world of one rank, in this process.
    from pipeline import distributed
    data = write_split_files(str(tmp_path / "data"), "jsonl", {"train": make_texts(6, seed=5)})
    one_rank_world(monkeypatch)
    out = str(tmp_path / "f.h5")
    distributed.extract(tiny_model, data, out, device="cpu", precision="fp32", progress=False)
    expected = _datasets(out)
    os.remove(distributed.shard_path(out, 0, 1))
    with pytest.raises(bc.UserError, match="missing"):
        FeatureStore(out)
    said = []
    distributed.extract(tiny_model, data, out, device="cpu", precision="fp32", progress=False, log=said.append)
    assert not any("already complete" in m for m in said), said
    again = _datasets(out)
    for key in expected:
        np.testing.assert_array_equal(again[key], expected[key], err_msg=key)


def one_rank_world(monkeypatch) -> None:
    """The environment torchrun gives its one rank in a world of one, on a free port: distributed.extract then
    runs as that rank, in this process."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
