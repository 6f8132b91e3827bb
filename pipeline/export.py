"""`bertcache export`: a checkpoint as one ONNX graph (encoder + pooling + head) for runtimes without PyTorch.

    <out>/model.onnx       inputs  input_ids, attention_mask   int64 [batch, length] (both dynamic)
                           outputs probabilities [batch, classes], logits [batch, classes],
                                   features [batch, in_features] (the pooled vectors the head reads)
    <out>/tokenizer.json   the encoder's tokenizer (and its other files, as save_pretrained writes them)
    <out>/bertcache.json   what a runner needs: labels, prefix, max_length, pad id, input / output names,
                           and the checkpoint's config (encoder reference, pooling, head)
    <out>/metrics.json     the checkpoint's training metrics (copied)

The graph computes what `Predictor.predict_proba` computes: the encoder's hidden states, [CLS] and
attention-masked mean pooling per cached layer, the checkpoint's pooling spec, the head's
standardization and layers, softmax. It is traced with torch.onnx's default exporter (torch.export,
`dynamo=True`) at the ONNX opset that torch version writes; `pipeline.onnx_runner` runs it with
onnxruntime and the `tokenizers` library only (no torch).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings

import numpy as np
import torch

from .checkpoint import check_out, load_checkpoint, read_config, write_folder, write_json
from .errors import UserError
from .onnx_runner import FORMAT, INPUTS, META_FILE, MODEL_FILE, OUTPUTS
from .tokenizer import save_tokenizer

FORMATS = ("onnx",)
INSTALL_HINT = "pip install 'bertcache[onnx]'"


def require_exporter() -> None:
    """Fail with the install command (before any model is loaded) when onnx / onnxscript are missing."""
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError as e:
            raise UserError(f"bertcache export needs the onnx and onnxscript packages ({name} is not installed): "
                            f"{INSTALL_HINT}") from e


def export(checkpoint: str, out: str, *, format: str = "onnx", model: str | None = None, weights: str = "best",
           allow_pickle: bool = False, log=None) -> str:
    """Write a checkpoint's encoder + pooling + head as one ONNX graph, with its tokenizer, to folder `out`.

    Args:
        checkpoint: checkpoint folder written by `fit_head` / `sweep` (`bertcache fit-head`).
        out: the folder to write (replaced whole when it exists; never half-written).
        format: "onnx" (the only one so far).
        model: an encoder to load instead of the checkpoint's reference (same weights, else UserError).
        weights: "best" or "last".
        allow_pickle: accept head weights in a .pt/.pth pickle (tensors only).
        log: optional callable for progress lines.

    The graph runs in float32 whatever precision the head was trained with.

    Example (after `bertcache quickstart`):

        from pipeline.export import export
        from pipeline.onnx_runner import OnnxPredictor

        export("checkpoints/snownlp-e5-small-sweep", "exported/snownlp")
        OnnxPredictor("exported/snownlp").predict(["物流很快"])  # no torch needed from here on
    """
    if format not in FORMATS:
        raise UserError(f"unknown --format {format!r}; use one of {', '.join(FORMATS)}")
    require_exporter()
    from .encoder import Encoder
    from .fingerprints import check_same_encoder
    from .models import locate_model

    config = read_config(checkpoint, allow_pickle)
    check_out(out, kind="export", source=checkpoint)
    if config.get("tuned"):
        raise UserError(f"{checkpoint} tunes the encoder's top {config['tuned']['k']} layer(s); export covers heads over "
                        "the frozen encoder only (serve it with `bertcache serve`)")
    enc = config["encoder"]
    blocking = [what for what, beyond in (
        (f"task {config.get('task')!r}", config.get("task", "classification") != "classification"),
        (f"pair mode {config.get('pair_mode')!r}", config.get("pair_mode")),
        (f"long texts {enc.get('long_texts')!r}", (enc.get("long_texts") or "truncate") != "truncate")) if beyond]
    if blocking:
        raise UserError(f"export covers classification heads over single, truncated texts; this head's "
                        f"{' and '.join(blocking)} is served by `bertcache serve` without --backend onnx")
    members = config["head"].get("members") or [{"pooling": config["pooling"]}]  # an ensemble: each member's
    if any("sentence" in str(m["pooling"]).split("+") for m in members):
        raise UserError("pooling 'sentence' (a sentence-transformers folder's own modules) cannot be exported to "
                        "ONNX yet; export a head trained on cls / mean / last pooling")
    encoder = Encoder(model or locate_model(enc), device="cpu", precision="fp32", max_length=enc["max_length"],
                      prefix=enc.get("prefix") or "", instruction=enc.get("instruction"),
                      layers=len(enc["layers"]), revision=enc.get("revision"))
    if encoder.family == "decoder":
        raise UserError(f"{encoder.model_ref!r} is a decoder-only model: ONNX export covers BERT-like encoders "
                        "so far (a decoder's padding side, positions and appended EOS are not in the graph)")
    # The graph is float32; a head trained on bf16 / fp16 vectors still belongs to this encoder.
    check_same_encoder(config, {**encoder.settings(), "precision": enc.get("precision")},
                       f"model {encoder.model_ref!r}", encoder.commitless_fingerprint)
    if enc.get("precision") not in (None, "fp32") and log:
        log(f"note: the head was trained on {enc['precision']} vectors; the ONNX graph runs in float32")
    _, head = load_checkpoint(checkpoint, weights, allow_pickle=allow_pickle)
    graph = ExportGraph(encoder.model, enc["layers"], config["pooling"], head).eval()
    ids, mask = example_inputs(encoder)
    meta = {"format": FORMAT, "format_version": 1, "package_version": _version(), "checkpoint": checkpoint,
            "weights": weights, "inputs": list(INPUTS), "outputs": list(OUTPUTS),
            "label_names": config["label_names"], "pooling": config["pooling"], "head": config["head"],
            "tokenizer": {"prefix": encoder.prefix, "max_length": encoder.max_length, "pad_id": encoder.pad_id,
                          "truncation_side": getattr(encoder.tokenizer, "truncation_side", "right"),
                          "class": encoder.tokenizer_class},
            "encoder": {**enc, "precision_exported": "fp32"}, "torch_version": torch.__version__}

    def write(tmp: str) -> None:
        if log:
            what = (f"an ensemble of {len(members)} heads" if config["head"]["type"] == "ensemble"
                    else f"{config['pooling']} pooling + {config['head']['type']} head")
            log(f"tracing {encoder.model_ref} + {what} "
                "with torch.onnx (dynamo)")
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=encoder.max_length)
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(graph, (ids, mask), dynamo=True, input_names=list(INPUTS),
                                        output_names=list(OUTPUTS), verbose=False,
                                        dynamic_shapes={"input_ids": {0: batch, 1: length},
                                                        "attention_mask": {0: batch, 1: length}})
        program.save(os.path.join(tmp, MODEL_FILE))
        save_tokenizer(encoder.tokenizer, encoder.tokenizer_class, tmp)
        if not os.path.exists(os.path.join(tmp, "tokenizer.json")):
            raise UserError(f"the tokenizer of {encoder.model_ref!r} has no fast (tokenizers) version, which the "
                            "ONNX runner needs")
        meta["opset"] = _opset(os.path.join(tmp, MODEL_FILE))
        write_json(os.path.join(tmp, META_FILE), meta)
        metrics = os.path.join(checkpoint, "metrics.json")
        if os.path.isfile(metrics):
            shutil.copyfile(metrics, os.path.join(tmp, "metrics.json"))

    return write_folder(out, write, kind="export")


class ExportGraph(torch.nn.Module):
    """input_ids, attention_mask -> (probabilities, logits, features), as `Predictor` computes them.

    Args:
        model: the HF encoder (BertModel-like: takes input_ids and attention_mask).
        layers: the cached layer indices (hidden_states positions, 0 = embeddings) the head's pooling reads from.
        pooling: the checkpoint's pooling spec (e.g. "cls+mean-avg2").
        head: the trained `heads.Head`.

    Example:

        graph = ExportGraph(encoder.model, [11, 12], "cls+mean", head)
        probs, logits, features = graph(ids, mask)
    """

    def __init__(self, model, layers: list[int], pooling: str, head):
        from .heads import Ensemble
        from .poolings import build_features, pooling_features

        super().__init__()
        self.model, self.head = model, head
        self.last = max(layers)
        # an ensemble (the sweep's winner): every member's head over its own pooling, probabilities averaged
        members = list(zip(head.members, head.poolings, head.weights)) if isinstance(head, Ensemble) \
            else [(head, pooling, 1.0)]
        self.names = head.feature_names(layers) if isinstance(head, Ensemble) else pooling_features(pooling, layers)
        self.need_all = any("_" in n for n in self.names)
        hidden = int(model.config.hidden_size)
        # build_features is linear in the pooled vectors (concatenations and averages): pushing the identity
        # through it gives the matrix that maps the stacked pooled vectors to the head's input, so the graph
        # reads the pooling spec through the same code as predict, not a second copy of its grammar.
        eye = np.eye(len(self.names) * hidden, dtype=np.float32)
        blocks = {n: eye[:, i * hidden:(i + 1) * hidden] for i, n in enumerate(self.names)}
        self.heads = torch.nn.ModuleList(h for h, _, _ in members)
        self.weights = [float(w) for _, _, w in members]
        # one mixing matrix per distinct pooling (a cross-fitted configuration's fold models share theirs)
        distinct = head.distinct_poolings() if isinstance(head, Ensemble) else [pooling]
        for j, p in enumerate(distinct):
            self.register_buffer(f"mix{j}", torch.from_numpy(build_features(blocks, p, layers)))
        self.mix_of, self.mixes = [distinct.index(p) for _, p, _ in members], len(distinct)
        self.shown = head.heaviest if isinstance(head, Ensemble) else 0  # whose features the graph outputs

    def forward(self, input_ids, attention_mask):
        result = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=self.need_all)
        m = attention_mask.unsqueeze(-1).float()
        denom = m.sum(1)
        last = attention_mask.sum(1) - 1  # right-padded rows: the last real token
        rows = torch.arange(input_ids.shape[0])
        pooled = []
        for name in self.names:
            kind, _, layer = name.partition("_")
            h = (result.hidden_states[int(layer)] if layer else result.last_hidden_state).float()
            if kind == "cls":
                pooled.append(h[:, 0])
            elif kind == "last":
                pooled.append(h[rows, last])
            else:
                pooled.append(torch.where(m > 0, h, 0.0).sum(1) / denom)
        stacked = torch.cat(pooled, dim=1)
        if len(self.heads) == 1:
            features = stacked @ self.mix0
            logits = self.heads[0](features)
            return torch.softmax(logits, dim=-1), logits, features
        mixed = [stacked @ getattr(self, f"mix{j}") for j in range(self.mixes)]
        probs, features = 0.0, None
        for i, (h, w) in enumerate(zip(self.heads, self.weights)):
            x = mixed[self.mix_of[i]]
            probs = probs + w * torch.softmax(h(x), dim=-1)
            features = x if i == self.shown else features
        return probs, torch.log(probs.clamp_min(1e-7)), features


def example_inputs(encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-text batch, the second padded: the traced graph must take masks with padding."""
    ids = encoder.tokenize(["x " * 12, "x"])
    input_ids = torch.full((2, len(ids[0])), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, s in enumerate(ids):
        input_ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return input_ids, mask


def _opset(path: str) -> int | None:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints its steps on stdout: stdout is for results, so they go to stderr; its warnings
    (torchvision absent, axis renames) say nothing to a user."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _version() -> str:
    from . import __version__
    return __version__
