"""Checkpoints: a folder of safetensors weights + JSON. Nothing here unpickles unless asked to.

    <folder>/best.safetensors   head weights of the best epoch on validation (tasks.SCORE) (+ standardization)
    <folder>/last.safetensors   head weights after the last epoch (not for an ensemble: best is its one state)
    <folder>/config.json        all predict needs: encoder reference + fingerprint, pooling, head shape, labels
    <folder>/metrics.json       per-epoch history, best epoch, test metrics
    <folder>/curves.png         train / validation loss and validation score per epoch (with matplotlib)
    <folder>/sweep.json         the ranked table, when the head won `fit-head --sweep`

A pickle (.pt, .pth, .bin, ...) is refused with a message. Only with `allow_pickle` (`--allow-pickle`)
it may stand in for the weights: `<folder>/best.pt` (or the file itself given as the checkpoint) is
read with `torch.load(weights_only=True)`, which builds tensors and plain containers but never calls
code, and must hold exactly the state_dict of the head that config.json (JSON, always required)
describes, bare or as {"state_dict": ...}.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid

from safetensors.torch import load_file, save_file

from ._version import __version__
from .errors import UserError, check_new_file, read_json_file, write_error
from .heads import Ensemble, Head, model_from_shape
from .onnx_runner import FORMAT as ONNX_FORMAT, META_FILE as ONNX_META_FILE

FORMAT = "bertcache-head"
WEIGHTS = ("best", "last")
PICKLE_ENDINGS = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def save_checkpoint(folder: str, config: dict, states: dict[str, dict], metrics: dict,
                    files: dict | None = None) -> str:
    """Write the checkpoint to a temporary folder beside `folder`, then swap it in whole.

    `files`: more files for the folder (e.g. curves.png), name -> a function that writes that path.
    """
    def write(tmp: str) -> None:
        for name, state in states.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      os.path.join(tmp, f"{name}.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), {"format": FORMAT, "format_version": 1,
                                                       "package_version": __version__, **config})
        write_json(os.path.join(tmp, "metrics.json"), metrics)
        for name, write_file in (files or {}).items():
            write_file(os.path.join(tmp, name))

    return write_folder(folder, write)


# What marks a folder as one bertcache wrote, per kind (file, format): only such a folder of the same kind, or
# an empty one, is replaced by a new one of the same name.
KINDS = {"checkpoint": ("config.json", FORMAT), "export": (ONNX_META_FILE, ONNX_FORMAT)}


def check_out(folder: str, *, kind: str = "checkpoint", source: str | None = None) -> None:
    """Refuse, before any work, an output folder that must not or cannot be replaced: the folder being
    read (`source`), an existing file, a folder that is not a bertcache `kind` ("checkpoint" or "export":
    a data folder, another checkpoint under an export's name), or a path under a file. Called again by
    `write_folder` as the last guard.

        >>> import tempfile
        >>> tmp = tempfile.mkdtemp()
        >>> open(f"{tmp}/reviews.csv", "w").close()
        >>> check_out(f"{tmp}/reviews.csv")
        Traceback (most recent call last):
        pipeline.errors.UserError: ...reviews.csv exists and is a file, not a bertcache checkpoint; choose another --out
    """
    folder = os.path.normpath(folder)
    if source and os.path.exists(folder) and os.path.exists(source) and os.path.samefile(folder, source):
        raise UserError(f"{folder} is what this command reads; choose another --out")
    if os.path.lexists(folder):
        if not os.path.isdir(folder) or os.path.islink(folder):
            raise UserError(f"{folder} exists and is a file, not a bertcache checkpoint; choose another --out")
        if os.listdir(folder) and not _is_kind(folder, kind):
            raise UserError(f"{folder} exists and is not a bertcache {kind} (no {KINDS[kind][0]} of one in it); "
                            "choose another --out, or remove it first")
        return
    check_new_file(folder, folder=True)


def _is_kind(folder: str, kind: str) -> bool:
    name, fmt = KINDS[kind]
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def write_folder(folder: str, write, kind: str = "checkpoint") -> str:
    """Call `write(tmp)` on a new folder beside `folder`, then swap it in whole: never a half-written folder
    under the final name (a failed write leaves the old one as it was). `folder` must pass `check_out`."""
    check_out(folder, kind=kind)
    folder = os.path.normpath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}: the folder is read-only; choose another --out")
    tmp = f"{folder}.partial-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(tmp)
        write(tmp)
        _umask_modes(tmp)
        old = None
        if os.path.exists(folder):
            old = f"{folder}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):
            err = write_error(e, folder)
            if err is not e:
                raise err from e
        raise
    return folder


def _umask_modes(folder: str) -> None:
    """Give every file the mode a plain open() gives under the umask (safetensors writes 0600 files)."""
    probe = os.path.join(folder, ".mode")
    open(probe, "w").close()
    mode = os.stat(probe).st_mode & 0o777
    os.remove(probe)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            os.chmod(path, mode)


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:  # numpy scalars (an API caller's np.int64 epochs or seed) as numbers
        json.dump(obj, f, indent=2, ensure_ascii=False, allow_nan=True, default=_plain)
        f.write("\n")


def _plain(value):
    if hasattr(value, "item") and type(value).__module__ == "numpy":
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_REFUSED = ("bertcache does not unpickle checkpoints unasked (unpickling can run code): use a checkpoint folder "
            "written by `bertcache fit-head` (safetensors + JSON), or pass --allow-pickle to read only tensors "
            "from it with torch.load(weights_only=True) next to the folder's config.json")


def _pickles(folder: str) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(PICKLE_ENDINGS))


def read_config(folder: str, allow_pickle: bool = False) -> dict:
    """config.json of a checkpoint folder (or, with allow_pickle, of the folder holding a given pickle)."""
    if os.path.isfile(folder):
        if not folder.lower().endswith(PICKLE_ENDINGS):
            raise UserError(f"{folder} is a file; give the checkpoint folder written by `bertcache fit-head`")
        if not allow_pickle:
            raise UserError(f"{folder} is a pickle file; {_REFUSED}")
        folder = os.path.dirname(os.path.abspath(folder))
    path = os.path.join(folder, "config.json")
    if os.path.isdir(folder) and not os.path.exists(path) and _pickles(folder):
        raise UserError(f"{folder} holds pickle files ({', '.join(_pickles(folder))}) but no config.json; "
                        "bertcache never unpickles a checkpoint without its JSON config: make one with "
                        "`bertcache fit-head`")
    if _is_kind(folder, "export"):
        raise UserError(f"{folder} is an ONNX export, not a head checkpoint: predict and serve read it with "
                        "--backend onnx")
    if not os.path.isdir(folder) or not os.path.exists(path):
        raise UserError(f"checkpoint not found: {folder} is not a folder with config.json "
                        "(make one with `bertcache fit-head`)")
    return read_json_file(path, folder, FORMAT, "a bertcache head checkpoint")


def load_checkpoint(folder: str, weights: str = "best", device="cpu",
                    allow_pickle: bool = False) -> tuple[dict, Head | Ensemble]:
    """The checkpoint's config and its head (best or last weights), ready for inference.

    The head is a heads.Head, or a heads.Ensemble when the sweep picked an ensemble (its members'
    weights are stored in the same safetensors file, under `members.<i>.`).
    """
    if weights not in WEIGHTS:
        raise UserError(f"unknown --weights {weights!r}; use best or last")
    config = read_config(folder, allow_pickle)
    if weights == "last" and config.get("head", {}).get("type") == "ensemble" and os.path.isdir(folder) \
            and not os.path.exists(os.path.join(folder, "last.safetensors")):
        weights = "best"  # an ensemble has no epochs: one state, saved as best
    import torch

    path = _weights_file(folder, weights, allow_pickle)
    task = config.get("task", "classification")
    try:  # shapes only (no memory): a config.json of a few bytes can describe a head of any size
        with torch.device("meta"):
            shaped = model_from_shape(config["head"], task)
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder}/config.json does not describe a head (missing {e})") from e
    try:
        state = load_file(path) if path.endswith(".safetensors") else _load_pickled_state(path)
    except UserError:
        raise
    except Exception as e:  # safetensors raises several types for corrupt files
        raise UserError(f"{path} does not hold this head's weights: {str(e).splitlines()[0]}") from e
    want = {k: list(v.shape) for k, v in shaped.state_dict().items()}
    got = {k: list(v.shape) for k, v in state.items()}
    if want != got:
        diff = [f"{k} {got.get(k, 'missing')} (expected {want.get(k, 'none')})" for k in sorted(set(want) | set(got))
                if want.get(k) != got.get(k)]
        raise UserError(f"{path} does not hold the weights of the head config.json describes: {'; '.join(diff[:4])}")
    head = model_from_shape(config["head"], task)  # as large as the weights the file holds
    head.load_state_dict(state)
    return config, head.to(device).eval()


def _weights_file(folder: str, weights: str, allow_pickle: bool) -> str:
    if os.path.isfile(folder):  # a pickle given as the checkpoint (read_config allowed it)
        return folder
    path = os.path.join(folder, f"{weights}.safetensors")
    if os.path.exists(path):
        return path
    pickles = [f for f in _pickles(folder) if os.path.splitext(f)[0] == weights]
    if pickles and not allow_pickle:
        raise UserError(f"{folder} has no {weights}.safetensors, only {pickles[0]}; {_REFUSED}")
    if pickles:
        return os.path.join(folder, pickles[0])
    other = "last" if weights == "best" else "best"
    raise UserError(f"{folder} has no {weights}.safetensors (removed?); use --weights {other} if it has that one, "
                    "or run fit-head again")


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")


def _load_pickled_state(path: str) -> dict:
    """Tensors from a pickle, with torch's restricted unpickler (no code runs); nothing but a state_dict."""
    import pickle

    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        # torch's message advises weights_only=False: keep only the reason.
        lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(e).splitlines()]
        reason = next((line for line in lines if line and not line.startswith(_TORCH_ADVICE)), type(e).__name__)
        raise UserError(f"{path} was refused by torch.load(weights_only=True): it holds more than tensors, or is not "
                        f"a torch file ({reason})") from e
    if isinstance(obj, dict) and set(obj) == {"state_dict"}:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path} must hold a state_dict (names -> tensors) of the head described by config.json, "
                        f"not a {type(obj).__name__}")
    return obj
