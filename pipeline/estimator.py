"""scikit-learn estimators over raw texts: the frozen encoder plus a head, in one estimator.

`TextClassifier` classifies (one label per text, or, given a 2-D 0/1 indicator matrix as y, several:
multilabel, with one threshold per label tuned on the hold-out); `TextRegressor` predicts a number
(targets standardized on the training texts, early stopping on validation Spearman).

`TextClassifier` follows scikit-learn's conventions (the constructor only stores its arguments,
`fit` returns self, `classes_`, `get_params` / `set_params`), so it works in `Pipeline`,
`GridSearchCV` and `cross_val_score`. The encoder is the expensive half: its vectors are kept in a
cache of this process keyed by (the encoder's settings, the text), so refitting with other head
settings, a clone made by `GridSearchCV`, or a later fold never encodes a text twice. With
`cache_dir`, the vectors also go to disk (for `n_jobs > 1`, whose workers are other processes, and
for the next session). Encoding and training are the package's own: `Encoder`, and training.py's
loop with early stopping on a stratified hold-out of the training texts.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets, unique_labels
    from sklearn.utils.validation import check_is_fitted
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("pipeline.estimator needs scikit-learn: pip install 'bertcache[sklearn]' "
                      "(or pip install scikit-learn)") from e

from . import defaults as D
from .encoder import DEFAULT_MAX_LENGTH, Encoder
from .errors import UserError, as_texts
from .poolings import build_features
from .tasks import tune_thresholds
from .training import class_weight_vector, holdout
from .training import fit as fit_arrays, head_device, step_work

# The parameters that decide the head's input: changed by set_params after fit, predict refuses to run. (Not model:
# a path, which may move with the same weights; nor precision or device, which only round the same vectors.)
_FEATURE_PARAMS = ("pooling", "layers", "max_length", "prefix", "revision", "long_texts", "stride")

# Process-wide caches: loaded encoders by their arguments, vectors by (encoder fingerprint, text digest).
_LOCK = threading.RLock()
_ENCODERS: dict[tuple, Encoder] = {}
_VECTORS: dict[str, dict[bytes, np.ndarray]] = {}
_LOADED_FILES: dict[tuple[str, str], set[str]] = {}  # (cache_dir, encoder fingerprint) -> npz files read


def clear_cache() -> None:
    """Forget the loaded encoders and cached vectors of this process (files in a `cache_dir` stay). Call it
    after changing a model folder in place: loaded encoders are kept by the folder's path."""
    with _LOCK:
        _ENCODERS.clear()
        _VECTORS.clear()
        _LOADED_FILES.clear()


class _TextEstimator(BaseEstimator):
    """What TextClassifier and TextRegressor share: their arguments, the encoder and its cached vectors.

    Args:
        model: encoder: a model folder, a hub id, or "e5-small" (built from PyPI, no hub needed).
        pooling: what the head reads: cls, mean, cls_<layer>, mean-avg<k>, cls-cat<k>, or terms joined by +.
        head: "linear", "mlp" or "logreg" (full-batch L-BFGS, its L2 strength chosen on the hold-out).
        hidden, dropout: the mlp head's hidden units and dropout.
        epochs, lr, weight_decay, batch_size: AdamW training of the head.
        patience: stop after this many epochs without a better validation score (None or 0: never).
        validation_fraction: share of the training texts held out (stratified) to pick the best epoch,
            from 0 up to (not including) 1; 0 trains on all and keeps the last epoch.
        label_smoothing: of the cross-entropy loss.
        class_weights: None or "balanced".
        seed: seeds the head's initial weights, the batch order and the hold-out.
        layers: encoder layers whose [CLS] and mean vectors are computed (poolings may read the last K).
        max_length, prefix, precision, batch_tokens, revision: as in `extract` (e5 models expect
            prefix "query: "; None, as there, takes a sentence-transformers folder's default prompt, "" none).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps", for the encoder and the head.
        cache_dir: also keep the encoded vectors in this folder (npz files, never pickles), to share them
            with other processes (GridSearchCV with n_jobs > 1) and later sessions.
        progress: show a progress bar on stderr while encoding.
        long_texts, stride: "truncate" texts past max_length, or "chunk" them into windows sharing
            `stride` tokens and average the window vectors (as `extract --long-texts`).

    Attributes after `fit`: head_ (the trained heads.Head), history_ (per-epoch losses and validation
    scores), best_epoch_, feature_params_ (the pooling and encoder settings the head was fitted on: changed
    by set_params, predict refuses until the next fit); TextClassifier also classes_ (the labels, sorted; label columns for multilabel)
    and thresholds_ (multilabel: one per label; else None).

    Example:

        from sklearn.model_selection import GridSearchCV
        from pipeline.estimator import TextClassifier

        texts, y = ["这本书写得真好", "质量太差了", "物流很快", "屏幕有坏点"], ["pos", "neg", "pos", "neg"]
        clf = TextClassifier("e5-small", prefix="query: ", pooling="mean").fit(texts, y)
        clf.predict(["包装也不错，很满意", "退货还很麻烦"])  # array(['pos', 'neg'], dtype='<U3')
        grid = GridSearchCV(clf, {"head": ["linear", "mlp"], "lr": [1e-3, 3e-4]}, cv=2)
        grid.fit(texts * 5, y * 5)                          # encodes each distinct text once
    """

    def __init__(self, model: str = "e5-small", *, pooling: str = "mean", head: str = "linear",
                 hidden: int = D.HIDDEN, dropout: float = D.DROPOUT, epochs: int = D.EPOCHS, lr: float = D.LR,
                 weight_decay: float = D.WEIGHT_DECAY, batch_size: int = D.BATCH_SIZE,
                 patience: int | None = D.PATIENCE, validation_fraction: float = D.VAL_FRACTION,
                 label_smoothing: float = 0.0, class_weights: str | None = None, seed: int = D.SEED,
                 layers: int = 1, max_length: int = DEFAULT_MAX_LENGTH, prefix: str | None = None, precision: str = "auto",
                 batch_tokens: int | None = None, revision: str | None = None, device: str = "auto",
                 cache_dir: str | None = None, progress: bool = False, long_texts: str = "truncate",
                 stride: int | None = None):
        self.model = model
        self.pooling = pooling
        self.head = head
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        self.seed = seed
        self.layers = layers
        self.max_length = max_length
        self.prefix = prefix
        self.precision = precision
        self.batch_tokens = batch_tokens
        self.revision = revision
        self.device = device
        self.cache_dir = cache_dir
        self.progress = progress
        self.long_texts = long_texts
        self.stride = stride

    def _fit_head(self, X_all, y, k, task, weights=None):
        """Train the head with a held-out share of the rows (stratified for class ids); returns the held-out rows."""
        n = len(X_all)
        if self.validation_fraction:  # _check_params refused a negative one
            train, val = holdout(y, self.validation_fraction, self.seed)
            if not len(train):
                raise UserError(f"validation_fraction {self.validation_fraction} holds out all {n} texts; "
                                "give more texts or a smaller validation_fraction (0: train on all)")
        else:
            train, val = np.arange(n), np.arange(0)
        work = step_work(self.batch_size, X_all.shape[1], self.head, self.hidden, k, rows=len(train))
        result = fit_arrays(X_all[train], y[train], X_all[val], y[val], k, device=head_device(self.device, work),
                            head=self.head, hidden=self.hidden, dropout=self.dropout, epochs=self.epochs, lr=self.lr,
                            weight_decay=self.weight_decay, batch_size=self.batch_size, seed=self.seed,
                            patience=self.patience, label_smoothing=self.label_smoothing,
                            class_weights=weights(train) if weights else None, task=task)
        self.head_, self.history_, self.best_epoch_ = result.head, result.history, result.best_epoch
        self.feature_params_ = {name: getattr(self, name) for name in _FEATURE_PARAMS}
        return val

    def _check_params(self) -> None:
        """Refuse, before any encoding, a number outside the range its option takes (defaults.BOUNDS), and
        what a logreg head cannot do (as fit_head refuses it)."""
        D.check_ranges(**self.get_params())
        if self.head == "logreg" and self.label_smoothing:
            raise UserError("label_smoothing does not apply to head='logreg' (it fits scikit-learn's unsmoothed "
                            "log-loss); leave it at 0, or use head='linear' or 'mlp'")

    # -- the encoder and its vectors ----------------------------------------------------------------

    def _apply_head(self, X, method: str, width: int | None) -> np.ndarray:
        """The fitted head's `method` ("predict_proba" or "predict") over the texts X; no texts give an empty
        array of shape [0, width] ([0] when width is None)."""
        check_is_fitted(self, "head_")
        for name, fitted in getattr(self, "feature_params_", {}).items():  # set_params after fit: not the head's input
            if getattr(self, name) != fitted:
                raise UserError(f"{name} is {getattr(self, name)!r} but the head was fitted on {fitted!r}; "
                                f"fit again, or set_params({name}={fitted!r})")
        texts = _texts(X)
        if not texts:
            return np.zeros((0,) if width is None else (0, width), np.float32)
        return getattr(self.head_, method)(self._features(texts))

    def _features(self, texts: list[str]) -> np.ndarray:
        """The head's input matrix for `texts`, encoding only the texts not cached yet."""
        encoder = self._encoder()
        arrays = _cached_vectors(encoder, texts, self.cache_dir, self.progress)
        return build_features(arrays, self.pooling, encoder.layers)

    def _encoder(self) -> Encoder:
        key = (self.model, self.layers, self.max_length, self.prefix, self.precision, self.batch_tokens,
               self.revision, self.device, self.long_texts, self.stride)
        with _LOCK:
            if key not in _ENCODERS:
                _ENCODERS[key] = Encoder(self.model, device=self.device, precision=self.precision,
                                         max_length=self.max_length, prefix=self.prefix, layers=self.layers,
                                         revision=self.revision, batch_tokens=self.batch_tokens,
                                         long_texts=self.long_texts, stride=self.stride)
            return _ENCODERS[key]

    def _more_tags(self):  # scikit-learn < 1.6
        return {"X_types": ["string"]}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True  # X is a 1-D sequence of texts
        tags.input_tags.string = True
        return tags


class TextClassifier(ClassifierMixin, _TextEstimator):
    """Classify raw texts: a frozen encoder's pooled vectors, then a trained linear or MLP head.

    y is one label per text, or a 2-D 0/1 indicator matrix [texts, labels] for multilabel (a sigmoid
    per label; `thresholds_` tuned per label on the hold-out; predict gives the indicator matrix).
    Arguments: see `_TextEstimator` below (the same for TextRegressor).

    Example:

        from pipeline.estimator import TextClassifier

        texts, y = ["这本书写得真好", "质量太差了", "物流很快", "屏幕有坏点"], ["pos", "neg", "pos", "neg"]
        clf = TextClassifier("e5-small", prefix="query: ", pooling="mean").fit(texts, y)
        clf.predict(["包装也不错，很满意", "退货还很麻烦"])  # array(['pos', 'neg'], dtype='<U3')

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import make_texts, toy_model
        >>> texts, y = zip(*make_texts(120))
        >>> clf = TextClassifier(toy_model(tempfile.mkdtemp()), epochs=20).fit(list(texts), ["neg pos".split()[i] for i in y])
        >>> clf.classes_.tolist(), clf.predict(["好棒", "太差"]).shape, clf.predict_proba(["好棒"]).shape
        (['neg', 'pos'], (2,), (1, 2))
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True  # a 2-D 0/1 y
        return tags

    def fit(self, X, y):
        """Encode the texts (those not cached yet) and train the head; returns self.

        Args:
            X: the training texts (a list, array or Series of str).
            y: their labels (ints or strings), one per text; or a 0/1 matrix [texts, labels] (multilabel).

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import make_texts, toy_model
            >>> texts, y = zip(*make_texts(40))
            >>> clf = TextClassifier(toy_model(tempfile.mkdtemp()), epochs=5)
            >>> clf.fit(list(texts), ["neg pos".split()[i] for i in y]) is clf, clf.classes_.tolist()
            (True, ['neg', 'pos'])
        """
        self._check_params()
        texts = _texts(X)
        if not texts:
            raise UserError("fit needs at least one text")
        if getattr(y, "ndim", 1) != 2:
            check_classification_targets(y)
            unique_labels(y)  # on y as given: a mix of ints and strings is refused, as scikit-learn does
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()  # a column of labels, as scikit-learn takes it (a one-label indicator is the same task)
        if len(y) != len(texts) or y.ndim not in (1, 2):
            raise UserError(f"fit needs one label per text (or a 0/1 row, multilabel): {len(texts)} texts, "
                            f"labels of shape {y.shape}")
        if self.class_weights not in (None, "none", "balanced"):
            raise UserError(f"unknown class_weights {self.class_weights!r}; use None or 'balanced'")
        if y.ndim == 1 and len(np.unique(y)) < 2:  # before encoding; scikit-learn's classifiers refuse it too
            raise UserError(f"fit needs texts of at least two classes; y has one only ({y[0].item()!r})")
        X_all = self._features(texts)
        if y.ndim == 2:  # multilabel
            if not np.isin(y, (0, 1)).all():
                raise UserError("a 2-D y is a multilabel indicator matrix: 0 and 1 only")
            self.classes_ = np.arange(y.shape[1])
            y = y.astype(np.int8)
            val = self._fit_head(X_all, y, y.shape[1], "multilabel")
            probs = self.head_.predict(X_all[val]) if len(val) else np.zeros((0, y.shape[1]))
            self.thresholds_ = tune_thresholds(y[val], probs) if len(val) else np.full(y.shape[1], 0.5)
            return self
        check_classification_targets(y)
        self.classes_, y_ids = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        self.thresholds_ = None
        weights = (lambda train: class_weight_vector(y_ids[train], k)) if self.class_weights == "balanced" else None
        self._fit_head(X_all, y_ids, k, "classification", weights)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, [n, len(classes_)], columns in the order of classes_.

        Args:
            X: texts (a list, array or Series of str; one str counts as one text).

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import make_texts, toy_model
            >>> texts, y = zip(*make_texts(40))
            >>> clf = TextClassifier(toy_model(tempfile.mkdtemp()), epochs=5).fit(list(texts), list(y))
            >>> clf.predict_proba(["好棒", "太差", "还可以"]).shape, clf.predict_proba("好棒").shape
            ((3, 2), (1, 2))
        """
        check_is_fitted(self, "head_")  # before classes_ is read: NotFittedError, as scikit-learn raises
        return self._apply_head(X, "predict_proba", len(self.classes_))

    def predict(self, X) -> np.ndarray:
        """The most probable label of every text, as an array of classes_' type.

        Args:
            X: texts (a list, array or Series of str; one str counts as one text).

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import make_texts, toy_model
            >>> texts, y = zip(*make_texts(40))
            >>> labels = ["neg pos".split()[i] for i in y]
            >>> clf = TextClassifier(toy_model(tempfile.mkdtemp()), epochs=5).fit(list(texts), labels)
            >>> predicted = clf.predict(["好棒", "太差", "还可以"])
            >>> predicted.shape, set(predicted) <= {"neg", "pos"}
            ((3,), True)
        """
        probs = self.predict_proba(X)
        if self.thresholds_ is not None:  # multilabel: the indicator matrix
            return (probs >= self.thresholds_).astype(np.int64)
        return self.classes_[probs.argmax(1)]


class TextRegressor(RegressorMixin, _TextEstimator):
    """Predict a number from raw texts: a frozen encoder's pooled vectors, then a trained head (mean squared
    error on targets standardized on the training texts; the best epoch by hold-out Spearman).
    Arguments: see `_TextEstimator` (label_smoothing and class_weights do not apply).

    Example:

        from pipeline.estimator import TextRegressor

        reg = TextRegressor("e5-small", prefix="query: ").fit(["很好", "还行", "很差"], [5.0, 3.0, 1.0])
        reg.predict(["不错"])                               # array([...]), in the targets' units
        reg.score(["很好", "很差"], [5.0, 1.0])             # R^2 (scikit-learn's RegressorMixin)

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import make_texts, toy_model
        >>> texts, y = zip(*make_texts(120))
        >>> reg = TextRegressor(toy_model(tempfile.mkdtemp()), epochs=20).fit(list(texts), [1.0 + 4 * v for v in y])
        >>> reg.predict(["好棒", "太差"]).shape
        (2,)
    """

    def fit(self, X, y):
        """Encode the texts (those not cached yet) and train the head; returns self.

        Args:
            X: the training texts (a list, array or Series of str).
            y: one finite number per text.

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import make_texts, toy_model
            >>> texts, y = zip(*make_texts(40))
            >>> reg = TextRegressor(toy_model(tempfile.mkdtemp()), epochs=5)
            >>> reg.fit(list(texts), [1.0 + 4 * v for v in y]) is reg, 1 <= reg.best_epoch_ <= 5
            (True, True)
        """
        self._check_params()
        texts = _texts(X)
        if not texts:
            raise UserError("fit needs at least one text")
        try:
            y = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as e:  # "could not convert string to float: 'good'"
            raise UserError(f"a regression target must be a number ({e}); use TextClassifier for labels") from e
        if y.ndim != 1 or len(y) != len(texts):
            raise UserError(f"fit needs one target per text: {len(texts)} texts, targets of shape {y.shape}")
        if not np.isfinite(y).all():
            raise UserError("the targets hold NaN or inf; give every text a finite number")
        self._fit_head(self._features(texts), y, 1, "regression")
        return self

    def predict(self, X) -> np.ndarray:
        """The predicted number of every text, in the targets' units.

        Args:
            X: texts (a list, array or Series of str; one str counts as one text).

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import make_texts, toy_model
            >>> texts, y = zip(*make_texts(40))
            >>> reg = TextRegressor(toy_model(tempfile.mkdtemp()), epochs=5).fit(list(texts), [1.0 + 4 * v for v in y])
            >>> reg.predict(["好棒", "太差"]).shape, reg.predict("好棒").dtype
            ((2,), dtype('float64'))
        """
        return self._apply_head(X, "predict", None).astype(np.float64)


def _texts(X) -> list[str]:
    """Texts from a list, a 1-D array, a one-column 2-D array or DataFrame (as a ColumnTransformer gives)."""
    if hasattr(X, "to_numpy") and not isinstance(X, str):
        X = X.to_numpy()
    if isinstance(X, np.ndarray) and X.ndim == 2:
        if X.shape[1] != 1:
            raise UserError(f"give one column of texts, not {X.shape[1]} columns (shape {X.shape}); pick the "
                            "text column (e.g. df['text'])")
        X = X[:, 0]
    _, texts = as_texts(X)
    return texts


def encoder_fingerprint(encoder: Encoder) -> str:
    """What decides an encoder's vectors (weights, tokenizer, max_length, prefix, precision, layers)."""
    settings = {k: v for k, v in encoder.settings().items() if k != "model"}  # a path alone changes nothing
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()


def _cached_vectors(encoder: Encoder, texts: list[str], cache_dir: str | None,
                    progress: bool) -> dict[str, np.ndarray]:
    """Feature name -> [len(texts), hidden] for `texts`, from the cache or encoded (then cached)."""
    names, h = encoder.feature_names(), encoder.hidden_size
    fp = encoder_fingerprint(encoder)
    digests = [_digest(t) for t in texts]
    with _LOCK:
        table = _VECTORS.setdefault(fp, {})
        seen = _LOADED_FILES.setdefault((cache_dir, fp), set()) if cache_dir else None
        todo = _missing(table, digests, texts)
        if todo and cache_dir:  # files other processes (GridSearchCV's workers) may have written since
            _load_dir(os.path.join(cache_dir, fp), table, seen)
            todo = _missing(table, digests, texts)
        if todo:
            from tqdm.auto import tqdm
            with tqdm(total=len(todo), unit="text", desc="encode", disable=not progress, dynamic_ncols=True) as bar:
                arrays = encoder.encode(list(todo.values()), on_progress=bar.update)
            rows = np.concatenate([arrays[n] for n in names], axis=1)
            table.update(zip(todo, rows))
            if cache_dir:
                seen.add(_save(os.path.join(cache_dir, fp), list(todo), rows))
        matrix = np.stack([table[d] for d in digests]) if digests else np.zeros((0, len(names) * h), np.float32)
    return {n: matrix[:, i * h:(i + 1) * h] for i, n in enumerate(names)}


def _missing(table: dict, digests: list[bytes], texts: list[str]) -> dict:
    todo = {}
    for d, t in zip(digests, texts):
        if d not in table:
            todo.setdefault(d, t)
    return todo


def _load_dir(folder: str, table: dict, seen: set) -> None:
    """Read the npz files of `folder` not in `seen` into `table` (and add them to `seen`)."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npz") or name in seen:
            continue
        with np.load(os.path.join(folder, name), allow_pickle=False) as f:
            table.update(zip(map(bytes, f["digests"]), f["vectors"]))
        seen.add(name)


def _save(folder: str, digests: list[bytes], rows: np.ndarray) -> str:
    """One more npz file of (digests, vectors), written under a temporary name and renamed when whole;
    returns its name."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"vectors-{uuid.uuid4().hex}.npz")
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        # Digests as uint8 rows: numpy's bytes dtype would drop a digest's trailing zero bytes.
        np.savez(f, digests=np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 20),
                 vectors=rows.astype(np.float32))
    os.replace(tmp, path)
    return os.path.basename(path)
