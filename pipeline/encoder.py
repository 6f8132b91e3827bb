"""The frozen encoder: load a HF model, tokenize, batch by token budget, pool.

`Encoder.encode` is the one place batching lives (extract, predict and serve all go through it):
sort by token length, cut into batches of at most `batch_tokens` tokens, run under inference_mode,
restore the caller's order. BERT-family models run packed (pipeline/packed.py: the texts of a batch end
to end, no padding); other families pad each batch only to its own longest text. On a CPU, batches run
on `workers` threads with one torch thread each: no per-operation barrier for a busy core to stall.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import UserError
from .poolings import POOLS as POOLINGS, feature_name, feature_names
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_MAX_LENGTH = 512
# Batches are padded to a multiple of this many tokens: few distinct shapes, so the kernels' per-shape
# caches (oneDNN primitives under CPU bf16) stop growing over a long run; aligned shapes suit GPUs too.
PAD_MULTIPLE = 8
# Padded tokens per batch. On a CPU small batches win: a 1024-token batch keeps its activations and
# attention scores in cache, and measured 2-2.7x the tokens/s of 8192 (benchmarks/speed.py, README).
BATCH_TOKENS = {"cpu": 1024, "cuda": 65536, "mps": 16384}
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Models whose position ids start after the padding index, so two positions are never used.
PACKINGS = ("auto", "off")
_told = set()  # fallback notes already printed: once per process
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "data2vec-text", "xlm-roberta-xl"}


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast where the hardware does bf16 natively, fp16 on older GPUs, else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16"
    return "fp32"


def resolve_model(model: str) -> str:
    """A local folder, a built-in name, or a hub id (left for transformers to resolve)."""
    if os.path.isdir(model):
        return model
    if model == "e5-small":
        from .e5 import ensure_e5_small
        return ensure_e5_small()
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"model not found: {model} is not a folder; give a model folder, a hub id or 'e5-small'")
    return model


def _hash_files(folder: str, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


class Encoder:
    """A frozen HF encoder that turns texts into pooled vectors.

    Feature names: `cls` and `mean` are the [CLS] vector and the attention-masked mean of the last
    hidden layer; with `layers=K > 1`, `cls_i` and `mean_i` are the same for hidden_states[i] for the
    K-1 layers below the last (i counts from 0 = embeddings, as HF's `hidden_states` tuple does).
    """

    def __init__(self, model: str, *, device: str | None = "auto", precision: str = "auto",
                 max_length: int = DEFAULT_MAX_LENGTH, prefix: str = "", layers: int = 1,
                 revision: str | None = None, batch_tokens: int | None = None, packing: str = "auto",
                 workers: int | None = None):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.model_ref = model
        self.revision = revision
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        path = resolve_model(model)
        hf_logging.set_verbosity_error()  # "some weights unused (pooler)" is noise for a frozen encoder
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        except Exception as e:  # OSError, ValueError, ...: transformers uses several for "cannot load"
            raise UserError(f"cannot load the tokenizer of model {model!r}: {_first_line(e)}") from e
        try:
            self.model = AutoModel.from_pretrained(path, revision=revision, attn_implementation="sdpa")
        except Exception as e:
            try:
                self.model = AutoModel.from_pretrained(path, revision=revision)
            except Exception:
                raise UserError(f"cannot load model {model!r}: {_first_line(e)}") from e
        self.model.eval().to(self.device)
        self.model.requires_grad_(False)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's tanh pooler: a wasted matmul per batch, never cached
        self._cast_linear_weights()
        self.packed = self._packed(packing)
        self.packing = "on" if self.packed is not None else "off"
        self.workers = workers
        cfg = self.model.config
        if len(self.tokenizer) > cfg.vocab_size:
            raise UserError(f"the tokenizer of {model!r} has {len(self.tokenizer)} tokens but the model's "
                            f"vocabulary has {cfg.vocab_size}: tokenizer and weights do not belong together")
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        if not 1 <= layers <= self.num_layers:
            raise UserError(f"--layers must be between 1 and {self.num_layers} for this model, not {layers}")
        self.layers = list(range(self.num_layers - layers + 1, self.num_layers + 1))
        self.max_length = min(int(max_length), self.model_limit())
        if self.max_length < 2:
            raise UserError(f"--max-length {max_length} is too small; use at least 8")
        self.prefix = prefix
        self.batch_tokens = int(batch_tokens or BATCH_TOKENS.get(self.device.type, BATCH_TOKENS["cpu"]))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.commit = getattr(cfg, "_commit_hash", None)
        self.model_fingerprint = self._fingerprint(path)

    # -- identity ---------------------------------------------------------------------------------

    def model_limit(self) -> int:
        cfg = self.model.config
        limit = int(getattr(cfg, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH)
        if cfg.model_type in _OFFSET_POSITIONS:
            limit -= 2
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        if tok_limit and tok_limit < 1_000_000:
            limit = min(limit, int(tok_limit))
        return limit

    def _fingerprint(self, path: str) -> str:
        """Identity of weights + config + tokenizer: the files' bytes locally, the commit for hub models."""
        cfg = json.dumps(self.model.config.to_diff_dict(), sort_keys=True, default=str)
        self.config_hash = hashlib.sha256(cfg.encode()).hexdigest()
        h = hashlib.sha256(self.config_hash.encode())
        if os.path.isdir(path):
            files = os.listdir(path)
            weights = [f for f in files if f.endswith((".safetensors", ".bin")) and not f.startswith("training_args")]
            tok = [f for f in files if f.startswith(("tokenizer", "vocab", "special_tokens", "sentencepiece",
                                                     "spiece", "merges", "added_tokens")) or f.endswith((".model", ".spm"))]
            h.update(_hash_files(path, weights).encode())
            h.update(_hash_files(path, tok).encode())
        else:
            h.update(f"{self.model_ref}@{self.commit or self.revision or ''}".encode())
        return h.hexdigest()[:32]

    def settings(self) -> dict:
        """Everything besides the data that determines the cached vectors."""
        return {"model": self.model_ref, "revision": self.revision, "commit": self.commit,
                "model_fingerprint": self.model_fingerprint, "config_hash": self.config_hash,
                "max_length": self.max_length, "prefix": self.prefix, "precision": self.precision,
                "layers": self.layers, "poolings": list(POOLINGS), "hidden_size": self.hidden_size,
                "tokenizer": type(self.tokenizer).__name__}

    def feature_names(self) -> list[str]:
        return feature_names(self.layers, self.num_layers)

    # -- encoding ---------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        enc = self.tokenizer([self.prefix + t for t in texts], truncation=True, max_length=self.max_length,
                             add_special_tokens=True, return_attention_mask=False, return_token_type_ids=False)
        return enc["input_ids"]

    def encode(self, texts: list[str], on_progress=None) -> dict[str, np.ndarray]:
        """Pooled float32 vectors for `texts`, in their order: feature name -> [len(texts), hidden]."""
        return self.encode_ids(self.tokenize(texts), on_progress)

    def encode_ids(self, ids: list[list[int]], on_progress=None, *, count: str = "texts") -> dict[str, np.ndarray]:
        """Pooled float32 vectors for already tokenized texts (`tokenize`'s output), in their order.

        `on_progress(n)` is called per batch with its distinct texts, or with its tokens (unpadded) when
        `count="tokens"`: texts come longest first, so only tokens give a true ETA."""
        return self._encode(ids, on_progress, count)[0]

    def encode_ids_with_states(self, ids: list[list[int]], layer: int, on_progress=None, *,
                               count: str = "texts") -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """`encode_ids`, plus every text's token states hidden_states[layer] (float32 [its tokens, hidden]),
        from the same forward pass (extract --states, and a tuned checkpoint's predict)."""
        return self._encode(ids, on_progress, count, layer)

    def _encode(self, ids, on_progress=None, count: str = "texts", states_layer: int | None = None):
        names = self.feature_names()
        n = len(ids)
        if n == 0:
            return {k: np.zeros((0, self.hidden_size), np.float32) for k in names}, []
        # Identical inputs are encoded once: review corpora repeat a tenth or more of their texts.
        keys = {}
        first = np.empty(n, dtype=np.int64)
        for i, seq in enumerate(ids):
            first[i] = keys.setdefault(tuple(seq), len(keys))
        uniq = [None] * len(keys)
        for seq, j in keys.items():
            uniq[j] = seq
        lengths = np.fromiter((len(s) for s in uniq), dtype=np.int64, count=len(uniq))
        widths = np.minimum(-(-lengths // PAD_MULTIPLE) * PAD_MULTIPLE, max(self.max_length, lengths.max()))
        out = {k: torch.empty((len(uniq), self.hidden_size), dtype=torch.float32, device=self.device) for k in names}
        states = [None] * len(uniq) if states_layer is not None else None
        # Packed batches hold real tokens only, so they are cut by real lengths.
        batches = plan_batches(lengths if self.packed is not None else widths, self.batch_tokens)

        def run(batch):
            with torch.inference_mode(), self._autocast():
                if self.packed is not None:
                    return batch, self._forward_packed([uniq[j] for j in batch], states_layer)
                # A lone text (predict's one sentence) needs no padding at all.
                width = int(lengths[batch[0]] if len(batch) == 1 else widths[batch[0]])
                return batch, self._forward([uniq[j] for j in batch], width, states_layer)

        workers = self.resolve_workers(len(batches))
        with _one_thread_each(workers), ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
            for batch, pooled in (pool.map(run, batches) if pool else map(run, batches)):
                if states is not None:
                    for j, st in zip(batch, pooled.pop(None)):
                        states[j] = st
                idx = torch.from_numpy(batch).to(self.device, non_blocking=True)
                for k in names:
                    out[k].index_copy_(0, idx, pooled[k])
                if on_progress is not None:
                    on_progress(len(batch) if count == "texts" else int(lengths[batch].sum()))
        take = torch.from_numpy(first).to(self.device)
        pooled = {k: v.index_select(0, take).cpu().numpy() for k, v in out.items()}
        return pooled, ([states[j] for j in first] if states is not None else [])

    def resolve_workers(self, n_batches: int) -> int:
        """Threads that run batches side by side (each with one torch thread): `workers` when given, else
        on a CPU as many as torch has intra-op threads, when there are batches enough to share out."""
        if self.device.type != "cpu":
            return 1
        if self.workers:
            return max(1, min(int(self.workers), n_batches))
        threads = torch.get_num_threads()
        return threads if threads > 1 and n_batches >= 2 * threads else 1

    def _packed(self, packing: str):
        from .packed import PackedEncoder, unsupported

        if packing not in PACKINGS:
            raise UserError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
        if packing == "off":
            return None
        reason = unsupported(self.model)
        if reason is None:
            return PackedEncoder(self.model)
        if reason not in _told:
            _told.add(reason)
            print(f"note: padded batches for this model ({reason}); packed batches cover BERT, RoBERTa and "
                  f"XLM-R families", file=sys.stderr)
        return None

    def _cast_linear_weights(self):
        """Store Linear weights in the autocast dtype once: autocast would recast them on every batch
        (a copy of the whole model per batch on CPU), and the numbers are the same either way."""
        dtype = _DTYPES[self.precision]
        if dtype is None:
            return
        for module in self.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(dtype)

    def _autocast(self):
        dtype = _DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, seqs: list, width: int, states_layer: int | None = None) -> dict:
        """Pooled features of a padded batch; with `states_layer`, also hidden_states[states_layer] under key None."""
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = s
            mask[r, :len(s)] = 1
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.device.type == "cuda":
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        ids_t = ids_t.to(self.device, non_blocking=True)
        mask_t = mask_t.to(self.device, non_blocking=True)
        need_all = len(self.layers) > 1 or (states_layer is not None and states_layer != self.num_layers)
        result = self.model(input_ids=ids_t, attention_mask=mask_t, output_hidden_states=need_all)
        hidden = result.hidden_states if need_all else {self.num_layers: result.last_hidden_state}
        m = mask_t.unsqueeze(-1).float()
        denom = m.sum(1)
        pooled = {}
        for layer in self.layers:
            h = hidden[layer].float()
            pooled[feature_name("cls", layer, self.num_layers)] = h[:, 0]
            pooled[feature_name("mean", layer, self.num_layers)] = (h * m).sum(1) / denom
        if states_layer is not None:  # every row's own tokens, float32 on the CPU
            h = (result.hidden_states[states_layer] if need_all else result.last_hidden_state).float().cpu().numpy()
            pooled[None] = [h[r, :len(s)].copy() for r, s in enumerate(seqs)]
        return pooled


    def _forward_packed(self, seqs: list, states_layer: int | None = None) -> dict:
        from .packed import Packing, pool

        p = Packing.of(seqs, self.device)
        extra = [states_layer] if states_layer is not None and states_layer not in self.layers else []
        hidden = self.packed.forward(p, self.layers + extra)
        pooled = {}
        for layer in self.layers:
            suffix = "" if layer == self.num_layers else f"_{layer}"
            pooled["cls" + suffix], pooled["mean" + suffix] = pool(hidden[layer], p)
        if states_layer is not None:  # packed rows are already ragged: cut them apart
            h = hidden[states_layer].float().cpu().numpy()
            starts, lengths = p.starts.cpu().numpy(), p.lengths.cpu().numpy()
            pooled[None] = [h[a:a + n].copy() for a, n in zip(starts, lengths)]
        return pooled


@contextlib.contextmanager
def _one_thread_each(workers: int):
    """While `workers` > 1 threads run batches: one torch thread each (set in the calling thread, which
    new threads inherit, and in each worker); the caller's setting comes back afterwards."""
    if workers <= 1:
        yield
        return
    with _threads_lock:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


_threads_lock = threading.Lock()


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices of `lengths` grouped longest first into batches of at most `batch_tokens` padded tokens."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        size = max(1, batch_tokens // max(1, int(lengths[order[start]])))
        batches.append(order[start:start + size])
        start += size
    return batches


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
