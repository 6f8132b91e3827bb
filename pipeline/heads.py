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
    """Standardize with train statistics, then a linear layer or a one-hidden-layer MLP."""

    def __init__(self, in_features: int, num_classes: int, kind: str = "linear", hidden: int = HIDDEN,
                 dropout: float = DROPOUT):
        super().__init__()
        if kind not in HEADS:
            raise UserError(f"unknown --head {kind!r}; use one of {', '.join(HEADS)}")
        self.kind, self.in_features, self.num_classes, self.hidden = kind, in_features, num_classes, hidden
        self.register_buffer("shift", torch.zeros(in_features))
        self.register_buffer("scale", torch.ones(in_features))
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

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.predict_scores(x)[0]

    @torch.no_grad()
    def predict_scores(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, logits) of rows `x`: [n, classes] each."""
        self.eval()
        logits = self(torch.as_tensor(x, dtype=torch.float32, device=self.shift.device))
        return torch.softmax(logits, dim=-1).cpu().numpy(), logits.cpu().numpy()
