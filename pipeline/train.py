"""fit-head: feature store -> head -> checkpoint, with validation every epoch."""
from __future__ import annotations

import os
import re

import numpy as np

from . import heads as H
from . import stream
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
             device: str = "auto", max_memory: int | str | None = None, shuffle_block: int = H.SHUFFLE_BLOCK,
             shuffle_window: int = H.SHUFFLE_WINDOW, log=None) -> tuple[str, dict]:
    """Train a head on a features file; returns (checkpoint folder, metrics).

    The features are held in memory when they fit `max_memory` (bytes or '4G'; default: a share of the
    available memory), else streamed from the file; both give the same batches in the same order.
    """
    if head not in H.HEADS:
        raise UserError(f"unknown --head {head!r}; use one of {', '.join(H.HEADS)}")
    if class_weights not in (None, "none", "balanced"):
        raise UserError(f"unknown --class-weights {class_weights!r}; use none or balanced")
    dev = resolve_device(device)
    with FeatureStore(features) as store:
        if "train" not in store.splits:
            raise UserError(f"{features} has no train split; it has: {', '.join(store.splits)}")
        k = len(store.label_names)
        # Which rows train, validate and test, from the labels alone; features are read below.
        labels = {s: store.labels(s) for s in store.splits if s in ("train", "validation", "test")}
        parts = {name: (split, np.flatnonzero(labels[split] >= 0))
                 for name, split in (("train", "train"), ("val", "validation"), ("test", "test")) if split in labels}
        val_note = "validation"
        if "val" not in parts or len(parts["val"][1]) == 0:
            labelled = parts["train"][1]
            tr, va = H.holdout(labels["train"][labelled], H.VAL_FRACTION, seed)
            parts["train"], parts["val"] = ("train", labelled[tr]), ("train", labelled[va])
            val_note = f"{int(H.VAL_FRACTION * 100)}% of train held out (no labelled validation split)"
        y, yv = (labels[split][index] for split, index in (parts["train"], parts["val"]))
        unseen = sorted(set(np.unique(yv)) - set(np.unique(y)))
        if unseen:
            raise UserError(f"class {store.label_names[unseen[0]]!r} appears in validation but never in train; "
                            "the head cannot learn it: fix the split or drop that class")
        width = stream.pooled_width(store, pooling)
        need = stream.IN_MEMORY_COPIES * 4 * width * sum(store.rows(s) for s in {s for s, _ in parts.values()})
        budget = stream.memory_budget(max_memory, dev)
        streamed = need > budget
        if streamed and log:
            log(f"the features need about {need / 2**20:.0f} MiB in memory, more than the {budget / 2**20:.0f} MiB "
                "allowed (--max-memory): streaming them from the file")
        rows_at_once = max(1, budget // (stream.IN_MEMORY_COPIES * 4 * width))
        loaded = {}

        def source(split, index):
            if streamed:
                return stream.StoredRows(store, split, pooling, index, labels[split], dev, chunk_rows=rows_at_once,
                                         window=min(shuffle_window, rows_at_once), block=shuffle_block)
            if split not in loaded:
                loaded[split] = load_split(store, split, pooling, labelled_only=False)[0]
            return H.ArrayRows(loaded[split][index], labels[split][index], dev)

        rows = {name: source(*part) for name, part in parts.items()}
        loaded.clear()
        weights = H.class_weight_vector(y, k) if class_weights == "balanced" else None
        result = H.fit_rows(rows["train"], rows["val"], k, head=head, hidden=hidden, dropout=dropout, epochs=epochs,
                            lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed, patience=patience,
                            label_smoothing=label_smoothing, class_weights=weights, device=dev, log=log,
                            shuffle_block=shuffle_block, shuffle_window=shuffle_window)
        test = rows.get("test")
        test_pred = H.predict_rows(result.head, test).argmax(1) if test is not None and test.n else None
        test_y = labels["test"][parts["test"][1]] if test_pred is not None else None
        settings, label_names, fingerprint = store.settings, store.label_names, store.file.attrs["fingerprint"]
    metrics = {"best_epoch": result.best_epoch, "epochs_run": len(result.history), "seconds": result.seconds,
               "validation": val_note, "best": result.history[result.best_epoch - 1], "history": result.history}
    metrics["streamed"] = streamed
    if test_pred is not None:
        metrics["test"] = classification_report(test_y, test_pred, label_names)
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
