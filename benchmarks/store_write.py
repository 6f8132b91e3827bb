"""What the crash-safe store layout costs: StoreWriter write + read-back speed, now vs before issue 5.

Writes a cache of ROWS x HIDDEN float32 vectors (cls and mean) in chunks of 2048 rows with this
checkout's StoreWriter and with the chunked one of commit BASE (loaded with `git show`), alternating,
REPEATS times each; prints the median seconds and the ratio. Usage:

    python benchmarks/store_write.py [--rows 200000] [--hidden 384] [--repeats 5] [--dir /tmp] [--base 9d9593f]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import store as current  # noqa: E402

CHUNK = 2048


def old_store(commit: str):
    """store.py of `commit` as the module pipeline._store_old (its relative imports resolve in pipeline)."""
    code = subprocess.run(["git", "show", f"{commit}:pipeline/store.py"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    spec = importlib.util.spec_from_loader("pipeline._store_old", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "pipeline"
    exec(compile(code, f"{commit}:pipeline/store.py", "exec"), module.__dict__)
    return module


def run(store, folder, rows, hidden, features) -> float:
    path = os.path.join(folder, "f.h5")
    for p in (path, path + ".partial"):
        if os.path.exists(p):
            os.remove(p)
    labels = np.zeros(rows, np.int64)
    t0 = time.perf_counter()
    w = store.StoreWriter(path, settings={"hidden_size": hidden, "model_fingerprint": "x"},
                          splits={"train": {"rows": rows, "fingerprint": "x"}}, label_names=["a", "b"],
                          feature_names=["cls", "mean"], hidden_size=hidden, source="bench", chunk_rows=CHUNK)
    for start in range(0, rows, CHUNK):
        stop = min(start + CHUNK, rows)
        w.write("train", start, {n: features[start:stop] for n in ("cls", "mean")}, labels[start:stop],
                np.arange(start, stop))
    w.finish()
    with store.FeatureStore(path) as s:
        assert s.features("train")["cls"].shape == (rows, hidden)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--base", default="9d9593f", help="A commit with the chunked store of before issue 5.")
    a = ap.parse_args()
    features = np.random.default_rng(0).standard_normal((a.rows, a.hidden)).astype(np.float32)
    folder = tempfile.mkdtemp(dir=a.dir, prefix="bc-bench-")
    stores = {"before": old_store(a.base), "now": current}
    times = {k: [] for k in stores}
    try:
        for _ in range(a.repeats):
            for name, store in stores.items():
                times[name].append(run(store, folder, a.rows, a.hidden, features))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    mb = a.rows * a.hidden * 4 * 2 / 2**20
    print(f"{a.rows} rows x {a.hidden} x 2 features float32 ({mb:.0f} MiB), chunks of {CHUNK}, "
          f"median of {a.repeats}; before = store.py of {a.base}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:6s} write + finish + read back: {m:.3f} s  ({mb / m:.0f} MiB/s)")
    print(f"  ratio now / before: {statistics.median(times['now']) / statistics.median(times['before']):.2f}")


if __name__ == "__main__":
    main()
