"""Prediction: the full encoder plus a trained head on raw text, and evaluation over a cache."""
from __future__ import annotations

import os

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
    """A trained head and its encoder, loaded from a checkpoint folder, for raw texts.

    Args:
        checkpoint: checkpoint folder written by `fit_head` / `sweep` (`bertcache fit-head`).
        model: an encoder to use instead of the checkpoint's reference (a folder, hub id or "e5-small");
            it must give the same vectors (same weights, max_length, prefix, precision), else UserError.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        weights: "best" (best validation epoch) or "last".
        batch_tokens: padded tokens per encoder forward pass [1024 on CPU, 65536 on GPU].
        encoder: an already loaded `Encoder` to share (then `model`, `device`, `batch_tokens` are unused).
        allow_pickle: accept head weights in a .pt/.pth pickle (read with weights_only, tensors only).

    Example (after `bertcache quickstart`):

        from pipeline.predict import Predictor

        p = Predictor("checkpoints/snownlp-e5-small-sweep")
        p.predict("这本书写得真好")["label"]           # one text, one dict: '正向评价'
        p.predict(["物流很快", "质量太差了"])           # a list, a list of dicts
        p.predict_proba("物流很快")                   # array of shape (2,): one probability per class
    """

    def __init__(self, checkpoint: str, *, model: str | None = None, device: str = "auto", weights: str = "best",
                 batch_tokens: int | None = None, encoder: Encoder | None = None, allow_pickle: bool = False):
        self.checkpoint, self.weights = checkpoint, weights
        self.config = read_config(checkpoint, allow_pickle)
        enc = self.config["encoder"]
        self.encoder = encoder or Encoder(model or locate_model(enc), device=device, precision=enc["precision"],
                                          max_length=enc["max_length"], prefix=enc.get("prefix") or "",
                                          instruction=enc.get("instruction"), layers=len(enc["layers"]),
                                          revision=enc.get("revision"), batch_tokens=batch_tokens)
        check_same_encoder(self.config, self.encoder.settings(), f"model {self.encoder.model_ref!r}")
        _, self.head = load_checkpoint(checkpoint, weights, device=self.encoder.device, allow_pickle=allow_pickle)
        self.label_names = self.config["label_names"]
        self.pooling = self.config["pooling"]
        self.layers = enc["layers"]
        self._names = pooling_features(self.pooling, self.layers)

    def predict_proba(self, texts: str | list[str], on_progress=None) -> np.ndarray:
        """Class probabilities: [n, classes] for a list of texts, [classes] for one string.

        Args:
            texts: one text, or a list (any iterable) of texts.
            on_progress: optional callback, called with the number of texts in each encoded batch.

        Example:

            Predictor("checkpoints/snownlp-e5-small-sweep").predict_proba(["物流很快", "质量太差了"])  # (2, 2)
        """
        one, texts = as_texts(texts)
        if not texts:
            return np.zeros((0, len(self.label_names)), np.float32)
        arrays = self.encoder.encode(texts, on_progress=on_progress)
        probs = self.head.predict_proba(build_features(arrays, self.pooling, self.layers))
        return probs[0] if one else probs

    def predict(self, texts: str | list[str], on_progress=None) -> dict | list[dict]:
        """The predicted label: a dict for one string, a list of dicts (in order) for a list of texts.

        Each dict: text, label (name), label_id, probs (label name -> probability).

        Args:
            texts: one text, or a list (any iterable) of texts.
            on_progress: optional callback, called with the number of texts in each encoded batch.

        Example:

            Predictor("checkpoints/snownlp-e5-small-sweep").predict("这本书写得真好")
            # {'text': '这本书写得真好', 'label': '正向评价', 'label_id': 1, 'probs': {'负向评价': 0.37, '正向评价': 0.63}}
        """
        one, texts = as_texts(texts)
        results = self.results(texts, self.predict_proba(texts, on_progress))
        return results[0] if one else results

    def run(self, texts: list[str]) -> dict[str, np.ndarray]:
        """probabilities, logits and features (the pooled vectors the head reads) for a list of texts, in
        order: what serve's endpoints read (OnnxPredictor.run gives the same)."""
        features = build_features(self.encoder.encode(list(texts)), self.pooling, self.layers)
        probs, logits = self.head.predict_scores(features)
        return {"probabilities": probs, "logits": logits, "features": features}

    def results(self, texts: list[str], probs: np.ndarray) -> list[dict]:
        """`predict`'s dicts for texts whose probabilities were computed elsewhere (serve's micro-batches)."""
        return prediction_dicts(texts, probs, self.label_names)


def locate_model(encoder_settings: dict) -> str:
    """Where a checkpoint's model is, from any working directory: the absolute folder it was loaded from
    when that still exists, else the reference as typed (a hub id, a built-in name, a relative path)."""
    folder = encoder_settings.get("model_path")
    if folder and os.path.isdir(folder):
        return folder
    return encoder_settings["model"]


def as_texts(texts) -> tuple[bool, list[str]]:
    """(whether one string was given, the texts as a list): a str is one text, not its characters."""
    if isinstance(texts, str):
        return True, [texts]
    if texts is None or isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__"):
        raise UserError(f"give a text or a list of texts, not {type(texts).__name__}")
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise UserError(f"every text must be a str; got {type(bad).__name__} {bad!r:.40}")
    return False, texts


def evaluate(checkpoint: str, features: str | None = None, split: str = "test", weights: str = "best", *,
             allow_pickle: bool = False, errors: int = 0) -> dict:
    """Metrics of a checkpoint's head on a cached split (its labelled rows only).

    Args:
        checkpoint: checkpoint folder from `fit_head` / `sweep`.
        features: features file to evaluate on [the one the head was trained on]; it must come from the
            same encoder settings and have the same label names.
        split: the cached split, e.g. "test" or "validation".
        weights: "best" or "last".
        allow_pickle: accept head weights in a .pt/.pth pickle (tensors only).
        errors: list, per true class, the N most confidently wrong rows (the cache keeps each row's text).

    Returns a dict: n, accuracy, macro_f1, per_class (precision / recall / f1 / support), confusion_matrix
    (rows: truth), label_names, split; with `errors`, also errors: {true label: [{text, true, predicted,
    probability, row}]}, most confident first.

    Example (after `bertcache quickstart`):

        from pipeline.predict import evaluate

        report = evaluate("checkpoints/snownlp-e5-small-sweep", split="test")
        print(report["accuracy"], report["macro_f1"], report["label_names"])
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
