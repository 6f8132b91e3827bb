"""Prediction: the full encoder plus a trained head on raw text, and evaluation over a cache."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .checkpoint import load_checkpoint, read_config
from .defaults import check_ranges
from .encoder import Encoder
from .errors import UserError, as_texts, is_blank
from .fingerprints import check_same_encoder
from .heads import Ensemble, model_feature_names, predict_scores_features
from .labels import prediction_dicts
from .metrics import report
from .models import locate_model
from .poolings import build_features, single_text_pooling
from .tasks import labelled

if TYPE_CHECKING:
    from .store import RowTexts


class Predictor:
    """A trained head and its encoder, loaded from a checkpoint folder, for raw texts, for every task
    (classification, multilabel, regression) and pair mode.

    Args:
        checkpoint: checkpoint folder written by `fit_head` / `sweep` (`bertcache fit-head`).
        model: an encoder to use instead of the checkpoint's reference (a folder, hub id or "e5-small");
            it must give the same vectors (same weights, max_length, prefix, precision), else UserError.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        weights: "best" (best validation epoch) or "last".
        batch_tokens: padded tokens per encoder forward pass [1024 on CPU, 65536 on GPU].
        encoder: an already loaded `Encoder` to share (then `model`, `device`, `batch_tokens` are unused).
        allow_pickle: accept head weights in a .pt/.pth pickle (read with weights_only, tensors only).

    A head trained on sentence pairs takes `pairs=` (the second texts) as well, or (text, text_pair)
    tuples as the items (serve's micro-batches pass those).

    Example (after `bertcache quickstart`):

        from pipeline.predict import Predictor

        p = Predictor("checkpoints/snownlp-e5-small-sweep")
        p.predict("这本书写得真好")["label"]           # one text, one dict: '正向评价'
        p.predict(["物流很快", "质量太差了"])           # a list, a list of dicts
        p.predict_proba("物流很快")                   # array of shape (2,): one probability per class
        Predictor("checkpoints/sts").predict("一只猫", pairs="一只小猫")  # {'text': ..., 'text_pair': ..., 'score': 4.2}

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import toy_features
        >>> from pipeline.train import fit_head
        >>> tmp = tempfile.mkdtemp()
        >>> p = Predictor(fit_head(toy_features(tmp), f"{tmp}/head", epochs=5)[0], device="cpu")
        >>> sorted(p.predict("这个东西真的很好"))
        ['label', 'label_id', 'probabilities', 'text']
        >>> p.predict_proba(["很好", "很差", "还可以"]).shape
        (3, 2)
    """

    def __init__(self, checkpoint: str, *, model: str | None = None, device: str = "auto", weights: str = "best",
                 batch_tokens: int | None = None, encoder: Encoder | None = None, allow_pickle: bool = False):
        self.checkpoint, self.weights = checkpoint, weights
        self.config = read_config(checkpoint, allow_pickle)
        enc = self.config["encoder"]
        self.encoder = encoder or Encoder(model or locate_model(enc), device=device, precision=enc["precision"],
                                          max_length=enc["max_length"], prefix=enc.get("prefix") or "",
                                          instruction=enc.get("instruction"), layers=len(enc["layers"]),
                                          revision=enc.get("revision"), batch_tokens=batch_tokens,
                                          long_texts=enc.get("long_texts") or "truncate", stride=enc.get("stride"))
        check_same_encoder(self.config, self.encoder.settings(), f"model {self.encoder.model_ref!r}",
                           self.encoder.commitless_fingerprint)
        _, self.head = load_checkpoint(checkpoint, weights, device=self.encoder.device, allow_pickle=allow_pickle)
        self.label_names = self.config["label_names"]
        self.pooling = self.config["pooling"]
        self.layers = enc["layers"]
        self.task = self.config.get("task", "classification")
        self.pair_mode = self.config.get("pair_mode")
        self.thresholds = self.config.get("thresholds")
        self.top = None
        if self.config.get("tuned"):  # raw text -> frozen encoder -> states -> tuned top layers -> head
            from .tuned import load_tuned
            self.top = load_tuned(checkpoint, self.config, self.head, weights, self.encoder.device)

    def outputs(self, texts, on_progress=None, pairs=None) -> np.ndarray:
        """The head's outputs: [n, classes] probabilities (classification, multilabel) or [n] values
        (regression) for a list; one row for one string (or one pair).

        Args:
            texts: one text, or a list of texts, or of (text, text_pair) tuples for a pair head.
            on_progress: optional callback, called with the number of texts in each encoded batch.
            pairs: the second text of each pair (a pair head), in the same shape as `texts`.

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> from pipeline.train import fit_head
            >>> tmp = tempfile.mkdtemp()
            >>> p = Predictor(fit_head(toy_features(tmp), f"{tmp}/head", epochs=1)[0], device="cpu")
            >>> p.outputs(["很好", "很差", "还可以"]).shape, p.outputs("很好").shape
            ((3, 2), (2,))
        """
        one, texts, pairs = self._items(texts, pairs)
        if not texts:
            return np.zeros((0,) if self.task == "regression" else (0, len(self.label_names)), np.float32)
        out = self._scores(texts, on_progress, pairs)[0]
        return out[0] if one else out

    def _scores(self, texts: list, on_progress=None, pairs: list[str] | None = None):
        """(outputs, logits, features) for a list of texts (or pairs: `pairs`, or (text, text_pair) items);
        features are the pooled vectors the head reads (an ensemble's: its heaviest member's)."""
        _, texts, pairs = self._items(texts, pairs)
        if self.top is not None:  # the frozen bottom layers, then the tuned top over their states
            arrays, states = self.encoder.encode_ids_with_states(self.encoder.tokenize(texts),
                                                                 self.config["tuned"]["states_layer"], on_progress)
            return self.top.predict_scores(states, {n: arrays[n] for n in self.top.frozen_names})
        if self.pair_mode == "bi":  # each distinct text once, then u and v per pair
            distinct = list(dict.fromkeys(texts + pairs))
            where = {t: i for i, t in enumerate(distinct)}
            vectors = self.encoder.encode(distinct, on_progress=on_progress)
            index = np.array([[where[a], where[b]] for a, b in zip(texts, pairs)]).reshape(-1, 2)
            arrays = {n: v[index] for n, v in vectors.items()}
        else:
            arrays = self.encoder.encode(texts, on_progress=on_progress, pairs=pairs)
        return predict_scores_features(self.head, self.pooling, arrays, self.layers)

    def embed(self, texts) -> np.ndarray:
        """Vectors of single texts, [n, width] (one row for one string): the pooled features the head reads,
        or for a head on pairs encoded apart (`--pair-mode bi`) each text's own vector under its pooling
        (cos:mean -> mean). A head on pairs encoded together (`cross`) has no vector of one text: UserError.

        Args:
            texts: one text, or a list (any iterable) of texts.

        Example:

            Predictor("checkpoints/snownlp-e5-small-sweep").embed(["物流很快"]).shape  # (1, 384)

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> from pipeline.train import fit_head
            >>> tmp = tempfile.mkdtemp()
            >>> p = Predictor(fit_head(toy_features(tmp), f"{tmp}/head", epochs=1)[0], device="cpu")
            >>> p.embed(["很好", "很差"]).shape, p.embed("很好").shape
            ((2, 32), (32,))
        """
        one, texts = as_texts(texts)
        if self.pair_mode == "cross":
            raise UserError("this head reads two texts encoded together (--pair-mode cross): it has no vector of "
                            "one text; a head made with --pair-mode bi has")
        if not texts:  # [0, width]: the width of one text's vector
            return np.zeros((0, self.embed("x").shape[0]), np.float32)
        if self.pair_mode == "bi":
            pooling = self.head.poolings[self.head.heaviest] if isinstance(self.head, Ensemble) else self.pooling
            out = build_features(self.encoder.encode(texts), single_text_pooling(pooling), self.layers)
        else:
            out = self._scores(texts)[2]
        return out[0] if one else out

    def _items(self, texts, pairs) -> tuple[bool, list[str], list[str] | None]:
        """(one item given, first texts, second texts or None), checked against the head's pair mode."""
        if pairs is None and not isinstance(texts, (str, dict)) and hasattr(texts, "__iter__") and self.pair_mode \
                and not (isinstance(texts, tuple) and len(texts) == 2 and all(isinstance(t, str) for t in texts)):
            texts = list(texts)  # (text, text_pair) items: every one a pair of two strings, or a one-line refusal
            bad = next((i for i, t in enumerate(texts) if not (isinstance(t, (list, tuple)) and len(t) == 2)), None)
            if bad is not None:
                raise UserError(f"item {bad} is {type(texts[bad]).__name__} {texts[bad]!r:.40}, not a (text, "
                                "text_pair) pair: give every item as a pair, or the second texts as pairs=")
            texts, pairs = [t[0] for t in texts], [t[1] for t in texts]
        elif pairs is None and isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], (list, tuple)):
            raise UserError("this head reads single texts, not pairs")
        elif pairs is None and isinstance(texts, tuple) and len(texts) == 2 and self.pair_mode:
            texts, pairs = texts[0], texts[1]
        one, texts = as_texts(texts)
        if (pairs is not None) != bool(self.pair_mode):
            raise UserError("this head reads sentence pairs: give a second text for each text (pairs=)"
                            if self.pair_mode else "this head reads single texts, not pairs")
        if pairs is not None:
            one_pair, pairs = as_texts(pairs)
            if one_pair != one or len(pairs) != len(texts):
                raise UserError(f"{len(texts)} texts but {len(pairs)} second texts: give one pair per row")
            blank = next((i for i, (a, b) in enumerate(zip(texts, pairs)) if is_blank(a) or is_blank(b)), None)
            if blank is not None:  # as extract, predict's CLI and serve refuse it
                side = "first" if is_blank(texts[blank]) else "second"
                raise UserError(f"pair {blank + 1}: the {side} text is blank; give two non-blank texts")
        return one, texts, pairs

    def predict_proba(self, texts, on_progress=None, pairs=None) -> np.ndarray:
        """Class probabilities (multilabel: per label): [n, classes] for a list of texts, [classes] for one string.

        Args:
            texts: one text, or a list (any iterable) of texts.
            on_progress: optional callback, called with the number of texts in each encoded batch.
            pairs: the second texts, for a head trained on sentence pairs.

        Example:

            Predictor("checkpoints/snownlp-e5-small-sweep").predict_proba(["物流很快", "质量太差了"])  # (2, 2)

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> from pipeline.train import fit_head
            >>> tmp = tempfile.mkdtemp()
            >>> p = Predictor(fit_head(toy_features(tmp), f"{tmp}/head", epochs=1)[0], device="cpu")
            >>> p.predict_proba(["很好", "很差"]).shape, round(float(p.predict_proba("很好").sum()), 4)
            ((2, 2), 1.0)
        """
        if self.task == "regression":
            raise UserError("a regression head predicts scores, not probabilities; use predict")
        return self.outputs(texts, on_progress, pairs)

    def predict(self, texts, on_progress=None, pairs=None) -> dict | list[dict]:
        """The prediction: a dict for one string (or pair), a list of dicts (in order) for a list.

        Each dict: text (and text_pair), then per task (see `results`).

        Args:
            texts: one text, or a list (any iterable) of texts (or of (text, text_pair) tuples).
            on_progress: optional callback, called with the number of texts in each encoded batch.
            pairs: the second texts, for a head trained on sentence pairs.

        Example:

            Predictor("checkpoints/snownlp-e5-small-sweep").predict("这本书写得真好")
            # {'text': '这本书写得真好', 'label': '正向评价', 'label_id': 1, 'probabilities': {'负向评价': 0.37, '正向评价': 0.63}}

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> from pipeline.train import fit_head
            >>> tmp = tempfile.mkdtemp()
            >>> p = Predictor(fit_head(toy_features(tmp), f"{tmp}/head", epochs=1)[0], device="cpu")
            >>> sorted(p.predict("很好")), [row["text"] for row in p.predict(["很好", "很差"])]
            (['label', 'label_id', 'probabilities', 'text'], ['很好', '很差'])
        """
        one, texts, pairs = self._items(texts, pairs)
        out = self.outputs(texts, on_progress, pairs)
        results = self.results(texts if pairs is None else list(zip(texts, pairs)), out)
        return results[0] if one else results

    def run(self, texts: list) -> dict[str, np.ndarray]:
        """outputs (the task's: class or label probabilities, or regression scores), logits and features (the
        pooled vectors the head reads) for a list of texts (or pairs), in order: what serve's endpoints
        read (OnnxPredictor.run gives the same); `probabilities` too, except for regression.

        Args:
            texts: a list of texts (or of (text, text_pair) tuples, for a pair head).

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> from pipeline.train import fit_head
            >>> tmp = tempfile.mkdtemp()
            >>> p = Predictor(fit_head(toy_features(tmp), f"{tmp}/head", epochs=1)[0], device="cpu")
            >>> {name: array.shape for name, array in p.run(["很好", "很差"]).items()}
            {'outputs': (2, 2), 'logits': (2, 2), 'features': (2, 32), 'probabilities': (2, 2)}
        """
        outputs, logits, features = self._scores(texts)
        out = {"outputs": outputs, "logits": logits, "features": features}
        if self.task != "regression":
            out["probabilities"] = outputs
        return out

    def results(self, texts: list, outputs: np.ndarray) -> list[dict]:
        """`predict`'s dicts for items whose outputs were computed elsewhere (serve's micro-batches):
        text (and text_pair), then per task: classification label, label_id, probabilities (name -> probability);
        multilabel labels (those over their threshold, most probable first) and probabilities; regression score.

        Args:
            texts: the items: texts, or (text, text_pair) tuples.
            outputs: their outputs, one row per item, as `outputs` gives them.

        Runnable, on pipeline.toy's model and data (seconds):

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> from pipeline.train import fit_head
            >>> tmp = tempfile.mkdtemp()
            >>> p = Predictor(fit_head(toy_features(tmp), f"{tmp}/head", epochs=1)[0], device="cpu")
            >>> import numpy as np
            >>> p.label_names, p.results(["很好"], np.array([[0.25, 0.75]]))
            (['正向', '负向'],
             [{'text': '很好', 'label': '负向', 'label_id': 1, 'probabilities': {'正向': 0.25, '负向': 0.75}}])
        """
        out = []
        for item, p in zip(texts, outputs):
            row = {"text": item} if isinstance(item, str) else {"text": item[0], "text_pair": item[1]}
            if self.task == "regression":
                row["score"] = float(p)
            elif self.task == "multilabel":
                over = [(float(v), n) for n, v in zip(self.label_names, p) if v >= self.thresholds[n]]
                row["labels"] = [n for _, n in sorted(over, key=lambda x: -x[0])]
                row["probabilities"] = {n: float(v) for n, v in zip(self.label_names, p)}
            else:
                row.update({k: v for k, v in prediction_dicts([row["text"]], [p], self.label_names)[0].items()
                            if k != "text"})
            out.append(row)
        return out


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
        errors: list the N most confidently wrong rows (the cache keeps each row's text): per true class
            (classification), per label (multilabel), or the N largest errors (regression).

    Returns a dict per the head's task, with n, task and split: classification accuracy, macro_f1,
    per_class (precision / recall / f1 / support), confusion_matrix (rows: truth), label_names, and with
    `errors` also errors: {true label: [{text, true, predicted, probability, row}]}, most confident
    first; regression pearson, spearman, mse, mae (errors: {"largest": [{text, true, predicted, error,
    row}]}); multilabel micro_f1, macro_f1, subset_accuracy, per_label (precision / recall / f1 /
    support), label_names (errors: {label: [{text, true, predicted, probability, row}]}, true and
    predicted being whether the label applies). Rows of a `--pair-mode bi` cache carry text_pair too (a
    cross cache stores the first texts only).

    Example (after `bertcache quickstart`):

        from pipeline.predict import evaluate

        report = evaluate("checkpoints/snownlp-e5-small-sweep", split="test")
        print(report["accuracy"], report["macro_f1"], report["label_names"])

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import toy_features
        >>> from pipeline.train import fit_head
        >>> tmp = tempfile.mkdtemp()
        >>> report = evaluate(fit_head(toy_features(tmp), f"{tmp}/head", epochs=5)[0], errors=1)
        >>> report["n"], report["label_names"], len(report["confusion_matrix"]), list(report["errors"])
        (40, ['正向', '负向'], 2, ['正向', '负向'])
    """
    from .store import TEXTS, FeatureStore, RowTexts  # h5py: not needed by predict on raw text (0.15 s)
    check_ranges(errors=errors)
    config, head = load_checkpoint(checkpoint, weights, allow_pickle=allow_pickle)
    features = features or config["features"]["path"]
    with FeatureStore(features) as store:
        check_same_encoder(config, store.settings, f"the features file {features}")
        if (store.task, store.pair_mode) != (config.get("task", "classification"), config.get("pair_mode")):
            raise UserError(f"{features} holds task {store.task} (pair mode {store.pair_mode}), the checkpoint "
                            f"{config.get('task', 'classification')} (pair mode {config.get('pair_mode')})")
        names, ours = store.label_names, config["label_names"]
        task = config.get("task", "classification")
        # A file whose classes are some of the checkpoint's (an evaluation set without every class, named by
        # the values it has): its ids are mapped onto the checkpoint's by name.
        remap = names != ours and task == "classification" and names and set(names) <= set(ours)
        if names != ours and not remap:
            raise UserError(f"{features} has labels {names}, the checkpoint {ours}; extract it with "
                            f"--label-names {','.join(ours)}")
        if split not in store.splits:
            raise UserError(f"split {split!r} is not in {features}; it has: {', '.join(store.splits)}; choose one "
                            "with --split")
        layers = store.settings["layers"]
        y = store.labels(split)
        if remap:
            ids = np.array([ours.index(n) for n in names])
            y = np.where(y >= 0, ids[np.clip(y, 0, None)], y)
        keep = labelled(y)
        if not keep.any():
            raise UserError(f"split {split!r} of {features} has no labelled rows to evaluate on")
        arrays = {n: v[keep] for n, v in store.features(split, model_feature_names(head, config["pooling"],
                                                                                    layers)).items()}
        if config.get("tuned"):
            out = _tuned_outputs(checkpoint, config, head, weights, store, split, keep, arrays)
        else:
            try:
                out = predict_scores_features(head, config["pooling"], arrays, layers)[0]
            except UserError as e:
                raise UserError(f"{features}: {e}") from e
        result = report(config, y[keep], out)
        result["task"] = task
        result["split"] = split
        if errors > 0:
            if not store.has_texts(split if store.pair_mode != "bi" else TEXTS):
                raise UserError(f"{features} keeps no texts (it was extracted before bertcache stored them, or "
                                "with keep_texts=False): extract it again with --restart to list errors")
            pick = {"classification": confident_errors, "multilabel": label_errors,
                    "regression": largest_errors}[task]
            result["errors"] = pick(RowTexts(store, split), np.flatnonzero(keep), y[keep], out, errors, config)
    return result


def confident_errors(texts: RowTexts, rows: np.ndarray, y: np.ndarray, probs: np.ndarray, n: int,
                     config: dict) -> dict[str, list[dict]]:
    """Per true class, its `n` wrong rows with the most probable wrong answers, most confident first."""
    label_names = config["label_names"]
    pred = probs.argmax(1)
    confidence = probs[np.arange(len(pred)), pred]
    out = {}
    for c, name in enumerate(label_names):
        wrong = np.flatnonzero((y == c) & (pred != c))
        top = wrong[np.argsort(-confidence[wrong], kind="stable")[:n]]
        out[name] = [{**t, "true": name, "predicted": label_names[int(pred[i])],
                      "probability": float(confidence[i]), "row": int(rows[i])} for t, i in zip(texts(rows[top]), top)]
    return out


def label_errors(texts: RowTexts, rows: np.ndarray, y: np.ndarray, probs: np.ndarray, n: int,
                 config: dict) -> dict[str, list[dict]]:
    """Multilabel: per label, its `n` rows where the label was most confidently wrong (given over its
    threshold but not true, or true but left under it), most confident first."""
    out = {}
    for j, name in enumerate(config["label_names"]):
        cut = config["thresholds"][name]
        p, truth = probs[:, j], y[:, j] > 0.5
        wrong = np.flatnonzero((p >= cut) != truth)
        confidence = np.where(truth, 1 - p, p)  # how sure the head was of the wrong answer
        top = wrong[np.argsort(-confidence[wrong], kind="stable")[:n]]
        out[name] = [{**t, "true": bool(truth[i]), "predicted": bool(p[i] >= cut), "probability": float(p[i]),
                      "row": int(rows[i])} for t, i in zip(texts(rows[top]), top)]
    return out


def largest_errors(texts: RowTexts, rows: np.ndarray, y: np.ndarray, scores: np.ndarray, n: int,
                   config: dict) -> dict[str, list[dict]]:
    """Regression: the `n` rows whose predicted score is farthest from the target, largest first."""
    err = scores - y
    top = np.argsort(-np.abs(err), kind="stable")[:n]
    return {"largest": [{**t, "true": float(y[i]), "predicted": float(scores[i]), "error": float(err[i]),
                         "row": int(rows[i])} for t, i in zip(texts(rows[top]), top)]}


def _tuned_outputs(checkpoint, config, head, weights, store, split, keep, arrays) -> np.ndarray:
    """A tuned checkpoint's probabilities over the cached token states (extract --states) of a split's rows."""
    from .tuned import RaggedRows, load_tuned

    st = store.states_settings
    if not st or st["layer"] != config["tuned"]["states_layer"]:
        raise UserError(f"{store.path} holds no token states of layer {config['tuned']['states_layer']}, which this "
                        f"tuned checkpoint reads; extract with --states {config['tuned']['cached_k']}")
    top = load_tuned(checkpoint, config, head, weights)
    rows = RaggedRows.from_store(store, split, np.flatnonzero(keep), {n: arrays[n] for n in top.frozen_names},
                                 np.zeros(int(keep.sum()), np.int64))
    return top.head.predict_proba(top.features_of(rows))
