"""A first end-to-end pass through the API on the tiny model (the full CLI tests live in test_pipeline.py)."""
import numpy as np

import pipeline as bc
from conftest import default_splits, write_split_files


def test_api_round_trip(tiny_model, tmp_path):
    data = write_split_files(str(tmp_path / "data"), "jsonl", default_splits())
    path = bc.extract(tiny_model, data, str(tmp_path / "f.h5"), precision="fp32", progress=False)
    ckpt, metrics = bc.fit_head(path, str(tmp_path / "ck"), pooling="mean", epochs=30)
    assert metrics["test"]["n"] == 40
    report = bc.evaluate(ckpt)
    assert report["accuracy"] == metrics["test"]["accuracy"]
    probs = bc.Predictor(ckpt, device="cpu").predict_proba(["好棒赞", "差烂坏"])
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-6)
