"""fit-head --sweep: try a grid of heads over one cache, keep the best by validation.

The cached arrays are read once (train.load_cache); every configuration is one `train.train` call.
Selection: validation accuracy, ties broken by validation loss (then by grid order), never by test.
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

# The default grid: poolings (see default_poolings) x heads x learning rates x weight decays. Weight
# decay matters little next to early stopping, so it has one default value (give more with
# --sweep-weight-decays); a shorter patience than fit-head's keeps the default sweep within ~2 minutes.
HEADS = ("linear", "mlp")
LRS = (1e-3, 3e-4)
WEIGHT_DECAYS = (D.WEIGHT_DECAY,)
PATIENCE = 10
SELECTION = "validation accuracy, then validation loss"


def default_poolings(layers: list[int]) -> list[str]:
    """Last-layer mean, and [CLS] + mean; with K > 1 cached layers, averages and the concatenation of means.

    (Last-layer [CLS] alone never won on the caches tried, and [CLS] concatenated over layers costs
    twice the time of mean-catK for no better validation score.)
    """
    out = ["mean", "cls+mean"]
    k = len(layers)
    if k > 1:
        out += [f"mean-avg{k}", f"cls-avg{k}+mean-avg{k}", f"mean-cat{k}"]
    return out


def sweep(features: str, out: str | None = None, *, poolings: list[str] | None = None,
          heads: list[str] | None = None, lrs: list[float] | None = None, weight_decays: list[float] | None = None,
          seed: int = D.SEED, patience: int | None = PATIENCE, progress: bool = True,
          max_memory: int | str | None = None, log=None, **options) -> tuple[str, list[dict], dict]:
    """Fit every configuration of the grid; returns (winner's checkpoint folder, ranked table, winner's metrics).

    `options` go to every fit (epochs, batch_size, patience, hidden, dropout, label_smoothing,
    class_weights, device). Past `max_memory` the features are streamed from the file (see train.load_cache).
    """
    heads = list(heads or HEADS)
    lrs, weight_decays = list(lrs or LRS), list(weight_decays or WEIGHT_DECAYS)
    bad = [h for h in heads if h not in D.HEADS]
    if bad:
        raise UserError(f"unknown head {bad[0]!r} in --sweep-heads; use {', '.join(D.HEADS)}")
    if poolings is None:
        with FeatureStore(features) as store:
            poolings = default_poolings(store.settings["layers"])
    with T.load_cache(features, poolings, seed, max_memory, options.get("device", "auto"), log) as data:
        return _run(features, out, data, poolings, heads, lrs, weight_decays, seed, patience, progress, log, options)


def _run(features, out, data, poolings, heads, lrs, weight_decays, seed, patience, progress, log, options):
    from tqdm.auto import tqdm

    grid = list(itertools.product(poolings, heads, lrs, weight_decays))
    rows, best = [], None
    t0 = time.perf_counter()
    bar = tqdm(grid, desc="sweep", unit="head", disable=not progress, dynamic_ncols=True)
    for pooling, head, lr, wd in bar:
        bar.set_postfix_str(f"{pooling} {head} lr {lr:g} wd {wd:g}")
        result, metrics, config = T.train(data, pooling=pooling, head=head, lr=lr, weight_decay=wd, seed=seed,
                                          patience=patience, **options)
        row = {"pooling": pooling, "head": head, "lr": lr, "weight_decay": wd,
               "val_acc": metrics["best"]["val_acc"], "val_loss": metrics["best"]["val_loss"],
               "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"],
               "seconds": round(metrics["seconds"], 3)}
        rows.append(row)
        if best is None or _key(row) < _key(best[0]):
            best = (row, result, metrics, config)
        if log:
            log(f"{pooling:<24} {head:<6} lr {lr:<7g} wd {wd:<5g} val acc {row['val_acc']:.4f} "
                f"loss {row['val_loss']:.4f} ({row['seconds']:.1f}s)")
    bar.close()
    ranked = sorted(rows, key=_key)
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    row, result, metrics, config = best
    metrics["sweep"] = {"configurations": len(grid), "seconds": time.perf_counter() - t0, "selection": SELECTION}
    table = {"features": os.path.abspath(features), "selection": SELECTION, "validation": data.val_note,
             "grid": {"poolings": poolings, "heads": heads, "lrs": lrs, "weight_decays": weight_decays},
             "options": {"patience": patience, **{k: v for k, v in options.items() if k != "device"}}, "seed": seed, "ranked": ranked}
    path = T.save(out or T.default_checkpoint_path(features, "sweep"), data, result, metrics, config,
                  files={"sweep.json": lambda p: write_json(p, table)})
    return path, ranked, metrics


def _key(row: dict):
    return (-row["val_acc"], row["val_loss"])
