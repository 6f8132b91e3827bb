"""fit-head: feature store -> head -> checkpoint, with validation every epoch."""
from __future__ import annotations

import os
import re

import numpy as np

from . import heads as H
from .checkpoint import save_checkpoint
from .encoder import resolve_device
from .errors import UserError
from .metrics import classification_report
from .store import FeatureStore


def default_checkpoint_path(features: str, pooling: str, head: str) -> str:
    stem = os.path.splitext(os.path.basename(features))[0]
    return os.path.join("checkpoints", re.sub(r"[^\w.-]+", "_", f"{stem}-{pooling}-{head}"))


def load_split(store: FeatureStore, split: str, pooling: str, labelled_only: bool = True):
    """(X, y) of a split for a pooling spec; unlabelled rows dropped unless asked for."""
    names = H.pooling_features(pooling, store.settings["layers"])
    X = H.build_features(store.features(split, names), pooling, store.settings["layers"])
    y = store.labels(split)
    if labelled_only:
        keep = y >= 0
        X, y = X[keep], y[keep]
    return X, y


def fit_head(features: str, out: str | None = None, *, pooling: str = "cls", head: str = "linear",
             hidden: int = H.HIDDEN, dropout: float = H.DROPOUT, epochs: int = H.EPOCHS, lr: float = H.LR,
             weight_decay: float = H.WEIGHT_DECAY, batch_size: int = H.BATCH_SIZE, seed: int = H.SEED,
             patience: int | None = H.PATIENCE, label_smoothing: float = 0.0, class_weights: str | None = None,
             device: str = "auto", log=None) -> tuple[str, dict]:
    """Train a head on a features file; returns (checkpoint folder, metrics)."""
    if head not in H.HEADS:
        raise UserError(f"unknown --head {head!r}; use one of {', '.join(H.HEADS)}")
    if class_weights not in (None, "none", "balanced"):
        raise UserError(f"unknown --class-weights {class_weights!r}; use none or balanced")
    with FeatureStore(features) as store:
        if "train" not in store.splits:
            raise UserError(f"{features} has no train split; it has: {', '.join(store.splits)}")
        k = len(store.label_names)
        X, y = load_split(store, "train", pooling)
        val_note = "validation"
        Xv = yv = None
        if "validation" in store.splits:
            Xv, yv = load_split(store, "validation", pooling)
        if Xv is None or len(yv) == 0:
            tr, va = H.holdout(y, H.VAL_FRACTION, seed)
            X, Xv, y, yv = X[tr], X[va], y[tr], y[va]
            val_note = f"{int(H.VAL_FRACTION * 100)}% of train held out (no labelled validation split)"
        unseen = sorted(set(np.unique(yv)) - set(np.unique(y)))
        if unseen:
            raise UserError(f"class {store.label_names[unseen[0]]!r} appears in validation but never in train; "
                            "the head cannot learn it: fix the split or drop that class")
        test = load_split(store, "test", pooling) if "test" in store.splits else None
        settings, label_names, fingerprint = store.settings, store.label_names, store.file.attrs["fingerprint"]
    dev = resolve_device(device)
    weights = H.class_weight_vector(y, k) if class_weights == "balanced" else None
    result = H.fit(X, y, Xv, yv, k, head=head, hidden=hidden, dropout=dropout, epochs=epochs, lr=lr,
                   weight_decay=weight_decay, batch_size=batch_size, seed=seed, patience=patience,
                   label_smoothing=label_smoothing, class_weights=weights, device=dev, log=log)
    metrics = {"best_epoch": result.best_epoch, "epochs_run": len(result.history), "seconds": result.seconds,
               "validation": val_note, "best": result.history[result.best_epoch - 1], "history": result.history}
    if test is not None and len(test[1]):
        pred = result.head.predict_proba(test[0]).argmax(1)
        metrics["test"] = classification_report(test[1], pred, label_names)
    config = {
        "encoder": {k_: settings.get(k_) for k_ in ("model", "revision", "commit", "model_fingerprint", "config_hash",
                                                    "max_length", "prefix", "precision", "layers", "hidden_size")},
        "pooling": pooling, "head": result.head.shape(), "label_names": label_names,
        "features": {"path": os.path.abspath(features), "fingerprint": fingerprint},
        "training": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                     "seed": seed, "patience": patience, "label_smoothing": label_smoothing,
                     "class_weights": class_weights, "dropout": dropout, "best_epoch": result.best_epoch},
    }
    out = out or default_checkpoint_path(features, pooling, head)
    save_checkpoint(out, config, {"best": result.best_state, "last": result.last_state}, metrics)
    return out, metrics
