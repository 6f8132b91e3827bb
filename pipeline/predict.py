"""Prediction: the full encoder plus a trained head on raw text, and evaluation over a cache."""
from __future__ import annotations

import numpy as np

from .checkpoint import load_checkpoint, read_config
from .encoder import Encoder
from .errors import UserError
from .fingerprints import check_same_encoder
from .metrics import report
from .poolings import build_features, pooling_features
from .store import FeatureStore
from .tasks import labelled


class Predictor:
    """Encoder + head from a checkpoint folder, for every task and pair mode.

    `outputs(texts)` gives the head's outputs ([n, classes] probabilities; [n] values for regression);
    `predict(texts)` one dict per text. A head trained on sentence pairs takes `pairs` (the second
    texts) as well; serve passes (text, text_pair) tuples as the items instead.

        >>> Predictor("checkpoints/sts").predict(["一只猫"], pairs=["一只小猫"])  # doctest: +SKIP
        [{'text': '一只猫', 'text_pair': '一只小猫', 'score': 4.2}]
    """

    def __init__(self, checkpoint: str, *, model: str | None = None, device: str = "auto", weights: str = "best",
                 batch_tokens: int | None = None, encoder: Encoder | None = None, allow_pickle: bool = False):
        self.checkpoint, self.weights = checkpoint, weights
        self.config = read_config(checkpoint, allow_pickle)
        enc = self.config["encoder"]
        self.encoder = encoder or Encoder(model or enc["model"], device=device, precision=enc["precision"],
                                          max_length=enc["max_length"], prefix=enc.get("prefix") or "",
                                          layers=len(enc["layers"]), revision=enc.get("revision"),
                                          batch_tokens=batch_tokens, long_texts=enc.get("long_texts") or "truncate",
                                          stride=enc.get("stride"))
        check_same_encoder(self.config, self.encoder.settings(), f"model {self.encoder.model_ref!r}")
        _, self.head = load_checkpoint(checkpoint, weights, device=self.encoder.device, allow_pickle=allow_pickle)
        self.label_names = self.config["label_names"]
        self.pooling = self.config["pooling"]
        self.layers = enc["layers"]
        self.task = self.config.get("task", "classification")
        self.pair_mode = self.config.get("pair_mode")
        self.thresholds = self.config.get("thresholds")
        self._names = pooling_features(self.pooling, self.layers)

    def outputs(self, texts: list, on_progress=None, pairs: list[str] | None = None) -> np.ndarray:
        """The head's outputs for texts (or pairs: `pairs`, or items that are (text, text_pair) tuples)."""
        texts = list(texts)
        if pairs is None and texts and not isinstance(texts[0], str):
            texts, pairs = [t[0] for t in texts], [t[1] for t in texts]
        if (pairs is not None) != bool(self.pair_mode):
            raise UserError("this head reads sentence pairs: give a second text for each text" if self.pair_mode
                            else "this head reads single texts, not pairs")
        if pairs is not None and len(pairs) != len(texts):
            raise UserError(f"{len(texts)} texts but {len(pairs)} second texts: give one pair per row")
        if not texts:
            return np.zeros((0,) if self.task == "regression" else (0, len(self.label_names)), np.float32)
        if self.pair_mode == "bi":  # each distinct text once, then u and v per pair
            distinct = list(dict.fromkeys(texts + list(pairs)))
            where = {t: i for i, t in enumerate(distinct)}
            vectors = self.encoder.encode(distinct, on_progress=on_progress)
            index = np.array([[where[a], where[b]] for a, b in zip(texts, pairs)])
            arrays = {n: v[index] for n, v in vectors.items()}
        else:
            arrays = self.encoder.encode(texts, on_progress=on_progress, pairs=pairs)
        return self.head.predict(build_features(arrays, self.pooling, self.layers))

    def predict_proba(self, texts: list, on_progress=None, pairs: list[str] | None = None) -> np.ndarray:
        """Class (multilabel: per-label) probabilities [n, classes]."""
        if self.task == "regression":
            raise UserError("a regression head predicts scores, not probabilities; use predict")
        return self.outputs(texts, on_progress, pairs)

    def predict(self, texts: list, on_progress=None, pairs: list[str] | None = None) -> list[dict]:
        """One dict per text, in order (see `results`)."""
        out = self.outputs(texts, on_progress, pairs)
        return self.results(list(texts) if pairs is None else list(zip(texts, pairs)), out)

    def results(self, texts: list, outputs: np.ndarray) -> list[dict]:
        """`predict`'s dicts for items whose outputs were computed elsewhere (serve's micro-batches):
        text (and text_pair), then per task: classification label, label_id, probs (name -> probability);
        multilabel labels (those over their threshold, most probable first) and probs; regression score."""
        out = []
        for item, p in zip(texts, outputs):
            row = {"text": item} if isinstance(item, str) else {"text": item[0], "text_pair": item[1]}
            if self.task == "regression":
                row["score"] = float(p)
            elif self.task == "multilabel":
                over = [(float(v), n) for n, v in zip(self.label_names, p) if v >= self.thresholds[n]]
                row["labels"] = [n for _, n in sorted(over, key=lambda x: -x[0])]
                row["probs"] = {n: float(v) for n, v in zip(self.label_names, p)}
            else:
                i = int(p.argmax())
                row.update(label=self.label_names[i], label_id=i,
                           probs={n: float(v) for n, v in zip(self.label_names, p)})
            out.append(row)
        return out


def evaluate(checkpoint: str, features: str | None = None, split: str = "test", weights: str = "best",
             allow_pickle: bool = False) -> dict:
    """Metrics of a checkpoint's head on a cached split (labelled rows only), per the head's task:
    classification accuracy, macro_f1, per_class, confusion_matrix; regression pearson, spearman, mse,
    mae; multilabel micro_f1, macro_f1, subset_accuracy, per_label. Every report has n and split."""
    config, head = load_checkpoint(checkpoint, weights, allow_pickle=allow_pickle)
    features = features or config["features"]["path"]
    with FeatureStore(features) as store:
        check_same_encoder(config, store.settings, f"the features file {features}")
        if (store.task, store.pair_mode) != (config.get("task", "classification"), config.get("pair_mode")):
            raise UserError(f"{features} holds task {store.task} (pair mode {store.pair_mode}), the checkpoint "
                            f"{config.get('task', 'classification')} (pair mode {config.get('pair_mode')})")
        if store.label_names != config["label_names"]:
            raise UserError(f"{features} has labels {store.label_names}, the checkpoint {config['label_names']}")
        layers = store.settings["layers"]
        X = build_features(store.features(split, pooling_features(config["pooling"], layers)), config["pooling"],
                           layers)
        y = store.labels(split)
    if X.shape[1] != head.in_features:
        raise UserError(f"{features} gives {X.shape[1]} features for pooling {config['pooling']!r}, "
                        f"the head expects {head.in_features}")
    keep = labelled(y)
    if not keep.any():
        raise UserError(f"split {split!r} of {features} has no labelled rows to evaluate on")
    result = report(config, y[keep], head.predict(X[keep]))
    result["task"] = config.get("task", "classification")
    result["split"] = split
    return result
