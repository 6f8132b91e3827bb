#!/usr/bin/env bash
# Create ./.venv with torch and bertcache (editable, with the test and serve extras). Safe to run again.
# TORCH_SPEC picks the torch build: the default is the CPU build these machines keep on disk; on a
# machine with a GPU, set e.g. TORCH_SPEC="torch" to take the build pip chooses for your platform.
# One line per step on stderr; pip's own output is kept in .venv/setup.log and shown only if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { echo "setup: $* ($((SECONDS - start))s)" >&2; }
if [ ! -x .venv/bin/python ]; then
  step "creating .venv with $("${PYTHON:-python3}" --version 2>&1)"
  "${PYTHON:-python3}" -m venv .venv
fi
log=.venv/setup.log
: > "$log"
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1; }
fail() { cat "$log" >&2; echo "setup failed: $1 (pip's output above, also in $log)" >&2; exit 1; }
step "upgrading pip"
pip install --upgrade pip || echo "setup: could not upgrade pip; going on with $(.venv/bin/python -m pip --version | cut -d' ' -f1-2)" >&2
if .venv/bin/python -c "import torch" 2>/dev/null; then
  step "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') is installed"
else
  step "installing ${TORCH_SPEC:-torch==2.13.0} (the largest download: a minute or more)"
  pip install "${TORCH_SPEC:-torch==2.13.0}" || fail "installing torch"
fi
step "installing bertcache (editable) with transformers, datasets, h5py and the extras test,serve${EXTRAS:+,$EXTRAS}"
pip install -e ".[test,serve${EXTRAS:+,$EXTRAS}]" || fail "installing bertcache"
step "checking that pipeline, torch, transformers, datasets and h5py import"
.venv/bin/python -c "import pipeline, torch, transformers, datasets, h5py" 2>>"$log" || fail "importing the packages"
step "ready: run '. .venv/bin/activate' to put bertcache on PATH, or call .venv/bin/bertcache"
