"""Frozen heads past a tuned logistic regression: the logreg head (L-BFGS, C on validation) and the sweep's
greedy ensemble, saved as one checkpoint that evaluate, predict and info understand (tiny model)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import pipeline as bc
from pipeline.checkpoint import load_checkpoint
from pipeline.data import load_corpus
from pipeline.heads import Ensemble
from pipeline.info import as_text, describe
from pipeline.rows import ArrayRows
from pipeline.sweep import greedy_ensemble, sweep
from pipeline.training import fit_logreg
from conftest import default_splits, write_split_files
from helpers import one_line_error, run as cli_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three classes, a quarter of the labels replaced at random: no single head is right everywhere."""
    rng = np.random.default_rng(0)
    splits = {s: [(t, int(rng.integers(3)) if rng.random() < 0.25 else y) for t, y in rows]
              for s, rows in default_splits(3, n_train=150).items()}
    return write_split_files(str(tmp_path_factory.mktemp("data")), "jsonl", splits)


@pytest.fixture(scope="module")
def cache(tiny_model, data, tmp_path_factory):
    return bc.extract(tiny_model, data, str(tmp_path_factory.mktemp("f") / "f.h5"), precision="fp32", layers=2,
                      progress=False)


def _blobs(n, d=6, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + 1.5 * np.eye(k, d)[y] + 4
    return X.astype(np.float32), y


def test_logreg_matches_scikit_learn_at_the_same_C():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    assert sklearn
    X, y = _blobs(300)
    cpu = torch.device("cpu")
    for c in (0.01, 1.0):
        r = fit_logreg(ArrayRows(X, y, cpu), ArrayRows(X[:0], y[:0], cpu), 3, cs=[c])
        scaler = StandardScaler().fit(X)
        ref = LogisticRegression(C=c, max_iter=10000, tol=1e-10).fit(scaler.transform(X), y)
        np.testing.assert_allclose(r.head.predict_proba(X), ref.predict_proba(scaler.transform(X)), atol=1e-3)


def test_logreg_C_is_scikit_learns_for_two_classes_multilabel_and_ridge():
    """Two classes (scikit-learn's binomial LogisticRegression), one LogisticRegression per label, and
    Ridge(alpha = 1 / (2 C)) on the standardized target: the same C, the same fit."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(300, 6)) * rng.uniform(0.5, 3, 6) + 4).astype(np.float32)
    Xs = StandardScaler().fit_transform(X)
    cpu = torch.device("cpu")

    def logreg(y, k, c, task):
        return fit_logreg(ArrayRows(X, y, cpu), ArrayRows(X[:0], y[:0], cpu), k, cs=[c], task=task).head

    def sk(y, c):
        return LogisticRegression(C=c, max_iter=10000, tol=1e-10).fit(Xs, y).predict_proba(Xs)[:, 1]

    y = (X[:, 0] + 2 * rng.normal(size=300) > 4).astype(np.int64)
    Y = (X[:, :3] + 2 * rng.normal(size=(300, 3)) > 4).astype(np.int8)
    t = X @ rng.normal(size=6) + 3 * rng.normal(size=300)
    for c in (0.01, 0.1):
        np.testing.assert_allclose(logreg(y, 2, c, "classification").predict_proba(X)[:, 1], sk(y, c), atol=1e-3)
        np.testing.assert_allclose(logreg(Y, 3, c, "multilabel").predict_proba(X),
                                   np.column_stack([sk(Y[:, j], c) for j in range(3)]), atol=1e-3)
        ridge = Ridge(alpha=1 / (2 * c)).fit(Xs, (t - t.mean()) / t.std())
        np.testing.assert_allclose(logreg(t, 1, c, "regression").predict(X),
                                   ridge.predict(Xs) * t.std() + t.mean(), atol=1e-3 * t.std())


def test_logreg_keeps_the_C_with_the_best_validation_score():
    X, y = _blobs(200, seed=1)
    Xv, yv = _blobs(200, seed=2)
    cpu = torch.device("cpu")
    cs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    r = fit_logreg(ArrayRows(X, y, cpu), ArrayRows(Xv, yv, cpu), 3, cs=cs)
    fit_cs = [h["C"] for h in r.history]
    assert fit_cs == cs[:len(fit_cs)] and len(fit_cs) >= 3
    keys = [(h["val_accuracy"], -h["val_loss"]) for h in r.history]
    assert r.best_epoch == 1 + keys.index(max(keys))
    if len(fit_cs) < len(cs):  # the path stopped: the last Cs fit did not beat the best
        assert len(fit_cs) - r.best_epoch == 2
    # the penalty shrinks the weights: the weakest C fit has the largest norm
    norms = [torch.linalg.norm(s["net.weight"]).item() for s in (r.best_state, r.last_state)]
    assert r.best_epoch == len(fit_cs) or norms[0] < norms[1]
    assert (r.head.predict_proba(Xv).argmax(1) == yv).mean() == pytest.approx(r.history[r.best_epoch - 1]["val_accuracy"])


def test_fit_head_logreg_cli(cache, tmp_path):
    out = tmp_path / "lr"
    result = cli_run("fit-head", "-f", cache, "-o", out, "--head", "logreg", "--pooling", "mean", "--json")
    assert result.exit_code == 0, result.output
    config = json.load(open(out / "config.json"))
    assert config["head"]["type"] == "logreg" and config["training"]["C"] in config["training"]["Cs"]
    assert bc.evaluate(str(out))["accuracy"] == json.loads(result.stdout)["test"]["accuracy"]


def test_info_and_fit_head_name_a_logreg_heads_C_and_a_refit(cache, tmp_path):
    """A logreg head's history is one fit per C: the chosen C is reported, not an "epoch"; a refit head
    has trained on the validation rows, which info says."""
    out = tmp_path / "lr"
    result = cli_run("fit-head", "-f", cache, "-o", out, "--head", "logreg", "--pooling", "mean", "--refit",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = json.load(open(out / "config.json"))
    c = config["training"]["C"]
    assert f"best C {c:g} of {len(config['training']['Cs'])} fit" in result.stdout and "epoch" not in result.stdout
    text = "\n".join(as_text(describe(str(out))))
    assert f"best C       {c:g} (of {len(config['training']['Cs'])} fit)" in text and "best epoch" not in text
    assert "refit        on train + validation" in text


def test_label_smoothing_is_refused_for_a_logreg_head(cache, tmp_path):
    """fit_logreg fits scikit-learn's plain log-loss: a smoothing asked for would be silently dropped."""
    out = tmp_path / "lr"
    one_line_error(cli_run("fit-head", "-f", cache, "-o", out, "--head", "logreg", "--label-smoothing", "0.1"),
                   "--label-smoothing does not apply to --head logreg")
    assert not out.exists()


def test_greedy_ensemble_prefers_complementary_members():
    y = np.array([0, 0, 1, 1])
    right_on_0 = np.array([[.9, .1], [.9, .1], [.5, .5], [.5, .5]])
    right_on_1 = np.array([[.5, .5], [.5, .5], [.1, .9], [.1, .9]])
    wrong = np.array([[.2, .8], [.2, .8], [.8, .2], [.8, .2]])
    picks = greedy_ensemble([wrong, right_on_0, right_on_1], y)
    assert set(picks) == {1, 2} and abs(picks.count(1) - picks.count(2)) <= 1


def test_sweep_ensemble_checkpoint_evaluate_predict_info(cache, data, tmp_path):
    grid = dict(poolings=["cls", "mean", "mean-cat2"], heads=["logreg", "mlp"], lrs=[1e-2], epochs=15, progress=False)
    ckpt, ranked, metrics = sweep(cache, str(tmp_path / "sw"), **grid)
    ens = [r for r in ranked if r["head"] == "ensemble"]
    assert len(ens) == 1 and len(ens[0]["members"]) >= 2
    assert abs(sum(m["weight"] for m in ens[0]["members"]) - 1) < 1e-9
    keys = [(r["val_loss"], -r["val_accuracy"]) for r in ranked]  # ranked by validation log-loss
    assert keys == sorted(keys)
    assert metrics["sweep"]["score"] == "val_accuracy"
    assert metrics["sweep"]["selection"] == "validation loss, then validation accuracy"
    # greedy selection starts from the best single head's log-loss and only adds what lowers it
    assert ranked[0] is ens[0] and ens[0]["val_loss"] < min(r["val_loss"] for r in ranked if r["head"] != "ensemble")
    config, model = load_checkpoint(ckpt)
    assert isinstance(model, Ensemble) and config["head"]["type"] == "ensemble"
    assert len(model.members) == len(ens[0]["members"])
    assert bc.evaluate(ckpt)["accuracy"] == metrics["test"]["accuracy"]
    texts = load_corpus(data).splits["test"].texts
    live = bc.Predictor(ckpt, device="cpu").predict_proba(texts)
    with bc.FeatureStore(cache) as store:
        arrays = store.features("test")
        layers = store.settings["layers"]
        y = store.labels("test")
    cached = model.predict_features(arrays, layers)
    np.testing.assert_allclose(live, cached, atol=1e-4)
    assert metrics["test"]["accuracy"] == pytest.approx(float((cached.argmax(1) == y).mean()))
    assert "ensemble of" in as_text(describe(ckpt))[0]
    assert any("no epochs of its own" in line for line in as_text(describe(ckpt)))
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from pipeline.serve import create_app
    predictor = bc.Predictor(ckpt, device="cpu")
    with TestClient(create_app(predictor)) as client:  # serve reads an ensemble like any checkpoint
        got = client.post("/predict", json={"texts": texts[:3]}).json()["predictions"]
        np.testing.assert_allclose([list(p["probabilities"].values()) for p in got], live[:3], atol=1e-4)
        vectors = client.post("/v1/embeddings", json={"input": texts[:2]}).json()["data"]
        assert len(vectors) == 2 and len(vectors[0]["embedding"]) == predictor.embed(texts[0]).shape[0]
        assert client.get("/info").json()["head"]["type"] == "ensemble"
    by_accuracy = sweep(cache, str(tmp_path / "acc"), selection="score", **grid)[1]
    keys = [(-r["val_accuracy"], r["val_loss"]) for r in by_accuracy]
    assert keys == sorted(keys)


def test_fold_ids_are_stratified_balanced_and_seeded():
    from pipeline.training import fold_ids

    y = np.array([0] * 7 + [1] * 5 + [2] * 2)
    f = fold_ids(y, 3, seed=4)
    assert np.bincount(f).tolist() == [5, 5, 4]  # sizes differ by one at most
    for c in (0, 1):  # every class spread over the folds as evenly as it can be
        counts = np.bincount(f[y == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert (fold_ids(y, 3, seed=4) == f).all() and not (fold_ids(y, 3, seed=5) == f).all()
    assert np.bincount(fold_ids(np.linspace(0, 1, 10), 4, 0)).tolist() == [3, 3, 2, 2]  # targets: a plain deal


def test_cross_fitted_sweep_ranks_out_of_fold_and_averages_the_fold_models(cache, tmp_path):
    from pipeline import train as T
    from pipeline.sweep import resolve_folds, validation_loss

    ckpt, ranked, metrics = sweep(cache, str(tmp_path / "sw"), poolings=["mean"], heads=["mlp"], lrs=[1e-2],
                                  epochs=8, folds=3, ensemble=False, progress=False, device="cpu")
    row = ranked[0]
    assert [f["fold"] for f in row["folds"]] == [1, 2, 3] and metrics["sweep"]["folds"] == 3
    assert metrics["validation"].startswith("out of fold") and "3 folds" in metrics["validation"]
    # the row's figures are those of every train + validation row, each predicted by the model that did not see it
    with T.load_cache(cache, ["mean"]) as data:
        y, fold, view = T.fold_views(data, 3)
        assert len(y) == len(data.labels["train"]) + len(data.labels["validation"])
        out = np.zeros((len(y), len(data.label_names)))
        pooled = np.concatenate([data.arrays[s]["mean"] for s in ("train", "validation")])
        for k in range(3):
            part = view(k)  # trains on the other folds' rows, validates on fold k's: no row in both
            np.testing.assert_array_equal(part.arrays["train"]["mean"], pooled[fold != k])
            np.testing.assert_array_equal(part.arrays["validation"]["mean"], pooled[fold == k])
            np.testing.assert_array_equal(part.labels["validation"], y[fold == k])
            head = T.train(part, pooling="mean", head="mlp", lr=1e-2, epochs=8, device="cpu",
                           patience=10)[0].head
            out[fold == k] = T.predict_split(part, "validation", head, "mean")
        assert row["val_loss"] == pytest.approx(validation_loss("classification", y, out), abs=1e-6)
        assert row["val_accuracy"] == pytest.approx(float((out.argmax(1) == y).mean()))
        # the saved model is the mean of the three fold models, and predicts test as they do together
        config, model = load_checkpoint(ckpt)
        assert isinstance(model, Ensemble) and len(model.members) == 3
        # one state, stored once; --weights last reads it as best
        assert not os.path.exists(os.path.join(ckpt, "last.safetensors"))
        last = load_checkpoint(ckpt, weights="last")[1]
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values()))
        assert model.weights == pytest.approx([1 / 3] * 3) and config["training"]["folds"] == 3
        assert model.distinct_poolings() == ["mean"]  # built once for the three fold models
        assert "cross-fitted" in config["training"]["method"]
        mean = np.mean([T.predict_split(data, "test", h, "mean") for h in model.members], axis=0)
        np.testing.assert_allclose(T.predict_split(data, "test", model, "mean"), mean, atol=1e-6)
        assert bc.evaluate(ckpt)["accuracy"] == pytest.approx(float((mean.argmax(1) == data.labels["test"]).mean()))
        # auto: cross-fit small caches unless a refit is asked; a refit of cross-fitted heads is refused
        assert resolve_folds("auto", data) == 5 and resolve_folds("auto", data, refit=True) == 1
        with pytest.raises(bc.UserError, match="--refit does not go with --sweep-folds"):
            resolve_folds(3, data, refit=True)
        with pytest.raises(bc.UserError, match="--sweep-folds"):
            resolve_folds("many", data)
    # the greedy ensemble over cross-fitted heads keeps every fold model, info names each configuration once
    ckpt2, ranked2, _ = sweep(cache, str(tmp_path / "ens"), poolings=["cls", "mean"], heads=["logreg", "mlp"],
                              lrs=[1e-2], epochs=8, folds=2, progress=False, device="cpu")
    ens = next(r for r in ranked2 if r["head"] == "ensemble")
    assert len(ens["members"]) % 2 == 0 and {m["fold"] for m in ens["members"]} == {1, 2}
    assert abs(sum(m["weight"] for m in ens["members"]) - 1) < 1e-9
    text = as_text(describe(ckpt2))[0] if ranked2[0] is ens else ""
    assert not text or text.count(" mlp (") + text.count(" logreg (") <= 4


def test_sweep_folds_on_the_command_line(cache, tmp_path):
    out = cli_run("fit-head", "-f", cache, "--sweep", "--sweep-poolings", "mean", "--sweep-heads", "linear",
                  "--sweep-lrs", "1e-2", "--sweep-folds", "2", "--epochs", "3", "-o", tmp_path / "a", "--device", "cpu")
    assert out.exit_code == 0 and "ranked out of fold" in out.stdout and "2 folds" in out.stdout
    # its fold models trained on the validation rows: evaluate says so there, not on test
    assert "not held out" in cli_run("evaluate", "-c", tmp_path / "a", "--split", "validation").stderr
    assert "not held out" not in cli_run("evaluate", "-c", tmp_path / "a").stderr
    for args, needle in ((["--sweep-folds", "0"], "1 (one train / validation split) or more"),
                         (["--sweep-folds", "2", "--refit"], "--refit does not go with --sweep-folds")):
        one_line_error(cli_run("fit-head", "-f", cache, "--sweep", "--sweep-heads", "linear", *args,
                               "-o", tmp_path / "b"), needle)
    one_line_error(cli_run("fit-head", "-f", cache, "--sweep-folds", "2", "-o", tmp_path / "c"), "need --sweep")


def test_refit_trains_the_chosen_head_again_on_train_and_validation(cache, tmp_path):
    from pipeline import train as T
    from pipeline.training import fit

    _, plain = bc.fit_head(cache, str(tmp_path / "a"), pooling="mean", head="mlp", epochs=8, lr=1e-2, device="cpu")
    ckpt, metrics = bc.fit_head(cache, str(tmp_path / "b"), pooling="mean", head="mlp", epochs=8, lr=1e-2,
                                device="cpu", refit=True)
    assert metrics["best_epoch"] == plain["best_epoch"] >= 1
    with T.load_cache(cache, ["mean"], device="cpu") as data:
        X = np.concatenate([data.xy(s, "mean")[0] for s in ("train", "validation")])
        y = np.concatenate([data.labels[s] for s in ("train", "validation")])
        k = len(data.label_names)
    assert metrics["refit"]["rows"] == len(y)
    # the same as training that head by hand on both splits' rows for its best epoch count
    direct = fit(X, y, X[:0], y[:0], k, head="mlp", epochs=plain["best_epoch"], lr=1e-2, patience=None)
    config, head = load_checkpoint(ckpt)
    assert "refit" in config["training"]
    for name, value in direct.head.state_dict().items():
        np.testing.assert_allclose(head.state_dict()[name].numpy(), value.numpy(), atol=1e-6, err_msg=name)
    assert metrics["test"]["accuracy"] == bc.evaluate(ckpt)["accuracy"]
    # a sweep refits its winner, an ensemble member by member (each with its own epochs or C)
    grid = dict(poolings=["cls", "mean"], heads=["logreg", "mlp"], lrs=[1e-2], epochs=8, progress=False)
    ckpt, ranked, metrics = sweep(cache, str(tmp_path / "sw"), refit=True, **grid)
    config, model = load_checkpoint(ckpt)
    assert metrics["sweep"]["refit"] and metrics["refit"]["rows"] == len(y)
    if isinstance(model, Ensemble):
        assert all("best_epoch" in m and "C" in m for m in config["training"]["members"])
    assert bc.evaluate(ckpt)["accuracy"] == metrics["test"]["accuracy"]
    assert "--refit" in cli_run("fit-head", "--help").stdout
