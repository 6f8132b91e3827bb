"""The feature store: one HDF5 file holding the pooled vectors of every split.

Layout (readable with plain h5py; see README):
    /                 attrs: format="bertcache-features", complete, settings (JSON), label_names (JSON), ...
    /<split>/<feature>  float32 or float16 [N, hidden]   feature = cls, mean, last, cls_<layer>, ..., sentence
                                     (a width other than hidden is named in settings' feature_dims)
    /<split>/label      by task (settings' "task", tasks.py): classification int64 [N] (-1 = unlabelled),
                        regression float64 [N] (NaN = unlabelled), multilabel int8 [N, labels] (-1 rows)
    /<split>/row        int64 [N]    row number in the source split
    /<split>/text_utf8     uint8 [B]    every row's text, UTF-8, back to back (B bytes in all)
    /<split>/text_offsets  int64 [N+1]  row i's text is text_utf8[text_offsets[i]:text_offsets[i+1]]
    /<split>          attrs: rows, rows_done, data_fingerprint, skipped
  with `extract --states K` (settings["states"] = {"layer": L-K, "k": K, "dtype": ...}), per split also:
    /<split>/states   [tokens, hidden]  the token-level hidden states entering the top K layers
                      (hidden_states[L-K]), every row's tokens one after another, no padding; float32,
                      float16, or bfloat16 stored as its raw 16 bits (uint16)
    /<split>/offsets  int64 [N + 1]  row i's tokens are states[offsets[i]:offsets[i+1]]

Sentence pairs cached apart (settings' pair_mode "bi"): every distinct text of either column is one row
of the group `texts` (its features, label -1, row = its number); a data split then holds no features but
`pair` int64 [N, 2], the `texts` rows of its first and second texts (written with the layout), and
`FeatureStore.features` gives [N, 2, hidden] per feature.

The texts (for error analysis: `evaluate --errors`, `info --rows`) are written whole with the layout,
before any vector; they cost their UTF-8 bytes plus 8 bytes a row. Files from before they were kept have no text
datasets and read as having none; a file joined from distributed shards holds a real copy of theirs.

A file is written under `<name>.partial` in chunks of rows, each chunk followed by a flush and an
update of `rows_done`; only a complete file is renamed to its final name, so a reader never sees a
half-written cache there, and a killed run resumes from the last complete chunk.

HDF5 itself is not crash-safe: a process killed while HDF5 updates its metadata can leave a file that
does not open, or opens with a broken structure. So the layout is made so that, once created, writing
rows changes no HDF5 metadata at all: the whole layout is written under a temporary name and renamed to
`.partial` only when complete; datasets are contiguous and allocated (and the disk space reserved) at
creation; rows go straight to their final bytes (no sieve buffer), and `rows_done` is overwritten in place.
A `.partial` is still checked when reopened (readable, layout as expected, `rows_done` in range), and
one that fails is started over. SWMR (`libver="latest"`) was not used: its writer may only write
dataset data, and a writer killed under it leaves a flag that makes the file refuse to open until
`h5clear` is run.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil

import h5py
import numpy as np

from ._version import __version__
from .errors import UserError, first_line, write_error
from .fingerprints import cache_fingerprint, describe_differences, json_attr
from .poolings import feature_dim
from .tasks import label_layout, labelled, task_of

try:
    import resource
except ImportError:  # Windows: no file size limits to check
    resource = None

FORMAT = "bertcache-features"
TEXTS = "texts"  # the group of distinct texts in a pair cache (pair_mode "bi")
FORMAT_VERSION = 1
STORE_DTYPES = ("float32", "float16")
STATES_DTYPES = ("bfloat16", "float16", "float32")  # bfloat16 is kept as its upper 16 bits in uint16
_RESUMABLE = " (the rows written so far are kept: run extract again to resume)"


def partial_path(path: str) -> str:
    return path + ".partial"


def layout_problem(f: h5py.File, complete: bool) -> str | None:
    """What is wrong with the structure of an open features file (None: nothing).

    Every split must hold every feature as [rows, hidden] of the store dtype, `label` and `row` as
    [rows] integers, and 0 <= rows_done <= rows (== rows when `complete`): splits cannot disagree on
    the feature set or width, and a killed run's file is never taken for a finished one.
    """
    a = f.attrs
    try:
        feature_names = json.loads(a["feature_names"])
        splits = json.loads(a["splits"])
        settings = json.loads(a["settings"])
        dims = {n: feature_dim(settings, n) for n in feature_names}
        dtype = np.dtype(str(a["store_dtype"]))
        num_labels = len(json.loads(a["label_names"]))
        task = task_of(settings)
        label_tail, label_dtype = label_layout(task, num_labels)
        bi = settings.get("pair_mode") == "bi"
    except (KeyError, ValueError, TypeError) as e:
        return f"its attributes are incomplete or invalid ({type(e).__name__}: {e})"
    for s in splits:
        g = f.get(s)
        if not isinstance(g, h5py.Group):
            return f"split {s!r} is missing"
        try:
            rows, done = int(g.attrs["rows"]), int(g.attrs["rows_done"])
        except (KeyError, ValueError, TypeError):
            return f"split {s!r} has no valid rows / rows_done attributes"
        is_texts = bi and s == TEXTS
        names = feature_names + ["label", "row"] if not bi or is_texts else ["label", "row", "pair"]
        for name in names:
            d = g.get(name)
            shape, kind = ((rows, dims[name]), dtype) if name in feature_names else ((rows,), np.dtype("int64"))
            if name == "label" and not is_texts:
                shape, kind = (rows, *label_tail), np.dtype(label_dtype)
            if name == "pair":
                shape = (rows, 2)
            if not isinstance(d, h5py.Dataset):
                return f"split {s!r} has no {name!r} dataset"
            if d.shape != shape or d.dtype != kind:
                return f"split {s!r}: {name!r} is {d.dtype}{list(d.shape)}, expected {kind}{list(shape)}"
        if "text_offsets" in g or "text_utf8" in g:
            offsets, data = g.get("text_offsets"), g.get("text_utf8")
            if not isinstance(offsets, h5py.Dataset) or not isinstance(data, h5py.Dataset) \
                    or offsets.shape != (rows + 1,) or len(data.shape) != 1:
                return f"split {s!r} has a broken text_offsets / text_utf8 pair"
        states = settings.get("states")
        if states:
            hidden = int(settings["hidden_size"])
            st, off = g.get("states"), g.get("offsets")
            if not isinstance(st, h5py.Dataset) or not isinstance(off, h5py.Dataset) or off.shape != (rows + 1,):
                return f"split {s!r} has no valid states / offsets datasets"
            if st.shape[1:] != (hidden,) or st.dtype != np.dtype(states_storage(states["dtype"])):
                return f"split {s!r}: states are {st.dtype}{list(st.shape)}, expected {states['dtype']} [*, {hidden}]"
        storage = storage_problem(f, s)
        if storage:
            return storage
        if not 0 <= done <= rows or (complete and done != rows):
            return f"split {s!r} has {done} of {rows} rows written"
        if complete and rows and task == "classification" and not is_texts:
            labels = g["label"][:]
            bad = (labels < -1) | (labels >= num_labels)
            if bad.any():
                return (f"split {s!r} has label id {int(labels[bad][0])}, outside the {num_labels} label names "
                        "(-1 = unlabelled)")
    return None


def storage_problem(f: h5py.File, split: str) -> str | None:
    """What is wrong with where a split's datasets keep their bytes (None: nothing). extract allocates every
    dataset whole in the file (or, joined from shards, maps rows of the shard files beside it), so a dataset
    whose declared size the file does not hold is refused: a file of a few KB can declare billions of rows,
    and reading them would fill memory; HDF5's external storage (a dataset kept in any other file, such as
    ~/.ssh/id_rsa) is refused too."""
    folder = os.path.dirname(os.path.abspath(f.filename))
    for name, d in f[split].items():
        if not isinstance(d, h5py.Dataset):
            continue
        where = f"split {split!r}: {name!r}"
        if d.external:
            return f"{where} is kept in another file ({d.external[0][0]}), which bertcache never writes"
        if not d.is_virtual:
            held = d.id.get_storage_size()
            if held < d.nbytes:
                return f"{where} declares {list(d.shape)} ({d.nbytes} bytes) but the file holds {held} bytes of it"
            continue
        held, seen = 0, set()
        for source in d.virtual_sources():
            file = source.file_name
            if os.path.basename(file) != file or file in (".", "..") or not os.path.isfile(os.path.join(folder, file)):
                return f"{where} maps rows of {file!r}, not of a shard file beside it"
            if (file, source.dset_name) in seen:
                continue
            seen.add((file, source.dset_name))
            with h5py.File(os.path.join(folder, file), "r") as shard:
                got = shard.get(source.dset_name)
                if not isinstance(got, h5py.Dataset) or got.is_virtual or got.external:
                    return f"{where} maps {file}:{source.dset_name}, which is not a plain dataset"
                held += got.id.get_storage_size()
        if held < d.nbytes:
            return f"{where} declares {list(d.shape)} ({d.nbytes} bytes) but its shards hold {held} bytes of it"
    return None


class FeatureStore:
    """Read side of a complete cache file: its splits, pooled features, labels, texts and settings.

    Args:
        path: a features file written by `extract` (a `.partial` one is refused: resume the extract).

        >>> import tempfile
        >>> from pipeline.toy import toy_features
        >>> with FeatureStore(toy_features(tempfile.mkdtemp())) as store:
        ...     store.splits, store.feature_names, store.rows("test"), store.features("train", ["cls"])["cls"].shape
        (['train', 'validation', 'test'], ['cls', 'mean', 'last'], 40, (160, 32))
    """

    def __init__(self, path: str):
        if not os.path.exists(path):
            hint = " (a .partial file exists: the extraction did not finish; run extract again to resume)" \
                if os.path.exists(partial_path(path)) else ""
            raise UserError(f"features file not found: {path}{hint}")
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder, not a features file; give the .h5 file `bertcache extract` wrote")
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise UserError(f"{path} is not a readable HDF5 file (truncated or another format): {first_line(e)}") from e
        try:
            self._open(path)
        except OSError as e:  # HDF5's read errors: a file damaged after it opened
            self.file.close()
            raise _damaged(path, e) from e

    def _open(self, path: str) -> None:
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT:
            self.file.close()
            raise UserError(f"{path} is an HDF5 file but not a bertcache features file; make one with `bertcache extract`")
        if not attrs.get("complete", False):
            self.file.close()
            raise UserError(f"{path} is an incomplete extraction; run extract again to finish it")
        # A file joined from the shards of a distributed extract reads them through virtual datasets;
        # HDF5 would silently fill rows of a missing shard with zeros.
        self.shards = json.loads(attrs.get("shards", "[]"))
        folder = os.path.dirname(os.path.abspath(path))
        missing = [s["file"] for s in self.shards if not os.path.exists(os.path.join(folder, s["file"]))]
        if missing:
            self.file.close()
            raise UserError(f"{path} is joined from shard files that are missing ({', '.join(missing)}); "
                            "keep the .shard-* files in the same folder as the joined file (a lost one: run the "
                            "same torchrun extract again, which encodes it again)")
        try:
            problem = layout_problem(self.file, complete=True)
        except OSError as e:  # a damaged file can open and still fail on the first read
            problem = f"it cannot be read ({first_line(e)})"
        if problem:
            self.file.close()
            raise UserError(f"{path} is not a consistent features file: {problem}; extract it again with --restart")
        self.path = path
        self.settings = json.loads(attrs["settings"])
        self.label_names = json.loads(attrs["label_names"])
        self.feature_names = json.loads(attrs["feature_names"])
        self.source = attrs.get("source", "")
        self.task = task_of(self.settings)
        self.pair_mode = self.settings.get("pair_mode")
        self.splits = [s for s in json.loads(attrs["splits"]) if not (self.pair_mode == "bi" and s == TEXTS)]

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        self.close()
        if isinstance(exc, OSError) and not getattr(exc, "errno", None) and "read" in str(exc).lower():
            # HDF5's own read errors (no errno): a file damaged after it opened, inside a data block
            raise _damaged(self.path, exc) from exc

    def close(self):
        """Close the file (what leaving a `with FeatureStore(path) as store:` block does)."""
        self.file.close()

    def require_split(self, split: str) -> h5py.Group:
        """The HDF5 group of a split; a UserError naming the file's splits when it has no such split.

        Args:
            split: a split of the file, e.g. "train" (see `splits`).

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> path = toy_features(tempfile.mkdtemp())
            >>> with FeatureStore(path) as store:
            ...     sorted(store.require_split("test"))
            ['cls', 'label', 'last', 'mean', 'row', 'text_offsets', 'text_utf8']
            >>> with FeatureStore(path) as store:
            ...     store.require_split("dev")
            Traceback (most recent call last):
            pipeline.errors.UserError: split 'dev' is not in .../toy.h5; it has: train, validation, test
        """
        if split not in self.splits:
            raise UserError(f"split {split!r} is not in {self.path}; it has: {', '.join(self.splits)}")
        return self.file[split]

    def rows(self, split: str) -> int:
        """How many rows a split has (labelled or not).

        Args:
            split: a split of the file, e.g. "train".

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> with FeatureStore(toy_features(tempfile.mkdtemp())) as store:
            ...     [store.rows(split) for split in store.splits]
            [160, 40, 40]
        """
        return int(self.require_split(split).attrs["rows"])

    def labels(self, split: str) -> np.ndarray:
        """A split's labels, per task: classification int64 [rows] ids into `label_names` (-1: unlabelled),
        regression float64 [rows] (NaN: unlabelled), multilabel int8 [rows, labels] (a row of -1: unlabelled).

        Args:
            split: a split of the file, e.g. "train".

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> with FeatureStore(toy_features(tempfile.mkdtemp())) as store:
            ...     store.label_names, store.labels("test")[:4].tolist()
            (['正向', '负向'], [0, 1, 0, 1])
        """
        return self.require_split(split)["label"][:]

    def features(self, split: str, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """A split's pooled vectors, float32, by feature name: [rows, width] each ([rows, 2, width] in a pair
        cache of `--pair-mode bi`: the first and second text of every row).

        Args:
            split: a split of the file, e.g. "train".
            names: the features to read (see `feature_names`) [None: all]; one the file lacks is a UserError.

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> with FeatureStore(toy_features(tempfile.mkdtemp())) as store:
            ...     {name: vectors.shape for name, vectors in store.features("test", ["cls", "mean"]).items()}
            {'cls': (40, 32), 'mean': (40, 32)}
        """
        group = self.require_split(split)
        names = names or self.feature_names
        missing = [n for n in names if n not in self.feature_names]
        if missing:
            name = missing[0]
            no_cls = name.split("_")[0] == "cls" and not any(n.split("_")[0] == "cls" for n in self.feature_names)
            raise UserError(f"{self.path} has no feature {name!r}; it has: {', '.join(self.feature_names)}"
                            + (" (a decoder has no [CLS]: pool with last or mean)" if no_cls else
                               " (extract with more --layers for deeper poolings)" if re.search(r"_\d+$", name)
                               else ""))
        if self.pair_mode == "bi":  # u and v of every row, from the distinct texts' vectors
            pair = group["pair"][:]
            uniq, inverse = np.unique(pair.ravel(), return_inverse=True)
            texts = self.file[TEXTS]
            return {n: texts[n][uniq].astype(np.float32, copy=False)[inverse].reshape(len(pair), 2, -1)
                    for n in names}
        return {n: group[n][:].astype(np.float32, copy=False) for n in names}

    def _text_group(self, split: str) -> h5py.Group:
        """A split, or in a pair cache (`--pair-mode bi`) also `texts`, the group of its distinct texts."""
        return self.file[TEXTS] if split == TEXTS and self.pair_mode == "bi" else self.require_split(split)

    def has_texts(self, split: str) -> bool:
        """Whether the file keeps a split's texts (not when extracted with keep_texts=False, or by a version
        from before texts were kept).

        Args:
            split: a split of the file, or in a pair cache of `--pair-mode bi` also "texts" (its distinct texts).

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> with FeatureStore(toy_features(tempfile.mkdtemp())) as store:
            ...     store.has_texts("test")
            True
        """
        return "text_offsets" in self._text_group(split)

    def texts(self, split: str, index: np.ndarray | None = None) -> list[str] | None:
        """Texts of a split's rows (all, or rows `index`, in that order); None for a file without texts.

        Args:
            split: a split of the file, or in a pair cache of `--pair-mode bi` also "texts" (its distinct texts).
            index: row numbers to read [None: every row].

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> with FeatureStore(toy_features(tempfile.mkdtemp())) as store:
            ...     len(store.texts("test")), store.texts("test", [1, 0])
            (40, ['以退', '可不我得推'])
        """
        group = self._text_group(split)
        if "text_offsets" not in group:
            return None
        offsets, data = group["text_offsets"][:], group["text_utf8"]
        if index is None:
            blob = data[:].tobytes()
            return [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:])]
        return [data[offsets[i]:offsets[i + 1]].tobytes().decode("utf-8") for i in np.asarray(index, dtype=np.int64)]

    @property
    def states_settings(self) -> dict | None:
        """{"layer", "k", "dtype"} of the cached token states (extract --states), None when there are none.

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> with FeatureStore(toy_features(tempfile.mkdtemp())) as store:
            ...     store.states_settings is None
            True
        """
        return self.settings.get("states")

    def states(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split's token states as stored (flat [tokens, hidden]; bfloat16 as uint16 bits) and its offsets
        (int64 [rows + 1]: row i's tokens are states[offsets[i]:offsets[i + 1]]); a UserError for a file without.

        Args:
            split: a split of the file, e.g. "train".

            >>> import tempfile
            >>> from pipeline.extract import extract
            >>> from pipeline.toy import toy_data, toy_model
            >>> tmp = tempfile.mkdtemp()
            >>> path = extract(toy_model(f"{tmp}/model"), toy_data(f"{tmp}/data", 8, 4, 4), f"{tmp}/states.h5",
            ...                states=1, precision="fp32", device="cpu", progress=False, log=lambda msg: None)
            >>> with FeatureStore(path) as store:
            ...     states, offsets = store.states("train")
            ...     store.states_settings, states.shape[1], states.dtype, offsets.shape
            ({'dtype': 'bfloat16', 'k': 1, 'layer': 2}, 32, dtype('uint16'), (9,))
        """
        if not self.states_settings:
            raise UserError(f"{self.path} holds no token states; extract with --states K")
        g = self.require_split(split)
        return g["states"][:], g["offsets"][:]

    def info(self) -> dict:
        """What `bertcache info` shows: path, source, task, label_names, feature_names, settings, fingerprint,
        shards, and per split its rows and labelled rows (and tokens, with cached states).

            >>> import tempfile
            >>> from pipeline.toy import toy_features
            >>> with FeatureStore(toy_features(tempfile.mkdtemp())) as store:
            ...     info = store.info()
            >>> info["task"], info["splits"]["train"]
            ('classification', {'rows': 160, 'labelled': 160})
        """
        return {"path": self.path, "source": self.source, "task": self.task, "label_names": self.label_names,
                "feature_names": self.feature_names, "settings": self.settings,
                "fingerprint": self.file.attrs.get("fingerprint"), "shards": self.shards,
                "splits": {s: {"rows": self.rows(s), "labelled": int(labelled(self.labels(s)).sum()),
                               **({"tokens": int(self.file[s]["offsets"][-1])} if self.states_settings and s != TEXTS else {})}
                           for s in self.splits}}


class StoreWriter:
    """Write side: creates or resumes `<path>.partial`, renames it to `path` when complete.

    After construction: `status` is "new", "resumed" or "complete" (nothing to do), `chunk_rows` the
    chunk size the file was started with (kept on resume, so chunks and their batches stay the same),
    and `discarded` says why an unusable `.partial` was started over (None when none was).
    """

    def __init__(self, path: str, *, settings: dict, splits: dict[str, dict], label_names: list[str],
                 feature_names: list[str], hidden_size: int, source: str, store_dtype: str = "float32",
                 chunk_rows: int = 2048, restart: bool = False, texts: dict | None = None):
        if store_dtype not in STORE_DTYPES:
            raise UserError(f"unknown --store-dtype {store_dtype!r}; use float32 or float16")
        if int(chunk_rows) < 1:
            raise UserError(f"--chunk-rows must be at least 1, not {chunk_rows}")
        self.path, self.tmp = path, partial_path(path)
        self.chunk_rows = int(chunk_rows)
        self.texts = texts or {}  # split -> its texts, written with the layout
        self.discarded = None
        fingerprint = cache_fingerprint(settings, store_dtype, splits)
        expected = {"settings": settings, "store_dtype": store_dtype, "label_names": label_names,
                    "splits": {s: {"rows": v["rows"], "fingerprint": v["fingerprint"]} for s, v in splits.items()}}
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise write_error(e, folder) from e
        if not os.access(folder, os.W_OK):
            raise UserError(f"cannot write to {folder}: the folder is read-only; choose another --out")
        self.status = "complete"
        if restart:
            if os.path.exists(self.tmp):
                _refuse_if_locked(self.tmp)  # another extract writing it: never remove it under its feet
                os.remove(self.tmp)
        elif os.path.exists(path):
            try:
                with h5py.File(path, "r") as f:
                    if f.attrs.get("format") != FORMAT:
                        raise UserError(f"{path} exists and is not a bertcache features file; choose another --out")
                    old = _describe(f)
                    problem = layout_problem(f, complete=True)  # every row written? (a copied .partial: no)
            except (OSError, KeyError, ValueError, TypeError) as e:
                raise UserError(f"{path} exists but is not a readable features file ({first_line(e)}); "
                                "pass --restart to replace it, or choose another --out") from e
            diff = describe_differences(old, expected)
            if diff:
                raise UserError(f"{path} exists and was made with different settings or data ({diff}); "
                                "pass --restart to overwrite it, or choose another --out")
            if problem:
                raise UserError(f"{path} exists but is not a complete features file ({problem}); pass --restart "
                                "to extract it again")
            return
        if os.path.exists(self.tmp):
            self.discarded = self._check_partial(expected)
            if self.discarded:
                os.remove(self.tmp)
        if os.path.exists(self.tmp):
            self.status = "resumed"
            self.file = _open_for_writing(self.tmp)
            self.chunk_rows = int(self.file.attrs["chunk_rows"])
        else:
            self.status = "new"
            self._create(settings, splits, label_names, feature_names, hidden_size, source, store_dtype, fingerprint)
            self.file = _open_for_writing(self.tmp)
        self._inode = os.stat(self.tmp).st_ino  # finish renames this file only if it is still the one written

    def _check_partial(self, expected: dict) -> str | None:
        """Why the leftover `.partial` cannot be resumed (None: it can); refuses one made differently."""
        try:
            with h5py.File(self.tmp, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    return "it is not a bertcache features file"
                diff = describe_differences(_describe(f), expected)
                if diff:
                    raise UserError(f"{self.tmp} is an unfinished extraction with different settings or data "
                                    f"({diff}); pass --restart to start over")
                problem = layout_problem(f, complete=False)
                if problem is None and int(f.attrs["chunk_rows"]) < 1:
                    problem = "its chunk_rows is invalid"
                for s in json.loads(f.attrs["splits"]) if problem is None else []:
                    done = int(f[s].attrs["rows_done"])
                    for d in f[s].values() if done else ():
                        d[done - 1]  # the last row recorded as written must read back
        except (OSError, KeyError, ValueError, TypeError) as e:
            if isinstance(e, OSError):  # another extract has it open: never remove it under its feet
                _raise_if_locked(e, self.tmp)
            return f"it cannot be read ({first_line(e)})"
        return problem

    def _create(self, settings, splits, label_names, feature_names, hidden_size, source, store_dtype, fingerprint):
        """Write the whole layout under a temporary name, reserve its disk space, then rename it `.partial`."""
        itemsize = np.dtype(store_dtype).itemsize
        width = sum(feature_dim(settings, n) for n in feature_names)
        need = sum(int(v["rows"]) * (width * itemsize + 16) for v in splits.values())
        need += states_bytes(settings, splits)
        folder = os.path.dirname(os.path.abspath(self.tmp))
        free = shutil.disk_usage(folder).free
        if need > free:
            raise UserError(f"not enough disk space for {self.path}: it needs {size_text(need)}, {folder} has "
                            f"{size_text(free)} free; free some space or choose another --out")
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource else -1
        if limit not in (-1, getattr(resource, "RLIM_INFINITY", -1)) and need + (1 << 20) > limit:
            raise UserError(f"{self.path} would need {size_text(need)}, past the file size limit of "
                            f"{size_text(limit)} (ulimit -f); raise it or choose another --out")
        new = self.tmp + ".new"
        try:
            with h5py.File(new, "w") as f:
                self._layout(f, settings, splits, label_names, feature_names, hidden_size, source, store_dtype,
                             fingerprint)
            _reserve(new)
            os.replace(new, self.tmp)
        except OSError as e:
            if os.path.exists(new):
                os.remove(new)
            raise write_error(e, self.tmp) from e

    def _layout(self, f, settings, splits, label_names, feature_names, hidden_size, source, store_dtype, fingerprint):
        a = f.attrs
        a["format"] = FORMAT
        a["format_version"] = FORMAT_VERSION
        a["package_version"] = __version__
        a["complete"] = False
        a["settings"] = json_attr(settings)
        a["label_names"] = json_attr(label_names)
        a["feature_names"] = json_attr(feature_names)
        a["splits"] = json_attr(list(splits))
        a["source"] = source
        a["store_dtype"] = store_dtype
        a["fingerprint"] = fingerprint
        a["chunk_rows"] = self.chunk_rows
        for key in ("model", "revision", "commit", "model_fingerprint", "max_length", "prefix", "precision"):
            a[key] = "" if settings.get(key) is None else settings[key]
        bi = settings.get("pair_mode") == "bi"
        for split, spec in splits.items():
            g = f.create_group(split)
            n = int(spec["rows"])
            written = spec.get("written")  # a pair split of a bi cache: label, row and pair, known up front
            for name in feature_names if written is None else ():
                g.create_dataset(name, shape=(n, feature_dim(settings, name)), dtype=store_dtype, dcpl=_allocated())
            tail, label_dtype = label_layout(task_of(settings), len(label_names))
            if bi and split == TEXTS:
                tail, label_dtype = (), "int64"
            g.create_dataset("label", shape=(n, *tail), dtype=label_dtype, dcpl=_allocated())
            g.create_dataset("row", shape=(n,), dtype="int64", dcpl=_allocated())
            if written is not None:
                g.create_dataset("pair", shape=(n, 2), dtype="int64", dcpl=_allocated())
                for name, values in written.items():
                    if n:
                        g[name][:] = values
            if split in self.texts:
                _write_texts(g, self.texts[split])
            if settings.get("states"):
                offsets = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(spec["token_lengths"], out=offsets[1:])
                g.create_dataset("states", shape=(int(offsets[-1]), hidden_size),
                                 dtype=states_storage(settings["states"]["dtype"]), dcpl=_allocated())
                g.create_dataset("offsets", data=offsets)
            g.attrs["rows"] = n
            g.attrs["rows_done"] = np.int64(n if written is not None else 0)
            g.attrs["data_fingerprint"] = spec["fingerprint"]
            g.attrs["skipped"] = int(spec.get("skipped", 0))

    def rows_done(self, split: str) -> int:
        return int(self.file[split].attrs["rows_done"])

    def write(self, split: str, start: int, features: dict[str, np.ndarray], labels: np.ndarray, rows: np.ndarray,
              states: np.ndarray | None = None):
        """Write rows [start, start + len(labels)) of `split` (and their token states, flat float32, when
        the file holds states), then record them as done."""
        g = self.file[split]
        stop = start + len(labels)
        try:
            if states is not None:
                lo, hi = (int(v) for v in g["offsets"][[start, stop]])
                if len(states) != hi - lo:
                    raise ValueError(f"{len(states)} token states for rows {start}:{stop}, the layout has {hi - lo}")
                g["states"][lo:hi] = to_storage(states, json.loads(self.file.attrs["settings"])["states"]["dtype"])
            for name, values in features.items():
                g[name][start:stop] = values
            g["label"][start:stop] = labels
            g["row"][start:stop] = rows
            self.file.flush()
            g.attrs.modify("rows_done", np.int64(stop))  # in place: the one metadata change per chunk
            self.file.flush()
        except OSError as e:
            raise write_error(e, self.tmp, _RESUMABLE) from e

    def read(self, split: str, index: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """Rows already written (for texts seen earlier in the run), in the order of `index`."""
        uniq, inverse = np.unique(index, return_inverse=True)
        g = self.file[split]
        return {n: g[n][uniq][inverse].astype(np.float32) for n in names}

    def read_states(self, split: str, row: int) -> np.ndarray:
        """One written row's token states, float32 [tokens, hidden] (for a text seen earlier in the run)."""
        g = self.file[split]
        lo, hi = (int(v) for v in g["offsets"][[row, row + 1]])
        return from_storage(g["states"][lo:hi], json.loads(self.file.attrs["settings"])["states"]["dtype"])

    def finish(self):
        try:
            self.file.attrs.modify("complete", True)
            self.file.close()
        except OSError as e:
            raise write_error(e, self.tmp, _RESUMABLE) from e
        if not os.path.exists(self.tmp) or os.stat(self.tmp).st_ino != self._inode:
            raise UserError(f"{self.tmp} was removed or replaced by another process while this extract wrote it; "
                            f"{self.path} is left as it was: run extract again (one at a time)")
        os.replace(self.tmp, self.path)

    def abort(self):
        """Close without completing; the .partial file stays for a resume."""
        try:
            self.file.close()
        except Exception:  # closing a file after a failed write can fail again; nothing more to save
            pass


def _write_texts(group: h5py.Group, texts, piece: int = 65536) -> None:
    """text_offsets + text_utf8 for `texts`, a piece of rows at a time (never the whole corpus as one copy)."""
    n = len(texts)
    lengths = np.fromiter((len(str(t).encode("utf-8")) for t in texts), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    group.create_dataset("text_offsets", data=offsets)
    data = group.create_dataset("text_utf8", shape=(int(offsets[-1]),), dtype="uint8")
    for start in range(0, n, piece):
        stop = min(start + piece, n)
        blob = "".join(str(t) for t in texts[start:stop]).encode("utf-8")
        data[offsets[start]:offsets[stop]] = np.frombuffer(blob, dtype=np.uint8)


def states_storage(dtype: str) -> str:
    """The HDF5 dtype token states of `dtype` are kept in (HDF5 has no bfloat16: its 16 bits as uint16)."""
    if dtype not in STATES_DTYPES:
        raise UserError(f"unknown --states-dtype {dtype!r}; use one of {', '.join(STATES_DTYPES)}")
    return "uint16" if dtype == "bfloat16" else dtype


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the stored form (bfloat16: rounded to nearest even, as torch does, kept as uint16)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype != "bfloat16":
        return x.astype(dtype)
    bits = x.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """The stored form -> float32 (exact)."""
    if dtype == "bfloat16":
        return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return x.astype(np.float32)


def states_bytes(settings: dict, splits: dict[str, dict]) -> int:
    """Disk bytes the token states (and offsets) of `splits` take, 0 without states."""
    states = settings.get("states")
    if not states:
        return 0
    item = np.dtype(states_storage(states["dtype"])).itemsize
    tokens = sum(int(np.sum(v["token_lengths"])) for v in splits.values())
    return tokens * int(settings["hidden_size"]) * item + sum(8 * (int(v["rows"]) + 1) for v in splits.values())


def _allocated():
    """Contiguous storage allocated at creation and never filled: writing rows later moves no metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _refuse_if_locked(path: str) -> None:
    """A UserError when another process holds `path` open for writing (HDF5's file lock); a file that cannot
    be read for other reasons (damaged, another format) is left to the caller."""
    try:
        h5py.File(path, "r").close()
    except OSError as e:
        _raise_if_locked(e, path)


def _raise_if_locked(e: OSError, path: str) -> None:
    """The "locked by another process" UserError when `e`, from opening `path`, is HDF5's file lock."""
    locked = write_error(e, path)
    if isinstance(locked, UserError):
        raise locked from e


def _open_for_writing(path: str) -> h5py.File:
    """Without HDF5's sieve buffer every write goes straight to the file, so a failed write (disk full)
    leaves nothing dirty that HDF5 would retry when closing (which crashes the interpreter at exit)."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_sieve_buf_size(0)
    fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)
    try:
        return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl))
    except OSError as e:
        raise write_error(e, path) from e


def _reserve(path: str) -> None:
    """Reserve the file's disk space now, so a full disk stops the run before hours of encoding."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # not supported here: go without
            raise
    finally:
        os.close(fd)


def size_text(n: int) -> str:
    """A byte count for people: '512 B', '93.8 KiB', '1.2 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _damaged(path: str, e: OSError) -> UserError:
    return UserError(f"{path} cannot be read: {first_line(e)}; the file is damaged: extract it again")


def _describe(f: h5py.File) -> dict:
    return {"settings": json.loads(f.attrs["settings"]), "store_dtype": f.attrs["store_dtype"],
            "label_names": json.loads(f.attrs["label_names"]),
            "splits": {s: {"rows": int(f[s].attrs["rows"]), "fingerprint": f[s].attrs["data_fingerprint"]}
                       for s in json.loads(f.attrs["splits"])}}


class RowTexts:
    """The stored text(s) of a split's rows: {"text"} or, in a pair cache, {"text", "text_pair"}."""

    def __init__(self, store: FeatureStore, split: str):
        self.store, self.split = store, split
        self.pair = store.file[split]["pair"][:] if store.pair_mode == "bi" else None

    def __call__(self, rows) -> list[dict]:
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return []
        if self.pair is None:
            texts = self.store.texts(self.split, rows)
            return [{"text": t} for t in texts] if texts is not None else [{} for _ in rows]
        a, b = (self.store.texts(TEXTS, self.pair[rows, i]) for i in (0, 1))
        return [{"text": x, "text_pair": y} for x, y in zip(a, b)]
