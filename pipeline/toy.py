"""A toy encoder and toy data, made in about a second: to try the API offline, and for its examples.

`toy_model(folder)` saves a tiny random BERT (3 layers, hidden 32) with a character tokenizer, as
`save_pretrained` does; `toy_data(folder)` writes train / validation / test JSON-lines files of short
Chinese texts whose label ("正向" or "负向") shows in some of their characters. The weights are random: a
head over them learns which characters a text has, not what it means. (Like scikit-learn's
`make_classification`; the test suite builds its models and data with the same functions.)

    >>> import tempfile, pipeline as bc
    >>> from pipeline.toy import toy_data, toy_model
    >>> tmp = tempfile.mkdtemp()
    >>> corpus = bc.load_corpus(toy_data(f"{tmp}/data"))
    >>> corpus.label_names, len(corpus.splits["train"].texts)
    (['正向', '负向'], 160)
"""
from __future__ import annotations

import json
import os
import random

POS = "好棒赞喜欢满意推荐快美"
NEG = "差烂坏慢贵失望退糟破"
FILLER = "这个东西我们买了一次觉得真的很还是不可以"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABEL_NAMES = ("正向", "负向")  # label 0 and 1 of make_texts' two classes: POS and NEG characters


def make_texts(n: int, num_classes: int = 2, seed: int = 0) -> list[tuple[str, int]]:
    """`n` (text, label) pairs whose label shows in their characters, 2 to 60 characters long.

    Args:
        n: how many; labels cycle 0, 1, ..., num_classes - 1.
        num_classes: 2 marks texts with POS / NEG characters; more marks class c with one character of its own.
        seed: the same seed gives the same texts.

        >>> make_texts(2, seed=1)[1][1]
        1
    """
    rng = random.Random(seed)
    marks = [POS, NEG] if num_classes == 2 else [chr(0x4E00 + 40 * c) for c in range(num_classes)]
    out = []
    for i in range(n):
        label = i % num_classes
        length = rng.choice([2, 5, 9, 15, 30, 60])
        chars = [rng.choice(FILLER) for _ in range(length)]
        for _ in range(max(1, length // 4)):
            chars[rng.randrange(length)] = rng.choice(marks[label])
        out.append(("".join(chars), label))
    return out


def vocab_chars(num_classes: int = 8) -> list[str]:
    """The characters of `make_texts` (for up to `num_classes` classes) and a few more, sorted."""
    chars = set(POS + NEG + FILLER + "我爱北京天安门今天不错")
    chars |= {chr(0x4E00 + 40 * c) for c in range(num_classes)}
    return sorted(chars)


def toy_model(folder: str, hidden: int = 32, layers: int = 3, seed: int = 0) -> str:
    """Save a random BertModel and its character tokenizer (WordPiece vocab.txt) in `folder`; return it.

    Args:
        folder: where to save (made if missing).
        hidden: hidden size (4 attention heads; feed-forward 2 x hidden).
        layers: encoder layers.
        seed: torch seed of the random weights (another seed: another model of the same shape).

        >>> import tempfile
        >>> from transformers import AutoModel
        >>> AutoModel.from_pretrained(toy_model(tempfile.mkdtemp())).config.hidden_size
        32
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = SPECIAL + vocab_chars() + list("abcdefghijklmnopqrstuvwxyz0123456789")
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=os.path.join(folder, "vocab.txt"), model_max_length=128)  # transformers 5: vocab=
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=0)
    BertModel(cfg).eval().save_pretrained(folder)
    return folder


def toy_splits(num_classes: int = 2, train: int = 160, validation: int = 40, test: int = 40) -> dict:
    """{"train", "validation", "test"} -> `make_texts` rows (seeds 1, 2, 3): the splits of `toy_data`.

        >>> {split: len(rows) for split, rows in toy_splits(train=8).items()}
        {'train': 8, 'validation': 40, 'test': 40}
    """
    return {"train": make_texts(train, num_classes, seed=1), "validation": make_texts(validation, num_classes, seed=2),
            "test": make_texts(test, num_classes, seed=3)}


def toy_data(folder: str, train: int = 160, validation: int = 40, test: int = 40) -> str:
    """Write `train.jsonl`, `validation.jsonl` and `test.jsonl` ({"text", "label"}, labels as LABEL_NAMES)
    of `toy_splits` in `folder` (made if missing); return it. `extract` and `load_corpus` read it.

    Args:
        folder: where to write.
        train, validation, test: rows per split.

        >>> import tempfile
        >>> sorted(os.listdir(toy_data(tempfile.mkdtemp())))
        ['test.jsonl', 'train.jsonl', 'validation.jsonl']
    """
    os.makedirs(folder, exist_ok=True)
    for split, rows in toy_splits(2, train, validation, test).items():
        with open(os.path.join(folder, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for text, label in rows:
                f.write(json.dumps({"text": text, "label": LABEL_NAMES[label]}, ensure_ascii=False) + "\n")
    return folder


def toy_features(folder: str) -> str:
    """`toy_model` and `toy_data` made in `folder` and extracted (fp32, on the CPU, no progress bar) into
    `folder`/toy.h5: a features file for trying `fit_head`, `sweep`, `evaluate` and `Predictor`.

    Args:
        folder: where the model, the data and the features file go (made if missing).

        >>> import tempfile
        >>> toy_features(tempfile.mkdtemp()).endswith("toy.h5")
        True
    """
    from .extract import extract

    return extract(toy_model(os.path.join(folder, "model")), toy_data(os.path.join(folder, "data")),
                   os.path.join(folder, "toy.h5"), precision="fp32", device="cpu", progress=False, log=lambda msg: None)
