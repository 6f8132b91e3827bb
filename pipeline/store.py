"""The feature store: one HDF5 file holding the pooled vectors of every split.

Layout (readable with plain h5py; see README):
    /                 attrs: format="bertcache-features", complete, settings (JSON), label_names (JSON), ...
    /<split>/<feature>  float32 or float16 [N, hidden]   feature = cls, mean, cls_<layer>, mean_<layer>
    /<split>/label      int64 [N]    -1 = unlabelled
    /<split>/row        int64 [N]    row number in the source split
    /<split>          attrs: rows, rows_done, data_fingerprint, skipped

A file is written under `<name>.partial` in chunks of rows, each chunk followed by a flush and an
update of `rows_done`; only a complete file is renamed to its final name, so a reader never sees a
half-written cache there, and a killed run resumes from the last complete chunk.
"""
from __future__ import annotations

import hashlib
import json
import os

import h5py
import numpy as np

from . import __version__
from .errors import UserError

FORMAT = "bertcache-features"
FORMAT_VERSION = 1
STORE_DTYPES = ("float32", "float16")


def partial_path(path: str) -> str:
    return path + ".partial"


def data_fingerprint(texts: list[str], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def _json_attr(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


class FeatureStore:
    """Read side of a complete cache file."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            hint = " (a .partial file exists: the extraction did not finish; run extract again to resume)" \
                if os.path.exists(partial_path(path)) else ""
            raise UserError(f"features file not found: {path}{hint}")
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise UserError(f"{path} is not a readable HDF5 file (truncated or another format): {e}") from e
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT:
            self.file.close()
            raise UserError(f"{path} is an HDF5 file but not a bertcache features file; make one with `bertcache extract`")
        if not attrs.get("complete", False):
            self.file.close()
            raise UserError(f"{path} is an incomplete extraction; run extract again to finish it")
        self.path = path
        self.settings = json.loads(attrs["settings"])
        self.label_names = json.loads(attrs["label_names"])
        self.feature_names = json.loads(attrs["feature_names"])
        self.source = attrs.get("source", "")
        self.splits = [s for s in json.loads(attrs["splits"])]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.file.close()

    def require_split(self, split: str) -> h5py.Group:
        if split not in self.splits:
            raise UserError(f"split {split!r} is not in {self.path}; it has: {', '.join(self.splits)}")
        return self.file[split]

    def rows(self, split: str) -> int:
        return int(self.require_split(split).attrs["rows"])

    def labels(self, split: str) -> np.ndarray:
        return self.require_split(split)["label"][:]

    def features(self, split: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
        group = self.require_split(split)
        names = names or self.feature_names
        missing = [n for n in names if n not in self.feature_names]
        if missing:
            raise UserError(f"{self.path} has no feature {missing[0]!r}; it has: {', '.join(self.feature_names)} "
                            "(extract with more --layers for deeper poolings)")
        return {n: group[n][:].astype(np.float32, copy=False) for n in names}

    def info(self) -> dict:
        return {"path": self.path, "source": self.source, "label_names": self.label_names,
                "features": self.feature_names, "settings": self.settings,
                "fingerprint": self.file.attrs.get("fingerprint"),
                "splits": {s: {"rows": self.rows(s), "labelled": int((self.labels(s) >= 0).sum())}
                           for s in self.splits}}


class StoreWriter:
    """Write side: creates or resumes `<path>.partial`, renames it to `path` when complete."""

    def __init__(self, path: str, *, settings: dict, splits: dict[str, dict], label_names: list[str],
                 feature_names: list[str], hidden_size: int, source: str, store_dtype: str = "float32",
                 chunk_rows: int = 2048, restart: bool = False):
        if store_dtype not in STORE_DTYPES:
            raise UserError(f"unknown --store-dtype {store_dtype!r}; use float32 or float16")
        self.path, self.tmp = path, partial_path(path)
        self.chunk_rows = int(chunk_rows)
        fingerprint = hashlib.sha256(_json_attr([settings, store_dtype, {s: v["fingerprint"]
                                                                         for s, v in splits.items()}]).encode()).hexdigest()[:32]
        expected = {"settings": settings, "store_dtype": store_dtype, "label_names": label_names,
                    "splits": {s: {"rows": v["rows"], "fingerprint": v["fingerprint"]} for s, v in splits.items()}}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise UserError(f"cannot write to {folder}: the folder is read-only; choose another --out")
        self.already_complete = False
        if restart:
            for p in (self.tmp,):
                if os.path.exists(p):
                    os.remove(p)
        elif os.path.exists(path):
            diff = _differences(_describe(path), expected)
            if diff:
                raise UserError(f"{path} exists and was made with different settings or data ({diff}); "
                                "pass --restart to overwrite it, or choose another --out")
            self.already_complete = True
            return
        if os.path.exists(self.tmp):
            try:
                diff = _differences(_describe(self.tmp), expected)
            except (OSError, KeyError, ValueError):
                diff = None  # unreadable leftover of a killed run: start over
                os.remove(self.tmp)
            if diff:
                raise UserError(f"{self.tmp} is an unfinished extraction with different settings or data ({diff}); "
                                "pass --restart to start over")
        if os.path.exists(self.tmp):
            self.file = h5py.File(self.tmp, "r+")
        else:
            self.file = self._create(settings, splits, label_names, feature_names, hidden_size, source,
                                     store_dtype, fingerprint)

    def _create(self, settings, splits, label_names, feature_names, hidden_size, source, store_dtype, fingerprint):
        f = h5py.File(self.tmp, "w")
        a = f.attrs
        a["format"] = FORMAT
        a["format_version"] = FORMAT_VERSION
        a["package_version"] = __version__
        a["complete"] = False
        a["settings"] = _json_attr(settings)
        a["label_names"] = _json_attr(label_names)
        a["feature_names"] = _json_attr(feature_names)
        a["splits"] = _json_attr(list(splits))
        a["source"] = source
        a["store_dtype"] = store_dtype
        a["fingerprint"] = fingerprint
        a["chunk_rows"] = self.chunk_rows
        for key in ("model", "revision", "commit", "model_fingerprint", "max_length", "prefix", "precision"):
            a[key] = "" if settings.get(key) is None else settings[key]
        for split, spec in splits.items():
            g = f.create_group(split)
            n = int(spec["rows"])
            chunk = (max(1, min(n, self.chunk_rows)),)
            for name in feature_names:
                g.create_dataset(name, shape=(n, hidden_size), dtype=store_dtype,
                                 chunks=(chunk[0], hidden_size) if n else None)
            g.create_dataset("label", shape=(n,), dtype="int64", chunks=chunk if n else None)
            g.create_dataset("row", shape=(n,), dtype="int64", chunks=chunk if n else None)
            g.attrs["rows"] = n
            g.attrs["rows_done"] = 0
            g.attrs["data_fingerprint"] = spec["fingerprint"]
            g.attrs["skipped"] = int(spec.get("skipped", 0))
        f.flush()
        return f

    def rows_done(self, split: str) -> int:
        return int(self.file[split].attrs["rows_done"])

    def write(self, split: str, start: int, features: dict[str, np.ndarray], labels: np.ndarray, rows: np.ndarray):
        """Write rows [start, start + len(labels)) of `split`, then record them as done."""
        g = self.file[split]
        stop = start + len(labels)
        for name, values in features.items():
            g[name][start:stop] = values
        g["label"][start:stop] = labels
        g["row"][start:stop] = rows
        self.file.flush()
        g.attrs["rows_done"] = stop
        self.file.flush()

    def read(self, split: str, index: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Rows already written (for texts seen earlier in the run), in the order of `index`."""
        uniq, inverse = np.unique(index, return_inverse=True)
        g = self.file[split]
        return {n: g[n][uniq][inverse].astype(np.float32) for n in names}

    def finish(self):
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        """Close without completing; the .partial file stays for a resume."""
        try:
            self.file.close()
        except Exception:  # closing a file after a failed write can fail again; nothing more to save
            pass


def _describe(path: str) -> dict:
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise UserError(f"{path} exists and is not a bertcache features file; choose another --out")
        return {"settings": json.loads(f.attrs["settings"]), "store_dtype": f.attrs["store_dtype"],
                "label_names": json.loads(f.attrs["label_names"]),
                "splits": {s: {"rows": int(f[s].attrs["rows"]), "fingerprint": f[s].attrs["data_fingerprint"]}
                           for s in json.loads(f.attrs["splits"])}}


def _differences(old: dict, new: dict) -> str:
    """Which settings differ, as `key: old -> new`, '' when none."""
    diffs = []
    for key in sorted(set(old["settings"]) | set(new["settings"])):
        a, b = old["settings"].get(key), new["settings"].get(key)
        if a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
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
