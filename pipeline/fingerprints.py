"""Identities and their differences: what decides whether a cache, a partial file or a head still fits.

A data fingerprint names a split's content, a cache fingerprint a whole features file, and the model
fingerprint (encoder.py) the encoder's weights, config and tokenizer. `settings_differences` says, as
`key: old -> new`, why two of them are not the same.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import numpy as np

from .errors import UserError


def data_fingerprint(texts: list[str], labels: np.ndarray, rows: np.ndarray | None = None,
                     pairs: list[str] | None = None) -> str:
    """Identity of a split's cached content: its texts (and second texts), labels and (when given) source
    row numbers. Class ids hash as they always did; targets and label matrices with their layout."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    if pairs is not None:
        h.update(b"pairs")
        for t in pairs:
            h.update(t.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
    labels = np.asarray(labels)
    if labels.dtype.kind == "f" or labels.ndim > 1:
        h.update(f"{labels.dtype.str}{labels.shape}".encode())
        h.update(np.ascontiguousarray(labels).tobytes())
    else:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if rows is not None:
        h.update(b"rows")
        h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


MEMO_MIN_BYTES = 64 << 20  # file sets smaller than this hash in under 0.05 s: not worth remembering
MEMO_ENTRIES = 64
_RACY_NS = 3_000_000_000  # files modified this recently are not remembered (coarse file-system clocks)


def hash_files(folder: str, names: list[str], memo: str | None = None, min_bytes: int = MEMO_MIN_BYTES) -> str:
    """sha256 over each file's name and bytes, in name order (a model's weights or tokenizer files).

    Every load of a model fingerprints its weights, gigabytes for today's embedders (seconds per
    `predict`). With `memo` (a JSON file), a set of at least `min_bytes` whose files have the same size,
    modification time and inode as when it was last hashed is not read again; the digest is the same
    either way. Files modified in the last few seconds are not remembered, as git does for its index.

        >>> import tempfile, pathlib
        >>> d = tempfile.mkdtemp(); _ = pathlib.Path(d, "w.bin").write_bytes(b"weights")
        >>> hash_files(d, ["w.bin"]) == hash_files(d, ["w.bin"], memo=f"{d}/memo.json", min_bytes=0)
        True
    """
    names = sorted(names)
    paths = [os.path.join(folder, n) for n in names]

    def state():
        return [[s.st_size, s.st_mtime_ns, s.st_ino] for s in map(os.stat, paths)]
    before = state()
    use = memo is not None and sum(s[0] for s in before) >= min_bytes
    key = json.dumps([os.path.realpath(folder), names], ensure_ascii=False)
    table = _read_memo(memo) if use else {}
    hit = table.get(key)
    if isinstance(hit, dict) and hit.get("state") == before and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    for name, path in zip(names, paths):
        h.update(name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    digest = h.hexdigest()
    now = time.time_ns()
    if use and state() == before and all(now - s[1] > _RACY_NS for s in before):
        table.pop(key, None)
        table[key] = {"state": before, "sha256": digest}
        _write_memo(memo, dict(list(table.items())[-MEMO_ENTRIES:]))
    return digest


def hash_model_files(folder: str, names: list[str]) -> str:
    """`hash_files` of a model's files (weights, tokenizer), remembered in `$BERTCACHE_HOME/file-hashes.json`."""
    from .e5 import cache_home
    return hash_files(folder, names, memo=os.path.join(cache_home(), "file-hashes.json"))


def _read_memo(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):  # none yet, unreadable or half-understood: hash as if there were none
        return {}


def _write_memo(path: str, table: dict) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # threads of one process write apart too
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(table, f, ensure_ascii=False)
        os.replace(tmp, path)  # concurrent writers: the last one wins, the others' entries are hashed again
    except (OSError, ValueError):  # a read-only home, say: remembering is an optimization only
        try:
            os.remove(tmp)
        except OSError:
            pass


def cache_fingerprint(settings: dict, store_dtype: str, splits: dict[str, dict]) -> str:
    """Identity of a whole cache: settings, store dtype and every split's data fingerprint."""
    return hashlib.sha256(json_attr([settings, store_dtype, {s: v["fingerprint"] for s, v in splits.items()}])
                          .encode()).hexdigest()[:32]


def json_attr(value) -> str:
    """JSON as stored in the file's attributes (and hashed): keys sorted, text as is."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# Where the model was found, not what it is: ignored when the model fingerprints agree, so a moved
# model folder (or a hub model copied to disk) does not invalidate a cache.
LOCATION_KEYS = ("model", "model_path", "revision", "commit")


def settings_differences(old: dict, new: dict, keys=None) -> list[str]:
    """`key: old -> new` for every setting that differs (of `keys`, default all)."""
    same_model = bool(old.get("model_fingerprint")) and old.get("model_fingerprint") == new.get("model_fingerprint")
    diffs = []
    for key in keys or sorted(set(old) | set(new)):
        if same_model and key in LOCATION_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if a != b:
            if key.endswith(("fingerprint", "hash")):  # enough hex digits to tell them apart
                a, b = (v[:12] if isinstance(v, str) else v for v in (a, b))
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def describe_differences(old: dict, new: dict) -> str:
    """Which settings differ, as `key: old -> new`, '' when none."""
    diffs = settings_differences(old["settings"], new["settings"])
    if old["store_dtype"] != new["store_dtype"]:
        diffs.append(f"store_dtype: {old['store_dtype']} -> {new['store_dtype']}")
    if old["label_names"] != new["label_names"]:
        diffs.append(f"label names: {old['label_names']} -> {new['label_names']}")
    if list(old["splits"]) != list(new["splits"]):
        diffs.append(f"splits: {list(old['splits'])} -> {list(new['splits'])}")
    else:
        for s in new["splits"]:
            if old["splits"][s] != new["splits"][s]:
                diffs.append(f"the data of split {s!r}")
    return "; ".join(diffs)


# The encoder settings that decide what a vector means: a head is only valid on vectors made the same way.
VECTOR_SETTINGS = ("model", "model_fingerprint", "max_length", "prefix", "precision", "hidden_size", "long_texts",
                   "stride")


def check_same_encoder(checkpoint: dict, settings: dict, what: str, commitless: str | None = None) -> None:
    """Refuse an encoder (or a cache) whose vectors differ from those the head was trained on. `commitless`: the
    encoder's fingerprint without its hub commit (Encoder.commitless_fingerprint), which a checkpoint that
    recorded no commit was made with."""
    trained = checkpoint["encoder"]
    if commitless and trained.get("commit") is None and trained.get("model_fingerprint") == commitless:
        trained = {**trained, "model_fingerprint": settings.get("model_fingerprint")}
    keys = [k for k in VECTOR_SETTINGS if k in trained]
    diffs = settings_differences(trained, settings, keys)
    if any(not d.startswith("model:") for d in diffs):  # a path alone is not a difference
        raise UserError(f"this checkpoint's head was trained on vectors of model {trained.get('model')!r}, but {what} "
                        f"differs ({'; '.join(diffs)}): use the encoder and settings the head was trained with")
