"""`bertcache info`: what a features file or a checkpoint folder holds, as one dict (and as text)."""
from __future__ import annotations

import math
import os

import numpy as np

from .checkpoint import read_config
from .errors import UserError
from .poolings import default_pooling
from .store import FeatureStore, RowTexts
from .tasks import read_metrics


def describe(path: str, rows: int = 0) -> dict:
    """A features file's or a checkpoint folder's description (JSON-ready: NaN / inf as None); with `rows`,
    a features file's first rows of each split (text, label) too, under `first_rows` (`splits.<s>.rows` is
    a count)."""
    if os.path.isdir(path):
        from .checkpoint import _is_kind
        if _is_kind(path, "export"):
            from .onnx_runner import describe_export
            return finite(describe_export(path))
        return finite(describe_checkpoint(path))
    if not os.path.exists(path):
        from .store import partial_path
        if os.path.exists(partial_path(path)):
            raise UserError(f"{path} does not exist yet: {partial_path(path)} is an extraction that did not finish; "
                            "run extract again to resume it")
        raise UserError(f"{path} does not exist; give a features file (.h5) or a checkpoint folder")
    return finite(describe_features(path, rows))


def finite(obj):
    """NaN / inf (e.g. a validation loss without validation rows) as None: JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _label(store: FeatureStore, y):
    """A row's label as a reader wants it: the class name, the target (regression), the names set
    (multilabel); None when unlabelled."""
    if store.task == "regression":
        return None if np.isnan(y) else float(y)
    if store.task == "multilabel":
        return None if (y < 0).any() else [n for n, v in zip(store.label_names, y) if v]
    return store.label_names[y] if y >= 0 else None


def describe_features(path: str, rows: int = 0) -> dict:
    with FeatureStore(path) as store:
        info = store.info()
        if rows > 0:
            info["first_rows"] = {}
            for s in store.splits:
                index = np.arange(min(rows, store.rows(s)))
                texts = RowTexts(store, s)(index)
                labels = store.labels(s)[index]
                info["first_rows"][s] = [{"row": int(i), "text": t.get("text"), **({"text_pair": t["text_pair"]}
                                    if "text_pair" in t else {}), "label": _label(store, y)}
                                   for i, y, t in zip(index, labels, texts)]
        f = store.file
        vectors = [f["texts"]] if store.pair_mode == "bi" else [f[s] for s in store.splits[:1]]
        info.update(kind="features", store_dtype=f.attrs.get("store_dtype"), model=store.settings.get("model"),
                    model_fingerprint=store.settings.get("model_fingerprint"), pair_mode=store.pair_mode,
                    long_texts=store.settings.get("long_texts", "truncate"),
                    family=store.settings.get("family"), model_type=store.settings.get("model_type"),
                    default_pooling=default_pooling(store.settings), prefix=store.settings.get("prefix"),
                    instruction=store.settings.get("instruction"), sentence=store.settings.get("sentence"),
                    poolings=store.settings.get("poolings"), layers=store.settings.get("layers"),
                    dims={n: int(g[n].shape[1]) for g in vectors for n in store.feature_names})
        if store.pair_mode == "bi":
            info["distinct_texts"] = int(f["texts"].attrs["rows"])
    return info


def describe_checkpoint(path: str) -> dict:
    """What `info --json` says of a checkpoint; `test` holds the task's headline metrics (accuracy and
    macro_f1; spearman, pearson, mse, mae; micro_f1, macro_f1, subset_accuracy) and n."""
    config = read_config(path)
    metrics = read_metrics(path)
    enc = config["encoder"]
    task = config.get("task", "classification")
    headline = {"classification": ("accuracy", "macro_f1"), "regression": ("spearman", "pearson", "mse", "mae"),
                "multilabel": ("micro_f1", "macro_f1", "subset_accuracy")}[task]
    return {"kind": "checkpoint", "path": path, "task": task, "pair_mode": config.get("pair_mode"),
            "thresholds": config.get("thresholds"), "target": config.get("target"),
            "long_texts": enc.get("long_texts") or "truncate",
            "model": enc.get("model"), "model_fingerprint": enc.get("model_fingerprint"),
            "pooling": config["pooling"], "head": config["head"], "label_names": config["label_names"],
            "features": config.get("features"), "layers": enc.get("layers"), "max_length": enc.get("max_length"),
            "prefix": enc.get("prefix"), "precision": enc.get("precision"),
            # the weight files there are (`weights` elsewhere, as in an export's meta, is the one chosen)
            "weights_available": sorted(n[:-12] for n in os.listdir(path)
                                        if n.endswith(".safetensors") and ".top." not in n),
            "tuned": ({k: config["tuned"][k] for k in ("k", "layer", "states_layer")} if config.get("tuned") else None),
            "best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
            "seconds": metrics.get("seconds"), "validation": metrics.get("validation"), "best": metrics.get("best"),
            "refit": metrics.get("refit"),
            "test": {k: metrics["test"][k] for k in (*headline, "n")} if "test" in metrics else None}


_NAMES = {"macro_f1": "macro-F1", "micro_f1": "micro-F1", "subset_accuracy": "subset accuracy"}


def as_text(info: dict) -> list[str]:
    if info["kind"] == "export":
        test = info["test"] or {}
        return [f"{info['path']}: ONNX export (opset {info['opset']}) of {info['checkpoint']} "
                f"({info['weights']} weights), {info['head']['type']} head",
                f"  model        {info['model']} (fingerprint {info['model_fingerprint']})",
                f"  pooling      {info['pooling']}; layers {info['layers']}; max_length {info['max_length']}; "
                "precision fp32",
                f"  labels       {', '.join(info['label_names'])}"] + (
            ["  test         " + ", ".join(f"{_NAMES.get(k, k)} {v:.4f}" for k, v in test.items()
                                       if k != "n" and v is not None) + f", n {test['n']}"] if test else [])
    if info["kind"] == "checkpoint":
        head = info["head"]
        if head["type"] == "ensemble":
            from .heads import group_members
            what = f"ensemble of {len(head['members'])} heads -> {head['num_classes']}: " + ", ".join(
                f"{p} {h} ({w:.2f})" for p, h, w in group_members(head["members"]))
        else:
            what = f"{head['type']} head {head['in_features']} -> {head['num_classes']}" + (
                f" (hidden {head['hidden']})" if head.get("hidden") else "")
        lines = [f"{info['path']}: checkpoint, {what}, {info['task']}"
                 + (f" on pairs ({info['pair_mode']})" if info.get("pair_mode") else ""),
                 f"  model        {info['model']} (fingerprint {info['model_fingerprint']})",
                 f"  pooling      {info['pooling']}; layers {info['layers']}; max_length {info['max_length']}; "
                 f"precision {info['precision']}",
                 f"  labels       {', '.join(info['label_names'])}",
                 f"  features     {(info['features'] or {}).get('path')} "
                 f"(fingerprint {(info['features'] or {}).get('fingerprint')})",
                 f"  weights      {', '.join(info['weights_available'])}"]
        if info["long_texts"] != "truncate":
            lines.append(f"  long texts   {info['long_texts']}: raw texts past max_length are encoded in windows")
        if info.get("tuned"):
            t = info["tuned"]
            # the states it reads (evaluate's cache): they enter the cached K layers, which can be more than the tuned k
            lines.append(f"  tuned        the encoder's top {t['k']} layer{'s' if t['k'] != 1 else ''} (trained over the cached states of "
                         f"hidden_states[{t['states_layer']}]); the layers below are frozen")
        if info["best"]:
            from .tasks import SCORE
            score = SCORE[info["task"]]
            best = info["best"].get(score)
            value = f"{score.replace('_', ' ')} {'n/a' if best is None else format(best, '.4f')}"
            if info["best"].get("C") is not None:  # a logreg head: its history holds one fit per C, not epochs
                lines.append(f"  best C       {info['best']['C']:g} (of {info['epochs_run']} fit): {value}")
            else:
                lines.append(f"  best epoch   {info['best_epoch']}: {value}" if info["best_epoch"] is not None
                             else f"  validation   {value} (an ensemble of trained heads: no epochs of its own)")
        if info.get("refit"):
            lines.append(f"  refit        on train + validation ({info['refit']['rows']} rows) after that choice: "
                         "the weights have seen the validation rows")
        if info["test"]:
            lines.append("  test         " + ", ".join(f"{_NAMES.get(k, k)} {v:.4f}" for k, v in info["test"].items()
                                                       if k != "n" and v is not None) + f", n {info['test']['n']}")
        if info.get("thresholds"):
            lines.append("  thresholds   " + ", ".join(f"{n} {t:g}" for n, t in info["thresholds"].items()))
        return lines
    lines = [f"{info['path']}: features, {info['task']}" + (f", pairs ({info['pair_mode']})" if info["pair_mode"] else "")
             + f", {info['store_dtype']}, fingerprint {info['fingerprint']}",
             f"  model        {info['model']} (fingerprint {info['model_fingerprint']})",
             f"  family       {info['family'] or 'encoder'} ({info['model_type'] or '?'}); "
             f"default pooling {info['default_pooling']}",
             f"  features     {', '.join(f'{n} [{d}]' for n, d in info['dims'].items())}; layers {info['layers']}",
             f"  labels       {', '.join(info['label_names'])}"]
    if info["sentence"]:
        st = info["sentence"]
        lines.append(f"  sentence     {'+'.join(st['pooling'])} pooling"
                     + "".join(f", dense {d['in']}->{d['out']}" for d in st["dense"])
                     + (", normalized" if st["normalize"] else "") + ("" if st["include_prompt"] else ", prompt excluded"))
    if info["instruction"]:
        lines.append(f"  instruction  {info['instruction']}")
    elif info["prefix"]:
        lines.append(f"  prefix       {info['prefix']!r}")
    settings = info["settings"]
    if info["long_texts"] != "truncate":
        lines.append(f"  long texts   {info['long_texts']} (stride {settings.get('stride')})")
    if info.get("distinct_texts") is not None:
        lines.append(f"  texts        {info['distinct_texts']} distinct, each encoded once (pairs {info['pair_mode']})")
    if settings.get("states"):
        st = settings["states"]
        lines.append(f"  states       every token's hidden_states[{st['layer']}] ({st['dtype']}), for fit-head "
                     f"--tune-layers up to {st['k']}")
    for split, v in info["splits"].items():
        lines.append(f"  {split:<12} {v['rows']} rows, {v['labelled']} labelled")
    for split, rows in (info.get("first_rows") or {}).items():
        for r in rows:
            text = "(no texts in this file)" if r["text"] is None else r["text"].replace("\n", " ")[:120]
            if r.get("text_pair") is not None:
                text += "  |  " + r["text_pair"].replace("\n", " ")[:120]
            label = r["label"]
            label = "(unlabelled)" if label is None else ", ".join(label) if isinstance(label, list) else label
            lines.append(f"  {split}[{r['row']}]  {label}  {text}")
    for shard in info["shards"]:
        rows = ", ".join(f"{s} {lo}:{hi}" for s, (lo, hi) in shard["rows"].items())
        lines.append(f"  shard        {shard['file']} ({rows})")
    return lines
