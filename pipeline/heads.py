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

    `num_classes` is the output width: classes (classification: softmax; multilabel: a sigmoid per
    label) or 1 (regression: the target standardized on train; `target_mean` / `target_std` buffers
    turn outputs back into the target's units). `logreg` is the same module as `linear`; only its
    training differs (full-batch L-BFGS, training.fit_logreg).

        >>> Head(4, 2, "logreg").predict_proba(np.zeros((1, 4))).shape
        (1, 2)
        >>> Head(4, 1, task="regression").predict(np.zeros((2, 4))).shape
        (2,)
    """

    def __init__(self, in_features: int, num_classes: int, kind: str = "linear", hidden: int = HIDDEN,
                 dropout: float = DROPOUT, task: str = "classification"):
        super().__init__()
        if kind not in HEADS:
            raise UserError(f"unknown --head {kind!r}; use one of {', '.join(HEADS)}")
        self.kind, self.in_features, self.num_classes, self.hidden = kind, in_features, num_classes, hidden
        self.task = task
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
        if task == "regression":
            self.register_buffer("target_mean", torch.zeros(()))
            self.register_buffer("target_std", torch.ones(()))
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

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What the task reads from the net's output: class probabilities, label probabilities, or values."""
        if self.task == "regression":
            return logits[:, 0] * self.target_std + self.target_mean
        return torch.sigmoid(logits) if self.task == "multilabel" else torch.softmax(logits, dim=-1)

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """`outputs` for rows of features: [n, classes] probabilities, or [n] values for regression."""
        return self.predict_scores(x)[0]

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class (or, multilabel, per-label) probabilities."""
        if self.task == "regression":
            raise UserError("a regression head predicts values, not probabilities")
        return self.predict(x)

    @torch.no_grad()
    def predict_scores(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, logits) of rows `x`: outputs as `outputs` gives them, logits [n, classes] (the raw
        net outputs; standardized values for regression)."""
        self.eval()
        logits = self(torch.as_tensor(x, dtype=torch.float32, device=self.shift.device))
        return self.outputs(logits).cpu().numpy(), logits.cpu().numpy()


def head_from_shape(shape: dict, task: str = "classification") -> Head:
    """An untrained Head of the shape a checkpoint's config records (`Head.shape()`)."""
    return Head(shape["in_features"], shape["num_classes"], shape["type"], shape.get("hidden") or 0, task=task)


class Ensemble(nn.Module):
    """Weighted average of member heads' outputs (probabilities, or values for regression); member i reads
    pooling `poolings[i]`.

    `weights` are how often greedy selection picked each member (Caruana et al. 2004), normalized here.

    >>> e = Ensemble([Head(3, 2), Head(6, 2)], ["cls", "cls+mean"], [2, 1])
    >>> e.predict_features({"cls": np.ones((1, 3)), "mean": np.ones((1, 3))}, [4]).shape
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
        self.num_classes, self.task = heads[0].num_classes, heads[0].task

    def shape(self) -> dict:
        return {"type": "ensemble", "num_classes": self.num_classes,
                "members": [{"pooling": p, "weight": w, "head": h.shape()}
                            for h, p, w in zip(self.members, self.poolings, self.weights)]}

    @classmethod
    def from_shape(cls, shape: dict, task: str = "classification") -> "Ensemble":
        m = shape["members"]
        return cls([head_from_shape(x["head"], task) for x in m], [x["pooling"] for x in m], [x["weight"] for x in m])

    def feature_names(self, layers: list[int]) -> list[str]:
        names = []
        for p in self.poolings:
            names += [n for n in pooling_features(p, layers) if n not in names]
        return names

    def distinct_poolings(self) -> list[str]:
        """Each pooling the members read, once, in order of first use: what to build once and share (a
        cross-fitted configuration's fold models all read the same one)."""
        return list(dict.fromkeys(self.poolings))

    @property
    def heaviest(self) -> int:
        """The member with the largest weight: whose pooled vectors stand for the ensemble's (serve's /embed)."""
        return int(np.argmax(self.weights))

    def features(self, arrays: dict[str, np.ndarray], layers: list[int]) -> np.ndarray:
        """The pooled vectors of the heaviest member (what serve's /embed gives for an ensemble)."""
        return build_features(arrays, self.poolings[self.heaviest], layers)

    def predict_features(self, arrays: dict[str, np.ndarray], layers: list[int]) -> np.ndarray:
        """Averaged outputs from cached (or freshly encoded) features, feature name -> [n, hidden]."""
        return self.predict_scores(arrays, layers)[0]

    def predict_scores(self, arrays: dict[str, np.ndarray], layers: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(averaged outputs, logits that give them back: log-probabilities, log-odds, or standardized values)."""
        built = {p: build_features(arrays, p, layers) for p in self.distinct_poolings()}
        out = None
        for head, pooling, w in zip(self.members, self.poolings, self.weights):
            p = w * head.predict(built[pooling])
            out = p if out is None else out + p
        if self.task == "regression":
            first = self.members[0]
            return out, ((out - float(first.target_mean)) / float(first.target_std))[:, None]
        p = np.clip(out, 1e-7, 1 - 1e-7)
        return out, (np.log(p / (1 - p)) if self.task == "multilabel" else np.log(p))


def group_members(members: list[dict]) -> list[tuple[str, str, float]]:
    """(pooling, head, summed weight) per distinct pooling and head (and lr) of an ensemble's members, in order
    of appearance: a cross-fitted configuration's fold models are one entry. `head` is a name or a shape.

    >>> group_members([{"pooling": "mean", "head": "mlp", "weight": .25}, {"pooling": "mean", "head": "mlp",
    ...                "weight": .25}, {"pooling": "cls", "head": {"type": "linear"}, "weight": .5}])
    [('mean', 'mlp', 0.5), ('cls', 'linear', 0.5)]
    """
    out = {}
    for m in members:
        head = m["head"]["type"] if isinstance(m["head"], dict) else m["head"]
        key = (m["pooling"], head, m.get("lr"))
        out[key] = out.get(key, 0.0) + m["weight"]
    return [(p, h, w) for (p, h, _), w in out.items()]


def model_from_shape(shape: dict, task: str = "classification") -> Head | Ensemble:
    """The module a checkpoint's `head` entry describes: one Head, or an Ensemble of them."""
    return Ensemble.from_shape(shape, task) if shape.get("type") == "ensemble" else head_from_shape(shape, task)


def predict_scores_features(model: Head | Ensemble, pooling: str, arrays: dict[str, np.ndarray],
                            layers: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(outputs, logits, pooled features) of a checkpoint's model (a Head over `pooling`, or an Ensemble)
    from feature arrays (feature name -> [n, hidden], or [n, 2, hidden] for a pair cache)."""
    if isinstance(model, Ensemble):
        return (*model.predict_scores(arrays, layers), model.features(arrays, layers))
    x = build_features(arrays, pooling, layers)
    if x.shape[1] != model.in_features:
        raise UserError(f"pooling {pooling!r} gives {x.shape[1]} features, the head expects {model.in_features}")
    return (*model.predict_scores(x), x)


def model_feature_names(model: Head | Ensemble, pooling: str, layers: list[int]) -> list[str]:
    """The cached features a checkpoint's model reads."""
    return model.feature_names(layers) if isinstance(model, Ensemble) else pooling_features(pooling, layers)
