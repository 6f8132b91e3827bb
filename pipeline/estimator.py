"""A scikit-learn classifier over raw texts: the frozen encoder plus a head, in one estimator.

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
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("pipeline.estimator needs scikit-learn: pip install 'bertcache[sklearn]' "
                      "(or pip install scikit-learn)") from e

from . import defaults as D
from .encoder import DEFAULT_MAX_LENGTH, Encoder, resolve_device
from .errors import UserError
from .poolings import build_features
from .predict import as_texts
from .training import class_weight_vector, holdout
from .training import fit as fit_arrays

# Process-wide caches: loaded encoders by their arguments, vectors by (encoder fingerprint, text digest).
_LOCK = threading.RLock()
_ENCODERS: dict[tuple, Encoder] = {}
_VECTORS: dict[str, dict[bytes, np.ndarray]] = {}
_LOADED_DIRS: set[tuple[str, str]] = set()


def clear_cache() -> None:
    """Forget the loaded encoders and cached vectors of this process (files in a `cache_dir` stay)."""
    with _LOCK:
        _ENCODERS.clear()
        _VECTORS.clear()
        _LOADED_DIRS.clear()


class TextClassifier(ClassifierMixin, BaseEstimator):
    """Classify raw texts: a frozen encoder's pooled vectors, then a trained linear or MLP head.

    Args:
        model: encoder: a model folder, a hub id, or "e5-small" (built from PyPI, no hub needed).
        pooling: what the head reads: cls, mean, cls_<layer>, mean-avg<k>, cls-cat<k>, or terms joined by +.
        head: "linear" or "mlp".
        hidden, dropout: the mlp head's hidden units and dropout.
        epochs, lr, weight_decay, batch_size: AdamW training of the head.
        patience: stop after this many epochs without a better validation score (None or 0: never).
        validation_fraction: share of the training texts held out (stratified) to pick the best epoch;
            0 trains on all and keeps the last epoch.
        label_smoothing: of the cross-entropy loss.
        class_weights: None or "balanced".
        seed: seeds the head's initial weights, the batch order and the hold-out.
        layers: encoder layers whose [CLS] and mean vectors are computed (poolings may read the last K).
        max_length, prefix, precision, batch_tokens, revision: as in `extract` (e5 models expect
            prefix "query: ").
        device: "auto", "cpu", "cuda", "cuda:N" or "mps", for the encoder and the head.
        cache_dir: also keep the encoded vectors in this folder (npz files, never pickles), to share them
            with other processes (GridSearchCV with n_jobs > 1) and later sessions.
        progress: show a progress bar on stderr while encoding.

    Attributes after `fit`: classes_ (the labels, sorted), head_ (the trained heads.Head), history_
    (per-epoch losses and accuracies), best_epoch_.

    Example:

        from sklearn.model_selection import GridSearchCV
        from pipeline.estimator import TextClassifier

        texts, y = ["这本书写得真好", "质量太差了", "物流很快", "屏幕有坏点"], ["pos", "neg", "pos", "neg"]
        clf = TextClassifier("e5-small", prefix="query: ", pooling="mean").fit(texts, y)
        clf.predict(["价格便宜，性价比很高"])               # array(['pos'], dtype='<U3')
        grid = GridSearchCV(clf, {"head": ["linear", "mlp"], "lr": [1e-3, 3e-4]}, cv=2)
        grid.fit(texts * 5, y * 5)                          # encodes each distinct text once
    """

    def __init__(self, model: str = "e5-small", *, pooling: str = "mean", head: str = "linear",
                 hidden: int = D.HIDDEN, dropout: float = D.DROPOUT, epochs: int = D.EPOCHS, lr: float = D.LR,
                 weight_decay: float = D.WEIGHT_DECAY, batch_size: int = D.BATCH_SIZE,
                 patience: int | None = D.PATIENCE, validation_fraction: float = D.VAL_FRACTION,
                 label_smoothing: float = 0.0, class_weights: str | None = None, seed: int = D.SEED,
                 layers: int = 1, max_length: int = DEFAULT_MAX_LENGTH, prefix: str = "", precision: str = "auto",
                 batch_tokens: int | None = None, revision: str | None = None, device: str = "auto",
                 cache_dir: str | None = None, progress: bool = False):
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

    # -- scikit-learn API ---------------------------------------------------------------------------

    def fit(self, X, y):
        """Encode the texts (those not cached yet) and train the head; returns self.

        Args:
            X: the training texts (a list, array or Series of str).
            y: their labels (ints or strings), one per text.
        """
        texts = _texts(X)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(texts):
            raise UserError(f"fit needs one label per text: {len(texts)} texts, labels of shape {y.shape}")
        check_classification_targets(y)
        if self.class_weights not in (None, "none", "balanced"):
            raise UserError(f"unknown class_weights {self.class_weights!r}; use None or 'balanced'")
        self.classes_, y_ids = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        X_all = self._features(texts)
        if self.validation_fraction and self.validation_fraction > 0:
            train, val = holdout(y_ids, self.validation_fraction, self.seed)
        else:
            train, val = np.arange(len(texts)), np.arange(0)
        weights = (class_weight_vector(y_ids[train], k) if self.class_weights == "balanced" else None)
        result = fit_arrays(X_all[train], y_ids[train], X_all[val], y_ids[val], k, device=resolve_device(self.device),
                       head=self.head, hidden=self.hidden, dropout=self.dropout, epochs=self.epochs, lr=self.lr,
                       weight_decay=self.weight_decay, batch_size=self.batch_size, seed=self.seed,
                       patience=self.patience, label_smoothing=self.label_smoothing, class_weights=weights)
        self.head_, self.history_, self.best_epoch_ = result.head, result.history, result.best_epoch
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, [n, len(classes_)], columns in the order of classes_.

        Args:
            X: texts (a list, array or Series of str; one str counts as one text).
        """
        check_is_fitted(self, "head_")
        texts = _texts(X)
        if not texts:
            return np.zeros((0, len(self.classes_)), np.float32)
        return self.head_.predict_proba(self._features(texts))

    def predict(self, X) -> np.ndarray:
        """The most probable label of every text, as an array of classes_' type.

        Args:
            X: texts (a list, array or Series of str; one str counts as one text).
        """
        return self.classes_[self.predict_proba(X).argmax(1)]

    def _more_tags(self):  # scikit-learn < 1.6
        return {"X_types": ["string"]}

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags

    # -- the encoder and its vectors ----------------------------------------------------------------

    def _features(self, texts: list[str]) -> np.ndarray:
        """The head's input matrix for `texts`, encoding only the texts not cached yet."""
        encoder = self._encoder()
        arrays = _cached_vectors(encoder, texts, self.cache_dir, self.progress)
        return build_features(arrays, self.pooling, encoder.layers)

    def _encoder(self) -> Encoder:
        key = (self.model, self.layers, self.max_length, self.prefix, self.precision, self.batch_tokens,
               self.revision, self.device)
        with _LOCK:
            if key not in _ENCODERS:
                _ENCODERS[key] = Encoder(self.model, device=self.device, precision=self.precision,
                                         max_length=self.max_length, prefix=self.prefix, layers=self.layers,
                                         revision=self.revision, batch_tokens=self.batch_tokens)
            return _ENCODERS[key]


def _texts(X) -> list[str]:
    """Texts from a list, a 1-D array, a one-column 2-D array or DataFrame (as a ColumnTransformer gives)."""
    if hasattr(X, "to_numpy") and not isinstance(X, str):
        X = X.to_numpy()
    if isinstance(X, np.ndarray) and X.ndim == 2 and X.shape[1] == 1:
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
        if cache_dir and (cache_dir, fp) not in _LOADED_DIRS:
            _load_dir(os.path.join(cache_dir, fp), table)
            _LOADED_DIRS.add((cache_dir, fp))
        todo = {}
        for d, t in zip(digests, texts):
            if d not in table:
                todo.setdefault(d, t)
        if todo:
            from tqdm.auto import tqdm
            with tqdm(total=len(todo), unit="text", desc="encode", disable=not progress, dynamic_ncols=True) as bar:
                arrays = encoder.encode(list(todo.values()), on_progress=bar.update)
            rows = np.concatenate([arrays[n] for n in names], axis=1)
            table.update(zip(todo, rows))
            if cache_dir:
                _save(os.path.join(cache_dir, fp), list(todo), rows)
        matrix = np.stack([table[d] for d in digests]) if digests else np.zeros((0, len(names) * h), np.float32)
    return {n: matrix[:, i * h:(i + 1) * h] for i, n in enumerate(names)}


def _load_dir(folder: str, table: dict) -> None:
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npz"):
            continue
        with np.load(os.path.join(folder, name), allow_pickle=False) as f:
            table.update(zip(map(bytes, f["digests"]), f["vectors"]))


def _save(folder: str, digests: list[bytes], rows: np.ndarray) -> None:
    """One more npz file of (digests, vectors), written under a temporary name and renamed when whole."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"vectors-{uuid.uuid4().hex}.npz")
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        # Digests as uint8 rows: numpy's bytes dtype would drop a digest's trailing zero bytes.
        np.savez(f, digests=np.frombuffer(b"".join(digests), np.uint8).reshape(-1, 20),
                 vectors=rows.astype(np.float32))
    os.replace(tmp, path)
