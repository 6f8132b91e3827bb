"""Predictions as dicts: the one shape `bertcache predict --json`, `serve` and the ONNX runner all give."""
from __future__ import annotations

import numpy as np


def prediction_dicts(texts: list[str], probabilities: np.ndarray, label_names: list[str]) -> list[dict]:
    """One dict per text: text, label (the most probable name), label_id, probabilities (label name -> probability).

    Example:

        prediction_dicts(["好"], np.array([[0.2, 0.8]]), ["neg", "pos"])
        # [{'text': '好', 'label': 'pos', 'label_id': 1, 'probabilities': {'neg': 0.2, 'pos': 0.8}}]
    """
    out = []
    for text, p in zip(texts, probabilities):
        i = int(p.argmax())
        out.append({"text": text, "label": label_names[i], "label_id": i,
                    "probabilities": {n: float(v) for n, v in zip(label_names, p)}})
    return out
