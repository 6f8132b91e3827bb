"""fit-head: feature store -> head -> checkpoint, with validation every epoch.

`load_cache` reads a features file's arrays once; `train` fits one head over them; `save` writes the
checkpoint. `fit_head` is the three in a row; the sweep (sweep.py) calls `train` once per configuration.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from . import heads as H
from . import plots
from .checkpoint import save_checkpoint
from .encoder import resolve_device
from .errors import UserError
from .metrics import classification_report
from .store import FeatureStore

CLASS_WEIGHTS = (None, "none", "balanced")


def default_checkpoint_path(features: str, pooling: str, head: str) -> str:
    stem = os.path.splitext(os.path.basename(features))[0]
    return os.path.join("checkpoints", re.sub(r"[^\w.-]+", "_", f"{stem}-{pooling}-{head}"))


@dataclass
class CachedSplits:
    """The labelled rows of a features file's train / validation / test splits, in memory.

    `arrays[split]` holds every cached feature a set of poolings needs; `xy(split, pooling)` pools
    them. Without a labelled validation split, a seeded stratified 10% of train stands in for it.
    """
    path: str
    settings: dict
    label_names: list[str]
    fingerprint: str
    arrays: dict[str, dict[str, np.ndarray]]
    labels: dict[str, np.ndarray]
    val_note: str

    @property
    def layers(self) -> list[int]:
        return self.settings["layers"]

    def xy(self, split: str, pooling: str) -> tuple[np.ndarray, np.ndarray]:
        return H.build_features(self.arrays[split], pooling, self.layers), self.labels[split]


def load_cache(features: str, poolings: list[str], seed: int = H.SEED) -> CachedSplits:
    """Read, once, what the given poolings need from a features file."""
    with FeatureStore(features) as store:
        if "train" not in store.splits:
            raise UserError(f"{features} has no train split; it has: {', '.join(store.splits)}")
        layers = store.settings["layers"]
        names = []
        for pooling in poolings:
            names += [n for n in H.pooling_features(pooling, layers) if n not in names]
        arrays, labels = {}, {}
        for split in ("train", "validation", "test"):
            if split in store.splits:
                y = store.labels(split)
                keep = y >= 0
                arrays[split] = {n: v[keep] for n, v in store.features(split, names).items()}
                labels[split] = y[keep]
        data = CachedSplits(features, store.settings, store.label_names, store.file.attrs["fingerprint"],
                            arrays, labels, "validation")
    if len(labels.get("validation", ())) == 0:
        tr, va = H.holdout(labels["train"], H.VAL_FRACTION, seed)
        arrays["validation"] = {n: v[va] for n, v in arrays["train"].items()}
        arrays["train"] = {n: v[tr] for n, v in arrays["train"].items()}
        labels["validation"], labels["train"] = labels["train"][va], labels["train"][tr]
        data.val_note = f"{int(H.VAL_FRACTION * 100)}% of train held out (no labelled validation split)"
    unseen = sorted(set(np.unique(labels["validation"])) - set(np.unique(labels["train"])))
    if unseen:
        raise UserError(f"class {data.label_names[unseen[0]]!r} appears in validation but never in train; "
                        "the head cannot learn it: fix the split or drop that class")
    return data


def train(data: CachedSplits, *, pooling: str = "cls", head: str = "linear", hidden: int = H.HIDDEN,
          dropout: float = H.DROPOUT, epochs: int = H.EPOCHS, lr: float = H.LR, weight_decay: float = H.WEIGHT_DECAY,
          batch_size: int = H.BATCH_SIZE, seed: int = H.SEED, patience: int | None = H.PATIENCE,
          label_smoothing: float = 0.0, class_weights: str | None = None, device: str = "auto",
          log=None) -> tuple[H.FitResult, dict, dict]:
    """One head over cached splits: (fit result, metrics, checkpoint config)."""
    if head not in H.HEADS:
        raise UserError(f"unknown --head {head!r}; use one of {', '.join(H.HEADS)}")
    if class_weights not in CLASS_WEIGHTS:
        raise UserError(f"unknown --class-weights {class_weights!r}; use none or balanced")
    k = len(data.label_names)
    X, y = data.xy("train", pooling)
    Xv, yv = data.xy("validation", pooling)
    weights = H.class_weight_vector(y, k) if class_weights == "balanced" else None
    result = H.fit(X, y, Xv, yv, k, head=head, hidden=hidden, dropout=dropout, epochs=epochs, lr=lr,
                   weight_decay=weight_decay, batch_size=batch_size, seed=seed, patience=patience,
                   label_smoothing=label_smoothing, class_weights=weights, device=resolve_device(device), log=log)
    metrics = {"best_epoch": result.best_epoch, "epochs_run": len(result.history), "seconds": result.seconds,
               "validation": data.val_note, "best": result.history[result.best_epoch - 1], "history": result.history}
    config = {
        "encoder": {k_: data.settings.get(k_) for k_ in ("model", "revision", "commit", "model_fingerprint",
                                                         "config_hash", "max_length", "prefix", "precision",
                                                         "layers", "hidden_size")},
        "pooling": pooling, "head": result.head.shape(), "label_names": data.label_names,
        "features": {"path": os.path.abspath(data.path), "fingerprint": data.fingerprint},
        "training": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                     "seed": seed, "patience": patience, "label_smoothing": label_smoothing,
                     "class_weights": class_weights, "dropout": dropout, "best_epoch": result.best_epoch},
    }
    return result, metrics, config


def save(out: str, data: CachedSplits, result: H.FitResult, metrics: dict, config: dict,
         files: dict | None = None) -> str:
    """Test metrics (when the cache has a labelled test split), then the checkpoint folder with curves.png."""
    if len(data.labels.get("test", ())):
        X, y = data.xy("test", config["pooling"])
        metrics["test"] = classification_report(y, result.head.predict_proba(X).argmax(1), data.label_names)
    files = dict(files or {})
    if plots.available():
        files["curves.png"] = lambda path: plots.curves_png(metrics["history"], metrics["best_epoch"], path)
    return save_checkpoint(out, config, {"best": result.best_state, "last": result.last_state}, metrics, files)


def fit_head(features: str, out: str | None = None, *, pooling: str = "cls", head: str = "linear",
             seed: int = H.SEED, log=None, **options) -> tuple[str, dict]:
    """Train a head on a features file; returns (checkpoint folder, metrics).

    `options`: hidden, dropout, epochs, lr, weight_decay, batch_size, patience, label_smoothing,
    class_weights, device (see `train`).
    """
    data = load_cache(features, [pooling], seed)
    result, metrics, config = train(data, pooling=pooling, head=head, seed=seed, log=log, **options)
    out = save(out or default_checkpoint_path(features, pooling, head), data, result, metrics, config)
    return out, metrics
