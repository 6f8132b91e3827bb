"""The head: a small torch module over pooled features (standardize, then linear or a one-hidden-layer MLP).

Training it is training.py; reading its input from the cache is poolings.py and rows.py.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .defaults import DROPOUT, HEADS, HIDDEN
from .errors import UserError


class Head(nn.Module):
    """Standardize with train statistics, then a linear layer or a one-hidden-layer MLP.

    `num_classes` is the output width: classes (classification: softmax; multilabel: a sigmoid per
    label) or 1 (regression: the target standardized on train; `target_mean` / `target_std` buffers
    turn outputs back into the target's units).

        >>> head = Head(4, 1, task="regression")
        >>> head.predict(np.zeros((2, 4))).shape
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
        if kind == "linear":
            self.net = nn.Linear(in_features, num_classes)
        else:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, num_classes))

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
