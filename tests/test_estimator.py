"""The scikit-learn estimator over raw texts (pipeline/estimator.py), on the tiny random BERT."""
from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer  # noqa: E402

from pipeline import estimator as E  # noqa: E402
from pipeline.encoder import Encoder  # noqa: E402
from conftest import make_texts  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    rows = make_texts(60, seed=7)
    return [t for t, _ in rows], np.array(["负面" if y else "正面" for _, y in rows])


@pytest.fixture
def encoded(monkeypatch):
    """Every text the real encoder encodes (Encoder.encode wrapped, still run), from an empty cache."""
    E.clear_cache()
    seen = []
    original = Encoder.encode

    def counting(self, texts, on_progress=None):
        seen.extend(texts)
        return original(self, texts, on_progress)

    monkeypatch.setattr(Encoder, "encode", counting)
    yield seen
    E.clear_cache()


def make(tiny_model, **kw):
    return E.TextClassifier(tiny_model, precision="fp32", device="cpu", epochs=kw.pop("epochs", 30), **kw)


def test_sklearn_conventions(tiny_model, corpus, encoded):
    texts, y = corpus
    clf = make(tiny_model, pooling="cls+mean", head="mlp", hidden=16)
    params = clf.get_params()
    assert params["pooling"] == "cls+mean" and params["hidden"] == 16 and params["model"] == tiny_model
    assert clf.set_params(lr=3e-3, head="linear") is clf and clf.get_params()["lr"] == 3e-3
    assert not hasattr(clf, "classes_")  # the constructor stores params and nothing else
    assert clf.fit(texts, y) is clf
    assert list(clf.classes_) == ["正面", "负面"]  # string labels, sorted
    pred = clf.predict(texts[:5])
    assert pred.shape == (5,) and set(pred) <= set(clf.classes_)
    proba = clf.predict_proba(texts[:5])
    assert proba.shape == (5, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert (clf.classes_[proba.argmax(1)] == pred).all()
    assert clf.predict(texts[0]).shape == (1,)  # a string is one text, not its characters
    assert 0.0 <= clf.score(texts, y) <= 1.0
    # clone: same params, unfitted; it reuses the process cache, so fitting it encodes nothing
    twin = clone(clf)
    assert twin.get_params() == clf.get_params() and not hasattr(twin, "head_")
    before = len(encoded)
    twin.fit(texts, y)
    assert len(encoded) == before
    np.testing.assert_allclose(twin.predict_proba(texts[:5]), proba, rtol=1e-5, atol=1e-6)  # same seed, same head


def test_integer_labels_and_labels_the_head_learns(tiny_model, corpus, encoded):
    texts, y = corpus
    ids = (y == "负面").astype(int) * 3 + 2  # labels 2 and 5
    clf = make(tiny_model, pooling="mean", epochs=60, validation_fraction=0).fit(texts, ids)
    assert list(clf.classes_) == [2, 5] and clf.predict(texts).dtype.kind == "i"
    assert clf.score(texts, ids) > 0.7  # the label shows in the characters: the head fits its training texts
    with pytest.raises(Exception, match="one label per text"):
        clf.fit(texts, ids[:-1])


def test_grid_search_over_head_settings_encodes_each_text_once(tiny_model, corpus, encoded):
    texts, y = corpus
    grid = GridSearchCV(make(tiny_model, epochs=10), {"head": ["linear", "mlp"], "lr": [1e-2, 1e-3],
                                                      "pooling": ["cls", "mean"]}, cv=3)
    grid.fit(texts, y)
    assert len(grid.cv_results_["params"]) == 8  # 8 settings x 3 folds + the refit: 25 fits
    assert sorted(encoded) == sorted(set(texts))  # yet every distinct text went through the encoder once
    grid.best_estimator_.predict(texts[:3])
    clone(grid).fit(texts, y)  # a second search: nothing new to encode
    assert sorted(encoded) == sorted(set(texts))


def test_pipeline_and_cross_val_score(tiny_model, corpus, encoded):
    texts, y = corpus
    pipe = Pipeline([("strip", FunctionTransformer(lambda X: [x.strip() for x in X])),
                     ("clf", make(tiny_model, epochs=10))])
    scores = cross_val_score(pipe, [f"  {t} " for t in texts], y, cv=3)
    assert scores.shape == (3,) and all(0.0 <= s <= 1.0 for s in scores)
    pipe.set_params(clf__head="mlp")
    assert pipe.fit(texts, y).predict(texts[:4]).shape == (4,)
    assert len(encoded) == len(set(texts))


def test_cache_dir_shares_vectors_across_processes_caches(tiny_model, corpus, encoded, tmp_path):
    texts, y = corpus
    first = make(tiny_model, cache_dir=str(tmp_path / "vectors")).fit(texts, y)
    assert len(encoded) == len(set(texts))
    E.clear_cache()  # as a new process would start: only the files remain
    second = make(tiny_model, cache_dir=str(tmp_path / "vectors")).fit(texts, y)
    assert len(encoded) == len(set(texts))  # read from the npz files, not encoded again
    np.testing.assert_allclose(second.predict_proba(texts), first.predict_proba(texts), rtol=1e-5, atol=1e-6)
    other = make(tiny_model, max_length=8).fit(texts, y)  # other encoder settings: other vectors
    assert len(encoded) == 2 * len(set(texts))
    assert other.predict_proba(texts).shape == (len(texts), 2)


def test_cache_dir_files_written_meanwhile_are_read(tiny_model, corpus, encoded, tmp_path):
    """A running process finds vectors another process (a GridSearchCV worker) wrote after it first looked."""
    texts, y = corpus
    folder = str(tmp_path / "vectors")
    make(tiny_model, cache_dir=folder).fit(texts[:30], y[:30])
    n = len(encoded)
    enc = Encoder(tiny_model, precision="fp32", device="cpu")  # "the other process": its own encoder and file
    rest = list(dict.fromkeys(texts[30:]))
    arrays = enc.encode(rest)
    rows = np.concatenate([arrays[name] for name in enc.feature_names()], axis=1)
    E._save(f"{folder}/{E.encoder_fingerprint(enc)}", [E._digest(t) for t in rest], rows)
    before = len(encoded)
    make(tiny_model, cache_dir=folder).fit(texts, y)
    assert before - n == len(rest) and len(encoded) == before  # the other process's own encode, then none


@pytest.mark.parametrize("params, name, value", [({"validation_fraction": 1.5}, "validation_fraction", "1.5"),
                                                ({"validation_fraction": -0.1}, "validation_fraction", "-0.1"),
                                                ({"validation_fraction": 1}, "validation_fraction", "1"),
                                                ({"head": "mlp", "hidden": 0}, "hidden", "0"),
                                                ({"dropout": 1.0}, "dropout", "1.0"),
                                                ({"patience": -1}, "patience", "-1"),
                                                ({"lr": -1e-3}, "lr", "-0.001"),
                                                ({"seed": -1}, "seed", "-1"), ({"seed": None}, "seed", "None")])
def test_fit_refuses_numbers_out_of_range_before_encoding(tiny_model, corpus, encoded, params, name, value):
    texts, y = corpus
    message = rf"^{name} must be [^\n]*, not {re.escape(value)}$"
    with pytest.raises(E.UserError, match=message):
        make(tiny_model, **params).fit(texts, y)
    with pytest.raises(E.UserError, match=message):
        E.TextRegressor(tiny_model, precision="fp32", device="cpu", **params).fit(texts, np.arange(len(texts)) * 1.0)
    assert encoded == []


def test_a_numpy_integer_seed_as_a_grid_gives_it(tiny_model, corpus, encoded):
    """GridSearchCV over {"seed": np.arange(2)} sets numpy integers (torch's Generator refused them)."""
    texts, y = corpus
    grid = GridSearchCV(make(tiny_model, epochs=2), {"seed": np.arange(2)}, cv=2, error_score="raise").fit(texts, y)
    assert [p["seed"] for p in grid.cv_results_["params"]] == [0, 1]
    np.testing.assert_allclose(make(tiny_model, epochs=2, seed=np.int64(1)).fit(texts, y).predict_proba(texts[:3]),
                               make(tiny_model, epochs=2, seed=1).fit(texts, y).predict_proba(texts[:3]), rtol=1e-6)


def test_fit_takes_the_ends_of_each_range(tiny_model, corpus, encoded):
    texts, y = corpus
    clf = make(tiny_model, epochs=3, validation_fraction=0.0, head="mlp", hidden=1, dropout=0.0, patience=0,
               weight_decay=0.0, label_smoothing=0.0, batch_size=1).fit(texts, y)
    assert clf.best_epoch_ == 3 and len(clf.history_) == 3  # no hold-out: every text trains, the last epoch is kept


def test_sklearn_edges(tiny_model, corpus, encoded):
    from sklearn.exceptions import NotFittedError

    texts, y = corpus
    with pytest.raises(NotFittedError):
        make(tiny_model).predict(texts[:2])
    with pytest.raises(E.UserError, match="every text must be a str; got NoneType"):
        make(tiny_model).fit(texts[:9] + [None], y[:10])
    with pytest.raises(ValueError, match="Mix of label input types"):
        make(tiny_model).fit(texts[:4], [0, "a", 1, "a"])
    column = make(tiny_model, epochs=3).fit(texts, y[:, None])  # a column of labels, as scikit-learn takes it
    assert column.predict(texts[:3]).shape == (3,) and list(column.classes_) == ["正面", "负面"]
    tags = column.__sklearn_tags__()
    assert tags.input_tags.one_d_array and tags.input_tags.string and tags.classifier_tags.multi_label
    enc = Encoder(tiny_model, precision="fp32", device="cpu")
    assert enc.encode("好棒的东西")["cls"].shape == (1, enc.hidden_size)  # one str: one text
    assert enc.encode(np.array(["好", "坏"]))["cls"].shape == (2, enc.hidden_size)



def test_one_class_is_refused_before_encoding(tiny_model, corpus, encoded):
    """A classifier of one class scores a perfect, meaningless validation: refused, as scikit-learn does."""
    from pipeline.errors import UserError
    texts, _ = corpus
    with pytest.raises(UserError, match="at least two classes; y has one only"):
        make(tiny_model).fit(texts[:10], ["正面"] * 10)
    assert encoded == []


def test_set_params_after_fit_that_changes_the_heads_input_is_refused(tiny_model, corpus, encoded):
    """A head fitted on mean vectors read cls ones after set_params(pooling="cls"): other predictions, silently
    (or torch's shape error for a wider pooling). predict names the parameter; the next fit takes the new value."""
    texts, y = corpus
    clf = make(tiny_model, pooling="mean", epochs=3).fit(texts, y)
    for params in ({"pooling": "cls"}, {"pooling": "cls+mean"}, {"max_length": 16}):
        clf.set_params(**params)
        with pytest.raises(E.UserError, match=rf"^{next(iter(params))} is .* but the head was fitted on .*; fit again"):
            clf.predict(texts[:2])
        clf.set_params(pooling="mean", max_length=E.DEFAULT_MAX_LENGTH)
    proba = clf.predict_proba(texts[:2])
    clf.set_params(batch_tokens=64, epochs=99)  # the encoder's batching and training settings leave the input as it is
    np.testing.assert_allclose(clf.predict_proba(texts[:2]), proba, rtol=1e-5, atol=1e-6)
    assert clf.set_params(pooling="cls", epochs=3).fit(texts, y).predict(texts[:2]).shape == (2,)


def test_fit_with_no_text_to_train_on_says_why(tiny_model, corpus, encoded):
    """Not the feature cache's "the train split has no labelled rows": the estimators have no splits."""
    texts, y = corpus
    with pytest.raises(E.UserError, match="^fit needs at least one text$"):
        E.TextRegressor(tiny_model, precision="fp32", device="cpu").fit([], [])
    with pytest.raises(E.UserError, match=r"^validation_fraction 0.9 holds out all 4 texts; give more texts or a "):
        make(tiny_model, validation_fraction=0.9).fit(texts[:4], y[:4])
    with pytest.raises(E.UserError, match=r"^validation_fraction 0.9 holds out all 2 texts"):
        E.TextRegressor(tiny_model, precision="fp32", device="cpu", validation_fraction=0.9).fit(texts[:2], [1.0, 2.0])


def test_targets_that_are_not_numbers_and_two_text_columns_are_named(tiny_model, corpus):
    texts, y = corpus
    with pytest.raises(E.UserError, match=r"^a regression target must be a number .*use TextClassifier"):
        E.TextRegressor(tiny_model, precision="fp32", device="cpu").fit(texts[:2], ["good", "bad"])
    with pytest.raises(E.UserError, match=r"^give one column of texts, not 2 columns"):
        make(tiny_model).fit(np.array([texts[:4], texts[4:8]]).T, y[:4])


def test_label_smoothing_is_refused_for_a_logreg_head_as_fit_head_refuses_it(tiny_model, corpus):
    texts, y = corpus
    with pytest.raises(E.UserError, match="^label_smoothing does not apply to head='logreg'"):
        make(tiny_model, head="logreg", label_smoothing=0.1).fit(texts, y)
