"""fit-head past memory (rows.py, training.py): moments over chunks, the epoch order, streamed rows giving
the in-memory fit's batches, `--max-memory`; and `info` on a cache and a checkpoint."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import pipeline as bc
from pipeline import rows as R, training as T
from pipeline.checkpoint import load_checkpoint
from conftest import make_texts, write_split_files
from helpers import run


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
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    assert mem["best_epoch"] == streamed["best_epoch"]
    assert mem["test"]["confusion_matrix"] == streamed["test"]["confusion_matrix"]
    for weights in ("best", "last"):
        _, head_a = load_checkpoint(str(tmp_path / "mem"), weights)
        _, head_b = load_checkpoint(str(tmp_path / "stream"), weights)
        for (name, a), b in zip(head_a.state_dict().items(), head_b.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_a_streamed_cache_refuses_logreg_and_the_sweep_leaves_it_out(big_cache, tmp_path):
    """logreg fits every train row at once (L-BFGS): not over a cache too big for --max-memory."""
    with pytest.raises(bc.UserError, match="logreg fits full-batch"):
        bc.fit_head(big_cache, str(tmp_path / "lr"), head="logreg", max_memory="64K", device="cpu")
    logs = []
    _, ranked, _ = bc.sweep(big_cache, str(tmp_path / "sw"), poolings="mean", lrs=[1e-3], epochs=2, ensemble=False,
                            max_memory="64K", device="cpu", progress=True, log=logs.append)
    assert {r["head"] for r in ranked} == {"linear", "mlp"} and any("leaves out logreg" in line for line in logs)
    assert len([line for line in logs if line.startswith("mean ")]) == 2  # a line per head, bar or not
    # the command says it too (its sweep used to pass no log)
    r = run("fit-head", "-f", big_cache, "-o", tmp_path / "sw3", "--sweep", "--sweep-poolings", "mean",
            "--sweep-lrs", "1e-3", "--epochs", "2", "--max-memory", "64K", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "leaves out logreg" in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("mean ")]  # a line per head as it ends
    with pytest.raises(bc.UserError, match="leave logreg out"):
        bc.sweep(big_cache, str(tmp_path / "sw2"), heads="logreg", max_memory="64K", device="cpu", progress=False)
    assert not (tmp_path / "lr").exists() and not (tmp_path / "sw2").exists()


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
    assert info["dims"] == {"cls": 32, "mean": 32, "last": 32, "cls_2": 32, "mean_2": 32, "last_2": 32} and info["shards"] == []
    assert info["feature_names"] == list(info["dims"]) and "features" not in info
    text = run("info", ckpt).output
    assert "checkpoint, linear head 32 -> 2" in text and "pooling      cls_2" in text
    result = run("info", str(tmp_path / "nothing.h5"))
    assert result.exit_code == 2 and result.output.startswith("error: ")


def test_info_reads_an_old_checkpoints_accuracy_keys(big_cache, tmp_path):
    """metrics.json written before train_acc / val_acc became train_accuracy / val_accuracy still shows its
    validation accuracy in info (JSON and text)."""
    ckpt, metrics = bc.fit_head(big_cache, str(tmp_path / "ck"), epochs=2)
    old = {"train_accuracy": "train_acc", "val_accuracy": "val_acc"}  # today's name -> the one it replaced
    rows = [{old.get(k, k): v for k, v in r.items()} for r in metrics["history"]]
    saved = json.load(open(f"{ckpt}/metrics.json"))
    saved.update(best={old.get(k, k): v for k, v in saved["best"].items()}, history=rows)
    assert "val_acc" in saved["best"] and "val_accuracy" not in saved["best"]
    json.dump(saved, open(f"{ckpt}/metrics.json", "w"))
    info = json.loads(run("info", ckpt, "--json").stdout)
    assert info["best"]["val_accuracy"] == metrics["best"]["val_accuracy"]
    assert info["best"]["train_accuracy"] == metrics["best"]["train_accuracy"]
    assert "val_acc" not in info["best"] and "train_acc" not in info["best"]
    assert f"val accuracy {metrics['best']['val_accuracy']:.4f}" in run("info", ckpt).stdout
