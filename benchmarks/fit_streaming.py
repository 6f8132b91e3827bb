"""fit-head in memory vs streamed from HDF5 (--max-memory below the cache size): seconds per epoch and agreement.

Writes a synthetic cache (Gaussian classes, `--rows` train rows x `--hidden`, 10% validation) with
StoreWriter, then alternates the two paths `--repeats` times and prints medians and the largest
difference between their final weights.

    python benchmarks/fit_streaming.py [--rows 40000] [--hidden 768] [--epochs 5] [--max-memory 64M]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_cache(path: str, rows: int, hidden: int) -> str:
    from pipeline.store import StoreWriter

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, hidden)).astype(np.float32)
    sizes = {"train": rows, "validation": rows // 10}
    settings = {"model": "synthetic", "layers": [12], "hidden_size": hidden, "poolings": ["cls", "mean"]}
    w = StoreWriter(path, settings=settings, splits={s: {"rows": n, "fingerprint": s} for s, n in sizes.items()},
                    label_names=["a", "b"], feature_names=["cls"], hidden_size=hidden, source="synthetic")
    for split, n in sizes.items():
        for start in range(0, n, 8192):
            k = min(8192, n - start)
            y = rng.integers(0, 2, k)
            x = centers[y] * 0.1 + rng.normal(size=(k, hidden)).astype(np.float32)
            w.write(split, start, {"cls": x}, y, np.arange(start, start + k))
    w.finish()
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-memory", default="64M")
    args = ap.parse_args()

    import pipeline as bc
    from pipeline.checkpoint import load_checkpoint

    times = {"memory": [], "streamed": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_cache(os.path.join(tmp, "f.h5"), args.rows, args.hidden)
        for _ in range(args.repeats):
            for name, budget in (("memory", None), ("streamed", args.max_memory)):
                t0 = time.perf_counter()
                _, m = bc.fit_head(path, os.path.join(tmp, name), epochs=args.epochs, patience=None, device="cpu",
                                   max_memory=budget)
                assert m["streamed"] == (budget is not None)
                times[name].append(time.perf_counter() - t0)
        heads = [load_checkpoint(os.path.join(tmp, name), "last")[1].state_dict() for name in times]
        diff = max(float((heads[0][k] - heads[1][k]).abs().max()) for k in heads[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"rows": args.rows, "hidden": args.hidden, "epochs": args.epochs, "max_memory": args.max_memory,
                      "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                      "median_s_per_epoch": {k: round(v / args.epochs, 3) for k, v in med.items()},
                      "streamed_over_memory": round(med["streamed"] / med["memory"], 2),
                      "max_abs_weight_diff": diff}))


if __name__ == "__main__":
    main()
