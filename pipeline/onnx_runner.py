"""Run a `bertcache export` folder with onnxruntime: the `tokenizers` library + one session, numpy only.

Nothing here imports torch or transformers (but `load_predictor`, for the torch backend): a service needs
only `pip install onnxruntime tokenizers numpy` (or `bertcache[onnx]`) and the exported folder.
`OnnxPredictor` answers like `Predictor`:
`predict_proba(texts)`, `predict(texts)` (the same dicts as `bertcache predict --json`), plus
`embed(texts)` (the pooled vectors the head reads).
"""
from __future__ import annotations

import os

import numpy as np

from .defaults import check_ranges
from .errors import UserError, as_texts, read_json_file
from .labels import prediction_dicts
from .tasks import read_metrics

FORMAT = "bertcache-onnx"
MODEL_FILE = "model.onnx"
META_FILE = "bertcache.json"
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("probabilities", "logits", "features")
# Padded tokens per session call: like the torch encoder on a CPU, small batches keep activations in cache.
BATCH_TOKENS = 1024
INSTALL_HINT = "pip install 'bertcache[onnx]'"


def read_meta(folder: str) -> dict:
    """bertcache.json of an export folder, checked."""
    path = os.path.join(folder, META_FILE)
    if not os.path.isdir(folder) or not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, MODEL_FILE)):
        raise UserError(f"{folder} is not an ONNX export (no {META_FILE} and {MODEL_FILE}): make one with "
                        "`bertcache export -c CHECKPOINT -o OUT`")
    return read_json_file(path, folder, FORMAT, "a bertcache ONNX export")


class OnnxPredictor:
    """An exported checkpoint (`bertcache export`) run by onnxruntime on raw texts.

    Args:
        folder: the folder `bertcache export -c CHECKPOINT -o OUT` wrote.
        threads: onnxruntime intra-op threads [onnxruntime's default: one per core].
        batch_tokens: padded tokens per session call [1024].

    Example:

        from pipeline.onnx_runner import OnnxPredictor

        p = OnnxPredictor("exported/snownlp")
        p.predict("物流很快")["label"]          # one text, one dict (as Predictor.predict)
        p.predict_proba(["物流很快", "太差了"])  # array [2, classes]
        p.embed(["物流很快"])                    # array [1, in_features]: what the head reads
    """

    def __init__(self, folder: str, *, threads: int | None = None, batch_tokens: int | None = None):
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise UserError(f"the ONNX backend needs onnxruntime and tokenizers ({e.name} is not installed): "
                            f"{INSTALL_HINT}") from e
        self.meta = self.config = meta = read_meta(folder)  # config: the keys a checkpoint's config.json has
        self.checkpoint = folder
        self.label_names = meta["label_names"]
        self.pooling = meta["pooling"]
        tok = meta["tokenizer"]
        self.prefix, self.max_length, self.pad_id = tok["prefix"], int(tok["max_length"]), int(tok["pad_id"])
        self.batch_tokens = int(batch_tokens or BATCH_TOKENS)
        # What `serve` reads of an encoder: exports are of truncating heads (export refuses chunked ones).
        self.long_texts = "truncate"
        self.model_ref = meta.get("encoder", {}).get("model") or folder
        self.tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        # As the encoder calls its tokenizer: special tokens added, cut to max_length tokens, no padding.
        self.tokenizer.enable_truncation(self.max_length, direction=tok.get("truncation_side", "right"))
        self.tokenizer.no_padding()
        options = ort.SessionOptions()
        if threads is not None:
            check_ranges(threads=threads)
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(os.path.join(folder, MODEL_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
            raise UserError(f"onnxruntime cannot load {os.path.join(folder, MODEL_FILE)}: "
                            f"{str(e).strip().splitlines()[0]}") from e

    def describe(self) -> dict:
        """What `bertcache serve --backend onnx` shows at /info: `describe_export` of its folder."""
        return describe_export(self.checkpoint)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch([self.prefix + t for t in texts])]

    def run(self, texts: list[str]) -> dict[str, np.ndarray]:
        """probabilities, logits and features for `texts` (a list), in their order."""
        ids = self.tokenize(list(texts))
        out = {name: None for name in OUTPUTS}
        lengths = np.array([len(s) for s in ids], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            # Longest first, each call padded only to its own longest text, within the token budget.
            batch = order[start:start + max(1, self.batch_tokens // int(lengths[order[start]]))]
            start += len(batch)
            width = int(lengths[batch[0]])
            input_ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for r, i in enumerate(batch):
                input_ids[r, :lengths[i]] = ids[i]
                mask[r, :lengths[i]] = 1
            results = self.session.run(list(OUTPUTS), {"input_ids": input_ids, "attention_mask": mask})
            for name, value in zip(OUTPUTS, results):
                if out[name] is None:
                    out[name] = np.empty((len(ids), value.shape[1]), dtype=np.float32)
                out[name][batch] = value
        if not ids:
            return {"probabilities": np.zeros((0, len(self.label_names)), np.float32),
                    "logits": np.zeros((0, len(self.label_names)), np.float32),
                    "features": np.zeros((0, feature_width(self.meta["head"])), np.float32)}
        return out

    def predict_proba(self, texts: str | list[str]) -> np.ndarray:
        """Class probabilities: [n, classes] for a list of texts, [classes] for one string."""
        one, texts = as_texts(texts)
        probs = self.run(texts)["probabilities"]
        return probs[0] if one else probs

    def embed(self, texts: list[str]) -> np.ndarray:
        """The head's input vectors (pooled, before standardization): [n, in_features]."""
        return self.run(as_texts(texts)[1])["features"]

    def predict(self, texts: str | list[str]) -> dict | list[dict]:
        """A dict (text, label, label_id, probabilities) for one string, a list of them for a list of texts."""
        one, texts = as_texts(texts)
        results = self.results(texts, self.predict_proba(texts))
        return results[0] if one else results

    def results(self, texts: list[str], probabilities: np.ndarray) -> list[dict]:
        """`predict`'s dicts for texts whose probabilities were computed elsewhere (serve's micro-batches)."""
        return prediction_dicts(texts, probabilities, self.label_names)


def describe_export(folder: str) -> dict:
    """An export folder's description, for `info` and serve's /info (no onnxruntime needed): the checkpoint it
    was made from, its model, pooling, head, labels and the checkpoint's test figures."""
    meta = read_meta(folder)
    head, enc, tok = meta["head"], meta.get("encoder", {}), meta["tokenizer"]
    metrics = read_metrics(folder)
    test = metrics.get("test")
    return {"kind": "export", "path": folder, "model": enc.get("model"),
            "model_fingerprint": enc.get("model_fingerprint"), "pooling": meta["pooling"], "head": head,
            "label_names": meta["label_names"], "layers": enc.get("layers"), "max_length": int(tok["max_length"]),
            "prefix": tok["prefix"], "precision": "fp32", "opset": meta.get("opset"),
            "checkpoint": meta.get("checkpoint"), "weights": meta.get("weights"),  # as bertcache.json names them
            "best_epoch": metrics.get("best_epoch"), "best": metrics.get("best"),
            "test": {k: test.get(k) for k in ("accuracy", "macro_f1", "n")} if test else None}


def load_predictor(checkpoint: str, backend: str, *, model=None, device="auto", weights="best", batch_tokens=None,
                   allow_pickle=False, threads=None):
    """A `predict.Predictor` (backend "torch") or an `OnnxPredictor` (backend "onnx": `checkpoint` is then a
    `bertcache export` folder); the CLI's predict and serve load through here.

    Args:
        checkpoint: a checkpoint folder (torch), or the folder `bertcache export` wrote (onnx).
        backend: "torch" or "onnx".
        model, device, weights, allow_pickle: as `Predictor`'s; torch only: the export holds its encoder and
            head and runs on the CPU, so "onnx" refuses a model, weights other than "best", allow_pickle, and
            a device other than "auto" or "cpu".
        batch_tokens: padded tokens per forward pass (either backend).
        threads: onnxruntime intra-op threads [one per core]; onnx only.

    Example:

        p = load_predictor("exported/snownlp", "onnx")   # after `bertcache export -c CHECKPOINT -o exported/snownlp`
        p.predict("物流很快")["label"]

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import toy_features
        >>> from pipeline.train import fit_head
        >>> tmp = tempfile.mkdtemp()
        >>> p = load_predictor(fit_head(toy_features(tmp), f"{tmp}/head", epochs=1)[0], "torch", device="cpu")
        >>> type(p).__name__, sorted(p.predict("很好"))
        ('Predictor', ['label', 'label_id', 'probabilities', 'text'])
    """
    if backend == "onnx":
        asked = [f"--{n}" for n, v in (("model", model), ("allow-pickle", allow_pickle), ("weights", weights != "best"),
                                        ("device", device not in ("auto", "cpu"))) if v]
        if asked == ["--device"]:  # export has no --device: the graph is traced on the CPU and runs there
            raise UserError("--device does not go with --backend onnx: onnxruntime runs the export on the CPU; "
                            "leave --device out, or use the torch backend for a GPU")
        if asked:
            raise UserError(f"{asked[0]} does not go with --backend onnx: the export folder holds its encoder and "
                            "head; pass it to `bertcache export` instead")
        return OnnxPredictor(checkpoint, threads=threads, batch_tokens=batch_tokens)
    from .predict import Predictor

    return Predictor(checkpoint, model=model, device=device, weights=weights, batch_tokens=batch_tokens,
                     allow_pickle=allow_pickle)


def feature_width(head: dict) -> int:
    """The width of the graph's `features` output: the head's input (an ensemble's: its heaviest member's)."""
    if head.get("type") == "ensemble":
        head = max(head["members"], key=lambda m: m["weight"])["head"]
    return int(head["in_features"])
