"""Prediction: the full encoder plus a trained head on raw text, and evaluation over a cache."""
from __future__ import annotations

import os

import numpy as np

from .checkpoint import load_checkpoint, read_config
from .encoder import Encoder
from .errors import UserError
from .fingerprints import check_same_encoder
from .metrics import classification_report
from .heads import model_feature_names, predict_proba_features
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
        self.top = None
        if self.config.get("tuned"):  # raw text -> frozen encoder -> states -> tuned top layers -> head
            from .tuned import load_tuned
            self.top = load_tuned(checkpoint, self.config, self.head, weights, self.encoder.device)

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
        if self.top is not None:
            arrays, states = self.encoder.encode_ids_with_states(self.encoder.tokenize(texts),
                                                                 self.config["tuned"]["states_layer"], on_progress)
            probs = self.top.predict_proba(states, {n: arrays[n] for n in self.top.frozen_names})
        else:
            arrays = self.encoder.encode(texts, on_progress=on_progress)
            probs = predict_proba_features(self.head, self.pooling, arrays, self.layers)
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

    def results(self, texts: list[str], probs: np.ndarray) -> list[dict]:
        """`predict`'s dicts for texts whose probabilities were computed elsewhere (serve's micro-batches)."""
        out = []
        for text, p in zip(texts, probs):
            i = int(p.argmax())
            out.append({"text": text, "label": self.label_names[i], "label_id": i,
                        "probs": {n: float(v) for n, v in zip(self.label_names, p)}})
        return out


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
             allow_pickle: bool = False) -> dict:
    """Metrics of a checkpoint's head on a cached split (its labelled rows only).

    Args:
        checkpoint: checkpoint folder from `fit_head` / `sweep`.
        features: features file to evaluate on [the one the head was trained on]; it must come from the
            same encoder settings and have the same label names.
        split: the cached split, e.g. "test" or "validation".
        weights: "best" or "last".
        allow_pickle: accept head weights in a .pt/.pth pickle (tensors only).

    Returns a dict: n, accuracy, macro_f1, per_class (precision / recall / f1 / support), confusion_matrix
    (rows: truth), label_names, split.

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
        y = store.labels(split)
        keep = y >= 0
        if not keep.any():
            raise UserError(f"split {split!r} of {features} has no labelled rows to evaluate on")
        arrays = {n: v[keep] for n, v in store.features(split, model_feature_names(head, config["pooling"],
                                                                                    layers)).items()}
        if config.get("tuned"):
            return _evaluate_tuned(checkpoint, config, head, weights, store, split, keep, arrays, y)
    try:
        pred = predict_proba_features(head, config["pooling"], arrays, layers).argmax(1)
    except UserError as e:
        raise UserError(f"{features}: {e}") from e
    report = classification_report(y[keep], pred, config["label_names"])
    report["split"] = split
    return report


def _evaluate_tuned(checkpoint, config, head, weights, store, split, keep, arrays, y) -> dict:
    """A tuned checkpoint over the cached token states (extract --states) of a split."""
    from .tuned import RaggedRows, load_tuned

    st = store.states_settings
    if not st or st["layer"] != config["tuned"]["states_layer"]:
        raise UserError(f"{store.path} holds no token states of layer {config['tuned']['states_layer']}, which this "
                        f"tuned checkpoint reads; extract with --states {config['tuned']['cached_k']}")
    top = load_tuned(checkpoint, config, head, weights)
    rows = RaggedRows.from_store(store, split, np.flatnonzero(keep), {n: arrays[n] for n in top.frozen_names}, y[keep])
    probs = np.zeros((rows.n, top.head.num_classes), np.float32)
    import torch
    with torch.no_grad():
        for idx, h, mask, fz, _ in rows.batches(np.arange(rows.n), 4096, "cpu"):
            probs[idx] = torch.softmax(top(h, mask, fz), -1).numpy()
    report = classification_report(y[keep], probs.argmax(1), config["label_names"])
    report["split"] = split
    return report
