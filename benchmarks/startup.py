"""Start-up time of a bertcache command (`python -m pipeline --help` by default) in a fresh process, per
source tree, against a bare `import torch` for reference. Runs alternate between the trees; medians are
printed.

    python benchmarks/startup.py [--runs 15] [--tree /path/to/another/checkout ...] [--args "predict -c CK 很好"]

Without --tree it times this checkout only. Each tree is put first on PYTHONPATH, so any checkout of
bertcache (for instance the one before the package root became lazy) can be compared in one run.
`--args` times another command line instead of `--help` (split as a shell would), for instance a
one-sentence `predict`, whose time is mostly loading the libraries, the tokenizer and the weights.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seconds(cmd: list[str], tree: str | None) -> float:
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tree or HERE)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15, help="runs per command (the median is reported)")
    p.add_argument("--tree", action="append", default=[], help="another bertcache checkout to time (repeatable)")
    p.add_argument("--args", default="--help", help="the bertcache command line to time (default: --help)")
    args = p.parse_args()
    trees = [HERE] + [os.path.abspath(t) for t in args.tree]
    words = shlex.split(args.args)
    cases = [(f"bertcache {' '.join(words)[:40]}  [{t}]", [sys.executable, "-m", "pipeline", *words], t) for t in trees]
    cases.append(("python -c 'import torch'  (reference)", [sys.executable, "-c", "import torch"], None))
    for _, cmd, tree in cases:  # warm the page cache once
        seconds(cmd, tree)
    times = {name: [] for name, _, _ in cases}
    for _ in range(args.runs):
        for name, cmd, tree in cases:
            times[name].append(seconds(cmd, tree))
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"median of {args.runs} runs")
    sys.path.insert(0, HERE)
    from benchmarks.common import machine  # imports torch: only after the timed runs
    print(f"# machine: {machine()}")
    first = statistics.median(times[cases[0][0]])
    for name, _, _ in cases:
        med = statistics.median(times[name])
        print(f"{name:<70} {med:7.3f} s  ({med / first:5.2f}x this checkout; runs {min(times[name]):.3f}-"
              f"{max(times[name]):.3f} s)")


if __name__ == "__main__":
    main()
