"""Tasks: what a label is, how it is stored, and which metric picks the best head. No torch here.

- `classification`: one class per text; labels are ids (int64, -1 = unlabelled). Main metric: accuracy.
- `multilabel`: any number of classes per text; labels are a 0/1 matrix (int8 [N, classes], a row of
  -1 = unlabelled), given as a list (a JSON array, or a string split by `--label-sep`). Main metric: micro-F1.
- `regression`: one number per text; labels are float64 (NaN = unlabelled). Main metric: Spearman.

>>> detect_task({"train": [0.5, 1.25]})
('regression', 'the labels are numbers with fractions (e.g. 0.5): task regression (pass --task to choose)')
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from .errors import UserError

TASKS = ("classification", "multilabel", "regression")
DEFAULT_TASK = "classification"
# The validation score that picks the best epoch (ties: lower validation loss), and the sweep's winner
# where it ranks by score (sweep.default_selection: not classification, which ranks by validation loss).
SCORE = {"classification": "val_accuracy", "multilabel": "val_micro_f1", "regression": "val_spearman"}
# metrics.json written before the accuracy keys took the word the reports use ("accuracy"): old name -> new.
OLD_SCORE_KEYS = {"train_acc": "train_accuracy", "val_acc": "val_accuracy"}
UNLABELLED = -1
_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def read_metrics(folder: str) -> dict:
    """A checkpoint's metrics.json (empty when missing or unreadable), with an older checkpoint's `best` and
    `history` rows under today's key names (OLD_SCORE_KEYS), so that info, serve's /info, the demo page and
    an export's /info show its scores. Here, not in checkpoint.py, because the ONNX runner reads it without
    torch."""
    try:
        with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return {}

    def rename(row):
        return {OLD_SCORE_KEYS.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row
    if not isinstance(metrics, dict):
        return metrics
    if "best" in metrics:
        metrics["best"] = rename(metrics["best"])
    if isinstance(metrics.get("history"), list):
        metrics["history"] = [rename(r) for r in metrics["history"]]
    return metrics


def check_task(task: str | None) -> str | None:
    if task is not None and task not in TASKS:
        raise UserError(f"unknown --task {task!r}; use one of {', '.join(TASKS)}")
    return task


def labelled(y: np.ndarray) -> np.ndarray:
    """Which rows of a label array carry a label (any task's layout)."""
    y = np.asarray(y)
    if y.ndim == 2:
        return y[:, 0] >= 0 if y.shape[1] else np.ones(len(y), bool)
    if y.dtype.kind == "f":
        return np.isfinite(y)
    return y >= 0


def task_of(settings: dict) -> str:
    """The task a cache (or a checkpoint's encoder settings) was made for; caches before tasks: classification."""
    return settings.get("task", DEFAULT_TASK)


def outputs(task: str, label_names: list[str]) -> int:
    """Width of the head's output."""
    return 1 if task == "regression" else len(label_names)


def label_layout(task: str, num_labels: int) -> tuple[tuple[int, ...], str]:
    """(shape after the row axis, dtype) of the store's `label` dataset."""
    if task == "multilabel":
        return (num_labels,), "int8"
    return (), "float64" if task == "regression" else "int64"


# -- detection and parsing --------------------------------------------------------------------------

def _is_list(v) -> bool:
    return isinstance(v, (list, tuple)) or (isinstance(v, str) and v.strip().startswith("[")
                                            and v.strip().endswith("]"))


def _fraction(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (float, np.floating)):
        return math.isfinite(v) and not float(v).is_integer()
    if isinstance(v, str) and _NUMBER.fullmatch(v.strip()) and not _INT.fullmatch(v.strip()):
        f = float(v)
        return math.isfinite(f) and not f.is_integer()
    return False


def detect_task(values: dict[str, list], label_sep: str | None = None) -> tuple[str, str | None]:
    """(task, note for stderr or None) from raw label values: lists -> multilabel, fractions -> regression."""
    if label_sep is not None:
        return "multilabel", None
    for split, vs in values.items():
        for row, v in enumerate(vs):
            if _is_list(v):
                fraction = next((f"{w!r} (split {s!r}, row {r})" for s, ws in values.items() for r, w in enumerate(ws)
                                 if _fraction(w)), None)
                if fraction:  # a regression file with a stray list, more likely than multi-label targets of 3.461
                    raise UserError(f"labels mix lists (e.g. {v!r}, split {split!r}, row {row}) and numbers with "
                                    f"fractions (e.g. {fraction}); make them all lists of labels (multilabel) or "
                                    "all targets (regression)")
                return "multilabel", (f"the labels are lists (e.g. {v!r}): task multilabel (pass --task to choose)")
    fraction = next((v for vs in values.values() for v in vs if _fraction(v)), None)
    if fraction is None:
        return DEFAULT_TASK, None
    name = next((v for vs in values.values() for v in vs
                 if isinstance(v, str) and v.strip() and not _NUMBER.fullmatch(v.strip())), None)
    if name is not None:
        raise UserError(f"labels mix numbers with fractions (e.g. {fraction}) and names (e.g. {name!r}); make them "
                        "all targets (regression) or all class names or integers (classification)")
    return "regression", (f"the labels are numbers with fractions (e.g. {fraction}): task regression "
                          "(pass --task to choose)")


def regression_targets(values: dict[str, list]) -> dict[str, np.ndarray]:
    """float64 targets per split (NaN = unlabelled); NaN / inf given as a number is refused, as is text."""
    out = {}
    for split, vs in values.items():
        y = np.empty(len(vs), dtype=np.float64)
        for row, v in enumerate(vs):
            if v is None or (isinstance(v, str) and not v.strip()):
                y[row] = np.nan
                continue
            if isinstance(v, (list, tuple, dict, bool, np.bool_)) or (isinstance(v, str)
                                                                   and not _NUMBER.fullmatch(v.strip())):
                raise UserError(f"regression needs numeric targets, but label {v!r} (split {split!r}, row {row}) "
                                "is not a number; use --task classification for named classes")
            f = float(v)
            if not math.isfinite(f):
                raise UserError(f"target {v!r} (split {split!r}, row {row}) is not a finite number; fix the data "
                                "or leave the label empty for an unlabelled row")
            y[row] = f
        if split == "train" and np.isnan(y).any():
            row = int(np.flatnonzero(np.isnan(y))[0])
            raise UserError(f"split 'train' has {int(np.isnan(y).sum())} rows without a target (first at row "
                            f"{row}); give them one or drop them")
        out[split] = y
    return out


def _label_list(v, split: str, row: int, label_sep: str) -> list[str] | None:
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                v = json.loads(s)
            except json.JSONDecodeError as e:
                raise UserError(f"label {s!r} (split {split!r}, row {row}) looks like a JSON array but is not "
                                f"valid JSON ({e.msg})") from e
        else:
            return [p.strip() for p in s.split(label_sep) if p.strip()]
    if isinstance(v, (list, tuple)):
        items = []
        for item in v:
            if isinstance(item, bool) or not isinstance(item, (str, int, np.integer)):
                raise UserError(f"label list {v!r} (split {split!r}, row {row}) holds {item!r}; items must be "
                                "label names or integer ids")
            items.append(str(item).strip())
        return [i for i in items if i]
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return [str(v)]
    raise UserError(f"label {v!r} (split {split!r}, row {row}) is not a list of labels; give a JSON array or "
                    "a string split by --label-sep")


def multilabel_targets(values: dict[str, list], label_names: list[str] | None = None,
                       label_sep: str | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """0/1 matrices per split (int8 [N, classes]; a row of -1 = unlabelled) and the label names.

    Names: `label_names` (fixes their order; a label outside them is refused), else the sorted names
    seen. An empty list is a labelled row with no label.
    """
    sep = label_sep or ","
    parsed = {s: [_label_list(v, s, i, sep) for i, v in enumerate(vs)] for s, vs in values.items()}
    seen = sorted({x for ls in parsed.values() for lst in ls if lst for x in lst})
    names = list(label_names) if label_names else seen
    if not names:
        raise UserError("no label appears in any label list; multilabel needs at least one label name")
    if len(set(names)) != len(names):
        raise UserError(f"label names repeat: {names}")
    index = {n: i for i, n in enumerate(names)}
    out = {}
    for split, lists in parsed.items():
        y = np.zeros((len(lists), len(names)), dtype=np.int8)
        for row, lst in enumerate(lists):
            if lst is None:
                y[row] = UNLABELLED
                continue
            for name in lst:
                if name not in index:
                    raise UserError(f"label {name!r} (split {split!r}, row {row}) is not one of the label names "
                                    f"{names}; fix the data or --label-names")
                y[row, index[name]] = 1
        if split == "train" and (y[:, 0] < 0).any():
            row = int(np.flatnonzero(y[:, 0] < 0)[0])
            raise UserError(f"split 'train' has {int((y[:, 0] < 0).sum())} rows without labels (first at row "
                            f"{row}); give them a list (empty for none) or drop them")
        out[split] = y
    return out, names


# -- metrics ------------------------------------------------------------------------------------------

def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1 with ties given their average rank (as Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks start+1 .. end
    out = np.empty(len(x))
    out[order] = np.repeat(avg, ends - starts)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(ranks(a), ranks(b))


def regression_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """n, pearson, spearman, mse, mae over the labelled rows (NaN targets left out)."""
    keep = np.isfinite(y_true)
    t, p = np.asarray(y_true, np.float64)[keep], np.asarray(y_pred, np.float64)[keep]
    n = int(len(t))
    return {"n": n, "pearson": pearson(t, p), "spearman": spearman(t, p),
            "mse": float(((t - p) ** 2).mean()) if n else float("nan"),
            "mae": float(np.abs(t - p).mean()) if n else float("nan")}


def macro_f1(f1: np.ndarray, true_counts: np.ndarray, predicted_counts: np.ndarray) -> float:
    """The mean F1 of the classes (labels) true or predicted somewhere in the split, as scikit-learn's
    f1_score(average="macro") takes a classification's classes: a wrong guess of a class absent from the split
    counts as that class's F1 of 0; a class neither true nor predicted does not count. NaN when none is.

        >>> macro_f1(np.array([1.0, 0.0, 0.0]), np.array([2, 0, 0]), np.array([1, 1, 0]))
        0.5
    """
    present = (np.asarray(true_counts) > 0) | (np.asarray(predicted_counts) > 0)
    return float(f1[present].mean()) if present.any() else float("nan")


def multilabel_report(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict:
    """micro / macro F1, subset accuracy, per-label precision / recall / F1 / support (labelled rows only)."""
    keep = labelled(y_true)
    t, p = (np.asarray(y_true)[keep] > 0), (np.asarray(y_pred)[keep] > 0)
    tp, fp, fn = (t & p).sum(0).astype(float), (~t & p).sum(0).astype(float), (t & ~p).sum(0).astype(float)

    def f1(tp, fp, fn):
        den = 2 * tp + fp + fn
        return np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)

    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    per = f1(tp, fp, fn)
    n = int(len(t))
    return {"n": n,
            "micro_f1": float(f1(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0]),
            "macro_f1": macro_f1(per, t.sum(0), p.sum(0)),
            "subset_accuracy": float((t == p).all(1).mean()) if n else float("nan"),
            "per_label": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(per[i]),
                                 "support": int(t[:, i].sum())} for i, name in enumerate(label_names)},
            "label_names": list(label_names)}


def tune_thresholds(y_true: np.ndarray, probs: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per label, the probability cut with the best validation F1 (0.5 for a label absent from validation)."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2) if grid is None else grid
    t = np.asarray(y_true) > 0
    out = np.full(t.shape[1], 0.5)
    for j in range(t.shape[1]):
        if not t[:, j].any():
            continue
        pred = probs[:, j][:, None] >= grid[None, :]
        tp = (pred & t[:, j, None]).sum(0)
        den = pred.sum(0) + t[:, j].sum()
        f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
        best = np.flatnonzero(f1 == f1.max())
        out[j] = float(grid[best[len(best) // 2]])  # the middle of the tied best cuts
    return out
