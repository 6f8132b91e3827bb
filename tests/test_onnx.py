"""`bertcache export --format onnx` and `--backend onnx`: one graph, run by onnxruntime, same answers as torch."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

import pipeline as bc  # noqa: E402
from conftest import default_splits, make_texts, write_split_files  # noqa: E402
from helpers import ok, one_line_error, python_lines, run  # noqa: E402
from pipeline.checkpoint import read_config  # noqa: E402
from pipeline.onnx_runner import OnnxPredictor, read_meta  # noqa: E402
from pipeline.poolings import build_features  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Lengths from 1 character to past max_length (truncated), repeats, Latin and Chinese.
TEXTS = [t for t, _ in make_texts(196, seed=7)] + ["好", "x " * 200, "今天 天气 不错 abc", "好"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    """Two cached layers and a pooling spec that reads both (an average and a lower layer's mean), an mlp
    head with standardization: every part of what predict computes is in the graph."""
    tmp = tmp_path_factory.mktemp("onnx")
    data = write_split_files(str(tmp / "data"), "jsonl", default_splits(n_train=80, n_val=20, n_test=20))
    path = bc.extract(tiny_model, data, str(tmp / "f.h5"), precision="fp32", layers=2, max_length=64,
                      progress=False)
    ckpt, _ = bc.fit_head(path, str(tmp / "ck"), pooling="cls-avg2+mean_2", head="mlp", epochs=5)
    return ckpt


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exported") / "onnx")
    result = ok("export", "-c", checkpoint, "--format", "onnx", "-o", out)
    assert result.stdout.strip().splitlines() == [f"saved {out}"]  # torch.onnx's chatter stays off stdout
    return out


def predict_json(*args) -> list[dict]:
    result = ok("predict", "--json", *args, *TEXTS)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_export_folder_holds_one_dynamic_graph_and_the_tokenizer(exported, checkpoint):
    files = set(os.listdir(exported))
    assert {"model.onnx", "tokenizer.json", "bertcache.json", "metrics.json"} <= files
    assert not [f for f in os.listdir(os.path.dirname(exported)) if ".partial-" in f]
    meta = json.load(open(os.path.join(exported, "bertcache.json")))
    config = read_config(checkpoint)
    assert meta["label_names"] == config["label_names"] and meta["pooling"] == "cls-avg2+mean_2"
    model = onnx.load(os.path.join(exported, "model.onnx"))
    onnx.checker.check_model(model)
    assert meta["opset"] == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for dims in inputs.values():  # batch and length are named (symbolic), not fixed numbers
        assert all(isinstance(d, str) and d for d in dims), dims
    outputs = {o.name: o for o in model.graph.output}
    assert set(outputs) == {"probabilities", "logits", "features"}


def test_onnx_predict_matches_torch_predict_json(exported, checkpoint):
    torch_rows = predict_json("--checkpoint", checkpoint, "--device", "cpu")
    onnx_rows = predict_json("--checkpoint", exported, "--backend", "onnx")
    assert [r["text"] for r in onnx_rows] == TEXTS
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    a = np.array([list(r["probabilities"].values()) for r in torch_rows])
    b = np.array([list(r["probabilities"].values()) for r in onnx_rows])
    assert np.abs(a - b).max() < 1e-4
    assert len({round(float(p), 3) for p in a[:, 0]}) > 10  # the texts really differ: not one answer repeated


def test_serve_runs_an_export(exported):
    """`bertcache serve --backend onnx`: the app over the runner answers as the runner does."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pipeline.onnx_runner import OnnxPredictor
    from pipeline.serve import create_app

    runner, texts = OnnxPredictor(exported), TEXTS[:20]
    with TestClient(create_app(runner)) as client:
        got = client.post("/predict", json={"texts": texts})
        info = client.get("/info").json()
    assert got.status_code == 200, got.text
    want = runner.predict(texts)
    assert [g["label"] for g in got.json()["predictions"]] == [w["label"] for w in want]
    assert np.allclose([list(g["probabilities"].values()) for g in got.json()["predictions"]],
                       [list(w["probabilities"].values()) for w in want], atol=1e-6)
    # the backend as --backend names it; `kind` as export --json says
    assert info["encoder"]["backend"] == "onnx" and info["kind"] == "export"


def test_runner_tokenizes_as_the_encoder_and_gives_the_head_input(exported, checkpoint):
    predictor = bc.Predictor(checkpoint, device="cpu")
    runner = OnnxPredictor(exported, threads=1)
    assert runner.tokenize(TEXTS) == predictor.encoder.tokenize(TEXTS)  # truncation to max_length included
    assert max(len(s) for s in runner.tokenize(TEXTS)) == 64
    arrays = predictor.encoder.encode(TEXTS[:20])
    want = build_features(arrays, predictor.pooling, predictor.layers)
    assert np.abs(runner.embed(TEXTS[:20]) - want).max() < 1e-4
    assert runner.predict(TEXTS[0])["label"] == predictor.predict([TEXTS[0]])[0]["label"]
    assert runner.predict_proba([]).shape == (0, 2)
    for bad, words in ((["好", None], "must be a str"), (["好", "caf\udce9"], "text 2 holds a lone surrogate")):
        with pytest.raises(bc.UserError, match=words):  # what the torch Predictor refuses, in the same words
            runner.predict(bad)


def test_export_errors_are_one_line(checkpoint, tmp_path):
    one_line_error(run("export", "-c", tmp_path / "nothing", "-o", tmp_path / "out"), "checkpoint not found",
                   exit_code=2)
    one_line_error(run("export", "-c", checkpoint), "Missing option '--out'", "export --help", exit_code=2)
    one_line_error(run("export", checkpoint, tmp_path / "out"), "export takes options, not positional arguments",
                   f"bertcache export -c {checkpoint} -o {tmp_path / 'out'}", exit_code=2)  # the old form
    one_line_error(run("predict", "--backend", "onnx", "-c", checkpoint, "好"), "is not an ONNX export",
                   "bertcache export", exit_code=2)
    one_line_error(run("predict", "--backend", "onnx", "-c", checkpoint, "--weights", "last", "好"),
                   "--weights does not go with --backend onnx", exit_code=2)
    device = one_line_error(run("predict", "--backend", "onnx", "-c", checkpoint, "--device", "cuda", "好"),
                            "--device does not go with --backend onnx", "CPU", exit_code=2)
    assert "bertcache export" not in device  # export has no --device to pass it to
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_the_runner_needs_no_torch(exported):
    """A service without PyTorch: importing and running the runner never loads torch or transformers."""
    code = ("import sys; from pipeline.onnx_runner import OnnxPredictor; "
            f"print(OnnxPredictor({exported!r}).predict('好')['label']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    label, loaded = python_lines(code, timeout=120)
    assert label in json.load(open(os.path.join(exported, "bertcache.json")))["label_names"]
    assert loaded == "[]"


def test_an_ensemble_exports_as_one_graph(checkpoint, tmp_path):
    """The sweep's winner is often an ensemble: every member's pooling and head in the graph, averaged."""
    import torch

    from pipeline.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.heads import Ensemble, Head

    config, head = load_checkpoint(checkpoint)
    torch.manual_seed(0)
    other = Head(int(config["encoder"]["hidden_size"]), 2, "linear")  # a second member over another pooling
    torch.nn.init.normal_(other.net.weight, std=3.0)
    ens = Ensemble([head, other], [config["pooling"], "mean"], [3, 1])
    ckpt = save_checkpoint(str(tmp_path / "ens"), {**config, "pooling": "ensemble", "head": ens.shape()},
                           {"best": ens.state_dict()}, {})
    summary = json.loads(ok("export", "--checkpoint", ckpt, "--out", str(tmp_path / "onnx"), "--json").stdout)
    out = summary["path"]
    assert out == str(tmp_path / "onnx") and summary["kind"] == "export" and summary["format"] == "bertcache-onnx"
    assert summary == {"path": out, "kind": "export", **json.load(open(os.path.join(out, "bertcache.json")))}
    assert (summary["checkpoint"], summary["weights"], summary["pooling"]) == (ckpt, "best", "ensemble")
    predictor, runner = bc.Predictor(ckpt, device="cpu"), OnnxPredictor(out, threads=1)
    want, got = predictor.predict_proba(TEXTS[:30]), runner.predict_proba(TEXTS[:30])
    assert np.abs(want - got).max() < 1e-4 and np.abs(want - head.predict_proba(
        predictor.embed(TEXTS[:30]))).max() > 1e-3  # the average, not the heaviest member alone
    np.testing.assert_allclose(runner.embed(TEXTS[:30]), predictor.embed(TEXTS[:30]), atol=1e-4)


def test_info_describes_an_export_as_serve_does(exported, checkpoint):
    """`bertcache info EXPORT` (it used to refuse one) says what /info says; --rows on a folder says where rows are."""
    described = json.loads(ok("info", exported, "--json").stdout)
    assert described == json.loads(json.dumps(OnnxPredictor(exported).describe()))
    # the checkpoint it was made from under the name bertcache.json and export --json give it
    assert described["kind"] == "export" and described["checkpoint"] == checkpoint == read_meta(exported)["checkpoint"]
    text = ok("info", exported).stdout
    assert "ONNX export" in text and described["label_names"][0] in text
    note = ok("info", checkpoint, "--rows", "2").stderr
    assert "--rows shows a features file's rows" in note and "is a checkpoint" in note
