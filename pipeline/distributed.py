"""Extraction past one process: torchrun ranks each encode a shard, rank 0 joins the shards.

Under `torchrun` (WORLD_SIZE > 1 in the environment) every rank loads the corpus, takes its contiguous
row range of every split (sizes differ by at most one row; no rank pads with duplicated rows), encodes
it on its own device (cuda:LOCAL_RANK, else the CPU) and writes `<out>.shard-<rank>-of-<N>.h5` with
the ordinary single-process `extract` (so each shard resumes from its own `.partial`). After a barrier,
rank 0 checks the shards and writes the joined cache `<out>` (write_joined): the usual layout and
attributes, whose datasets are HDF5 virtual datasets mapping each shard's rows back to their place in
the original order. Every reader (FeatureStore, plain h5py) sees one file; the shard files must stay
beside it (source paths are stored relative to the joined file's folder).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import timedelta

import h5py
import numpy as np

from .data import Corpus, load_corpus
from .encoder import DEFAULT_MAX_LENGTH, Encoder
from .errors import UserError, write_error
from .extract import cache_settings, default_features_path, extract as extract_one, say_read, split_specs
from .fingerprints import cache_fingerprint
from .store import FeatureStore, StoreWriter

BACKENDS = {"cuda": "nccl", "cpu": "gloo"}
# Ranks that finish early (or find their shard complete on a resume) wait at the barrier for the slowest.
BARRIER_TIMEOUT = timedelta(days=7)


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    return world()[1] > 1


def shard_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of `n` that `rank` of `size` encodes: contiguous, the first n % size ranks take one more."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def shard_path(out: str, rank: int, size: int) -> str:
    return f"{out}.shard-{rank}-of-{size}.h5"


def shard_corpus(corpus: Corpus, rank: int, size: int) -> Corpus:
    splits = {}
    for name, s in corpus.splits.items():
        lo, hi = shard_range(len(s.texts), rank, size)
        splits[name] = dataclasses.replace(s, texts=s.texts[lo:hi], labels=s.labels[lo:hi], rows=s.rows[lo:hi])
    return dataclasses.replace(corpus, splits=splits, skipped={}, notes=[])  # rank 0 says them, once


def extract(model: str, data: str, out: str | None = None, *, text_column: str = "text",
            label_column: str = "label", label_names: list[str] | None = None,
            max_length: int = DEFAULT_MAX_LENGTH, prefix: str | None = None, layers: int = 1, device: str = "auto",
            precision: str = "auto", batch_tokens: int | None = None, store_dtype: str = "float32",
            restart: bool = False, revision: str | None = None, progress: bool = True,
            instruction: str | None = None, **kwargs) -> str:
    """`pipeline.extract` for one rank of a torchrun job; every rank returns the joined file's path."""
    import torch
    import torch.distributed as dist

    rank, size, local = world()
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local}"
    if kwargs.pop("text_pair_column", None):
        raise UserError("sentence pairs (--text-pair-column) are extracted in one process; run without torchrun")
    kwargs.pop("pair_mode", None)
    started = time.perf_counter()
    corpus = load_corpus(data, text_column, label_column, label_names, task=kwargs.pop("task", None),
                         label_sep=kwargs.pop("label_sep", None))
    if rank == 0:  # each shard's own run sees no blank texts (the corpus' are skipped before it is cut)
        say_read(corpus, time.perf_counter() - started, kwargs.get("log") or (lambda msg: None))
    encoder = Encoder(model, device=device, precision=precision, max_length=max_length, prefix=prefix,
                      layers=layers, revision=revision, batch_tokens=batch_tokens, instruction=instruction,
                      workers=kwargs.pop("workers", None), packing=kwargs.pop("packing", "auto"),
                      compile=kwargs.pop("compile", "auto"),
                      log=kwargs.get("log"), long_texts=kwargs.pop("long_texts", "truncate"),
                      stride=kwargs.pop("stride", None))
    settings = cache_settings(encoder, corpus.task, None)
    out = out or default_features_path(model, data)
    own_group = not dist.is_initialized()
    if own_group:
        if encoder.device.type == "cuda":
            torch.cuda.set_device(encoder.device)
        dist.init_process_group(BACKENDS.get(encoder.device.type, "gloo"), timeout=BARRIER_TIMEOUT)
    try:
        specs = split_specs(corpus) if rank == 0 else None  # fingerprints of the whole corpus
        done = False
        if rank == 0 and os.path.exists(out) and not restart:
            # Check an existing <out> before anyone spends hours encoding: StoreWriter refuses one made
            # with other settings or data (and creates nothing when <out> exists).
            # A joined <out> that lost a shard is joined again, once the lost shard is encoded again (its
            # own check would refuse it: a virtual dataset mapping a file that is not there).
            done = _agreed(lambda: not _missing_shards(out) and StoreWriter(
                out, settings=settings, splits=specs, label_names=corpus.label_names,
                feature_names=encoder.feature_names(), hidden_size=encoder.hidden_size, source=corpus.source,
                store_dtype=store_dtype).status == "complete")
        else:
            _agreed(lambda: None)
        if _broadcast(done):
            if rank == 0 and kwargs.get("log"):
                kwargs["log"](f"{out} is already complete")
            return out
        extract_one(model, data, shard_path(out, rank, size), corpus=shard_corpus(corpus, rank, size),
                    encoder=encoder, store_dtype=store_dtype, restart=restart,
                    progress=progress and rank == 0, **kwargs)
        try:
            dist.barrier()
        except RuntimeError as e:  # a rank that stopped (with its own error line) closed its connections
            raise UserError(f"rank {rank} finished its shard {shard_path(out, rank, size)}, but another rank stopped "
                            "before finishing its own (its error is above); fix that and run the same command "
                            "again (complete shards are kept)") from e
        _agreed(lambda: _join(out, size, corpus, specs, settings, store_dtype) if rank == 0 else None)
    finally:
        if own_group:
            dist.destroy_process_group()
    return out


def _missing_shards(path: str) -> list[str]:
    """The shard files a joined `path` names that are not beside it ([] for a one-process cache)."""
    with h5py.File(path, "r") as f:
        shards = json.loads(f.attrs.get("shards", "[]"))
    folder = os.path.dirname(os.path.abspath(path))
    return [s["file"] for s in shards if not os.path.exists(os.path.join(folder, s["file"]))]


def _broadcast(value):
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _agreed(step):
    """Run `step` on every rank; if it fails on rank 0 with a UserError, every rank raises it (no rank hangs)."""
    error, result = None, None
    try:
        result = step()
    except UserError as e:
        error = str(e)
    error = _broadcast(error)
    if error:
        raise UserError(error)
    return result


def _join(out: str, size: int, corpus: Corpus, specs: dict, settings: dict, store_dtype: str) -> None:
    """Check every shard, then write `out` joining them (write_joined)."""
    shards = []
    for rank in range(size):
        path = shard_path(out, rank, size)
        if not os.path.exists(path):
            raise UserError(f"shard {path} is missing after every rank finished: on several nodes, --out must be "
                            "on a filesystem all nodes share")
        with FeatureStore(path) as shard:  # complete, consistent layout
            if shard.settings != settings:
                raise UserError(f"shard {path} was made with other settings; run again with --restart")
            ranges = {}
            for split, s in corpus.splits.items():
                lo, hi = shard_range(len(s.texts), rank, size)
                if shard.rows(split) != hi - lo:
                    raise UserError(f"shard {path} holds {shard.rows(split)} rows of {split!r}, expected {hi - lo}; "
                                    "run again with --restart")
                ranges[split] = [lo, hi]
        shards.append({"file": os.path.basename(path), "rows": ranges})
    write_joined(out, shards, specs, cache_fingerprint(settings, store_dtype, specs))


TEXT_DATASETS = ("text_utf8", "text_offsets")
TEXT_PIECE = 1 << 26  # bytes the join copies at a time: rank 0 never holds every shard's texts at once


def _join_texts(group, shard_files: list[str], split: str) -> None:
    """The shards' texts copied into one real pair of datasets (a shard's offsets shifted by the bytes before it),
    a piece at a time: variable-length rows do not map onto a virtual layout, and the texts are small next to
    the vectors, though not next to memory (100M short texts are 10-20 GB)."""
    sizes = []
    for file in shard_files:
        with h5py.File(file, "r") as shard:
            offsets = shard[split]["text_offsets"]
            sizes.append((len(offsets) - 1, int(offsets[-1])))
    offsets = group.create_dataset("text_offsets", shape=(1 + sum(n for n, _ in sizes),), dtype=np.int64)
    data = group.create_dataset("text_utf8", shape=(sum(b for _, b in sizes),), dtype=np.uint8)
    offsets[0] = 0
    row = base = 0
    for file, (n, size) in zip(shard_files, sizes):
        with h5py.File(file, "r") as shard:
            o, d = shard[split]["text_offsets"], shard[split]["text_utf8"]
            step = max(1, TEXT_PIECE // 8)
            for a in range(0, n, step):
                b = min(a + step, n)
                offsets[row + 1 + a:row + 1 + b] = o[1 + a:1 + b] + base
            for a in range(0, size, TEXT_PIECE):
                b = min(a + TEXT_PIECE, size)
                data[base + a:base + b] = d[a:b]
        row, base = row + n, base + size


def write_joined(path: str, shards: list[dict], splits: dict[str, dict], fingerprint: str) -> None:
    """Write `path` as one cache over complete shard caches in its folder (a distributed extract).

    `shards`: [{"file": name beside `path`, "rows": {split: [lo, hi]}}] covering every split in order;
    `splits`: split -> rows, fingerprint, skipped of the whole corpus. The root attributes are the first
    shard's (all shards share the settings) plus `fingerprint` and `shards`; every dataset is a virtual
    dataset mapping the shards' rows into place. Source files are named relative to `path`'s folder, so
    the shard files must stay beside it. Written under a temporary name, then renamed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = path + ".joining"
    try:
        with h5py.File(os.path.join(folder, shards[0]["file"]), "r") as first, h5py.File(tmp, "w") as f:
            for key, value in first.attrs.items():
                f.attrs[key] = value
            f.attrs["fingerprint"] = fingerprint
            f.attrs["shards"] = json.dumps(shards)
            for split, spec in splits.items():
                g, n = f.create_group(split), int(spec["rows"])
                for name, source in first[split].items():
                    if name in TEXT_DATASETS:
                        continue
                    shape = (n, *source.shape[1:])
                    if n == 0:  # a virtual layout needs at least one row
                        g.create_dataset(name, shape=shape, dtype=source.dtype)
                        continue
                    layout = h5py.VirtualLayout(shape=shape, dtype=source.dtype)
                    for shard in shards:
                        lo, hi = shard["rows"][split]
                        if hi > lo:
                            layout[lo:hi] = h5py.VirtualSource(shard["file"], f"{split}/{name}",
                                                               shape=(hi - lo, *shape[1:]))
                    g.create_virtual_dataset(name, layout)
                if all(name in first[split] for name in TEXT_DATASETS):
                    _join_texts(g, [os.path.join(folder, shard["file"]) for shard in shards], split)
                g.attrs["rows"] = n
                g.attrs["rows_done"] = np.int64(n)
                g.attrs["data_fingerprint"] = spec["fingerprint"]
                g.attrs["skipped"] = int(spec.get("skipped", 0))
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise write_error(e, path) from e
