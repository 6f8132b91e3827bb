"""Checkpoints: a folder of safetensors weights + JSON. Nothing here ever unpickles.

    <folder>/best.safetensors   head weights with the best validation accuracy (+ standardization)
    <folder>/last.safetensors   head weights after the last epoch
    <folder>/config.json        all predict needs: encoder reference + fingerprint, pooling, head shape, labels
    <folder>/metrics.json       per-epoch history, best epoch, test metrics
"""
from __future__ import annotations

import json
import os
import shutil
import uuid

from safetensors.torch import load_file, save_file

from . import __version__
from .errors import UserError
from .heads import Head

FORMAT = "bertcache-head"
WEIGHTS = ("best", "last")
PICKLE_ENDINGS = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def save_checkpoint(folder: str, config: dict, states: dict[str, dict], metrics: dict) -> str:
    """Write the checkpoint to a temporary folder beside `folder`, then swap it in whole."""
    folder = os.path.normpath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}: the folder is read-only; choose another --out")
    tmp = f"{folder}.partial-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        for name, state in states.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      os.path.join(tmp, f"{name}.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "config.json"), {"format": FORMAT, "format_version": 1,
                                                       "package_version": __version__, **config})
        _write_json(os.path.join(tmp, "metrics.json"), metrics)
        old = None
        if os.path.exists(folder):
            old = f"{folder}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, allow_nan=True)
        f.write("\n")


def read_config(folder: str) -> dict:
    if os.path.isfile(folder) and folder.endswith(PICKLE_ENDINGS):
        raise UserError(f"{folder} is a pickle file; bertcache never unpickles checkpoints (they can run code). "
                        "Use a checkpoint folder written by `bertcache fit-head` (safetensors + JSON)")
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.exists(path):
        raise UserError(f"checkpoint not found: {folder} is not a folder with config.json "
                        "(make one with `bertcache fit-head`)")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if config.get("format") != FORMAT:
        raise UserError(f"{folder} is not a bertcache head checkpoint (config.json has no format {FORMAT!r})")
    return config


def load_checkpoint(folder: str, weights: str = "best", device="cpu") -> tuple[dict, Head]:
    """The checkpoint's config and its head (best or last weights), ready for inference."""
    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights {weights!r}; use best or last")
    config = read_config(folder)
    path = os.path.join(folder, f"{weights}.safetensors")
    if not os.path.exists(path):
        raise UserError(f"{folder} has no {weights}.safetensors")
    shape = config["head"]
    head = Head(shape["in_features"], shape["num_classes"], shape["type"], shape.get("hidden") or 0)
    try:
        state = load_file(path)
        head.load_state_dict(state)
    except Exception as e:  # safetensors and torch both raise several types for corrupt / mismatched files
        raise UserError(f"{path} does not hold this head's weights: {str(e).splitlines()[0]}") from e
    return config, head.to(device).eval()
