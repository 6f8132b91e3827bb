"""`bertcache info`: what a features file or a checkpoint folder holds, as one dict (and as text)."""
from __future__ import annotations

import math
import os

from .checkpoint import read_config, read_metrics
from .errors import UserError
from .poolings import default_pooling
from .store import FeatureStore


def describe(path: str) -> dict:
    """A features file's or a checkpoint folder's description (JSON-ready: NaN / inf as None)."""
    if os.path.isdir(path):
        return finite(describe_checkpoint(path))
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; give a features file (.h5) or a checkpoint folder")
    return finite(describe_features(path))


def finite(obj):
    """NaN / inf (e.g. a validation loss without validation rows) as None: JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def describe_features(path: str) -> dict:
    with FeatureStore(path) as store:
        info = store.info()
        f = store.file
        info.update(kind="features", store_dtype=f.attrs.get("store_dtype"), model=store.settings.get("model"),
                    model_fingerprint=store.settings.get("model_fingerprint"),
                    family=store.settings.get("family"), model_type=store.settings.get("model_type"),
                    default_pooling=default_pooling(store.settings), prefix=store.settings.get("prefix"),
                    instruction=store.settings.get("instruction"), sentence=store.settings.get("sentence"),
                    poolings=store.settings.get("poolings"), layers=store.settings.get("layers"),
                    dims={n: int(f[s][n].shape[1]) for s in store.splits[:1] for n in store.feature_names})
    return info


def describe_checkpoint(path: str) -> dict:
    config = read_config(path)
    metrics = read_metrics(path)
    enc = config["encoder"]
    return {"kind": "checkpoint", "path": path, "model": enc.get("model"), "model_fingerprint": enc.get("model_fingerprint"),
            "pooling": config["pooling"], "head": config["head"], "label_names": config["label_names"],
            "features": config.get("features"), "layers": enc.get("layers"), "max_length": enc.get("max_length"),
            "prefix": enc.get("prefix"), "precision": enc.get("precision"),
            "weights": sorted(n[:-12] for n in os.listdir(path) if n.endswith(".safetensors") and ".top." not in n),
            "tuned": ({k: config["tuned"][k] for k in ("k", "layer")} if config.get("tuned") else None),
            "best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
            "seconds": metrics.get("seconds"), "validation": metrics.get("validation"), "best": metrics.get("best"),
            "test": {k: metrics["test"][k] for k in ("accuracy", "macro_f1", "n")} if "test" in metrics else None}


def as_text(info: dict) -> list[str]:
    if info["kind"] == "checkpoint":
        head = info["head"]
        if head["type"] == "ensemble":
            what = f"ensemble of {len(head['members'])} heads -> {head['num_classes']}: " + ", ".join(
                f"{m['pooling']} {m['head']['type']} ({m['weight']:.2f})" for m in head["members"])
        else:
            what = f"{head['type']} head {head['in_features']} -> {head['num_classes']}" + (
                f" (hidden {head['hidden']})" if head.get("hidden") else "")
        lines = [f"{info['path']}: checkpoint, {what}",
                 f"  model        {info['model']} (fingerprint {info['model_fingerprint']})",
                 f"  pooling      {info['pooling']}; layers {info['layers']}; max_length {info['max_length']}; "
                 f"precision {info['precision']}",
                 f"  labels       {', '.join(info['label_names'])}",
                 f"  features     {(info['features'] or {}).get('path')} "
                 f"(fingerprint {(info['features'] or {}).get('fingerprint')})",
                 f"  weights      {', '.join(info['weights'])}"]
        if info.get("tuned"):
            t = info["tuned"]
            lines.append(f"  tuned        the encoder's top {t['k']} layers (trained over the cached states of "
                         f"hidden_states[{t['layer']}]); the layers below are frozen")
        if info["best"]:
            lines.append(f"  best epoch   {info['best_epoch']}: val acc {info['best']['val_acc']:.4f}")
        if info["test"]:
            lines.append(f"  test         accuracy {info['test']['accuracy']:.4f}, macro-F1 "
                         f"{info['test']['macro_f1']:.4f}, n {info['test']['n']}")
        return lines
    lines = [f"{info['path']}: features, {info['store_dtype']}, fingerprint {info['fingerprint']}",
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
    for split, v in info["splits"].items():
        lines.append(f"  {split:<12} {v['rows']} rows, {v['labelled']} labelled")
    for shard in info["shards"]:
        rows = ", ".join(f"{s} {lo}:{hi}" for s, (lo, hi) in shard["rows"].items())
        lines.append(f"  shard        {shard['file']} ({rows})")
    return lines
