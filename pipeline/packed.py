"""Packed, unpadded forward passes of BERT-family encoders (BERT, RoBERTa, XLM-R, CamemBERT).

The texts of a batch are concatenated into one [tokens, hidden] sequence with per-text boundaries
(cumulative lengths, as variable-length attention kernels take them). Every Linear, LayerNorm and
activation runs on real tokens only, with the HF model's own modules (so its weights, dtype casts and
autocast rules apply unchanged). Attention is the only step that needs texts apart: q, k and v are
gathered into a [texts, heads, longest, head_dim] block, run through SDPA with a key-padding mask
(texts of a length-sorted batch are close in length, so little is wasted) and gathered back. In bf16 on
the CPU, batches of several texts run attention as two batched matmuls instead (`matmul_attention`). In
bf16 or fp16 on a CUDA GPU they run FlashAttention's variable-length kernel on the packed rows themselves
(`varlen_attention`: no padding at all, and a text's rows come out the same whatever its neighbours).

No padded token ever enters a Linear or a LayerNorm, and no text's rows meet another's, so a text's
vector does not depend on its batch neighbours beyond the last bits of matmul blocking.

    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> packed = PackedEncoder(model)
    >>> hidden = packed.forward(Packing.of([[2, 5, 9, 3], [2, 7, 3]]), [2])
    >>> tuple(hidden[2].shape)
    (7, 32)
"""
from __future__ import annotations

import inspect
import platform
import sys
import threading
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Model types whose HF modules have BERT's layout (embeddings + encoder.layer[i] with attention.self.
# query/key/value, attention.output, intermediate, output). RoBERTa-style ones count positions from
# padding_idx + 1.
FAMILIES = {"bert": False, "roberta": True, "xlm-roberta": True, "camembert": True}
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
# `matmul_attention` pads blocks to a multiple of _SLOT_MULTIPLE tokens (torch's bf16 softmax is ~2.5x slower
# on rows that are not) and scores _QUERY_CHUNK queries at a time (scores of long texts at once do not stay
# in cache: 0.5-0.7x SDPA's speed at 150-512 tokens, 1.2-1.5x in chunks of 64; 32 and 128 measured slower).
_SLOT_MULTIPLE = 16
# On the CPU a batch's packed rows are padded to a multiple of ROW_MULTIPLE for the Linears: oneDNN keeps
# kernels per shape (up to 1024 of them, about a MiB each), and packed batches of every token count made
# extract's memory grow with the run (toy model, 200k texts: +524 MiB unpadded, +219 at 8, +132 at 32;
# benchmarks/RESULTS.md). 8, not 32: 32's extra rows cost the bert-base shape ~2% of its speed on one thread.
# Pad rows start as zeros, take no part in attention and are never pooled.
ROW_MULTIPLE = 8
_QUERY_CHUNK = 64
ATTENTIONS = ("sdpa", "matmul", "varlen")  # PackedEncoder(attention=...): None picks one per batch (`attention`)


# A BERT layer's modules (after "encoder.layer.<i>."), each with a weight and a bias: what packing runs and
# what `load_modules` reads.
_LAYER_PARTS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")


def unsupported(model) -> str | None:
    """Why `model` cannot run packed (None when it can): a family or a setting this module does not cover."""
    cfg = model.config
    if cfg.model_type not in FAMILIES:
        return f"model type {cfg.model_type!r} is not one of {', '.join(FAMILIES)}"
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {cfg.position_embedding_type!r} (only absolute positions are packed)"
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        return "a decoder configuration"
    emb = getattr(model, "embeddings", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    need = _LAYER_PARTS + ("intermediate.intermediate_act_fn",)
    if emb is None or layers is None or not all(hasattr(emb, a) for a in ("word_embeddings", "position_embeddings",
                                                                          "LayerNorm")):
        return "its modules do not have BERT's layout"
    for layer in layers:
        for path in need:
            obj = layer
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if obj is None:
                return f"its layers lack {path}"
    return None


_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Each family's base-model prefix in a task model's weights (transformers' base_model_prefix).
_PREFIXES = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "camembert": "roberta."}


def load_modules(folder: str, config) -> torch.nn.Module | None:
    """A BERT-family model's modules, as `PackedEncoder` reads them, made straight from the folder's
    safetensors, without transformers' modeling code: importing it (transformers.modeling_utils, which
    pulls in torch.distributed.tensor, torch._dynamo and scipy.optimize) takes about 1.7 s of every
    process that loads a model (benchmarks/RESULTS.md, issue 17). The tensors are the ones
    `AutoModel.from_pretrained` would hold, and `PackedEncoder` runs the same ops on them either way, so
    the vectors are the same (tests/test_packed.py).

    Args:
        folder: a local model folder with model.safetensors (or a safetensors index and its shards).
        config: its HF config (AutoConfig.from_pretrained).
    Returns the modules (eval mode, no gradients; `.config` is `config`, its dtype set where it had none, as
    from_pretrained sets it), or None where this does not
    cover the folder: no safetensors, names other than BERT's (bare, or under the family's `bert.` /
    `roberta.` prefix, which is taken when any name has it, as from_pretrained does), shapes other than
    the config's, an activation other than the exact GELU, tensors not stored in the config's dtype, or a
    setting `unsupported` names. The caller then loads the HF model as usual.

        >>> import tempfile
        >>> from pipeline.toy import toy_model
        >>> from transformers import AutoConfig
        >>> folder = toy_model(tempfile.mkdtemp())
        >>> net = load_modules(folder, AutoConfig.from_pretrained(folder))
        >>> tuple(net.encoder.layer[0].intermediate.dense.weight.shape)
        (64, 32)
    """
    import json
    import os

    from safetensors import safe_open

    if config.model_type not in FAMILIES or getattr(config, "hidden_act", None) != "gelu":
        return None
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    handles = {}
    try:
        if os.path.isfile(single):
            handles[single] = safe_open(single, framework="pt")
            where = {name: single for name in handles[single].keys()}
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                where = {name: os.path.join(folder, shard) for name, shard in json.load(f)["weight_map"].items()}
        else:
            return None
        # As from_pretrained reads a task model's weights into the base model: under the family's prefix when
        # any name has it (bert.*, roberta.*), else the names as they are.
        prefix = _PREFIXES[config.model_type]
        prefix = prefix if any(name.startswith(prefix) for name in where) else ""
        tensors = {}
        for name, shape in _shapes(config).items():
            path = where[prefix + name]  # KeyError: another layout
            if path not in handles:
                handles[path] = safe_open(path, framework="pt")
            tensors[name] = handles[path].get_tensor(prefix + name)
            if tuple(tensors[name].shape) != shape:  # from_pretrained refuses it, in one line
                return None
    except Exception:  # names of another layout, a damaged file, ...: from_pretrained decides (and says why)
        return None
    want = getattr(config, "dtype", None) or torch.float32  # what from_pretrained gives: the config's dtype
    want = _DTYPE_NAMES.get(want, want) if isinstance(want, str) else want
    if any(t.dtype != want for t in tensors.values()):
        return None
    net = _modules(config, tensors)
    if unsupported(net):
        return None
    if getattr(config, "dtype", None) is None:  # recorded as from_pretrained records it (the fingerprint hashes it)
        config.dtype = want
    return net


def _shapes(config) -> dict[str, tuple]:
    """The tensors `load_modules` reads, by name, with the shapes `config` gives them."""
    hidden, inner = int(config.hidden_size), int(config.intermediate_size)
    out = {"embeddings.word_embeddings.weight": (int(config.vocab_size), hidden),
           "embeddings.position_embeddings.weight": (int(config.max_position_embeddings), hidden),
           "embeddings.LayerNorm.weight": (hidden,), "embeddings.LayerNorm.bias": (hidden,)}
    if int(getattr(config, "type_vocab_size", 0) or 0) > 0:
        out["embeddings.token_type_embeddings.weight"] = (int(config.type_vocab_size), hidden)
    wide = {"intermediate.dense": (inner, hidden), "output.dense": (hidden, inner)}  # [out, in]
    for i in range(int(config.num_hidden_layers)):
        for part in _LAYER_PARTS:
            weight = (hidden,) if part.endswith("LayerNorm") else wide.get(part, (hidden, hidden))
            out[f"encoder.layer.{i}.{part}.weight"] = weight
            out[f"encoder.layer.{i}.{part}.bias"] = weight[:1]
    return out


def _modules(config, tensors: dict) -> torch.nn.Module:
    """Plain torch modules under BERT's attribute names, holding `tensors` (see `load_modules`)."""
    nn = torch.nn

    def node(**children):
        module = nn.Module()
        for name, child in children.items():
            setattr(module, name, child)
        return module

    def take(module, prefix):
        for kind in ("weight", "bias"):
            if getattr(module, kind, None) is not None:
                setattr(module, kind, nn.Parameter(tensors[f"{prefix}.{kind}"], requires_grad=False))
        return module

    # Modules made at size 1 and given the real tensors: the constructors would fill full-size weights at
    # random first, and on the meta device they import torch._dynamo (about 1 s).
    def linear(prefix):
        module = take(nn.Linear(1, 1), prefix)
        module.out_features, module.in_features = module.weight.shape
        return module

    hidden, eps = int(config.hidden_size), float(config.layer_norm_eps)

    def norm(prefix):
        module = take(nn.LayerNorm(1, eps=eps), prefix)
        module.normalized_shape = (hidden,)
        return module

    def embedding(prefix):
        module = take(nn.Embedding(1, 1), prefix)
        module.num_embeddings, module.embedding_dim = module.weight.shape
        return module

    emb = node(word_embeddings=embedding("embeddings.word_embeddings"),
               position_embeddings=embedding("embeddings.position_embeddings"),
               LayerNorm=norm("embeddings.LayerNorm"))
    emb.token_type_embeddings = (embedding("embeddings.token_type_embeddings")
                                 if "embeddings.token_type_embeddings.weight" in tensors else None)
    layers = []
    for i in range(int(config.num_hidden_layers)):
        at = f"encoder.layer.{i}"
        layers.append(node(
            attention=node(self=node(query=linear(f"{at}.attention.self.query"), key=linear(f"{at}.attention.self.key"),
                                     value=linear(f"{at}.attention.self.value")),
                           output=node(dense=linear(f"{at}.attention.output.dense"),
                                       LayerNorm=norm(f"{at}.attention.output.LayerNorm"))),
            intermediate=node(dense=linear(f"{at}.intermediate.dense"), intermediate_act_fn=nn.GELU()),
            output=node(dense=linear(f"{at}.output.dense"), LayerNorm=norm(f"{at}.output.LayerNorm"))))
    net = node(embeddings=emb, encoder=node(layer=nn.ModuleList(layers)))
    net.config = config
    return net.eval().requires_grad_(False)


class Packing:
    """Token ids of several texts laid end to end, with what attention and pooling need to keep them apart.

    Attributes: `ids` [T], `positions` [T] (from 0 within each text), `lengths` [B], `starts` [B]
    (offset of each text's first token), `segment` [T] (text of each token), `scatter` [T] (each token's
    row in a [B * longest] padded block), `gather` [B * longest] (the token row each slot of that block
    takes: its own, or for padding slots the text's first token, which the key mask hides), `longest`.
    """

    def __init__(self, ids, positions, lengths, starts, segment, scatter, gather, longest):
        self.ids, self.positions, self.lengths, self.starts = ids, positions, lengths, starts
        self.segment, self.scatter, self.gather, self.longest = segment, scatter, gather, longest
        self._blocks = None  # matmul_attention's layout, see `blocks`

    @classmethod
    def of(cls, seqs: list, device: torch.device | str = "cpu") -> "Packing":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        starts = np.zeros(len(seqs), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        total, longest = int(lengths.sum()), int(lengths.max())
        ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=total)
        segment = np.repeat(np.arange(len(seqs)), lengths)
        positions = np.arange(total, dtype=np.int64) - starts[segment]
        host = [torch.from_numpy(a) for a in (ids, positions, lengths, starts, segment)]
        _, gather, scatter = _block_layout(*host[1:], longest)  # host[1:]: positions, lengths, starts, segment
        packing = cls(*(t.to(device, non_blocking=True) for t in (*host, scatter, gather)), longest)
        packing.max_id = int(ids.max()) if total else 0  # on the host: embed needs no device sync to read it
        return packing

    @property
    def cu_lengths(self) -> torch.Tensor:
        """[B + 1] int32 cumulative lengths (0, then where each text ends): what variable-length kernels take."""
        if getattr(self, "_cu", None) is None:
            ends = self.starts + self.lengths
            self._cu = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)
        return self._cu

    def blocks(self, heads: int, dtype: torch.dtype) -> tuple:
        """`matmul_attention`'s layout, made on the first layer's call and kept for the others:
        (slots: `longest` rounded up to a multiple of `_SLOT_MULTIPLE`, gather [B * slots], scatter [T], bias
        [B * heads, 1, slots] with -inf on padding keys, for every query)."""
        key = (heads, dtype)
        if self._blocks is None or self._blocks[0] != key:
            batch = self.lengths.shape[0]
            slots = -(-self.longest // _SLOT_MULTIPLE) * _SLOT_MULTIPLE
            real, gather, scatter = _block_layout(self.positions, self.lengths, self.starts, self.segment, slots)
            bias = torch.zeros(batch, 1, slots, dtype=dtype, device=self.ids.device)
            bias = bias.masked_fill_(~real[:, None, :], float("-inf")).expand(batch, heads, slots)
            self._blocks = (key, (slots, gather, scatter, bias.reshape(batch * heads, 1, slots)))
        return self._blocks[1]


def _block_layout(positions, lengths, starts, segment, width: int) -> tuple:
    """Between packed rows [T] and a padded [B * width] block: `real` [B, width] (the slot holds a token),
    `gather` [B * width] (the row each slot takes: its own token's, or for padding slots the text's first,
    which the key mask hides) and `scatter` [T] (each token's slot)."""
    slot = torch.arange(width, device=lengths.device)
    real = slot < lengths[:, None]
    gather = (starts[:, None] + torch.where(real, slot, 0)).reshape(-1)
    gather.clamp_(max=max(len(positions) - 1, 0))  # an empty text (no special tokens) points in range
    return real, gather, segment * width + positions


class PackedEncoder:
    """Runs a BERT-family HF model (see `FAMILIES`) on a `Packing`, reusing the model's modules.

    Args:
        model: a loaded HF BertModel / RobertaModel / XLMRobertaModel (`unsupported(model)` is None).
        onednn: matmuls from oneDNN-reordered weights (below); None: where `onednn_supported`.
        attention: how texts attend within themselves, one of `ATTENTIONS`: "sdpa" (SDPA over a padded
            block), "matmul" (`matmul_attention`) or "varlen" (`varlen_attention`, CUDA in bf16/fp16 only:
            anywhere else, or if the kernel fails, SDPA, said once). None: "matmul" in bf16 on the CPU, where
            it measured faster, "varlen" in bf16/fp16 on CUDA, else "sdpa".
        log: where the one-line fallback note goes (default stderr).
    The q, k and v weights of every layer are made views of one fused [3 * hidden, hidden] weight
    (one matmul instead of three; the model's own forward still works and gives the same numbers).

    On an x86 CPU (torch's x86 builds all have oneDNN) the Linear weights are also reordered once into oneDNN's
    blocked layout and every eager layer runs its matmuls from those (`onednn`): torch's own `F.linear`
    reorders (bf16) or calls MKL (fp32) on every call. The exact GELU rides in the intermediate matmul.
    Measured on an AVX512-BF16 CPU: 6-7% more texts/s in bf16, 9% in fp32, one sentence 1.36x faster
    (benchmarks/RESULTS.md, issue 17); the cost is a second copy of the Linear weights. `onednn=False`
    keeps torch's linears.

    `compile(log)` runs every layer's feed-forward half (output dense + residual + LayerNorm, intermediate +
    activation, output + residual + LayerNorm) through `torch.compile` (inductor): one graph serves every
    layer (the weights are its inputs) and, with `dynamic=True`, every token count. Attention stays eager.
    If compiling fails (no C++ compiler, an op inductor does not cover) the layers run eagerly, said once.
    """

    def __init__(self, model, onednn: bool | None = None, attention: str | None = None, log=None):
        reason = unsupported(model)
        if reason:
            raise ValueError(f"cannot pack this model: {reason}")
        if attention is not None and attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {attention!r}; use one of {', '.join(ATTENTIONS)}")
        self.model = model
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        # RoBERTa-style positions count real tokens from padding_idx + 1; a pad id inside a text gets padding_idx
        # and is not counted (HF's create_position_ids_from_input_ids), which `embed` follows.
        self.pad_positions = int(cfg.pad_token_id) if FAMILIES[cfg.model_type] else None
        self.fused = []
        for layer in model.encoder.layer:
            att = layer.attention.self
            weight = torch.cat([att.query.weight, att.key.weight, att.value.weight]).detach()
            bias = torch.cat([att.query.bias, att.key.bias, att.value.bias]).detach()
            h = att.query.weight.shape[0]
            for i, lin in enumerate((att.query, att.key, att.value)):  # share storage: no second copy
                lin.weight = torch.nn.Parameter(weight[i * h:(i + 1) * h], requires_grad=False)
                lin.bias = torch.nn.Parameter(bias[i * h:(i + 1) * h], requires_grad=False)
            self.fused.append((weight, bias))
        self.ffn = [_ffn_args(layer) for layer in model.encoder.layer]
        if onednn is None:
            onednn = onednn_supported(self.fused[0][0])
        # Per layer: the fused q/k/v, attention output, intermediate (+ GELU) and output matmuls.
        self.onednn = [_onednn_layer(w, b, *args) for (w, b), args in zip(self.fused, self.ffn)] if onednn else None
        self.attention_kernel = attention  # None: chosen per batch's dtype and device (see `attention`)
        self.varlen_failed = False
        self.compiled = None  # the compiled _ffn while compile is on
        self.compile_failed = False
        self.compile_seconds = 0.0
        self._ready = set()  # shape keys already compiled: their calls need no lock
        self._lock = threading.Lock()
        self._log = log

    def note(self, msg: str) -> None:
        (self._log or (lambda m: print(m, file=sys.stderr)))(msg)

    def compile(self, log=None, backend="inductor") -> None:
        """Compile the layers' feed-forward half on its first call (lazily; see the class docstring).
        `log` gets one line: the compile time, or why the layers run eagerly.

        dynamic=True: one graph for every token count. Measured against dynamic=False with token counts
        padded up to a few buckets (RESULTS.md, issue 17): the same speed, half the compile time."""
        self.compiled = torch.compile(_ffn, dynamic=True, backend=backend)
        self._log = log or self._log or (lambda msg: print(msg, file=sys.stderr))

    def _block(self, a: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        fn = self.compiled
        if fn is None:
            if self.onednn is not None:
                return _ffn_onednn(a, x, self.onednn[i], *self.ffn[i])
            return _ffn(a, x, *self.ffn[i])
        # One graph for any token count but 1 (torch specializes on it). Threads wait while a shape
        # compiles: compiling is not thread-safe; running compiled code is.
        key = min(len(x), 2)
        if key in self._ready:
            return fn(a, x, *self.ffn[i])
        with self._lock:
            if self.compiled is None:  # another thread's compile failed meanwhile
                return _ffn(a, x, *self.ffn[i])
            start = time.perf_counter()
            try:
                out = fn(a, x, *self.ffn[i])
            except Exception as e:  # any compiler failure: the eager layers give the same numbers
                self.compiled, self.compile_failed = None, True
                while getattr(e, "inner_exception", None) or e.__cause__:  # torch wraps the compiler's error
                    e = getattr(e, "inner_exception", None) or e.__cause__
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self._log(f"compile: failed ({type(e).__name__}: {first[:200]}); running eagerly "
                          "(--compile off skips the attempt)")
                return _ffn(a, x, *self.ffn[i])
            seconds = time.perf_counter() - start
            if not self._ready:
                self._log(f"compile: the encoder's layers compiled in {seconds:.1f} s (torch.compile, inductor; "
                          "--compile off skips this)")
            self.compile_seconds += seconds
            self._ready.add(key)
            return out

    def embed(self, p: Packing) -> torch.Tensor:
        emb = self.model.embeddings
        vocab = emb.word_embeddings.num_embeddings
        paired = getattr(p, "max_id", 0) >= vocab  # text pairs: token types folded into the ids (encoder.py)
        words = p.ids % vocab if paired else p.ids
        x = emb.word_embeddings(words)
        if getattr(emb, "token_type_embeddings", None) is not None:  # HF's order of sums
            x = x + (emb.token_type_embeddings(p.ids // vocab) if paired else emb.token_type_embeddings.weight[0])
        positions = p.positions
        if self.pad_positions is not None:
            pad = self.pad_positions
            real = (words != pad).long()
            counted = torch.cat([real.new_zeros(1), real.cumsum(0)])  # [T + 1]: an empty last text's start is T
            counted = counted[1:] - counted[p.starts][p.segment]  # from 1 within each text
            positions = counted * real + pad
        return emb.LayerNorm(x + emb.position_embeddings(positions))

    def attention(self, qkv: torch.Tensor, p: Packing) -> torch.Tensor:
        """Self-attention within each text: [T, 3 * hidden] -> [T, hidden]."""
        total, width = qkv.shape
        batch = p.lengths.shape[0]
        kernel = self.attention_kernel
        half = qkv.dtype in (torch.bfloat16, torch.float16)
        if kernel is None:  # where each measured (or, for varlen, is built to be) the fastest
            kernel = ("varlen" if qkv.is_cuda and half else
                      "matmul" if qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu" else "sdpa")
        if kernel == "varlen" and total and not self.varlen_failed:
            try:
                return self.varlen_attention(qkv, p)
            except torch.OutOfMemoryError:  # a batch too large, not a missing kernel
                raise
            except (RuntimeError, NotImplementedError, ImportError, TypeError) as e:  # no kernel for this device,
                # dtype or GPU; TypeError: a torch whose varlen_attn has no num_splits (2.9-2.12)
                self.varlen_failed = True
                first = (str(e).strip().splitlines() or [""])[0]
                self.note(f"attention: FlashAttention's variable-length kernel is not available here "
                          f"({type(e).__name__}: {first[:160]}); padded SDPA instead")
        if batch > 1 and kernel == "matmul":
            return self.matmul_attention(qkv, p)
        hidden = width // 3
        d = hidden // self.heads
        longest = p.longest
        if batch == 1 or total == batch * longest:  # no padding needed (one text, or all of one length)
            block, mask = qkv.view(batch, longest, 3, self.heads, d), None
        else:
            # A gather, not zeros + index_copy_: 6x faster here, and masked keys never count anyway.
            block = qkv.index_select(0, p.gather)
            block = block.view(batch, longest, 3, self.heads, d)
            mask = (torch.arange(longest, device=qkv.device) < p.lengths[:, None])[:, None, None, :]
        q, k, v = block.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch * longest, hidden)
        return out if mask is None else out.index_select(0, p.scatter)

    def varlen_attention(self, qkv: torch.Tensor, p: Packing) -> torch.Tensor:
        """`attention` by FlashAttention's variable-length kernel (torch.nn.attention.varlen, CUDA, bf16 or
        fp16) over the packed rows and their cumulative lengths: nothing padded, nothing gathered. One split
        of the keys (`num_splits=1`): the kernel then sums every text's keys in one order, whatever the batch,
        so a text's vector does not depend on its neighbours."""
        from torch.nn.attention.varlen import varlen_attn
        if "num_splits" not in inspect.signature(varlen_attn).parameters:  # batch invariance is why it is used
            raise NotImplementedError("this torch's varlen_attn has no num_splits (torch >= 2.13 has it)")
        total, width = qkv.shape
        q, k, v = qkv.view(total, 3, self.heads, width // (3 * self.heads)).unbind(1)
        cu = p.cu_lengths
        out = varlen_attn(q, k, v, cu, cu, p.longest, p.longest, num_splits=1)
        return out.reshape(total, width // 3)

    def matmul_attention(self, qkv: torch.Tensor, p: Packing) -> torch.Tensor:
        """`attention` as a scores matmul, a softmax and a values matmul over padded [B * heads, slots, d]
        blocks, 64 queries at a time. For bf16 batches on the CPU, where SDPA's flash kernel is slow for
        many texts: the encoder 4-5% faster on e5-small and the bert-base shape (benchmarks/RESULTS.md,
        issue 17). One text alone keeps SDPA, which needs no mask then.

        The keys are centred per text and head first. Softmax over keys ignores any vector subtracted
        from all of them (it shifts a query's scores by one constant), and centred keys give smaller
        scores, which lose less where the matmul rounds them to bf16: e5-small's min cosine against the
        padded path is 0.999992 with centring and 0.99994 without (SDPA: 0.999993)."""
        hidden = qkv.shape[1] // 3
        d = hidden // self.heads
        batch = p.lengths.shape[0]
        slots, gather, scatter, bias = p.blocks(self.heads, qkv.dtype)
        block = qkv.index_select(0, gather).view(batch, slots, 3, self.heads, d)
        q, k, v = block.permute(2, 0, 3, 1, 4).reshape(3, batch * self.heads, slots, d).unbind(0)
        keys = (k - k.mean(1, keepdim=True)).transpose(1, 2)
        out = torch.empty_like(q)
        for start in range(0, slots, _QUERY_CHUNK):
            end = min(start + _QUERY_CHUNK, slots)
            scores = torch.baddbmm(bias, q[:, start:end], keys, alpha=d ** -0.5)
            torch.bmm(torch.softmax(scores, -1), v, out=out[:, start:end])
        out = out.view(batch, self.heads, slots, d).transpose(1, 2).reshape(batch * slots, hidden)
        return out.index_select(0, scatter)

    def forward(self, p: Packing, layers: list[int]) -> dict[int, torch.Tensor]:
        """Hidden states [T, hidden] of `layers` (0 = embeddings, as HF's hidden_states count). On the CPU the
        Linears run on the rows padded to a multiple of ROW_MULTIPLE; attention and the results see T rows."""
        want = set(layers)
        x = self.embed(p)
        total = x.shape[0]
        rows = -(-total // ROW_MULTIPLE) * ROW_MULTIPLE if x.device.type == "cpu" else total
        if rows > total:
            x = F.pad(x, (0, 0, 0, rows - total))
        out = {0: x[:total]} if 0 in want else {}
        for i, (layer, (w, b)) in enumerate(zip(self.model.encoder.layer, self.fused), start=1):
            if i > max(want):
                break
            qkv = F.linear(x, w, b) if self.onednn is None or self.compiled else self.onednn[i - 1].qkv(x)
            a = self.attention(qkv[:total], p)
            if rows > total:
                a = F.pad(a, (0, 0, 0, rows - total))
            x = self._block(a, x, i - 1)
            if i in want:
                out[i] = x[:total]
        return out


def _ffn_args(layer) -> tuple:
    """What `_ffn` needs of one HF layer: its tensors, LayerNorm epsilons and activation module."""
    att, mid, out = layer.attention.output, layer.intermediate, layer.output
    return (att.dense.weight, att.dense.bias, att.LayerNorm.weight, att.LayerNorm.bias, att.LayerNorm.eps,
            mid.dense.weight, mid.dense.bias, mid.intermediate_act_fn, out.dense.weight, out.dense.bias,
            out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps)


def _ffn(a, x, wo, bo, g1, c1, eps1, wi, bi, act, wf, bf, g2, c2, eps2):
    """A BERT layer after attention, as its modules compute it: LayerNorm(a @ Wo + x), then the
    feed-forward block with its residual and LayerNorm. Row by row: no token's output depends on another's."""
    x = F.layer_norm(F.linear(a, wo, bo) + x, x.shape[-1:], g1, c1, eps1)
    return F.layer_norm(F.linear(act(F.linear(x, wi, bi)), wf, bf) + x, x.shape[-1:], g2, c2, eps2)


def onednn_supported(weight: torch.Tensor) -> bool:
    """Whether `OneDNNLinear` runs for `weight`: an x86 CPU tensor in fp32, or in bf16 where the CPU does bf16.

    >>> onednn_supported(torch.zeros(2, 2, dtype=torch.float16))
    False
    """
    # x86 only: measured there; on ARM oneDNN may fall back to reference kernels.
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available() or not _X86:
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


class OneDNNLinear:
    """`F.linear(x, weight, bias)`, optionally followed by the exact GELU, from a weight that oneDNN
    reordered once. Inference only (no autograd through the reordered copy); `x` is cast to the weight's
    dtype first, as autocast would.

    Args:
        weight: [out, in] fp32 or bf16 CPU tensor (`onednn_supported(weight)` must be true).
        bias: [out] or None.
        gelu: apply the exact (erf) GELU inside the matmul, before the output is rounded.

    >>> w, x = torch.randn(8, 4), torch.randn(3, 4)
    >>> out = OneDNNLinear(w, None, gelu=True)(x) if onednn_supported(w) else F.gelu(x @ w.T)
    >>> torch.allclose(out, F.gelu(x @ w.T), atol=1e-5)
    True
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False):
        self.dtype = weight.dtype
        with torch.no_grad():
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.bias = None if bias is None else bias.detach().to(weight.dtype)
        self.attr, self.algorithm = ("gelu", "none") if gelu else ("none", "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, self.attr, [],
                                                  self.algorithm)


def _exact_gelu(act) -> bool:
    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    return getattr(act, "act", None) is F.gelu  # transformers' GELUActivation (the "gelu" of BERT configs)


class _OneDNNLayer(NamedTuple):
    """One layer's matmuls from reordered weights; `act` is None where the GELU rides in `intermediate`."""
    qkv: OneDNNLinear
    attn_out: OneDNNLinear
    intermediate: OneDNNLinear
    act: object
    output: OneDNNLinear


def _onednn_layer(w, b, wo, bo, g1, c1, eps1, wi, bi, act, wf, bf, g2, c2, eps2) -> _OneDNNLayer:
    """The fused q/k/v weight `w`, `b` and a layer's `_ffn_args`, reordered for oneDNN."""
    gelu = _exact_gelu(act)
    return _OneDNNLayer(OneDNNLinear(w, b), OneDNNLinear(wo, bo), OneDNNLinear(wi, bi, gelu=gelu),
                        None if gelu else act, OneDNNLinear(wf, bf))


def _ffn_onednn(a, x, lins, wo, bo, g1, c1, eps1, wi, bi, act, wf, bf, g2, c2, eps2):
    """`_ffn` (same arguments after `lins`) with the matmuls from `lins`, a `_OneDNNLayer`."""
    x = F.layer_norm(lins.attn_out(a) + x, x.shape[-1:], g1, c1, eps1)
    h = lins.intermediate(x)
    return F.layer_norm(lins.output(h if lins.act is None else lins.act(h)) + x, x.shape[-1:], g2, c2, eps2)


def pool(hidden: torch.Tensor, p: Packing) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] (first token) and mean vectors per text, float32: ([B, hidden], [B, hidden])."""
    h = hidden.float()
    cls = h.index_select(0, p.starts)
    total = h.new_zeros(p.lengths.shape[0], h.shape[1]).index_add_(0, p.segment, h)
    return cls, total / p.lengths[:, None].to(h.dtype)
