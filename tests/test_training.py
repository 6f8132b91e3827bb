"""Issue 3: poolings over cached layers, standardization parity, the sweep and the pictures (tiny model)."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import pipeline as bc
from pipeline import plots
from pipeline.checkpoint import load_checkpoint
from pipeline.data import load_corpus
from pipeline.errors import UserError
from pipeline.poolings import build_features, pooling_features
from pipeline.store import FeatureStore
from pipeline.sweep import sweep
from conftest import default_splits, write_split_files
from helpers import ok, run as cli_run

PNG = b"\x89PNG\r\n\x1a\n"
PREFIX = "这"  # stored in the cache, applied again by predict


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split_files(str(tmp_path_factory.mktemp("data")), "jsonl", default_splits(n_train=120))


@pytest.fixture(scope="module")
def cache3(tiny_model, data, tmp_path_factory):
    """All three layers of the tiny model cached."""
    return bc.extract(tiny_model, data, str(tmp_path_factory.mktemp("f") / "f.h5"), precision="fp32", layers=3,
                      prefix=PREFIX, progress=False)


@pytest.mark.parametrize("spec, parts", [
    ("cls", ["cls"]), ("mean", ["mean"]), ("cls_1", ["cls_1"]), ("mean_2", ["mean_2"]),
    ("mean-avg2", [("mean", "mean_2")]), ("cls-avg3", [("cls", "cls_2", "cls_1")]),
    ("cls-cat3", ["cls", "cls_2", "cls_1"]), ("mean-cat2", ["mean", "mean_2"]),
    ("cls+mean", ["cls", "mean"]), ("cls_2+mean-avg3", ["cls_2", ("mean", "mean_2", "mean_1")]),
    ("cls-cat2+mean-cat2", ["cls", "cls_2", "mean", "mean_2"]),
])
def test_pooling_shapes_and_values(cache3, spec, parts):
    with FeatureStore(cache3) as store:
        layers = store.settings["layers"]
        assert layers == [1, 2, 3] and store.feature_names == ["cls", "mean", "last", "cls_2", "mean_2", "last_2", "cls_1", "mean_1", "last_1"]
        raw = store.features("train")
    X = build_features({n: raw[n] for n in pooling_features(spec, layers)}, spec, layers)
    expected = np.concatenate([np.mean([raw[n] for n in p], axis=0) if isinstance(p, tuple) else raw[p]
                               for p in parts], axis=1)
    assert X.shape == (120, 32 * len(parts)) and X.dtype == np.float32
    np.testing.assert_allclose(X, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec, needle", [("cls-cat4", "--layers 4"), ("mean_0", "layer 0"), ("max", "unknown"),
                                          ("cls+", "unknown")])
def test_pooling_beyond_the_cache(cache3, spec, needle):
    with pytest.raises(UserError, match=needle):
        bc.fit_head(cache3, pooling=spec, epochs=1)


@pytest.mark.parametrize("pooling, head", [("cls", "linear"), ("mean", "mlp"), ("cls_1", "linear"),
                                           ("mean-avg3", "linear"), ("cls-cat2", "mlp"), ("cls+mean_2", "linear"),
                                           ("mean-cat3+cls-avg2", "mlp")])
def test_standardization_parity_fit_evaluate_predict(cache3, data, tmp_path, pooling, head):
    """For every pooling kind: train statistics in the checkpoint, the same probabilities from cache and text."""
    ckpt, metrics = bc.fit_head(cache3, str(tmp_path / "ck"), pooling=pooling, head=head, epochs=8)
    config, loaded = load_checkpoint(ckpt)
    assert config["encoder"]["prefix"] == PREFIX
    with FeatureStore(cache3) as store:
        layers = store.settings["layers"]
        names = pooling_features(pooling, layers)
        X_train = build_features(store.features("train", names), pooling, layers)
        X_test = build_features(store.features("test", names), pooling, layers)
        y_test = store.labels("test")
    np.testing.assert_allclose(loaded.shift.numpy(), X_train.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.scale.numpy(), 1 / X_train.std(0), rtol=1e-4)
    cached = loaded.predict_proba(X_test)
    assert metrics["test"]["accuracy"] == pytest.approx(float((cached.argmax(1) == y_test).mean()))
    assert bc.evaluate(ckpt)["accuracy"] == metrics["test"]["accuracy"]
    live = bc.Predictor(ckpt, device="cpu").predict_proba(load_corpus(data).splits["test"].texts)
    np.testing.assert_allclose(live, cached, atol=1e-4)


def test_prefix_reaches_the_encoder(cache3, data, tiny_model):
    """The cached vectors are those of prefix + text (so the parity above covers the prefix too)."""
    from pipeline.encoder import Encoder
    texts = load_corpus(data).splits["test"].texts[:5]
    with FeatureStore(cache3) as store:
        cached = store.features("test", ["mean"])["mean"][:5]
    enc = Encoder(tiny_model, device="cpu", precision="fp32")
    np.testing.assert_allclose(enc.encode([PREFIX + t for t in texts])["mean"], cached, atol=1e-5)
    assert not np.allclose(enc.encode(texts)["mean"], cached, atol=1e-3)


def test_label_smoothing_and_class_weights_change_training():
    from pipeline.training import fit
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.1).astype(np.int64)  # 10% minority class, overlapping with the majority
    X = (rng.standard_normal((600, 8)) + 0.6 * y[:, None]).astype(np.float32)
    Xs = X + 3.0 * (2 * y[:, None] - 1)  # separable copy
    plain = fit(Xs, y, Xs, y, 2, lr=0.05, epochs=60, patience=None)
    smooth = fit(Xs, y, Xs, y, 2, lr=0.05, epochs=60, patience=None, label_smoothing=0.2)
    # cross-entropy against targets smoothed by 0.2 over 2 classes cannot fall below H(0.9, 0.1) = 0.325
    assert plain.history[-1]["train_loss"] < 0.1 < 0.3 < smooth.history[-1]["train_loss"]
    weights = np.array([0.5 / 0.9, 0.5 / 0.1], np.float32)
    plain_w, balanced = (fit(X, y, X[:0], y[:0], 2, lr=0.05, epochs=40, class_weights=w).head.predict_proba(X)
                         for w in (None, weights))  # no validation: the last epoch's weights
    # plain training predicts the 9% class rarely; balanced weights move the prior towards uniform
    assert plain_w[:, 1].mean() < 0.15 and balanced[:, 1].mean() > plain_w[:, 1].mean() + 0.1
    recall = [float((p.argmax(1)[y == 1] == 1).mean()) for p in (plain_w, balanced)]
    assert recall[1] > recall[0] + 0.2


def test_class_weight_and_smoothing_options_reach_the_checkpoint(cache3, tmp_path):
    ckpt, _ = bc.fit_head(cache3, str(tmp_path / "c"), pooling="mean", epochs=2, class_weights="balanced",
                          label_smoothing=0.1)
    training = json.load(open(os.path.join(ckpt, "config.json")))["training"]
    assert training["class_weights"] == "balanced" and training["label_smoothing"] == 0.1


# -- the sweep ---------------------------------------------------------------------------------------

def test_sweep_ranks_by_validation_and_saves_the_winner(cache3, tmp_path, monkeypatch):
    reads = []
    original = FeatureStore.features

    def counting(self, split, names=None):
        reads.append(split)
        return original(self, split, names)

    monkeypatch.setattr(FeatureStore, "features", counting)
    grid = dict(poolings=["cls", "mean+cls_2", "mean-avg3"], heads=["linear", "mlp"], lrs=[1e-2, 1e-3],
                weight_decays=[0.01])
    ckpt, ranked, metrics = sweep(cache3, str(tmp_path / "sw"), epochs=6, progress=False, ensemble=False,
                                  selection="score", folds=1, **grid)
    assert sorted(reads) == ["test", "train", "validation"]  # each split read once for all 12 heads
    assert len(ranked) == 12 and [r["rank"] for r in ranked] == list(range(1, 13))
    keys = [(-r["val_accuracy"], r["val_loss"]) for r in ranked]
    assert keys == sorted(keys)
    win = ranked[0]
    config = json.load(open(os.path.join(ckpt, "config.json")))
    assert (config["pooling"], config["head"]["type"], config["training"]["lr"],
            config["training"]["weight_decay"]) == (win["pooling"], win["head"], win["lr"], win["weight_decay"])
    assert metrics["best"]["val_accuracy"] == win["val_accuracy"] and "test" in metrics
    saved = json.load(open(os.path.join(ckpt, "sweep.json")))
    assert saved["ranked"] == json.loads(json.dumps(ranked)) and saved["grid"]["poolings"] == grid["poolings"]
    assert saved["features"] == config["features"]  # {path, fingerprint}, as config.json names the file
    # the sweep trains exactly as fit-head does: the same configuration alone gives the same result
    monkeypatch.setattr(FeatureStore, "features", original)
    _, alone = bc.fit_head(cache3, str(tmp_path / "alone"), pooling=win["pooling"], head=win["head"], lr=win["lr"],
                           weight_decay=win["weight_decay"], epochs=6)
    assert alone["best"] == metrics["best"]
    assert bc.evaluate(ckpt)["accuracy"] == metrics["test"]["accuracy"]


def test_sweep_cli_prints_the_table(cache3, tmp_path):
    out = tmp_path / "sw"
    result = cli_run("fit-head", "-f", cache3, "-o", out, "--sweep", "--sweep-poolings", "cls,mean",
                     "--sweep-heads", "linear", "--sweep-lrs", "1e-2,1e-3", "--sweep-weight-decays", "0", "--epochs", 4,
                     "--no-sweep-ensemble", "--sweep-select", "score")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows[:4]] == ["1", "2", "3", "4"] and {r[1] for r in rows[:4]} == {"cls", "mean"}
    assert "winner:" in result.stdout and "saved" in result.stdout
    assert os.path.exists(out / "sweep.json") and os.path.exists(out / "best.safetensors")
    as_json = cli_run("fit-head", "-f", cache3, "-o", out, "--sweep", "--sweep-poolings", "cls", "--sweep-heads",
                      "mlp", "--sweep-lrs", "1e-2", "--sweep-weight-decays", "0.1", "--epochs", 3, "--json")
    assert as_json.exit_code == 0, as_json.output
    assert len(json.loads(as_json.stdout)["ranked"]) == 1
    assert json.loads(as_json.stdout)["label_names"] == ["0", "1"]


def test_sweep_lines_name_the_score_as_the_table_does(cache3, tmp_path):
    """The per-head lines say `val accuracy` as the table heading does; a logreg row has a C, not an epoch."""
    result = cli_run("fit-head", "-f", cache3, "-o", tmp_path / "sw", "--sweep", "--sweep-poolings", "mean",
                     "--sweep-heads", "logreg,linear", "--sweep-lrs", "1e-2", "--epochs", 3, "--sweep-folds", 1)
    assert result.exit_code == 0, result.output
    assert "val_accuracy" not in result.stderr and result.stderr.count(" val accuracy ") >= 2
    logreg = next(line.split() for line in result.stdout.splitlines() if " logreg " in line)
    assert logreg[-2] == "-", logreg  # the epoch column


def test_default_sweep_grid_on_a_layered_cache(cache3, tmp_path):
    ckpt, ranked, _ = sweep(cache3, str(tmp_path / "sw"), heads=["linear"], lrs=[1e-2], weight_decays=[0.0],
                            epochs=2, progress=False, ensemble=False)
    assert [r["pooling"] for r in sorted(ranked, key=lambda r: r["pooling"])] == sorted(
        ["mean", "cls+mean", "mean-avg3", "cls-avg3+mean-avg3", "mean-cat3"])


@pytest.mark.parametrize("args, needle", [(["--sweep", "--pooling", "mean"], "--pooling does not go with --sweep"),
                                          (["--sweep", "--sweep-lrs", "fast"], "--sweep-lrs"),
                                          (["--sweep-heads", "mlp"], "need --sweep"),
                                          (["--sweep", "--sweep-heads", "rnn"], "rnn")])
def test_sweep_option_mistakes(cache3, tmp_path, args, needle):
    result = cli_run("fit-head", "-f", cache3, "-o", tmp_path / "x", *args)
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and needle in result.output and "Traceback" not in result.output


# -- pictures ----------------------------------------------------------------------------------------

@pytest.mark.skipif(not plots.available(), reason="matplotlib (extra `plots`) not installed")
def test_curves_and_confusion_pngs(cache3, tmp_path):
    ckpt, _ = bc.fit_head(cache3, str(tmp_path / "ck"), epochs=3)
    assert open(os.path.join(ckpt, "curves.png"), "rb").read(8) == PNG
    png = tmp_path / "pics" / "confusion.png"
    result = cli_run("evaluate", "-c", ckpt, "--confusion-png", png)
    assert result.exit_code == 0, result.output
    assert open(png, "rb").read(8) == PNG and "accuracy" in result.stdout
    assert [p for p in os.listdir(png.parent)] == ["confusion.png"]


@pytest.mark.skipif(not plots.available(), reason="matplotlib (extra `plots`) not installed")
def test_confusion_png_finds_a_cjk_font_installed_after_matplotlibs_font_cache(monkeypatch, capsys):
    """matplotlib caches its font list once: a CJK font installed since (as the hint says to) is still used."""
    import matplotlib
    from matplotlib import font_manager

    def family(path):
        try:
            return font_manager.ttfFontProperty(font_manager.get_font(path)).name
        except Exception:
            return None

    if not any(family(p) in plots.CJK_FONTS for p in font_manager.findSystemFonts()):
        pytest.skip("no CJK font installed")
    manager = font_manager.fontManager
    monkeypatch.setattr(manager, "ttflist", [f for f in manager.ttflist if f.name not in plots.CJK_FONTS])
    monkeypatch.setitem(matplotlib.rcParams, "font.sans-serif", list(matplotlib.rcParams["font.sans-serif"]))
    assert plots._drawable(["正向", "负向"]) == ["正向", "负向"]
    assert matplotlib.rcParams["font.sans-serif"][0] in plots.CJK_FONTS
    assert "no installed font" not in capsys.readouterr().err


def test_evaluate_tables_align_wide_class_names(named_checkpoint):
    """Chinese class names take two terminal columns a character: the tables stay aligned on a terminal."""
    import re
    import unicodedata

    def cells(text):
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)

    lines = ok("evaluate", "-c", named_checkpoint).stdout.splitlines()
    table = lines[1:lines.index("confusion matrix (rows: truth, columns: predicted)")]
    assert len(table) == 3 and "负向评价" in table[1]
    starts = {cells(line[:re.search(r"precision|\d", line).start()]) for line in table}
    assert len(starts) == 1, table  # every row's first number under `precision`
    matrix = lines[len(table) + 2:len(table) + 5]
    assert matrix[0].split() == ["负向评", "正向评"]  # the columns are named (cut to their 6 terminal columns)
    assert len({cells(line) for line in matrix}) == 1, matrix  # right-aligned columns: rows end together


def test_commands_work_without_matplotlib(cache3, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, as when not installed
    assert not plots.available()
    ck = tmp_path / "ck"
    fit = cli_run("fit-head", "-f", cache3, "-o", ck, "--epochs", 3)
    assert fit.exit_code == 0 and "saved" in fit.stdout
    assert "pip install 'bertcache[plots]'" in fit.stderr and not os.path.exists(ck / "curves.png")
    ev = cli_run("evaluate", "-c", ck, "--confusion-png", tmp_path / "c.png")
    assert ev.exit_code == 0 and "accuracy" in ev.stdout
    assert "bertcache[plots]" in ev.stderr and not os.path.exists(tmp_path / "c.png")


def test_fit_head_device_rule_by_step_size():
    """--device auto: the GPU only for heads whose optimizer steps are big enough to fill it."""
    import torch

    from pipeline import defaults as D
    from pipeline.encoder import resolve_device
    from pipeline.training import gpu_pays, head_device, step_work

    least = D.GPU_MIN_STEP_WORK
    assert not gpu_pays(least - 1) and gpu_pays(least)
    assert not gpu_pays(256 * 768 * 2)  # the recorded case: a linear head over 768 features trained slower on an H200
    assert step_work(256, 768, "mlp", 64, 2) == 256 * 768 * 64 and step_work(256, 768, "linear", 64, 2) == 256 * 768 * 2
    assert step_work(256, 768, "logreg", 64, 2, rows=10_000) == 10_000 * 768 * 2  # full-batch steps
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert head_device("auto", least - 1, found=cuda) == cpu
    assert head_device("auto", least, found=cuda) == cuda
    assert head_device(None, 10 ** 12, found=cpu) == cpu  # nothing better found: the CPU whatever the size
    assert head_device("cpu", 10 ** 12, found=cuda) == cpu  # given: as given
    assert head_device("auto", 10 ** 12) == resolve_device("auto")  # this machine: its best device for a big head


def test_validation_loss_weighs_classes_as_the_heads_training_does():
    """With class_weights="balanced" the sweep judges the ensemble and cross-fitted rows by the weighted
    cross-entropy the single heads' validation reports (torch's cross_entropy with weight=)."""
    import torch

    from pipeline.sweep import validation_loss
    from pipeline.training import class_weight_vector

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    y[:30] = 0  # imbalanced
    out = rng.dirichlet(np.ones(3), 50)
    w = class_weight_vector(y, 3)
    want = torch.nn.functional.cross_entropy(torch.tensor(np.log(out)), torch.tensor(y), weight=torch.tensor(w).double())
    assert validation_loss("classification", y, out, weight=w) == pytest.approx(float(want), rel=1e-6)
    assert validation_loss("classification", y, out) != pytest.approx(float(want), rel=1e-3)


def test_macro_f1_counts_predicted_classes_absent_from_the_split():
    """As scikit-learn's f1_score(average="macro"): classes true or predicted; one neither does not count."""
    from pipeline.metrics import classification_report

    y_true, y_pred = np.array([0, 0, 1, -1]), np.array([0, 2, 1, 3])  # -1: unlabelled, left out
    report = classification_report(y_true, y_pred, ["a", "b", "c", "d"])
    # F1 of a: 2/3 (precision 1, recall 1/2); b: 1; c: 0 (predicted once, never true); d: never true nor predicted
    assert report["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert report["accuracy"] == pytest.approx(2 / 3) and report["n"] == 3
    from pipeline.tasks import multilabel_report  # the same rule per label
    t = np.array([[1, 0, 0], [1, 1, 0]], dtype=np.int8)
    p = np.array([[1, 0, 1], [1, 1, 0]], dtype=np.int8)  # label 2 predicted, never true: F1 0, counted
    assert multilabel_report(t, p, ["x", "y", "z"])["macro_f1"] == pytest.approx((1 + 1 + 0) / 3)
    try:
        from sklearn.metrics import f1_score
    except ImportError:
        return
    assert report["macro_f1"] == pytest.approx(f1_score(y_true[:3], y_pred[:3], average="macro"))


def test_a_train_split_of_one_class_is_refused(tiny_model, tmp_path):
    """fit-head and the sweep on a cache whose train split has one class: one line, not 'val accuracy 1.0000'."""
    import os

    import pipeline as bc
    from helpers import one_line_error, run
    from pipeline.toy import toy_splits
    from tests.conftest import write_split_files

    splits = toy_splits(2, 30, 10, 10)
    one = {s: [(t, 1) for t, _ in rows] for s, rows in splits.items()}
    cache = bc.extract(tiny_model, write_split_files(str(tmp_path / "d"), "jsonl", one), str(tmp_path / "f.h5"),
                       precision="fp32", device="cpu", progress=False, label_names=["neg", "pos"])
    for extra in ([], ["--sweep"]):
        one_line_error(run("fit-head", "-f", cache, "-o", tmp_path / "ck", *extra), "one class only ('pos')",
                       exit_code=2)
        assert not os.path.exists(tmp_path / "ck")


def test_sweep_draws_no_bar_into_a_log_file(cache3, tmp_path):
    """stderr not a terminal (CliRunner's): the per-head lines only, no bar frames or blanked lines between them."""
    result = cli_run("fit-head", "-f", cache3, "-o", tmp_path / "sw", "--sweep", "--sweep-poolings", "mean",
                     "--sweep-heads", "linear", "--sweep-lrs", "1e-2,1e-3", "--epochs", 2, "--sweep-folds", 1)
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr and "head/s" not in result.stderr
    assert result.stderr.count(" val accuracy ") >= 2


def test_fit_head_says_when_validation_is_held_out_of_train(tiny_model, tmp_path):
    """No validation split: the 'val' figures are on 10% of train, and fit-head says so before printing them."""
    splits = default_splits(n_train=60, n_val=0, n_test=20)
    splits.pop("validation", None)
    cache = bc.extract(tiny_model, write_split_files(str(tmp_path / "d"), "jsonl", splits), str(tmp_path / "f.h5"),
                       precision="fp32", progress=False)
    result = cli_run("fit-head", "-f", cache, "-o", tmp_path / "ck", "--epochs", 2)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == "validation: 10% of train held out (no labelled validation split)"
    swept = cli_run("fit-head", "-f", cache, "-o", tmp_path / "sw", "--sweep", "--sweep-heads", "linear",
                    "--sweep-poolings", "mean", "--sweep-lrs", "1e-2", "--epochs", 2, "--sweep-folds", 1)
    assert swept.exit_code == 0 and "validation: 10% of train held out" in swept.stderr, swept.output
    with_val = cli_run("fit-head", "-f", cache, "-o", tmp_path / "sw5", "--sweep", "--sweep-heads", "linear",
                       "--sweep-poolings", "mean", "--sweep-lrs", "1e-2", "--epochs", 2, "--sweep-folds", 2)
    assert with_val.exit_code == 0 and "held out" not in with_val.stderr  # folds of train + validation: no hold-out


@pytest.mark.skipif(not plots.available(), reason="matplotlib (extra `plots`) not installed")
def test_logreg_curves_are_plotted_against_c(monkeypatch, tmp_path):
    """A logreg head's history is one fit per C: curves.png's x axis is C, not an 'epoch' that numbers the grid."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    history = [{"epoch": i + 1, "C": c, "train_loss": 1 - i / 10, "train_accuracy": 0.5 + i / 10, "val_loss": 0.9,
                "val_accuracy": 0.6, "iterations": 9} for i, c in enumerate([0.01, 0.1, 1.0])]
    plots.curves_png(history, 2, str(tmp_path / "curves.png"))
    loss = figures[0].axes[0]
    assert loss.get_xscale() == "log" and loss.get_xlabel().startswith("C ")
    assert list(loss.lines[0].get_xdata()) == [0.01, 0.1, 1.0]
    assert "best C 0.1" in [t.get_text() for t in loss.get_legend().get_texts()]
    plots.curves_png([{**h, "C": None} for h in history], 2, str(tmp_path / "curves.png"))  # epochs: as before
    assert figures[1].axes[0].get_xlabel() == "epoch" and figures[1].axes[0].get_xscale() == "linear"
    for fig in figures:
        plots._pyplot().close(fig)


@pytest.mark.skipif(not plots.available(), reason="matplotlib (extra `plots`) not installed")
def test_confusion_png_without_a_cjk_font_names_its_file_and_the_ids(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(plots, "CJK_FONTS", ("No Such Font",))
    report = {"confusion_matrix": [[3, 1], [0, 4]], "label_names": ["负向", "正向"], "accuracy": 0.875, "n": 8}
    plots.confusion_png(report, str(tmp_path / "cm.png"))
    err = capsys.readouterr().err
    assert err.startswith(f"{tmp_path / 'cm.png'}: no installed font") and "class 0 to class 1" in err
