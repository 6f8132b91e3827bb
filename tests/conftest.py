"""Shared fixtures: a tiny random BERT saved with save_pretrained, and small labelled corpora.

Everything runs the real transformers / datasets / h5py code; nothing is mocked.
"""
from __future__ import annotations

import json
import os

import pytest

from pipeline.toy import FILLER, NEG, POS, SPECIAL, make_texts, vocab_chars  # noqa: F401 (tests import them here)
from pipeline.toy import toy_model as build_tiny_bert, toy_splits


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> str:
    """Same shape as tiny_model, different weights."""
    return build_tiny_bert(str(tmp_path_factory.mktemp("other-bert")), seed=1)


def write_split_files(folder: str, fmt: str, splits: dict[str, list[tuple[str, int]]], label_fn=None) -> str:
    os.makedirs(folder, exist_ok=True)
    label_fn = label_fn or (lambda y: y)
    for split, rows in splits.items():
        if fmt in ("csv", "tsv"):
            import csv
            with open(os.path.join(folder, f"{split}.{fmt}"), "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
                w.writerow(["text", "label"])
                for t, y in rows:
                    w.writerow([t, label_fn(y)])
        elif fmt in ("json", "jsonl"):
            with open(os.path.join(folder, f"{split}.{fmt}"), "w", encoding="utf-8") as f:
                for t, y in rows:
                    f.write(json.dumps({"text": t, "label": label_fn(y)}, ensure_ascii=False) + "\n")
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [label_fn(y) for _, y in rows]}),
                           os.path.join(folder, f"{split}.parquet"))
    return folder


def default_splits(num_classes: int = 2, n_train: int = 160, n_val: int = 40, n_test: int = 40):
    return toy_splits(num_classes, n_train, n_val, n_test)


@pytest.fixture(scope="session")
def saved_dataset(tmp_path_factory) -> str:
    """A DatasetDict with a ClassLabel feature, saved with save_to_disk."""
    import datasets
    folder = str(tmp_path_factory.mktemp("ds") / "chnsenticorp")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["负向评价", "正向评价"])})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]},
                                                             features=features)
                               for s, rows in default_splits().items()})
    dd.save_to_disk(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_cache(tiny_model, tmp_path_factory) -> str:
    """A features file of `default_splits()` (jsonl in `data/` beside it) from tiny_model, fp32 on the CPU.
    Shared by the whole session: tests read it, copy it, or extract it again (a no-op), never change it."""
    import pipeline as bc
    folder = tmp_path_factory.mktemp("tiny-cache")
    data = write_split_files(str(folder / "data"), "jsonl", default_splits())
    return bc.extract(tiny_model, data, str(folder / "f.h5"), precision="fp32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a shared,
    oversubscribed machine torch's spinning worker threads make tiny models ~100x slower."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


LABEL_NAMES = ["负向评价", "正向评价"]


@pytest.fixture(scope="session")
def named_checkpoint(tiny_model, tmp_path_factory) -> str:
    """A checkpoint (tiny model, `cls+mean`, linear head) whose labels are LABEL_NAMES: for serving tests."""
    import pipeline as bc
    tmp = tmp_path_factory.mktemp("named-checkpoint")
    data = write_split_files(str(tmp / "data"), "jsonl", default_splits(n_train=80, n_val=20, n_test=20),
                             label_fn=lambda y: LABEL_NAMES[y])
    path = bc.extract(tiny_model, data, str(tmp / "f.h5"), precision="fp32", label_names=LABEL_NAMES, progress=False)
    ckpt, _ = bc.fit_head(path, str(tmp / "ck"), pooling="cls+mean", epochs=15)
    return ckpt
