"""The head: a small torch module over pooled features (standardize, then linear or a one-hidden-layer MLP),
and the ensemble: several heads, each over its own pooling, whose class probabilities are averaged.

Training them is training.py (and sweep.py for the ensemble); reading their input from the cache is
poolings.py and rows.py.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .defaults import DROPOUT, HEADS, HIDDEN
from .errors import UserError
from .poolings import build_features, pooling_features


class Head(nn.Module):
    """Standardize with train statistics, then a linear layer (`linear`, `logreg`) or a one-hidden-layer MLP.

    `logreg` is the same module as `linear`; only its training differs (full-batch L-BFGS, training.fit_logreg).

    >>> Head(4, 2, "logreg").predict_proba(np.zeros((1, 4))).shape
    (1, 2)
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "linear", hidden: int = HIDDEN,
                 dropout: float = DROPOUT):
        super().__init__()
        if kind not in HEADS:
            raise UserError(f"unknown --head {kind!r}; use one of {', '.join(HEADS)}")
        self.kind, self.in_features, self.num_classes, self.hidden = kind, in_features, num_classes, hidden
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Linear(in_features, num_classes)

    def shape(self) -> dict:
        return {"type": self.kind, "in_features": self.in_features, "num_classes": self.num_classes,
                "hidden": self.hidden if self.kind == "mlp" else None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.shift) * self.scale)

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        self.eval()
        x = torch.as_tensor(x, dtype=torch.float32, device=self.shift.device)
        return torch.softmax(self(x), dim=-1).cpu().numpy()


def head_from_shape(shape: dict) -> Head:
    """An untrained Head of the shape a checkpoint's config records (`Head.shape()`)."""
    return Head(shape["in_features"], shape["num_classes"], shape["type"], shape.get("hidden") or 0)


class Ensemble(nn.Module):
    """Weighted average of member heads' class probabilities; member i reads pooling `poolings[i]`.

    `weights` are how often greedy selection picked each member (Caruana et al. 2004), normalized here.

    >>> e = Ensemble([Head(3, 2), Head(6, 2)], ["cls", "cls+mean"], [2, 1])
    >>> e.predict_proba_features({"cls": np.ones((1, 3)), "mean": np.ones((1, 3))}, [4]).shape
    (1, 2)
    """

    def __init__(self, heads: list[Head], poolings: list[str], weights: list[float]):
        super().__init__()
        if not heads or not len(heads) == len(poolings) == len(weights):
            raise UserError("an ensemble needs as many poolings and weights as heads, and at least one head")
        self.members = nn.ModuleList(heads)
        self.poolings = list(poolings)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        self.num_classes = heads[0].num_classes

    def shape(self) -> dict:
        return {"type": "ensemble", "num_classes": self.num_classes,
                "members": [{"pooling": p, "weight": w, "head": h.shape()}
                            for h, p, w in zip(self.members, self.poolings, self.weights)]}

    @classmethod
    def from_shape(cls, shape: dict) -> "Ensemble":
        m = shape["members"]
        return cls([head_from_shape(x["head"]) for x in m], [x["pooling"] for x in m], [x["weight"] for x in m])

    def feature_names(self, layers: list[int]) -> list[str]:
        names = []
        for p in self.poolings:
            names += [n for n in pooling_features(p, layers) if n not in names]
        return names

    def predict_proba_features(self, arrays: dict[str, np.ndarray], layers: list[int]) -> np.ndarray:
        """Averaged probabilities from cached (or freshly encoded) features, feature name -> [n, hidden]."""
        out = None
        for head, pooling, w in zip(self.members, self.poolings, self.weights):
            p = w * head.predict_proba(build_features(arrays, pooling, layers))
            out = p if out is None else out + p
        return out


def model_from_shape(shape: dict) -> Head | Ensemble:
    """The module a checkpoint's `head` entry describes: one Head, or an Ensemble of them."""
    return Ensemble.from_shape(shape) if shape.get("type") == "ensemble" else head_from_shape(shape)


def predict_proba_features(model: Head | Ensemble, pooling: str, arrays: dict[str, np.ndarray],
                           layers: list[int]) -> np.ndarray:
    """Class probabilities of a checkpoint's model (a Head over `pooling`, or an Ensemble) from features."""
    if isinstance(model, Ensemble):
        return model.predict_proba_features(arrays, layers)
    x = build_features(arrays, pooling, layers)
    if x.shape[1] != model.in_features:
        raise UserError(f"pooling {pooling!r} gives {x.shape[1]} features, the head expects {model.in_features}")
    return model.predict_proba(x)


def model_feature_names(model: Head | Ensemble, pooling: str, layers: list[int]) -> list[str]:
    """The cached features a checkpoint's model reads."""
    return model.feature_names(layers) if isinstance(model, Ensemble) else pooling_features(pooling, layers)
