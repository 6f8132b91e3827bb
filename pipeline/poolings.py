"""Features and poolings: what the cache stores, and how a head reads it. No torch here (the CLI imports it).

A *feature* is one cached vector per text: `cls` (the first token's vector), `mean` (the
attention-masked mean) or `last` (the last real token's vector) of the last hidden layer, and
`cls_<layer>` / `mean_<layer>` / `last_<layer>` of a layer below it (layers count from 0 = embeddings,
as HF's `hidden_states` tuple does). Decoder-only models cache no `cls` (their first token has seen
nothing but itself). `sentence` is a sentence-transformers folder's own sentence vector (its pooling,
Dense and Normalize modules applied); it may be narrower or wider than the hidden states.

A *pooling* is the spec a head reads: terms joined by `+` (concatenated). A term is `cls`, `mean` or
`last` (last layer), `cls_9` (a given layer), `mean-avg4` / `cls-cat2` (average or concatenation over
the last k cached layers), or `sentence`.

Sentence pairs cached apart (`--pair-mode bi`) hold two vectors per row, u and v (arrays [N, 2, hidden]);
their terms say how the two meet: `pair:<term>` is [u, v, |u-v|, u*v] (SBERT / InferSent) and
`cos:<term>` the cosine of u and v alone (one column), e.g. `cos:mean+pair:mean`.
"""
from __future__ import annotations

import re

import numpy as np

from .errors import UserError

POOLS = ("cls", "mean", "last")  # how each cached layer is reduced to a vector (the settings' "poolings")
DECODER_POOLS = ("mean", "last")  # decoder-only models: a causal model's first token has seen only itself
SENTENCE = "sentence"  # a sentence-transformers folder's own vector: one per text, not per layer
_TERM = re.compile(r"^(?:(cls|mean|last)(?:_(\d+)|-(avg|cat)(\d+))?|(sentence))$")
PAIR_COMBINES = ("pair", "cos")  # how a pair term joins u and v: [u, v, |u-v|, u*v], or their cosine


def feature_name(pool: str, layer: int, last: int) -> str:
    """`cls` / `mean` / `last` for the last layer, `cls_<layer>` / ... below it."""
    return pool if layer == last else f"{pool}_{layer}"


def feature_names(layers: list[int], last: int, pools=POOLS, sentence: bool = False) -> list[str]:
    """Every feature cached for `layers` (the model has `last` + 1 hidden states), last layer first.

    >>> feature_names([11, 12], 12, DECODER_POOLS)
    ['mean', 'last', 'mean_11', 'last_11']
    """
    names = [feature_name(p, layer, last) for layer in sorted(layers, reverse=True) for p in pools]
    return names + [SENTENCE] if sentence else names


def feature_dim(settings: dict, name: str) -> int:
    """Width of a cached feature: the hidden size, unless the settings' `feature_dims` say otherwise
    (a sentence-transformers Dense projection)."""
    return int((settings.get("feature_dims") or {}).get(name, settings["hidden_size"]))


def default_pooling(settings: dict) -> str:
    """The pooling a head reads unless told: the model's own sentence vector where one is cached, else
    what the model was trained to be pooled with (`last` for decoders, `cls` for the rest)."""
    if settings.get("pair_mode") == "bi":  # pairs cached apart: start from the cosine, add the pair features
        return "cos:mean+pair:mean"
    return settings.get("default_pooling") or "cls"


def pooling_features(spec: str, layers: list[int]) -> list[str]:
    """Cached feature names a pooling spec reads, given the cached layer indices.

    >>> pooling_features("cls+mean-avg2", [11, 12])
    ['cls', 'mean', 'mean_11']
    """
    names = []
    for term in _terms(spec):
        names.extend(n for n in _term_features(_split_term(term)[1], layers) if n not in names)
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
        combine, term = _split_term(term)
        names = _term_features(term, layers)
        paired = arrays[names[0]].ndim == 3
        if paired != bool(combine):
            raise UserError(f"pooling term {term!r} " + (
                f"reads a pair cache (--pair-mode bi): write pair:{term} or cos:{term}" if paired else
                f"{combine}:{term} needs a cache of sentence pairs made with --pair-mode bi; this cache holds single "
                f"texts: write {term}"))
        if _TERM.match(term).group(3) == "avg":
            got = [sum(arrays[n] for n in names) / len(names) if tensors
                   else np.mean([arrays[n] for n in names], axis=0)]
        else:
            got = [arrays[n] for n in names]
        if not combine:
            parts.extend(got)
            continue
        if tensors:
            raise UserError(f"pooling {term!r}: pair features are computed from cached vectors, not tuned layers")
        u, v = (np.concatenate([g[:, i] for g in got], axis=1).astype(np.float32) for i in (0, 1))
        if combine == "cos":
            norms = np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
            parts.append(((u * v).sum(1) / np.maximum(norms, 1e-12))[:, None])
        else:
            parts.extend([u, v, np.abs(u - v), u * v])
    if tensors:
        return _cat(parts)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


def _cat(parts):
    import torch  # only reached with torch tensors in hand
    return torch.cat(parts, 1)


def single_text_pooling(spec: str) -> str:
    """The per-text pooling under a pair pooling (its terms without pair: / cos:, each once).

    >>> single_text_pooling("cos:mean+pair:mean+pair:cls")
    'mean+cls'
    """
    return "+".join(dict.fromkeys(_split_term(t)[1] for t in _terms(spec)))


def starts_with_cosine(spec: str) -> bool:
    """Whether a pooling's first column is a cosine (a head can then start from it: training.fit_rows)."""
    return _split_term(_terms(spec)[0])[0] == "cos"


def pooled_width(spec: str, layers: list[int], hidden_size: int, dims: dict | None = None) -> int:
    """Columns of `build_features(..., spec, layers)` for features of `hidden_size` (`dims`: the
    widths of features that differ, as the settings' `feature_dims`).

    >>> pooled_width("cls-cat2+mean", [11, 12], 384)
    1152
    >>> pooled_width("sentence+last", [12], 384, {"sentence": 256})
    640
    """
    dims = dims or {}
    total = 0
    for t in _terms(spec):
        combine, t = _split_term(t)
        names = _term_features(t, layers)
        widths = [int(dims.get(n, hidden_size)) for n in names]
        w = widths[0] if _TERM.match(t).group(3) == "avg" else sum(widths)
        total += {"": w, "pair": 4 * w, "cos": 1}[combine]
    return total


def _split_term(term: str) -> tuple[str, str]:
    """("pair" / "cos" / "", the single-text term)."""
    combine, _, rest = term.rpartition(":")
    return combine, rest


def _terms(spec: str) -> list[str]:
    terms = [t.strip() for t in str(spec).split("+")]
    for t in terms:
        combine, rest = _split_term(t)
        if not _TERM.match(rest) or combine not in ("", *PAIR_COMBINES):
            raise UserError(f"unknown pooling {spec!r}: use cls, mean, last, sentence, cls_<layer>, mean-avg<k>, "
                            "mean-cat<k>, or terms joined with + (e.g. cls+mean); for a pair cache pair:<term> or "
                            "cos:<term>")
    return terms


def _term_features(term: str, layers: list[int]) -> list[str]:
    pool, layer, _, k, sentence = _TERM.match(term).groups()
    if sentence:
        return [SENTENCE]
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
