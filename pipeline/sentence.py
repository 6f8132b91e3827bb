"""sentence-transformers folders, read from their files (no sentence-transformers package at run time).

A folder with `modules.json` says how its model turns token vectors into one sentence vector:

    modules.json                          the module chain: Transformer, Pooling, [Dense ...], [Normalize]
    1_Pooling/config.json                 pooling_mode (a name or a list), or the older flags pooling_mode_cls_token /
                                          _mean_tokens / _max_tokens / _lasttoken / _mean_sqrt_len_tokens /
                                          _weightedmean_tokens; include_prompt
    2_Dense/config.json + model.safetensors   a Linear (in_features -> out_features) and its activation
    config_sentence_transformers.json     prompts {"query": ..., ...} and default_prompt_name
    sentence_bert_config.json             max_seq_length

`SentenceModules.read(folder)` reads them (None for a plain transformers folder); `apply` turns a batch's
token vectors into the `sentence` feature exactly as sentence-transformers' encode does. Dense weights
are read from safetensors only: a pickle-only Dense (pytorch_model.bin) is refused, never unpickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .errors import UserError

# sentence-transformers' order of concatenation when a Pooling config turns on several modes.
MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
_MODE_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
              "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "weightedmean": "pooling_mode_weightedmean_tokens",
              "lasttoken": "pooling_mode_lasttoken"}
_NEW_NAMES = {"mean_sqrt_len_tokens": "mean_sqrt_len"}  # `pooling_mode` names that differ from ours
_ACTIVATIONS = {"Identity": None, "Tanh": "tanh", "ReLU": "relu", "GELU": "gelu", "Sigmoid": "sigmoid"}
_KNOWN = ("Transformer", "Pooling", "Dense", "Normalize")
# Which prompt a classifier takes when the folder names no default: these names, in this order.
PROMPT_ORDER = ("classification", "query")


@dataclass
class SentenceModules:
    """What a sentence-transformers folder does after its transformer.

    Attributes: `transformer` (folder of the HF model, often the folder itself), `modes` (pooling modes, in
    concatenation order), `include_prompt`, `dense` (list of {"weights", "in", "out", "bias",
    "activation"}), `normalize`, `prompts`, `default_prompt_name`, `max_seq_length`, `files` (every file
    that decides the sentence vector, relative to the folder: they enter the model fingerprint).
    """
    folder: str
    transformer: str
    modes: list[str]
    include_prompt: bool = True
    dense: list[dict] = field(default_factory=list)
    normalize: bool = False
    prompts: dict = field(default_factory=dict)
    default_prompt_name: str | None = None
    max_seq_length: int | None = None
    files: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, folder: str) -> "SentenceModules | None":
        """The folder's modules, or None when it is no sentence-transformers folder (no modules.json)."""
        path = os.path.join(folder, "modules.json")
        if not os.path.exists(path):
            return None
        modules = _json(path)
        files = ["modules.json"]
        transformer, modes, include_prompt, dense, normalize = None, None, True, [], False
        for m in sorted(modules, key=lambda m: int(m.get("idx", 0))):
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            sub = m.get("path", "")
            if kind not in _KNOWN:
                raise UserError(f"{path}: module {m.get('type')!r} is not one bertcache reads ({', '.join(_KNOWN)}); "
                                "copy the transformer's files to a folder without modules.json to use its raw poolings")
            if kind == "Transformer":
                transformer = os.path.join(folder, sub) if sub else folder
                for name in ("sentence_bert_config.json",):
                    if os.path.exists(os.path.join(transformer, name)):
                        files.append(os.path.join(sub, name))
            elif kind == "Pooling":
                cfg_path = os.path.join(folder, sub, "config.json")
                cfg = _json(cfg_path)
                files.append(os.path.join(sub, "config.json"))
                modes = _modes(cfg, cfg_path)
                include_prompt = bool(cfg.get("include_prompt", True))
            elif kind == "Dense":
                dense.append(_dense(folder, sub))
                files += [os.path.join(sub, "config.json"), os.path.join(sub, "model.safetensors")]
            else:
                normalize = True
        if transformer is None or modes is None:
            raise UserError(f"{path} has no Transformer or no Pooling module; bertcache needs both")
        st = _json(os.path.join(folder, "config_sentence_transformers.json"), {})
        if st:
            files.append("config_sentence_transformers.json")
        bert_cfg = _json(os.path.join(transformer, "sentence_bert_config.json"), {})
        return cls(folder, transformer, modes, include_prompt, dense, normalize, dict(st.get("prompts") or {}),
                   st.get("default_prompt_name"), bert_cfg.get("max_seq_length"), files)

    def default_prompt(self) -> tuple[str | None, str]:
        """(prompt name, prompt text) a classifier takes: the folder's default_prompt_name, else the first
        of PROMPT_ORDER that it has and is not empty; (None, '') when none."""
        if self.default_prompt_name and self.prompts.get(self.default_prompt_name) is not None:
            return self.default_prompt_name, self.prompts[self.default_prompt_name]
        for name in PROMPT_ORDER:
            if self.prompts.get(name):
                return name, self.prompts[name]
        return None, ""

    def dim(self, hidden_size: int) -> int:
        """Width of the sentence vector."""
        return int(self.dense[-1]["out"]) if self.dense else hidden_size * len(self.modes)

    def describe(self) -> dict:
        """JSON-ready summary (the cache settings' `sentence`)."""
        return {"pooling": self.modes, "include_prompt": self.include_prompt, "normalize": self.normalize,
                "dense": [{k: d[k] for k in ("in", "out", "bias", "activation")} for d in self.dense]}

    # -- running ----------------------------------------------------------------------------------

    def load(self, device) -> None:
        """Read the Dense weights onto `device` (float32: they are small)."""
        from safetensors.torch import load_file
        for d in self.dense:
            state = load_file(d["weights"], device=str(device))
            d["weight"] = state["linear.weight"].float()
            d["bias_t"] = state["linear.bias"].float() if d["bias"] else None

    def apply(self, hidden, starts, lengths, segment, skip: int = 0):
        """The sentence vectors [B, dim] of a batch laid out as packed.Packing lays it out: `hidden` [T, H]
        token vectors (real tokens only), `starts` / `lengths` [B], `segment` [T]. `skip`: prompt tokens
        at the start of each text left out of the pooling (include_prompt false), as sentence-transformers
        does."""
        import torch
        import torch.nn.functional as F

        h = hidden.float()
        batch = lengths.shape[0]
        positions = torch.arange(h.shape[0], device=h.device) - starts[segment]
        keep = (positions >= skip) if skip and not self.include_prompt else None
        if keep is not None:
            counts = torch.zeros(batch, device=h.device).index_add_(0, segment, keep.float())
        else:
            counts = lengths.to(h.dtype)
        out = []
        for mode in self.modes:
            if mode == "cls":
                out.append(h.index_select(0, starts))
            elif mode == "lasttoken":
                out.append(h.index_select(0, starts + lengths - 1))
            elif mode == "max":
                masked = h if keep is None else h.masked_fill(~keep[:, None], -1e9)
                out.append(h.new_full((batch, h.shape[1]), -1e9).scatter_reduce_(
                    0, segment[:, None].expand_as(masked), masked, "amax"))
            else:
                w = (positions + 1).to(h.dtype) if mode == "weightedmean" else torch.ones_like(positions, dtype=h.dtype)
                if keep is not None:
                    w = w * keep
                total = h.new_zeros(batch, h.shape[1]).index_add_(0, segment, h * w[:, None])
                denom = counts if mode != "weightedmean" else h.new_zeros(batch).index_add_(0, segment, w)
                denom = denom.clamp(min=1e-9)[:, None]
                out.append(total / (denom.sqrt() if mode == "mean_sqrt_len" else denom))
        x = torch.cat(out, dim=1)
        # float32 like every other pooling: under the encoder's bf16 autocast F.linear would run in bf16
        with torch.autocast(h.device.type, enabled=False):
            for d in self.dense:
                x = F.linear(x, d["weight"], d["bias_t"])
                if d["activation"]:
                    x = getattr(torch, d["activation"])(x) if d["activation"] != "gelu" else F.gelu(x)
            return F.normalize(x, p=2, dim=1) if self.normalize else x


def _modes(cfg: dict, path: str) -> list[str]:
    """A Pooling config's modes in concatenation order: newer sentence-transformers (6.x) write `pooling_mode` (a
    name or a list, concatenated in that order), older ones one `pooling_mode_*` flag per mode (MODES order)."""
    if "pooling_mode" in cfg:
        given = cfg["pooling_mode"]
        modes = [_NEW_NAMES.get(m, m) for m in ([given] if isinstance(given, str) else list(given or []))]
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise UserError(f"{path}: pooling mode {bad[0]!r} is not one bertcache reads ({', '.join(MODES)})")
    else:
        modes = [mode for mode in MODES if cfg.get(_MODE_KEYS[mode])]
    if not modes:
        raise UserError(f"{path} turns on no pooling mode")
    return modes


def _dense(folder: str, sub: str) -> dict:
    where = os.path.join(folder, sub)
    cfg = _json(os.path.join(where, "config.json"))
    weights = os.path.join(where, "model.safetensors")
    if not os.path.exists(weights):
        pickles = [f for f in os.listdir(where) if f.endswith((".bin", ".pt", ".pth"))] if os.path.isdir(where) else []
        raise UserError(f"{where} holds its Dense weights only as {', '.join(pickles) or 'nothing'}; bertcache never "
                        "unpickles: convert them to model.safetensors (safetensors.torch.save_file of the state dict)")
    act = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if act not in _ACTIVATIONS:
        raise UserError(f"{where}/config.json: activation {act!r} is not one of {', '.join(_ACTIVATIONS)}")
    return {"weights": weights, "in": int(cfg["in_features"]), "out": int(cfg["out_features"]),
            "bias": bool(cfg.get("bias", True)), "activation": _ACTIVATIONS[act]}


def _json(path: str, default=None):
    if default is not None and not os.path.exists(path):
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise UserError(f"{path} is missing: the sentence-transformers folder is incomplete") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
