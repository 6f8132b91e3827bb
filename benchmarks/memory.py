"""Peak memory of `python -m pipeline extract` as the dataset grows (tiny model, short texts).

    python benchmarks/memory.py                   # 1k, 10k and 100k texts
    python benchmarks/memory.py --sizes 1000,5000 # smoke run

Extract streams the vectors to HDF5 chunk by chunk, so its peak RSS should grow only by what it must
hold for the whole run (the texts, labels and the first-seen index of distinct texts), not by the
cached arrays. Each size runs in its own subprocess; its peak RSS comes from os.wait4 (ru_maxrss;
on Windows, psutil's peak working set).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import build_random_bert, load  # noqa: E402

CHARS = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从"


def synthetic(n: int, seed: int = 0):
    """Short distinct-ish texts (4 to 24 characters), alternating labels."""
    rng = random.Random(seed)
    for i in range(n):
        yield "".join(rng.choice(CHARS) for _ in range(rng.randint(4, 24))), i % 2


def run_extract(model: str, data: str, out: str, precision: str = "auto") -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one extract subprocess."""
    # One thread: memory does not depend on it, and on a shared machine two-thread tiny batches crawl.
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--model", model, "--data", data, "--out", out,
                             "--precision", precision, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if hasattr(os, "wait4"):
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux
    else:
        peak = _peak_working_set(proc)
        stdout = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"extract failed with exit code {proc.returncode}")
    json.loads(stdout)  # the summary printed at the end: the run completed
    return peak, time.perf_counter() - start


def _peak_working_set(proc) -> float:
    """Windows (no os.wait4): the process's peak working set in MiB, polled until it exits (needs psutil)."""
    try:
        import psutil
    except ImportError:
        raise SystemExit("on Windows this benchmark needs psutil to read peak memory: pip install psutil") from None
    handle, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:  # the summary is one short line: the pipe does not fill up meanwhile
        try:
            peak = max(peak, handle.memory_info().peak_wset)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    proc.wait()
    return peak / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--precision", default="auto", help="extract --precision (auto is bf16 on CPUs that have it)")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "saved"],
                   help="the data as a JSON lines file, or a datasets save_to_disk folder (texts stay in Arrow)")
    args = p.parse_args(argv)
    print(f"load {load()}; extract --precision {args.precision}, data as {args.format}")
    print(f"{'texts':>8s} {'peak RSS MiB':>13s} {'vs first':>9s} {'cached arrays MiB':>18s} {'texts file MiB':>15s} "
          f"{'h5 MiB':>7s} {'seconds':>8s}")
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_bert(os.path.join(tmp, "tiny"), chars=CHARS, vocab_size=len(CHARS) + 200,
                                  hidden=args.hidden, layers=2, heads=4, max_positions=64)
        first = None
        for n in (int(s) for s in args.sizes.split(",")):
            data = os.path.join(tmp, f"train-{n}.jsonl")
            with open(data, "w", encoding="utf-8") as f:
                for text, label in synthetic(n):
                    f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
            size = os.path.getsize(data)
            if args.format == "saved":
                import datasets
                rows = list(synthetic(n))
                saved = os.path.join(tmp, f"saved-{n}")
                datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).save_to_disk(saved)
                data = saved
            out = os.path.join(tmp, f"f-{n}.h5")
            rss, seconds = run_extract(model, data, out, args.precision)
            first = first if first is not None else rss
            arrays = n * (2 * args.hidden * 4 + 16) / 2 ** 20  # cls + mean float32, label + row int64
            print(f"{n:8d} {rss:13.0f} {rss - first:+9.0f} {arrays:18.1f} {size / 2 ** 20:15.1f} "
                  f"{os.path.getsize(out) / 2 ** 20:7.1f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
