"""Where a model comes from, and what kind of model it is. No torch here.

A model reference is one of:
    a local folder           `./bge-small-zh`, `/models/qwen3-embedding-0.6b` (a sentence-transformers folder too)
    a built-in name          `e5-small` (pipeline/e5.py builds it)
    a hub id                 `BAAI/bge-small-zh-v1.5`, through the Hugging Face cache; HF_ENDPOINT points at a
                             mirror, HF_HUB_OFFLINE=1 uses the cache only (as transformers does)
    a ModelScope id          `modelscope:Qwen/Qwen3-Embedding-0.6B` (the `modelscope` extra)

A reference that is neither a folder nor in the cache fails at once when the hub cannot be reached (no
minutes of retries): the error says what was tried and how to point at a mirror.

Families: decoder-only models (Qwen2 / Qwen3 / Llama / Mistral ...) are pooled on their last token,
with an end-of-sequence token appended as their embedding recipes do; the rest (BERT-like encoders)
on [CLS] by default.

    >>> family({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
    'decoder'
    >>> family({"model_type": "bert"})
    'encoder'
"""
from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from .errors import UserError, first_line

MODELSCOPE = "modelscope:"
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 3.0  # how long to wait for the hub to answer before saying it cannot be reached
# Model types of decoder-only (causal) language models used as embedders; others are told apart by their
# architectures (`...ForCausalLM`).
DECODER_TYPES = {"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2",
                 "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "internlm2", "minicpm", "glm", "glm4", "olmo",
                 "olmo2", "baichuan", "yi", "deepseek_v2", "starcoder2", "falcon"}
# What a decoder's embedding recipe appends: Qwen's embedders end every text with <|endoftext|> (their
# tokenizers' eos is <|im_end|>, the chat turn end); the others with the tokenizer's eos token.
EOS_CANDIDATES = ("<|endoftext|>",)
INSTRUCTION = "Instruct: {instruction}\nQuery:"  # Qwen3-Embedding / gte-Qwen recipe; the text follows directly


def family(config) -> str:
    """'decoder' for decoder-only (causal) language models, else 'encoder'. `config`: a HF config or its dict."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("is_encoder_decoder", False):
        return "encoder"
    archs = get("architectures") or []
    if get("model_type") in DECODER_TYPES or any(a.endswith("ForCausalLM") for a in archs):
        return "decoder"
    return "encoder"


def instruction_prefix(instruction: str) -> str:
    """The text put before every input for an instruction-following embedder.

    >>> instruction_prefix("Classify the sentiment of a product review")
    'Instruct: Classify the sentiment of a product review\\nQuery:'
    """
    return INSTRUCTION.format(instruction=instruction.strip())


@dataclass
class Source:
    """A resolved model reference: `path` goes to from_pretrained; `folder` is the absolute local folder
    (None for a hub id, which is found through the cache from anywhere); `offline`: load from the
    cache only (the hub cannot be reached)."""
    path: str
    folder: str | None
    where: str
    offline: bool = False


def resolve(model: str, revision: str | None = None) -> Source:
    """Find `model`: a local folder, a built-in name, `modelscope:ORG/NAME`, or a hub id (see the module doc)."""
    if model.startswith("~"):  # `--model=~/x` reaches us unexpanded
        model = os.path.expanduser(model)
    if os.path.isdir(model):
        _refuse_bertcache_folder(model)
        if not any(os.path.isfile(os.path.join(model, f)) for f in ("config.json", "modules.json")):
            raise UserError(f"{model} is a folder but not a model folder (no config.json); give a Hugging Face model "
                            "folder (save_pretrained), a hub id (ORG/NAME), modelscope:ORG/NAME or 'e5-small'")
        return Source(model, os.path.abspath(model), "folder")
    if os.path.isfile(model):
        raise UserError(f"{model} is a file; give --model a model folder (save_pretrained), a hub id (ORG/NAME), "
                        f"{MODELSCOPE}ORG/NAME or 'e5-small'")
    if model == "e5-small":
        from .e5 import ensure_e5_small
        path = ensure_e5_small()
        return Source(path, os.path.abspath(path), "built-in")
    if model.startswith(MODELSCOPE):
        path = _modelscope(model[len(MODELSCOPE):], revision)
        return Source(path, os.path.abspath(path), "modelscope")
    if _looks_like_path(model):
        raise UserError(f"model not found: {model} is not a folder; give a model folder, a hub id (ORG/NAME), "
                        f"{MODELSCOPE}ORG/NAME or 'e5-small'")
    cached = _in_hf_cache(model, revision)
    reachable, why = hub_reachable()
    if cached:
        return Source(model, None, "hub cache", offline=not reachable)
    if not reachable:
        raise UserError(f"model {model!r} not found: no folder {os.path.abspath(model)}, not in the Hugging Face "
                        f"cache ({_hf_cache_dir()}), and {why}; check the path, or {hub_fixes(why, model)}")
    return Source(model, None, "hub")


def locate_model(encoder_settings: dict) -> str:
    """Where a checkpoint's model is, from any working directory: the absolute folder it was loaded from
    when that still exists, else the reference as typed (a hub id, a built-in name, a relative path)."""
    folder, ref = encoder_settings.get("model_path"), encoder_settings["model"]
    if folder and os.path.isdir(folder):
        return folder
    if folder and not os.path.isdir(ref) and ref != "e5-small" and not ref.startswith(MODELSCOPE):
        raise UserError(f"the checkpoint's model folder {folder} is gone (moved or deleted); pass --model with "
                        "where the model is now")
    return ref


def pinned(where: dict) -> bool:
    """Whether a hub id's files cannot change under a load with from_pretrained's keyword arguments `where`:
    offline, or a full commit hash asked for. Online, from_pretrained may fetch a newer revision than the
    cached snapshot."""
    from huggingface_hub import constants
    revision = where.get("revision") or ""
    return bool(where.get("local_files_only") or constants.HF_HUB_OFFLINE
                or re.fullmatch(r"[0-9a-f]{40}", revision))


def local_folder(path: str, where: dict, filename: str) -> str | None:
    """The folder from_pretrained(path, **where) reads `filename` from, where it is sure: `path` itself when
    it is a folder, else the cached hub snapshot holding `filename`, when the load is `pinned`. None when
    that is not known without asking the hub (the file is not cached, or a newer revision may be fetched).

        >>> local_folder("org/not-cached", {"local_files_only": True}, "config.json") is None
        True
    """
    if os.path.isdir(path):
        return path
    if not pinned(where):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(path, filename, revision=where.get("revision"))
    except Exception:  # not a valid repo id, say: nothing cached under it
        return None
    return os.path.dirname(hit) if isinstance(hit, str) else None


def cached_commit(path: str, revision: str | None = None) -> str | None:
    """The commit of the Hugging Face cache snapshot that from_pretrained(path, revision=revision) read a hub
    model's config.json from (the snapshot folder is named by it); None for a folder, or nothing cached.
    transformers 5 no longer records it in the config (`_commit_hash`).

        >>> cached_commit("org/not-cached") is None
        True
    """
    if os.path.isdir(path):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(path, "config.json", revision=revision)
    except Exception:  # not a valid repo id, say: nothing cached under it
        return None
    return os.path.basename(os.path.dirname(hit)) if isinstance(hit, str) else None


def hub_reachable() -> tuple[bool, str]:
    """(True, '') when the hub endpoint answers a TCP connection within PROBE_SECONDS, else (False, why).

    HF_HUB_OFFLINE=1 means no; behind a proxy (HTTPS_PROXY) the probe is left to the proxy (True)."""
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set (the hub is not asked)"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, ""
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False, f"HF_ENDPOINT {endpoint!r} is not a URL"
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return True, ""
    except OSError as e:
        return False, f"the hub {endpoint} cannot be reached ({e.strerror or type(e).__name__})"


def hub_fixes(why: str, ref: str | None = None) -> str:
    """What to try when the hub was not asked or not reached (`why`, from `hub_reachable`), after checking
    the path; `ref`: a model id, for which ModelScope is another source.

        >>> hub_fixes("HF_HUB_OFFLINE is set (the hub is not asked)", "google-bert/bert-base-chinese")
        'unset HF_HUB_OFFLINE to download it (with HF_ENDPOINT=https://hf-mirror.com for a mirror), or use modelscope:google-bert/bert-base-chinese'
    """
    if why.startswith("HF_HUB_OFFLINE"):  # HF_ENDPOINT is not read while it is set
        fixes = ["unset HF_HUB_OFFLINE to download it (with HF_ENDPOINT=https://hf-mirror.com for a mirror)"]
    else:
        fixes = ["set HF_ENDPOINT to a reachable mirror (e.g. HF_ENDPOINT=https://hf-mirror.com)"]
    if ref and ref.count("/") == 1:  # modelscope takes ORG/NAME
        fixes.append(f"use {MODELSCOPE}{ref}")
    return ", or ".join(fixes)


def _refuse_bertcache_folder(folder: str) -> None:
    """A checkpoint or an export given where an encoder goes: say which, and the encoder it names."""
    from .checkpoint import KINDS, _is_kind
    for kind in KINDS:
        if _is_kind(folder, kind):
            meta = os.path.join(folder, KINDS[kind][0])
            with open(meta, encoding="utf-8") as f:
                encoder = (json.load(f).get("encoder") or {}).get("model")
            raise UserError(f"{folder} is a bertcache {kind}, not an encoder"
                            + (f"; its encoder is {encoder!r}" if encoder else "")
                            + "; give --model a model folder, hub id or 'e5-small' (predict, evaluate and serve take this "
                              "folder as --checkpoint)")


def _looks_like_path(ref: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist is a mistyped path."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def _hf_cache_dir() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _in_hf_cache(repo_id: str, revision: str | None, repo_type: str = "model") -> bool:
    """Whether the cache holds `repo_id` (its config.json for a model, anything for a dataset)."""
    from huggingface_hub import try_to_load_from_cache
    if repo_type == "model":
        try:
            found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        except Exception:  # an id the hub library refuses (bad characters): not cached
            return False
        return isinstance(found, str)
    folder = os.path.join(_hf_cache_dir(), f"datasets--{repo_id.replace('/', '--')}")
    return os.path.isdir(folder)


def check_hub_dataset(name: str) -> None:
    """Fail at once when the dataset `name` is neither cached nor reachable (instead of retrying the hub)."""
    import datasets
    legacy = os.path.join(datasets.config.HF_DATASETS_CACHE, name.replace("/", "___"))
    if _in_hf_cache(name, None, "dataset") or os.path.isdir(legacy):
        return
    reachable, why = hub_reachable()
    if not reachable:
        raise UserError(f"data {name!r} not found: no file or folder {os.path.abspath(name)}, not in the datasets "
                        f"cache, and {why}; check the path, or {hub_fixes(why)}")


def _modelscope(name: str, revision: str | None) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise UserError(f"model {MODELSCOPE}{name} needs the modelscope package: pip install 'bertcache[modelscope]' "
                        "(or download the folder yourself and give its path)") from e
    try:
        return snapshot_download(name, **({"revision": revision} if revision else {}))
    except Exception as e:  # network, unknown id, ...: all mean "could not get it"
        raise UserError(f"cannot get {name} from ModelScope: {first_line(e)}; check the id, or download the folder "
                        "and give its path") from e
