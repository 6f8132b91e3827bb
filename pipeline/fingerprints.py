"""Identities and their differences: what decides whether a cache, a partial file or a head still fits.

A data fingerprint names a split's content, a cache fingerprint a whole features file, and the model
fingerprint (encoder.py) the encoder's weights, config and tokenizer. `settings_differences` says, as
`key: old -> new`, why two of them are not the same.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from .errors import UserError


def data_fingerprint(texts: list[str], labels: np.ndarray, rows: np.ndarray | None = None) -> str:
    """Identity of a split's cached content: its texts, labels and (when given) source row numbers."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    if rows is not None:
        h.update(b"rows")
        h.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


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
VECTOR_SETTINGS = ("model", "model_fingerprint", "max_length", "prefix", "precision", "hidden_size")


def check_same_encoder(checkpoint: dict, settings: dict, what: str) -> None:
    """Refuse an encoder (or a cache) whose vectors differ from those the head was trained on."""
    trained = checkpoint["encoder"]
    keys = [k for k in VECTOR_SETTINGS if k in trained]
    diffs = settings_differences(trained, settings, keys)
    if any(not d.startswith("model:") for d in diffs):  # a path alone is not a difference
        raise UserError(f"this checkpoint's head was trained on vectors of model {trained.get('model')!r}, but {what} "
                        f"differs ({'; '.join(diffs)}): use the encoder and settings the head was trained with")
