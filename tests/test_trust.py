"""Determinism of fit-head, and fingerprints that follow what a model is, not where it lies."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from safetensors.torch import load_file

import pipeline as bc
from helpers import run, run_module


pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(folder):
    return {name: load_file(os.path.join(folder, f"{name}.safetensors")) for name in ("best", "last")}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and
                                        all(a[k][t].numpy().tobytes() == b[k][t].numpy().tobytes() for t in a[k])
                                        for k in a)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_same_cache_and_seed_give_bitwise_identical_heads(tiny_cache, tmp_path, head):
    args = dict(head=head, pooling="cls+mean", epochs=15, patience=None, device="cpu")
    one, _ = bc.fit_head(tiny_cache, str(tmp_path / "a"), seed=3, **args)
    two, _ = bc.fit_head(tiny_cache, str(tmp_path / "b"), seed=3, **args)
    other, _ = bc.fit_head(tiny_cache, str(tmp_path / "c"), seed=4, **args)
    assert _same(_weights(one), _weights(two))
    assert not _same(_weights(one), _weights(other))  # the seed does reach the weights


@pytest.mark.slow
def test_a_separate_process_gives_the_same_head(tiny_cache, tmp_path):
    here, _ = bc.fit_head(tiny_cache, str(tmp_path / "here"), seed=5, epochs=10, device="cpu")
    r = run_module("fit-head", "-f", tiny_cache, "-o", tmp_path / "there", "--seed", 5, "--epochs", 10,
                   "--device", "cpu", "--json", OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert _same(_weights(here), _weights(str(tmp_path / "there")))


def test_a_moved_model_folder_keeps_its_cache_and_checkpoints(tiny_model, tiny_cache, tmp_path):
    moved = str(tmp_path / "moved-model")
    shutil.copytree(tiny_model, moved)
    data = os.path.join(os.path.dirname(tiny_cache), "data")
    before = open(tiny_cache, "rb").read()
    r = run("extract", "-m", moved, "-d", data, "-o", tiny_cache, "--device", "cpu",
                                 "--precision", "fp32")
    assert r.exit_code == 0, r.output
    assert "already complete" in r.stderr and open(tiny_cache, "rb").read() == before
    ck, _ = bc.fit_head(tiny_cache, str(tmp_path / "ck"), epochs=3, device="cpu")
    r = run("predict", "-c", ck, "-m", moved, "--device", "cpu", "好棒")
    assert r.exit_code == 0, r.output



@pytest.mark.parametrize("change", ["weights", "tokenizer"])
def test_other_weights_or_tokenizer_in_the_same_folder_are_another_model(tiny_model, tiny_cache, tmp_path, change):
    changed = str(tmp_path / "model")
    shutil.copytree(tiny_model, changed)
    if change == "weights":
        with open(os.path.join(changed, "model.safetensors"), "r+b") as f:
            f.seek(-8, os.SEEK_END)
            f.write(b"\x11" * 8)  # the last weights change; the file still loads
    else:
        for name in ("tokenizer.json", "vocab.txt"):  # two characters swap ids
            path = os.path.join(changed, name)
            text = open(path, encoding="utf-8").read().replace("好", "\0").replace("差", "好").replace("\0", "差")
            open(path, "w", encoding="utf-8").write(text)
    data = os.path.join(os.path.dirname(tiny_cache), "data")
    r = run("extract", "-m", changed, "-d", data, "-o", tiny_cache, "--device", "cpu",
                                 "--precision", "fp32")
    assert r.exit_code == 2 and "model_fingerprint" in r.stderr and "--restart" in r.stderr, r.stderr


def test_remembered_weight_hashes_follow_every_change(tmp_path):
    from pipeline.fingerprints import hash_files
    folder, names, memo = str(tmp_path / "m"), ["model.safetensors", "tokenizer.json"], str(tmp_path / "memo.json")
    os.makedirs(folder)
    weights = os.path.join(folder, names[0])
    for name in names:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(name.encode() * 100)
    old = time.time() - 60
    for name in names:
        os.utime(os.path.join(folder, name), (old, old))

    def memoized():
        return hash_files(folder, names, memo=memo, min_bytes=0)
    first = hash_files(folder, names)
    assert memoized() == first and json.load(open(memo))  # the same digest, now remembered
    with open(weights, "r+b") as f:  # same size, same time stamp, same file: the remembered digest stands
        f.write(b"X")
    os.utime(weights, (old, old))
    assert memoized() == first
    os.utime(weights, (old + 1, old + 1))  # any new time stamp: read again
    second = memoized()
    assert second == hash_files(folder, names) != first
    os.replace(os.path.join(folder, names[1]), weights + ".new")  # another file under the old name
    shutil.copy2(weights + ".new", os.path.join(folder, names[1]))
    assert memoized() == hash_files(folder, names) == second
    with open(weights, "ab") as f:  # just written: hashed, but not remembered (coarse clocks)
        f.write(b"more")
    third = memoized()
    assert third == hash_files(folder, names) != second
    assert third not in {v["sha256"] for v in json.load(open(memo)).values()}
    os.utime(weights, (old, old))
    unwritable = os.path.join(weights, "memo.json")  # under a file: remembering fails, hashing does not
    assert hash_files(folder, names, memo=unwritable, min_bytes=0) == third
