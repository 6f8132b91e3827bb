"""Prediction: the full encoder plus a trained head on raw text, and evaluation over a cache."""
from __future__ import annotations

import numpy as np

from .checkpoint import load_checkpoint, read_config
from .encoder import Encoder
from .errors import UserError
from .fingerprints import check_same_encoder
from .labels import prediction_dicts
from .metrics import classification_report
from .poolings import build_features, pooling_features
from .store import FeatureStore


class Predictor:
    """Encoder + head from a checkpoint folder. `predict_proba(texts)` -> [n, classes]."""

    def __init__(self, checkpoint: str, *, model: str | None = None, device: str = "auto", weights: str = "best",
                 batch_tokens: int | None = None, encoder: Encoder | None = None, allow_pickle: bool = False):
        self.checkpoint, self.weights = checkpoint, weights
        self.config = read_config(checkpoint, allow_pickle)
        enc = self.config["encoder"]
        self.encoder = encoder or Encoder(model or enc["model"], device=device, precision=enc["precision"],
                                          max_length=enc["max_length"], prefix=enc.get("prefix") or "",
                                          layers=len(enc["layers"]), revision=enc.get("revision"),
                                          batch_tokens=batch_tokens)
        check_same_encoder(self.config, self.encoder.settings(), f"model {self.encoder.model_ref!r}")
        _, self.head = load_checkpoint(checkpoint, weights, device=self.encoder.device, allow_pickle=allow_pickle)
        self.label_names = self.config["label_names"]
        self.pooling = self.config["pooling"]
        self.layers = enc["layers"]
        self._names = pooling_features(self.pooling, self.layers)

    def predict_proba(self, texts: list[str], on_progress=None) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.label_names)), np.float32)
        arrays = self.encoder.encode(list(texts), on_progress=on_progress)
        return self.head.predict_proba(build_features(arrays, self.pooling, self.layers))

    def predict(self, texts: list[str], on_progress=None) -> list[dict]:
        """One dict per text, in order: text, label, label_id, probs (label name -> probability)."""
        return self.results(texts, self.predict_proba(texts, on_progress))

    def run(self, texts: list[str]) -> dict[str, np.ndarray]:
        """probabilities, logits and features (the pooled vectors the head reads) for a list of texts, in
        order: what serve's endpoints read (OnnxPredictor.run gives the same)."""
        features = build_features(self.encoder.encode(list(texts)), self.pooling, self.layers)
        probs, logits = self.head.predict_scores(features)
        return {"probabilities": probs, "logits": logits, "features": features}

    def results(self, texts: list[str], probs: np.ndarray) -> list[dict]:
        """`predict`'s dicts for texts whose probabilities were computed elsewhere (serve's micro-batches)."""
        return prediction_dicts(texts, probs, self.label_names)


def evaluate(checkpoint: str, features: str | None = None, split: str = "test", weights: str = "best",
             allow_pickle: bool = False, errors: int = 0) -> dict:
    """Metrics of a checkpoint's head on a cached split (labelled rows only).

    With `errors=N`, report["errors"] also lists, per true class, the N most confidently wrong rows: text,
    true label, predicted label, its probability, row (the cache keeps each row's text).
    """
    config, head = load_checkpoint(checkpoint, weights, allow_pickle=allow_pickle)
    features = features or config["features"]["path"]
    with FeatureStore(features) as store:
        check_same_encoder(config, store.settings, f"the features file {features}")
        if store.label_names != config["label_names"]:
            raise UserError(f"{features} has labels {store.label_names}, the checkpoint {config['label_names']}")
        layers = store.settings["layers"]
        X = build_features(store.features(split, pooling_features(config["pooling"], layers)), config["pooling"],
                           layers)
        y = store.labels(split)
        if X.shape[1] != head.in_features:
            raise UserError(f"{features} gives {X.shape[1]} features for pooling {config['pooling']!r}, "
                            f"the head expects {head.in_features}")
        keep = y >= 0
        if not keep.any():
            raise UserError(f"split {split!r} of {features} has no labelled rows to evaluate on")
        probs = head.predict_proba(X[keep])
        pred = probs.argmax(1)
        report = classification_report(y[keep], pred, config["label_names"])
        report["split"] = split
        if errors > 0:
            if not store.has_texts(split):
                raise UserError(f"{features} keeps no texts (it was extracted before bertcache stored them, or "
                                "with keep_texts=False): extract it again with --restart to list errors")
            report["errors"] = confident_errors(store, split, np.flatnonzero(keep), y[keep], probs, errors,
                                                config["label_names"])
    return report


def confident_errors(store: FeatureStore, split: str, rows: np.ndarray, y: np.ndarray, probs: np.ndarray, n: int,
                     label_names: list[str]) -> dict[str, list[dict]]:
    """Per true class, its `n` wrong rows with the most probable wrong answers, most confident first."""
    pred = probs.argmax(1)
    confidence = probs[np.arange(len(pred)), pred]
    out = {}
    for c, name in enumerate(label_names):
        wrong = np.flatnonzero((y == c) & (pred != c))
        top = wrong[np.argsort(-confidence[wrong], kind="stable")[:n]]
        texts = store.texts(split, rows[top]) if len(top) else []
        out[name] = [{"text": t, "true": name, "predicted": label_names[int(pred[i])],
                      "probability": float(confidence[i]), "row": int(rows[i])} for t, i in zip(texts, top)]
    return out
