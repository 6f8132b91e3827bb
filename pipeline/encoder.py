"""The frozen encoder: load a HF model, tokenize, batch by token budget, pool.

`Encoder.encode` is the one place batching lives (extract, predict and serve all go through it):
sort by token length, cut into batches of at most `batch_tokens` tokens, run under inference_mode,
restore the caller's order. BERT-family models run packed (pipeline/packed.py: the texts of a batch end
to end, no padding); other families pad each batch only to its own longest text (decoders on the side
their tokenizer pads, with position ids counted from each text's first real token).

Models come from pipeline/models.py (folder, hub, ModelScope); decoder-only models get an end-of-sequence
token appended and cache `mean` and `last` (no `cls`); a sentence-transformers folder also caches its own
`sentence` vector (pipeline/sentence.py) and brings its prompt. On a CPU, batches run
on `workers` threads with one torch thread each: no per-operation barrier for a busy core to stall.
With compile="on" (or "auto" and a run long enough to pay back the compile time, `compile_pays`), packed
layers run through torch.compile (pipeline/packed.py); the vectors are the same either way.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import UserError, as_texts, first_line
from .fingerprints import hash_model_files
from . import defaults as D
from . import models as M
from .poolings import DECODER_POOLS, POOLS as POOLINGS, SENTENCE, feature_name, feature_names
from .threads import torch_threads
from .tokenizer import load_tokenizer, tokenizer_files
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
COMPILES = ("auto", "on", "off")
_told = set()  # fallback notes already printed: once per process
LONG_TEXTS = ("truncate", "chunk")
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


def compile_pays(tokens: int, device: torch.device | str, min_tokens: dict | None = None) -> bool:
    """Whether compile="auto" compiles a run of `tokens` tokens on `device`: when `min_tokens` (default
    defaults.COMPILE_MIN_TOKENS, the measured break-evens) has a number for the device type and the run
    has at least that many tokens. Never where no break-even is known (None, or the type is missing).

        >>> compile_pays(10_000, "cpu", {"cpu": 50_000}), compile_pays(80_000, "cpu", {"cpu": 50_000})
        (False, True)
    """
    least = (D.COMPILE_MIN_TOKENS if min_tokens is None else min_tokens).get(torch.device(device).type)
    return least is not None and int(tokens) >= least


def resolve_model(model: str) -> str:
    """A local folder, a built-in name, a ModelScope id or a hub id (see pipeline/models.py): what to load."""
    return M.resolve(model).path


def truncation_note(n: int, max_length: int, unit: str = "text") -> str:
    """What extract and predict say of `n` texts (or pairs) cut at max_length.

        >>> truncation_note(1, 512)
        '1 text longer than 512 tokens was truncated'
    """
    return f"{n} {unit}{'s' if n != 1 else ''} longer than {max_length} tokens {'was' if n == 1 else 'were'} truncated"


class Encoder:
    """A frozen HF encoder that turns texts into pooled vectors.

    Feature names: `cls`, `mean` and `last` are the first token's vector, the attention-masked mean and
    the last real token's vector of the last hidden layer; with `layers=K > 1`, `cls_i`, `mean_i` and
    `last_i` are the same for hidden_states[i] for the K-1 layers below the last (i counts from 0 =
    embeddings, as HF's `hidden_states` tuple does). Decoder-only models have no `cls`; a
    sentence-transformers folder adds `sentence` (its own pooling, Dense and Normalize modules).

    Args:
        model: a model folder (sentence-transformers folders too), a hub id, "modelscope:ORG/NAME", or
            "e5-small" (built from PyPI, no hub needed).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        precision: "auto" (bf16 where the hardware has it), "fp32", "bf16" or "fp16".
        max_length: tokens per text, capped by the model (`model_limit`).
        prefix: put before every text [None: a sentence-transformers folder's default prompt (said through
            `log`), or `instruction` in the model's instruction format (models.instruction_prefix); else none].
        layers: pool the last `layers` layers (the feature names above).
        revision: hub revision (branch, tag or commit) of the model.
        batch_tokens: tokens per forward pass [1024 on CPU, 65536 on GPU, 16384 on MPS].
        packing: "auto" (BERT/RoBERTa/XLM-R batches without padding) or "off" (padded batches).
        workers: CPU threads running batches side by side, one torch thread each [`resolve_workers`].
        instruction: for instruction-following embedders: the task, made the prefix in the model's format.
        log: a callable given notes (the prompt taken as prefix, compile's fallbacks) [print to stderr].
        long_texts: "truncate" cuts texts past max_length (counted in `truncated`); "chunk" encodes every
            window of at most max_length tokens and averages the windows' vectors.
        stride: tokens neighbouring windows share with long_texts="chunk" [max_length // 4].
        compile: "auto" (torch.compile the packed layers when the run is long enough to pay back the compile
            time, `compile_pays`), "on" or "off"; the vectors are the same either way.

        >>> enc = Encoder("path/to/qwen3-embedding", instruction="Classify the topic of a news title")  # doctest: +SKIP
        >>> enc.encode(["今天天气不错"])["last"].shape  # doctest: +SKIP
        (1, 1024)

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import toy_model
        >>> enc = Encoder(toy_model(tempfile.mkdtemp()), precision="fp32")
        >>> {name: vectors.shape for name, vectors in enc.encode(["很好", "这个东西真的很差"]).items()}
        {'cls': (2, 32), 'mean': (2, 32), 'last': (2, 32)}
    """

    def __init__(self, model: str, *, device: str | None = "auto", precision: str = "auto",
                 max_length: int = DEFAULT_MAX_LENGTH, prefix: str | None = None, layers: int = 1,
                 revision: str | None = None, batch_tokens: int | None = None, packing: str = "auto",
                 workers: int | None = None, instruction: str | None = None, log=None, long_texts: str = "truncate",
                 stride: int | None = None, compile: str = "auto"):
        from transformers import AutoConfig
        from transformers.utils import logging as hf_logging
        from .sentence import SentenceModules

        log = log or (lambda msg: print(msg, file=sys.stderr))
        self.model_ref = model
        self.revision = revision
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        source = M.resolve(model, revision)
        self.model_path = source.folder
        self.sentence = SentenceModules.read(source.path) if os.path.isdir(source.path) else None
        path = self.sentence.transformer if self.sentence else source.path
        hf_logging.set_verbosity_error()  # "some weights unused (pooler)" is noise for a frozen encoder
        hf_logging.disable_progress_bar()
        # trust_remote_code=False said, not left unset: unset, transformers asks on a terminal "Do you wish to run
        # the custom code? [y/N]" for a folder whose config names its own code (auto_map), and y runs it
        where = {"revision": revision, "trust_remote_code": False,
                 **({"local_files_only": True} if source.offline else {})}
        try:
            self.tokenizer, self.tokenizer_class = load_tokenizer(path, **where)
        except Exception as e:  # OSError, ValueError, ...: transformers uses several for "cannot load"
            raise UserError(f"cannot load the tokenizer of model {model!r}: {first_line(e)}") from e
        try:
            self.config = AutoConfig.from_pretrained(path, **where)
        except Exception as e:
            raise UserError(f"cannot load model {model!r}: {first_line(e)}") from e
        if getattr(self.config, "is_encoder_decoder", False):  # T5, BART, ...: their forward wants decoder inputs
            raise UserError(f"model {model!r} is an encoder-decoder ({self.config.model_type}); bertcache encodes with "
                            "encoder models (BERT-like, sentence-transformers folders) and decoder embedders")
        self._hf_load = (path, where)
        self._model = None
        # BERT-family folders that will run packed are read without transformers' modeling code (about 1.7 s
        # of imports, packed.load_modules); anything else, or anything it does not cover, loads as HF does.
        net = None
        folder = M.local_folder(path, where, "config.json") if packing != "off" else None
        if folder and M.family(self.config) == "encoder":
            from .packed import load_modules
            net = load_modules(folder, self.config)
        if net is not None:
            self._net = self._prepare(net)  # what the packed path runs
        else:
            self._net = self.model
            self.config = self.model.config  # with the dtype from_pretrained records, which the fingerprint hashes
        self._log = log
        self.packed = self._packed(packing)
        self.packing = "on" if self.packed is not None else "off"
        if compile not in COMPILES:
            raise UserError(f"unknown compile {compile!r}; use one of {', '.join(COMPILES)}")
        self.compile = compile
        self._expected_tokens = 0
        self.workers = workers
        cfg = self.config
        if len(self.tokenizer) > cfg.vocab_size:
            raise UserError(f"the tokenizer of {model!r} has {len(self.tokenizer)} tokens but the model's "
                            f"vocabulary has {cfg.vocab_size}: tokenizer and weights do not belong together")
        self.num_layers = int(cfg.num_hidden_layers)
        self.hidden_size = int(cfg.hidden_size)
        if not 1 <= layers <= self.num_layers:
            raise UserError(f"--layers must be between 1 and {self.num_layers} for this model, not {layers}")
        self.layers = list(range(self.num_layers - layers + 1, self.num_layers + 1))
        self.family = M.family(cfg)
        self.pools = DECODER_POOLS if self.family == "decoder" else POOLINGS
        self.max_length = min(int(max_length), self.model_limit())
        if self.sentence and self.sentence.max_seq_length:
            self.max_length = min(self.max_length, int(self.sentence.max_seq_length))
        if self.max_length < 8:
            raise UserError(f"--max-length {max_length} is too small; use at least 8")
        self.instruction = instruction or None
        if prefix is None and instruction:
            prefix = M.instruction_prefix(instruction)
        elif prefix is None and self.sentence:
            name, prefix = self.sentence.default_prompt()
            if name:
                log(f"prefix: the model's {name!r} prompt {prefix!r} (sentence-transformers config; "
                    "--prefix '' for none)")
        self.prefix = prefix or ""
        if long_texts not in LONG_TEXTS:
            raise UserError(f"unknown --long-texts {long_texts!r}; use truncate or chunk")
        self.long_texts = long_texts
        if stride is not None and long_texts != "chunk":
            raise UserError("--stride is for --long-texts chunk (the tokens neighbouring windows share); add "
                            "--long-texts chunk or drop --stride")
        # Windows overlap by `stride` tokens (HF's meaning of stride); default a quarter of a window.
        self.stride = int(stride if stride is not None else self.max_length // 4) if long_texts == "chunk" else 0
        if long_texts == "chunk":
            if not getattr(self.tokenizer, "is_fast", False):
                raise UserError("--long-texts chunk needs a fast (Rust) tokenizer; this model's is not")
            if not 0 <= self.stride < self.max_length // 2:
                raise UserError(f"--stride must be between 0 and {self.max_length // 2 - 1} for --max-length "
                                f"{self.max_length}, not {self.stride}")
        self.truncated = 0  # texts (or pairs) cut at max_length so far, for the caller to report
        # Decoder embedders end each text with EOS (Qwen3-Embedding's recipe); a sentence-transformers folder
        # encodes as sentence-transformers does, with what its tokenizer adds and nothing more.
        self.eos_id = self._eos_to_append() if self.family == "decoder" and not self.sentence else None
        # Decoders keep their tokenizer's padding side (Qwen3-Embedding pads left); encoders pad right.
        self.padding_side = getattr(self.tokenizer, "padding_side", "right") if self.family == "decoder" else "right"
        self.feature_dims = {}
        if self.sentence:
            self.sentence.load(self.device)
            if self.sentence.dim(self.hidden_size) != self.hidden_size:
                self.feature_dims[SENTENCE] = self.sentence.dim(self.hidden_size)
            # sentence-transformers counts the prompt's tokens less its closing special token, where it has one
            # ([SEP]; a decoder's tokenizer may add none)
            prompt = self.tokenizer(self.prefix)["input_ids"] if self.prefix else []
            self.prompt_tokens = len(prompt) - (1 if prompt and prompt[-1] in self.tokenizer.all_special_ids else 0)
        self.batch_tokens = int(batch_tokens or BATCH_TOKENS.get(self.device.type, BATCH_TOKENS["cpu"]))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        recorded = getattr(cfg, "_commit_hash", None)  # transformers 4; 5 records none: read from the hub cache
        self.commit = recorded or M.cached_commit(path, revision)
        self.model_fingerprint = self._fingerprint(path, self.commit)
        # What caches and checkpoints made before the commit was read from the hub cache recorded (commit None):
        # fingerprints.check_same_encoder still takes those, as they could not tell revisions apart either.
        self.commitless_fingerprint = self._fingerprint(path, None) if self.commit and not recorded else None

    # -- identity ---------------------------------------------------------------------------------

    def model_limit(self) -> int:
        """The most tokens the model takes in one text: its position embeddings (less the two that
        RoBERTa-like models never use), capped by the tokenizer's model_max_length.

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> Encoder(toy_model(tempfile.mkdtemp()), precision="fp32").model_limit()
            128
        """
        cfg = self.config
        limit = int(getattr(cfg, "max_position_embeddings", DEFAULT_MAX_LENGTH) or DEFAULT_MAX_LENGTH)
        if cfg.model_type in _OFFSET_POSITIONS:
            limit -= 2
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        if tok_limit and tok_limit < 1_000_000:
            limit = min(limit, int(tok_limit))
        return limit

    def _fingerprint(self, path: str, commit: str | None) -> str:
        """Identity of weights + config + tokenizer: the files' bytes locally, the commit for hub models."""
        cfg = json.dumps(self.config.to_diff_dict(), sort_keys=True, default=str)
        self.config_hash = hashlib.sha256(cfg.encode()).hexdigest()
        h = hashlib.sha256(self.config_hash.encode())
        if self.sentence:  # its pooling, Dense and prompts decide the `sentence` vector
            h.update(hash_model_files(self.sentence.folder, self.sentence.files).encode())
        if os.path.isdir(path):
            files = os.listdir(path)
            weights = [f for f in files if f.endswith((".safetensors", ".bin")) and not f.startswith("training_args")]
            h.update(hash_model_files(path, weights).encode())
            h.update(hash_model_files(path, tokenizer_files(path)).encode())
        else:
            h.update(f"{self.model_ref}@{commit or self.revision or ''}".encode())
        return h.hexdigest()[:32]

    def settings(self) -> dict:
        """Everything besides the data that determines the cached vectors (a features file's settings).

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> settings = Encoder(toy_model(tempfile.mkdtemp()), precision="fp32").settings()
            >>> {key: settings[key] for key in ("max_length", "prefix", "layers", "hidden_size", "family")}
            {'max_length': 128, 'prefix': '', 'layers': [3], 'hidden_size': 32, 'family': 'encoder'}
        """
        out = {"model": self.model_ref, "model_path": self.model_path, "revision": self.revision,
               "commit": self.commit, "model_fingerprint": self.model_fingerprint, "config_hash": self.config_hash,
               "max_length": self.max_length, "prefix": self.prefix, "instruction": self.instruction,
               "precision": self.precision, "layers": self.layers, "poolings": list(self.pools),
               "hidden_size": self.hidden_size, "tokenizer": self.tokenizer_class,
               "family": self.family, "model_type": self.config.model_type,
               "default_pooling": self.default_pooling()}
        if self.eos_id is not None:
            out["append_eos"] = self.tokenizer.convert_ids_to_tokens(self.eos_id)
        if self.family == "decoder":
            out["padding_side"] = self.padding_side
        if self.sentence:
            out["sentence"] = self.sentence.describe()
        if self.feature_dims:
            out["feature_dims"] = dict(self.feature_dims)
        if self.long_texts != "truncate":  # only when set: caches made before this setting keep their fingerprint
            out.update(long_texts=self.long_texts, stride=self.stride)
            if self.prefix:  # every window starts with the prefix (before: only the first did)
                out["window_prefix"] = "every"
        return out

    def default_pooling(self) -> str:
        """`sentence` for a sentence-transformers folder, `last` for a decoder, `cls` for the rest.

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> Encoder(toy_model(tempfile.mkdtemp()), precision="fp32").default_pooling()
            'cls'
        """
        return SENTENCE if self.sentence else ("last" if self.family == "decoder" else "cls")

    def feature_names(self) -> list[str]:
        """The names of the vectors `encode` gives (the class's feature names), last layer first.

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> Encoder(toy_model(tempfile.mkdtemp()), precision="fp32", layers=2).feature_names()
            ['cls', 'mean', 'last', 'cls_2', 'mean_2', 'last_2']
        """
        return feature_names(self.layers, self.num_layers, self.pools, sentence=self.sentence is not None)

    def _eos_to_append(self) -> int | None:
        """The token a decoder's embedding recipe ends each text with, unless its tokenizer adds one itself."""
        vocab = self.tokenizer.get_vocab()
        eos = next((vocab[t] for t in M.EOS_CANDIDATES if t in vocab), self.tokenizer.eos_token_id)
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        if eos is None or (probe and probe[-1] in (eos, self.tokenizer.eos_token_id)):
            return None
        return int(eos)

    # -- encoding ---------------------------------------------------------------------------------

    def tokenize(self, texts: list[str], pairs: list[str] | None = None) -> list[list[int]]:
        """Token ids per text (with `pairs`: per pair, the tokenizer's pair encoding, token types folded
        in, see `_fold_types`). Texts past max_length are cut (counted in `truncated`) or, with
        long_texts="chunk", split into overlapping windows: a `Windows` list that `encode_ids` pools back.

        Args:
            texts: a list of texts (`prefix` is put before each).
            pairs: the second text of each pair, for a head on pairs encoded together [None: single texts].

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> enc = Encoder(toy_model(tempfile.mkdtemp()), precision="fp32")
            >>> [len(ids) for ids in enc.tokenize(["很好", "这个东西真的很差"])]  # [CLS] and [SEP] too
            [4, 10]
            >>> [len(ids) for ids in enc.tokenize(["很好"], pairs=["很差"])]
            [7]
        """
        if not texts:
            return []
        room = self.max_length - (self.eos_id is not None)
        second = None if pairs is None else [self.prefix + t for t in pairs]
        chunk = self.long_texts == "chunk"
        if chunk and self.prefix and pairs is None:
            return self._windows(texts, room)
        enc = self.tokenizer([self.prefix + t for t in texts], second, truncation=True, max_length=room,
                             add_special_tokens=True, return_attention_mask=False,
                             return_token_type_ids=pairs is not None, return_overflowing_tokens=chunk,
                             stride=self.stride if chunk else 0)
        ids = enc["input_ids"]
        if pairs is not None:
            ids = [_fold_types(seq, types, self.config.vocab_size)
                   for seq, types in zip(ids, enc["token_type_ids"])]
        if self.eos_id is not None:
            ids = [list(s) + [self.eos_id] for s in ids]
        if chunk:
            return Windows(ids, np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64), len(texts))
        encodings = getattr(enc, "encodings", None)
        if encodings:
            self.truncated += sum(1 for e in encodings if e.overflowing)
        else:  # a slow tokenizer does not say: a text that fills max_length exactly counts too
            self.truncated += sum(1 for seq in ids if len(seq) >= self.max_length)
        return ids

    def _windows(self, texts: list[str], room: int) -> "Windows":
        """long_texts="chunk" with a prefix: every window starts with the prefix's tokens (e5's "query: ", an
        instruction), as the model expects of every input. The text is tokenized with its prefix once, as in
        truncate mode, so a text that fits in one window gets the same ids either way; the rest of the text is
        cut into windows of the tokenizer's own overflow layout (neighbours share `stride` tokens)."""
        enc = self.tokenizer([self.prefix + t for t in texts], add_special_tokens=False, return_attention_mask=False,
                             return_offsets_mapping=True)
        lead, trail = self._special_frame
        ids, owner = [], []
        for i, (seq, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            k = sum(1 for start, _ in offsets if start < len(self.prefix))  # tokens that begin in the prefix
            head, body = list(seq[:k]), list(seq[k:])
            width = room - len(lead) - len(trail) - len(head)
            if width - self.stride < 1:
                raise UserError(f"the prefix takes {len(head)} of {room} tokens: no room for windows of the text; "
                                "use a larger --max-length or a smaller --stride")
            start = 0
            while True:
                ids.append(lead + head + body[start:start + width] + trail)
                owner.append(i)
                if start + width >= len(body):
                    break
                start += width - self.stride
        if self.eos_id is not None:
            ids = [s + [self.eos_id] for s in ids]
        return Windows(ids, np.asarray(owner, dtype=np.int64), len(texts))

    @functools.cached_property
    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a single text's own tokens."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        at = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
        return list(full[:at]), list(full[at + len(plain):])

    def encode(self, texts: list[str], on_progress=None, pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Pooled float32 vectors for `texts` (or text pairs, one vector per pair), in their order:
        feature name -> [len(texts), hidden]. One str is one text (a [1, hidden] row), not its characters.

        Args:
            texts: one text, or a list (any iterable) of texts.
            on_progress: optional callback, called with the number of distinct texts in each encoded batch.
            pairs: the second text of each pair, encoded together with its first [None: single texts].

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> enc = Encoder(toy_model(tempfile.mkdtemp()), precision="fp32")
            >>> {name: vectors.shape for name, vectors in enc.encode("很好").items()}
            {'cls': (1, 32), 'mean': (1, 32), 'last': (1, 32)}
            >>> enc.encode(["很好", "还可以"], pairs=["很差", "不错"])["mean"].shape
            (2, 32)
        """
        texts = as_texts(texts)[1]
        pairs = None if pairs is None else as_texts(pairs)[1]
        return self.encode_ids(self.tokenize(texts, pairs), on_progress)

    def encode_ids(self, ids: list[list[int]], on_progress=None, *, count: str = "texts") -> dict[str, np.ndarray]:
        """Pooled float32 vectors for already tokenized texts (`tokenize`'s output), in their order.
        For `Windows`, the mean of each text's window vectors, per feature.

        Args:
            ids: token ids per text, as `tokenize` gives them.
            on_progress: optional callback, `on_progress(n)`, called per batch with its distinct texts.
            count: "texts", or "tokens" to call on_progress with a batch's tokens (unpadded) instead: texts
                come longest first, so only tokens give a true ETA.

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> enc = Encoder(toy_model(tempfile.mkdtemp()), precision="fp32")
            >>> ids = enc.tokenize(["很好", "这个东西真的很差"])
            >>> done = []
            >>> enc.encode_ids(ids, done.append, count="tokens")["cls"].shape, sum(done)
            ((2, 32), 14)
        """
        if isinstance(ids, Windows):
            tokens = count == "tokens"
            per_window = self.encode_ids(list(ids), on_progress if tokens else None, count=count)
            if on_progress is not None and not tokens:
                on_progress(ids.texts)
            counts = np.bincount(ids.owner, minlength=ids.texts).astype(np.float32)[:, None]
            out = {}
            for k, v in per_window.items():
                total = np.zeros((ids.texts, v.shape[1]), np.float32)
                np.add.at(total, ids.owner, v)
                out[k] = total / np.maximum(counts, 1)
            return out
        return self._encode(ids, on_progress, count)[0]

    def encode_ids_with_states(self, ids: list[list[int]], layer: int, on_progress=None, *,
                               count: str = "texts") -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """`encode_ids`, plus every text's token states hidden_states[layer] (float32 [its tokens, hidden]),
        from the same forward pass (extract --states, and a tuned checkpoint's predict).

        Args:
            ids: token ids per text, as `tokenize` gives them (whole texts: not long_texts="chunk" windows).
            layer: which hidden_states to return (0 = embeddings, `num_layers` = the last layer).
            on_progress, count: as in `encode_ids`.

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> enc = Encoder(toy_model(tempfile.mkdtemp()), precision="fp32")
            >>> ids = enc.tokenize(["很好", "这个东西真的很差"])
            >>> pooled, states = enc.encode_ids_with_states(ids, layer=2)
            >>> pooled["cls"].shape, [s.shape for s in states]
            ((2, 32), [(4, 32), (10, 32)])
        """
        if isinstance(ids, Windows):
            raise UserError("cached states need whole texts: use --long-texts truncate with --states")
        return self._encode(ids, on_progress, count, layer)

    def _encode(self, ids, on_progress=None, count: str = "texts", states_layer: int | None = None):
        names = self.feature_names()
        n = len(ids)
        dims = {k: self.feature_dims.get(k, self.hidden_size) for k in names}
        if n == 0:
            return {k: np.zeros((0, dims[k]), np.float32) for k in names}, []
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
        out = {k: torch.empty((len(uniq), dims[k]), dtype=torch.float32, device=self.device) for k in names}
        states = [None] * len(uniq) if states_layer is not None else None
        # Packed batches hold real tokens only, so they are cut by real lengths.
        batches = plan_batches(lengths if self.packed is not None else widths, self.batch_tokens)
        self._maybe_compile(int(lengths.sum()))

        def run(batch):
            with torch.inference_mode(), self._autocast():
                if self.packed is not None:
                    return batch, self._forward_packed([uniq[j] for j in batch], states_layer)
                # A lone text (predict's one sentence) needs no padding at all.
                width = int(lengths[batch[0]] if len(batch) == 1 else widths[batch[0]])
                return batch, self._forward([uniq[j] for j in batch], width, states_layer)

        workers = self.resolve_workers(len(batches))
        with torch_threads(1, when=workers > 1), ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
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

    def expect(self, tokens: int) -> None:
        """Say that the run will encode about `tokens` tokens in all (extract does, before its first chunk):
        compile="auto" decides by the run, not by one call's share of it.

        Args:
            tokens: the run's tokens, all calls together (the largest number said counts).

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> enc = Encoder(toy_model(tempfile.mkdtemp()), precision="fp32")
            >>> enc.expect(2_000_000)  # then encode the run's texts, a chunk at a time
        """
        self._expected_tokens = max(self._expected_tokens, int(tokens))

    def _maybe_compile(self, tokens: int) -> None:
        """Turn compile on before a call of `tokens` tokens when `compile` asks for it (once; see compile_pays)."""
        if self.compile == "off" or (self.packed is not None and self.packed.compiled is not None):
            return
        if self.compile == "auto" and not compile_pays(max(tokens, self._expected_tokens), self.device):
            return
        if self.packed is None:
            if self.compile == "on" and "compile-padded" not in _told:
                _told.add("compile-padded")
                self._log("compile: padded batches run eagerly (compile covers packed BERT-family batches)")
            self.compile = "off"
            return
        if not self.packed.compile_failed:
            self.packed.compile(self._log)

    def resolve_workers(self, n_batches: int) -> int:
        """Threads that run batches side by side (each with one torch thread): `workers` when given, else
        on a CPU as many as torch has intra-op threads, when there are batches enough to share out; 1 on a GPU.

        Args:
            n_batches: the batches of the call (never more workers than batches).

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> enc = Encoder(toy_model(tempfile.mkdtemp()), device="cpu", precision="fp32", workers=4)
            >>> enc.resolve_workers(3), enc.resolve_workers(10)
            (3, 4)
        """
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
        reason = unsupported(self._net)
        if reason is None:
            return PackedEncoder(self._net, log=self._log)
        if reason not in _told:
            _told.add(reason)
            print(f"note: padded batches for this model ({reason}); packed batches cover BERT, RoBERTa and "
                  f"XLM-R families", file=sys.stderr)
        return None

    @property
    def model(self):
        """The HF model (transformers' own modules: export traces it, the padded path runs it). Where the
        encoder runs from modules read straight from the folder (`packed.load_modules`), it is loaded on
        first use.

            >>> import tempfile
            >>> from pipeline.toy import toy_model
            >>> model = Encoder(toy_model(tempfile.mkdtemp()), precision="fp32").model
            >>> type(model).__name__, model.config.num_hidden_layers
            ('BertModel', 3)
        """
        if self._model is None:
            path, where = self._hf_load
            from transformers import AutoModel
            try:
                model = AutoModel.from_pretrained(path, attn_implementation="sdpa", **where)
            except Exception as e:
                try:
                    model = AutoModel.from_pretrained(path, **where)
                except Exception:
                    if "weights_only" in str(e):  # torch's advice to unpickle in full is not ours to give
                        raise UserError(f"cannot load model {self.model_ref!r}: its .bin weights hold more than "
                                        "tensors, and bertcache never unpickles them; use the model saved as "
                                        "safetensors (save_pretrained's default)") from e
                    raise UserError(f"cannot load model {self.model_ref!r}: {first_line(e)}") from e
            if getattr(model, "pooler", None) is not None:
                model.pooler = None  # BERT's tanh pooler: a wasted matmul per batch, never cached
            self._model = self._prepare(model)
        return self._model

    def _prepare(self, net):
        """Frozen, on the device, Linear weights stored in the autocast dtype once: autocast would recast
        them on every batch (a copy of the whole model per batch on CPU), and the numbers are the same."""
        net.eval().to(self.device)
        net.requires_grad_(False)
        dtype = _DTYPES[self.precision]
        stored = {p.dtype for p in net.parameters() if p.is_floating_point()}
        if stored - {dtype or torch.float32, torch.float32}:
            # Weights saved in half precision, run at another precision: from float32, as if saved so (fp16
            # LayerNorms under bf16 autocast failed on the CPU, and --precision fp32 ran in fp16).
            net.float()
        if dtype is not None:
            for module in net.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(dtype)
        return net

    def _autocast(self):
        dtype = _DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, seqs: list, width: int, states_layer: int | None = None) -> dict:
        """Pooled features of a padded batch; with `states_layer`, also hidden_states[states_layer] under key None."""
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        left = self.padding_side == "left"
        for r, s in enumerate(seqs):
            cols = slice(width - len(s), width) if left else slice(0, len(s))
            ids[r, cols] = s
            mask[r, cols] = 1
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        if self.device.type == "cuda":
            ids_t, mask_t = ids_t.pin_memory(), mask_t.pin_memory()
        ids_t = ids_t.to(self.device, non_blocking=True)
        mask_t = mask_t.to(self.device, non_blocking=True)
        need_all = len(self.layers) > 1 or (states_layer is not None and states_layer != self.num_layers)
        extra = {}
        if self.family == "decoder":  # positions count from each text's first real token, whatever the padding
            extra["position_ids"] = (mask_t.cumsum(1) - 1).clamp(min=0)
        vocab = self.config.vocab_size
        if int(ids.max()) >= vocab:  # text pairs: token types folded into the ids (_fold_types)
            extra["token_type_ids"] = ids_t // vocab
            ids_t = ids_t % vocab
        result = self.model(input_ids=ids_t, attention_mask=mask_t, output_hidden_states=need_all, **extra)
        hidden = result.hidden_states if need_all else {self.num_layers: result.last_hidden_state}
        real = mask_t.bool().unsqueeze(-1)
        denom = mask_t.sum(1, keepdim=True).float()
        rows = torch.arange(len(seqs), device=self.device)
        lengths_t = torch.from_numpy(lengths).to(self.device)
        first = (width - lengths_t) if left else torch.zeros_like(lengths_t)
        last = torch.full_like(lengths_t, width - 1) if left else lengths_t - 1
        pooled = {}
        for layer in self.layers:
            h = hidden[layer].float()
            if "cls" in self.pools:
                pooled[feature_name("cls", layer, self.num_layers)] = h[rows, first]
            # where, not a product: a left-padded row's pad positions may hold NaN (they attend to nothing)
            pooled[feature_name("mean", layer, self.num_layers)] = torch.where(real, h, 0.0).sum(1) / denom
            pooled[feature_name("last", layer, self.num_layers)] = h[rows, last]
        if self.sentence:
            from .packed import Packing
            p = Packing.of(seqs, self.device)
            tokens = hidden[self.num_layers][mask_t.bool()]  # real tokens, text after text: Packing's layout
            pooled[SENTENCE] = self._sentence(tokens, p)
        if states_layer is not None:  # every row's own tokens (wherever the padding is), float32 on the CPU
            h = (result.hidden_states[states_layer] if need_all else result.last_hidden_state).float()
            pooled[None] = [h[r][mask_t[r].bool()].cpu().numpy() for r in range(len(seqs))]
        return pooled

    def _sentence(self, tokens: torch.Tensor, p) -> torch.Tensor:
        return self.sentence.apply(tokens, p.starts, p.lengths, p.segment, skip=self.prompt_tokens)

    def _forward_packed(self, seqs: list, states_layer: int | None = None) -> dict:
        from .packed import Packing, pool

        p = Packing.of(seqs, self.device)
        extra = [states_layer] if states_layer is not None and states_layer not in self.layers else []
        hidden = self.packed.forward(p, self.layers + extra)
        pooled = {}
        ends = p.starts + p.lengths - 1
        for layer in self.layers:
            cls, mean = pool(hidden[layer], p)
            pooled[feature_name("cls", layer, self.num_layers)] = cls
            pooled[feature_name("mean", layer, self.num_layers)] = mean
            pooled[feature_name("last", layer, self.num_layers)] = hidden[layer].float().index_select(0, ends)
        if self.sentence:
            pooled[SENTENCE] = self._sentence(hidden[self.num_layers], p)
        if states_layer is not None:  # packed rows are already ragged: cut them apart
            h = hidden[states_layer].float().cpu().numpy()
            starts, lengths = p.starts.cpu().numpy(), p.lengths.cpu().numpy()
            pooled[None] = [h[a:a + n].copy() for a, n in zip(starts, lengths)]
        return pooled


class Windows(list):
    """Token ids of the windows of long texts (`Encoder.tokenize` with long_texts="chunk"): `owner[i]` is
    the text window i belongs to, `texts` how many texts there are."""

    def __init__(self, ids, owner: np.ndarray, texts: int):
        super().__init__(ids)
        self.owner, self.texts = owner, texts


def _fold_types(ids: list[int], types: list[int], vocab_size: int) -> list[int]:
    """Pair encodings carry token type ids; folded into the ids (id + type * vocab_size) they stay one list
    of ints per input, so deduplication, length sorting and batching need no second array. The forward
    passes unfold them (ids % vocab, ids // vocab). Type 0 tokens are unchanged."""
    return [i + t * vocab_size for i, t in zip(ids, types)]


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices of `lengths` grouped longest first into batches of at most `batch_tokens` tokens (padded
    widths for padded batches, real lengths for packed ones)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        size = max(1, batch_tokens // max(1, int(lengths[order[start]])))
        batches.append(order[start:start + size])
        start += size
    return batches
