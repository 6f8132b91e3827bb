"""Which device trains a head faster, by the size of its optimizer step (what `fit-head --device auto` reads).

    python benchmarks/fit_device.py [--rows 10000] [--dim 768] [--epochs 5] [--devices cpu,cuda]

Random rows (the speed does not depend on the values); per head shape (linear with k classes, mlp with
h hidden units) and device: ms per epoch (the fit's seconds over its epochs, validation included) and ms per step, and
the step work batch x input x output that pipeline.training.gpu_pays compares with defaults.GPU_MIN_STEP_WORK.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import load, machine  # noqa: E402


def main():
    import numpy as np
    import torch

    from pipeline.training import fit, gpu_pays, step_work

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shapes", default="linear:2,linear:64,mlp:64,mlp:256")
    p.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    Xv = rng.standard_normal((args.rows // 10, args.dim), dtype=np.float32)
    print(f"load {load()}, torch {torch.__version__}, {os.cpu_count()} cores, {args.rows} x {args.dim} rows, "
          f"batch {args.batch_size}")
    print(f"machine: {machine()}")
    print(f"{'head':<11} {'device':<6} {'ms/epoch':>9} {'ms/step':>8} {'step work':>11}  gpu_pays")
    steps = -(-args.rows // args.batch_size)
    for shape in args.shapes.split(","):
        head, width = shape.split(":")
        width = int(width)
        k = width if head == "linear" else 2
        y, yv = rng.integers(0, k, args.rows), rng.integers(0, k, len(Xv))
        work = step_work(args.batch_size, args.dim, head, width, k)
        for device in args.devices.split(","):
            r = fit(X, y, Xv, yv, k, head=head, hidden=width, epochs=args.epochs, patience=None,
                    batch_size=args.batch_size, device=device)
            ms = r.seconds / len(r.history) * 1e3
            print(f"{shape:<11} {device:<6} {ms:9.1f} {ms / steps:8.3f} {work:11,d}  {gpu_pays(work)}", flush=True)


if __name__ == "__main__":
    main()
