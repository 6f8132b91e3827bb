"""Features and poolings: what the cache stores, and how a head reads it. No torch here (the CLI imports it).

A *feature* is one cached vector per text: `cls` (the [CLS] vector) or `mean` (the attention-masked
mean) of the last hidden layer, and `cls_<layer>` / `mean_<layer>` of a layer below it (layers count
from 0 = embeddings, as HF's `hidden_states` tuple does).

A *pooling* is the spec a head reads: terms joined by `+` (concatenated). A term is `cls` or `mean`
(last layer), `cls_9` (a given layer), or `mean-avg4` / `cls-cat2` (average or concatenation over the
last k cached layers).
"""
from __future__ import annotations

import re

import numpy as np

from .errors import UserError

POOLS = ("cls", "mean")  # how each cached layer is reduced to a vector (the settings' "poolings")
_TERM = re.compile(r"^(cls|mean)(?:_(\d+)|-(avg|cat)(\d+))?$")


def feature_name(pool: str, layer: int, last: int) -> str:
    """`cls` / `mean` for the last layer, `cls_<layer>` / `mean_<layer>` below it."""
    return pool if layer == last else f"{pool}_{layer}"


def feature_names(layers: list[int], last: int) -> list[str]:
    """Every feature cached for `layers` (the model has `last` + 1 hidden states), last layer first."""
    return [feature_name(p, layer, last) for layer in sorted(layers, reverse=True) for p in POOLS]


def pooling_features(spec: str, layers: list[int]) -> list[str]:
    """Cached feature names a pooling spec reads, given the cached layer indices.

    >>> pooling_features("cls+mean-avg2", [11, 12])
    ['cls', 'mean', 'mean_11']
    """
    names = []
    for term in _terms(spec):
        names.extend(n for n in _term_features(term, layers) if n not in names)
    return names


def build_features(arrays: dict[str, np.ndarray], spec: str, layers: list[int]) -> np.ndarray:
    """The head's input matrix for a pooling spec, from cached (or freshly encoded) features.

    >>> x = {"cls": np.ones((2, 3)), "mean": np.zeros((2, 3))}
    >>> build_features(x, "cls+mean", [12]).shape
    (2, 6)
    """
    parts = []
    tensors = hasattr(next(iter(arrays.values()), None), "detach")  # torch (a tuned top's layers): keep the graph
    for term in _terms(spec):
        names = _term_features(term, layers)
        if _TERM.match(term).group(3) == "avg":
            parts.append(sum(arrays[n] for n in names) / len(names) if tensors
                         else np.mean([arrays[n] for n in names], axis=0))
        else:
            parts.extend(arrays[n] for n in names)
    if tensors:
        return _cat(parts)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _cat(parts):
    import torch  # only reached with torch tensors in hand
    return torch.cat(parts, 1)


def pooled_width(spec: str, layers: list[int], hidden_size: int) -> int:
    """Columns of `build_features(..., spec, layers)` for features of `hidden_size`.

    >>> pooled_width("cls-cat2+mean", [11, 12], 384)
    1152
    """
    return sum(hidden_size * (1 if _TERM.match(t).group(3) == "avg" else len(_term_features(t, layers)))
               for t in _terms(spec))


def _terms(spec: str) -> list[str]:
    terms = [t.strip() for t in str(spec).split("+")]
    for t in terms:
        if not _TERM.match(t):
            raise UserError(f"unknown --pooling {spec!r}: use cls, mean, cls_<layer>, mean-avg<k>, mean-cat<k>, "
                            "or terms joined with + (e.g. cls+mean)")
    return terms


def _term_features(term: str, layers: list[int]) -> list[str]:
    pool, layer, _, k = _TERM.match(term).groups()
    last = max(layers)
    if layer is not None:
        if int(layer) not in layers:
            raise UserError(f"pooling {term!r} needs layer {layer}, but the cache holds layers {layers}; "
                            "extract with more --layers")
        return [feature_name(pool, int(layer), last)]
    k = int(k or 1)
    if k < 1 or k > len(layers):
        raise UserError(f"pooling {term!r} needs the last {k} layers, but the cache holds {len(layers)}; "
                        f"extract with --layers {k}")
    return [feature_name(pool, last - i, last) for i in range(k)]
