"""Soak test of resumable extraction: many SIGKILLs at random times, then compare with an uninterrupted run.

Builds the tests' tiny random BERT and 3000 short texts in a temporary folder, runs one uninterrupted
`python -m pipeline extract`, then for each trial runs the same command and kills it with SIGKILL after
a random delay (covering interpreter start, model load, file creation and chunk writes) KILLS times,
lets the last run finish, and checks every dataset against the uninterrupted file. Usage:

    python benchmarks/kill_soak.py [--trials 2] [--kills 12] [--chunk-rows 16] [--min 1.5] [--max 6] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import write_split_files  # noqa: E402
from pipeline.toy import make_texts, toy_model  # noqa: E402

# Popen.kill's exit status: -SIGKILL on POSIX; on Windows TerminateProcess's 1 (as an unexpected error's).
KILLED = 1 if os.name == "nt" else -signal.SIGKILL


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--chunk-rows", type=int, default=16)
    ap.add_argument("--min", type=float, default=1.5, help="Shortest delay before a kill, seconds.")
    ap.add_argument("--max", type=float, default=6.0, help="Longest delay before a kill, seconds.")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bc-soak-")
    model = toy_model(os.path.join(work, "model"))
    rows = make_texts(3000, seed=7)
    data = write_split_files(os.path.join(work, "data"), "jsonl",
                             {"train": rows[:2400], "validation": rows[2400:2700], "test": rows[2700:]})
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

    def command(out):
        return [sys.executable, "-m", "pipeline", "extract", "-m", model, "-d", data, "-o", out, "--device", "cpu",
                "--precision", "fp32", "--chunk-rows", str(a.chunk_rows)]

    ref = os.path.join(work, "ref.h5")
    subprocess.run(command(ref), env=env, check=True, capture_output=True)
    rng = random.Random(a.seed)
    for trial in range(a.trials):
        out = os.path.join(work, f"killed{trial}.h5")
        kills = discarded = 0
        while True:
            proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
            if kills < a.kills:
                time.sleep(rng.uniform(a.min, a.max))
                proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
            _, err = proc.communicate()
            discarded += "could not be resumed" in err
            if proc.returncode == 0:
                break
            if proc.returncode != KILLED:
                sys.exit(f"extract failed (exit {proc.returncode}): {err[-500:]}")
            kills += 1
        with h5py.File(ref) as x, h5py.File(out) as y:
            same = all(np.array_equal(x[s][d][()], y[s][d][()]) for s in x for d in x[s])
        print(f"trial {trial}: {kills} SIGKILLs, {discarded} unfinished files started over, identical: {same}",
              flush=True)
    print(f"(files in {work})")


if __name__ == "__main__":
    main()
