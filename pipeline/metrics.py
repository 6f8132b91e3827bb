"""Metrics over labelled rows: classification here (label -1 = unlabelled, left out); regression and
multilabel in tasks.py; `report` picks the checkpoint's task's."""
from __future__ import annotations

import numpy as np

from .tasks import macro_f1, multilabel_report, regression_report


def report(config: dict, y: np.ndarray, out: np.ndarray) -> dict:
    """The task's metrics of head outputs `out` (probabilities, or values) against labels `y`; config is
    the checkpoint's (task, label names, multilabel thresholds)."""
    task = config.get("task", "classification")
    if task == "regression":
        return regression_report(y, out)
    if task == "multilabel":
        cuts = np.array([config["thresholds"][n] for n in config["label_names"]])
        return multilabel_report(y, (out >= cuts).astype(np.int8), config["label_names"])
    return classification_report(y, out.argmax(1), config["label_names"])


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict:
    """accuracy, macro_f1, per-class precision / recall / f1 / support, confusion matrix (rows = truth)."""
    keep = y_true >= 0
    y_true, y_pred = y_true[keep], y_pred[keep]
    k = len(label_names)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    n = int(len(y_true))
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else float("nan"),
        "macro_f1": macro_f1(f1, actual, predicted),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(actual[i])} for i, name in enumerate(label_names)},
        "confusion_matrix": cm.tolist(),
        "label_names": list(label_names),
    }
