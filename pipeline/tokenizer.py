"""A model's tokenizer, loaded as AutoTokenizer does, and remembered when that is slow.

transformers 5 builds some tokenizers again from the parts of their tokenizer.json on every load, in
Python: XLM-R's 250,002-piece Unigram (e5, bge-m3) takes over 2 s on a laptop core, a third of a
one-sentence `predict`. The first load here goes through AutoTokenizer as always. When it took longer
than `MEMO_MIN_SECONDS` and the class adds nothing to transformers' generic TokenizersBackend but its
constructor, the tokenizer it built is saved once under `$BERTCACHE_HOME/tokenizers/<key>`. The copy is
kept only if it reads back as a plain TokenizersBackend that encodes a set of probe texts (singles and
pairs, special tokens, odd spaces, truncation with overflow) to the same ids, masks, token types and
offsets and has the same special tokens and limits. Its tokenizer_config.json also lists the added
tokens, so that from_pretrained does not parse tokenizer.json in Python to find them. Later loads read
the copy in about a third of the time (0.71 s against 2.56 s for XLM-R; benchmarks/RESULTS.md). The key
covers the bytes of the tokenizer files and config.json (whose model type can pick the class), the
transformers and tokenizers versions and `MEMO_FORMAT`: a changed file or library makes a new copy; the most
recently used `MEMO_KEEP` are kept.

    >>> import tempfile
    >>> from pipeline.toy import toy_model
    >>> tok, name = load_tokenizer(toy_model(tempfile.mkdtemp()))
    >>> name, tok("很好")["input_ids"][0] == tok.cls_token_id
    ('BertTokenizer', True)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time

from .fingerprints import hash_model_files
from .models import local_folder

MEMO_MIN_SECONDS = 0.5  # tokenizers that load faster than this are not worth a copy on disk
MEMO_KEEP = 8  # copies kept (each the size of a tokenizer.json: 17 MB for XLM-R)
MEMO_FILE = "bertcache.json"  # written last: a folder without it is not a finished copy
MEMO_FORMAT = 2  # in the key: 2 = added tokens in tokenizer_config.json (copies of format 1 read slower)
PROBES = ["这本书写得真好，值得一读", "Hello,  world!\tTabs\nand  lines ", "  ", "", "a",
          "Ünïcödé ｆｕｌｌｗｉｄｔｈ １２３ 😀👍🏽", "query: 混合 English 文本 3.14"]
CLASS_ATTRS = ("model_input_names", "padding_side", "truncation_side")
SPECIAL_ATTRS = ("pad_token_id", "cls_token_id", "sep_token_id", "eos_token_id", "bos_token_id", "unk_token_id",
                 "mask_token_id", "all_special_ids", "model_max_length", "is_fast") + CLASS_ATTRS


def tokenizer_files(folder: str) -> list[str]:
    """The files in `folder` that define its tokenizer (what the model fingerprint hashes)."""
    return sorted(f for f in os.listdir(folder)
                  if f.startswith(("tokenizer", "vocab", "special_tokens", "sentencepiece", "spiece", "merges",
                                   "added_tokens")) or f.endswith((".model", ".spm")))


def load_tokenizer(path: str, *, memo_home: str | None = None, min_seconds: float | None = None, **where):
    """(tokenizer, class name): `AutoTokenizer.from_pretrained(path, **where)`, or its remembered copy.

    Args:
        path: what from_pretrained takes: a folder, or a hub id (remembered when its tokenizer.json is in
            the Hugging Face cache and the load is offline or names a full commit hash).
        memo_home: where copies go (default `$BERTCACHE_HOME/tokenizers`).
        min_seconds: a load faster than this is not remembered (default MEMO_MIN_SECONDS).
        where: from_pretrained's keyword arguments (revision, local_files_only).

    The class name is AutoTokenizer's class even when the copy (a TokenizersBackend) is returned, so
    that settings and fingerprints do not depend on which path loaded it. See the module doc.
    """
    from transformers import AutoTokenizer

    folder = local_folder(path, where, "tokenizer.json")
    memo = _memo_folder(folder, memo_home) if folder else None
    if memo and os.path.exists(os.path.join(memo, MEMO_FILE)):
        try:
            copy = _read_copy(memo)
        except Exception:  # unreadable (a library changed underneath, a file removed): load and copy again
            _remove(memo)
        else:
            try:
                os.utime(memo)  # pruning keeps the most recently used copies
            except OSError:
                pass
            return copy
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path, **where)
    if len(tok) <= len(set(tok.all_special_ids)):
        # transformers builds a tokenizer from its class defaults when the folder has no tokenizer files: every
        # text would become [UNK]s between its special tokens
        raise OSError(f"it knows only its {len(tok)} special tokens: no tokenizer files (tokenizer.json, vocab.txt, "
                      "...) were found; put the tokenizer's files beside the weights (tokenizer.save_pretrained)")
    name = type(tok).__name__
    least = MEMO_MIN_SECONDS if min_seconds is None else min_seconds
    if memo and time.perf_counter() - start >= least and _plain(type(tok)):
        _write_copy(tok, name, memo)
    return tok, name


def save_tokenizer(tok, name: str, folder: str) -> None:
    """`tok.save_pretrained(folder)`, with `name` (load_tokenizer's class name) as the saved tokenizer class,
    so that a remembered copy saves as the model's own tokenizer would."""
    tok.save_pretrained(folder)
    config = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            settings = json.load(f)
        settings["tokenizer_class"] = name
        with open(config, "w", encoding="utf-8") as f:
            json.dump(settings, f, ensure_ascii=False, indent=2)


def _memo_folder(folder: str, home: str | None) -> str | None:
    import tokenizers
    import transformers
    from .e5 import cache_home
    try:
        files = tokenizer_files(folder)
        if "tokenizer.json" not in files:  # only fast tokenizers are rebuilt, and only they can be copied
            return None
        # config.json too: without a tokenizer_class in tokenizer_config.json, the model type picks the class.
        files += ["config.json"] if os.path.isfile(os.path.join(folder, "config.json")) else []
        digest = hash_model_files(folder, files)
    except OSError:  # an unreadable or dangling file: AutoTokenizer may not need it, so load without a copy
        return None
    key = f"{digest} {transformers.__version__} {tokenizers.__version__} {MEMO_FORMAT}"
    key = hashlib.sha256(key.encode()).hexdigest()
    return os.path.join(home or os.path.join(cache_home(), "tokenizers"), key[:32])


def _plain(cls) -> bool:
    """Whether `cls` is a TokenizersBackend whose classes between it and TokenizersBackend define only a
    constructor and data (no methods that would behave differently on the generic class)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
    if not issubclass(cls, TokenizersBackend) or cls is TokenizersBackend:
        return False
    for klass in cls.__mro__[:cls.__mro__.index(TokenizersBackend)]:
        for attr, value in vars(klass).items():
            if attr in ("__init__", "model") or attr.startswith("__"):
                continue
            if callable(value) or isinstance(value, (property, classmethod, staticmethod)):
                return False
    return True


def _read_copy(memo: str):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
    with open(os.path.join(memo, MEMO_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    # The class's own defaults (BERT's token_type_ids among the inputs) are not in its saved config.
    return TokenizersBackend.from_pretrained(memo, **meta["init"]), meta["class"]


def _write_copy(tok, name: str, memo: str) -> None:
    """Save, read back, compare, then publish with one rename; any failure leaves no copy (an optimization)."""
    home = os.path.dirname(memo)
    tmp = None
    try:
        os.makedirs(home, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=home)
        tok.save_pretrained(tmp)
        _write_added_tokens(tok, tmp)
        with open(os.path.join(tmp, MEMO_FILE), "w", encoding="utf-8") as f:
            json.dump({"class": name, "init": {k: getattr(tok, k) for k in CLASS_ATTRS}}, f)
        copy, _ = _read_copy(tmp)
        if not same_tokenizer(tok, copy):
            return
        os.rename(tmp, memo)  # another process may have published first: then ours is dropped below
        tmp = None
        _prune(home)
    except Exception:
        pass
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_added_tokens(tok, folder: str) -> None:
    """Put the added tokens in the copy's tokenizer_config.json. Without them there, from_pretrained parses
    the whole tokenizer.json in Python to find them (about 0.6 s for XLM-R's 17 MB, before the Rust
    parse it makes anyway)."""
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["added_tokens_decoder"] = {
        str(i): {k: getattr(t, k) for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for i, t in sorted(tok.added_tokens_decoder.items())}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)


def _prune(home: str) -> None:
    """Keep the MEMO_KEEP most recently used copies; drop temporary folders an hour old (a killed writer's)."""
    names = os.listdir(home)
    copies = [os.path.join(home, d) for d in names if not d.startswith(".")]
    stale = [os.path.join(home, d) for d in names if d.startswith(".tmp-") and _age(os.path.join(home, d)) > 3600]
    for old in sorted(copies, key=os.path.getmtime, reverse=True)[MEMO_KEEP:] + stale:
        _remove(old)


def _age(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except OSError:  # gone meanwhile
        return 0.0


def _remove(folder: str) -> None:
    """Take `folder` out of readers' sight in one rename, then delete it: no reader sees half a copy."""
    gone = os.path.join(os.path.dirname(folder), f".tmp-gone-{os.getpid()}-{os.path.basename(folder)}")
    try:
        os.rename(folder, gone)
    except OSError:  # another process took it first
        return
    shutil.rmtree(gone, ignore_errors=True)


def same_tokenizer(a, b) -> bool:
    """Whether tokenizers `a` and `b` encode `PROBES` (alone, in pairs, cut with overflow) the same and agree
    on special tokens, vocabulary size and limits.

        >>> import tempfile
        >>> from pipeline.toy import toy_model
        >>> folder = toy_model(tempfile.mkdtemp())
        >>> same_tokenizer(load_tokenizer(folder)[0], load_tokenizer(folder)[0])
        True
    """
    if any(getattr(a, k, None) != getattr(b, k, None) for k in SPECIAL_ATTRS) or len(a) != len(b):
        return False
    texts = PROBES + [" ".join(a.all_special_tokens) + " x"]
    calls = [((texts,), {"return_offsets_mapping": True}), ((texts,), {"add_special_tokens": False}),
             ((texts,), {"truncation": True, "max_length": 6, "stride": 2, "return_overflowing_tokens": True}),
             ((texts, texts[::-1]), {"truncation": True, "max_length": 12, "return_token_type_ids": True})]
    return all(dict(a(*args, **kw)) == dict(b(*args, **kw)) for args, kw in calls)
