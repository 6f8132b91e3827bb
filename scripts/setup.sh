#!/usr/bin/env bash
# Create ./.venv with torch and bertcache (editable, with the test, serve and onnx extras). Safe to run again.
# TORCH_SPEC picks the torch build: the default is the CPU build these machines keep on disk; on a
# machine with a GPU, set e.g. TORCH_SPEC="torch" to take the build pip chooses for your platform.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch" 2>/dev/null || python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q --disable-pip-version-check -e ".[test,serve,onnx${EXTRAS:+,$EXTRAS}]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import pipeline, torch, transformers, datasets, h5py" || { echo "setup failed: see the pip output above" >&2; exit 1; }
