#!/usr/bin/env bash
# Set up ./.venv (if needed) and run the test suite. This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests build their own models and data: nothing may come from a hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
