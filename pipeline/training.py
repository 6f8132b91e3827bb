"""The training loop: AdamW over row sources, validation every epoch, best and last weights.

The loss follows the task (tasks.py): cross-entropy (classification), binary cross-entropy per label
(multilabel), mean squared error on train-standardized targets (regression); the best epoch is the one
with the best validation score (tasks.SCORE: accuracy, micro-F1 at 0.5, Spearman), then loss.

Plain code over row sources (rows.py): whole-split tensors already on the device (no DataLoader, no
per-sample Python; validation every epoch is one matrix product), or, for caches that do not fit
memory, the same batches streamed from HDF5. Also here: the epoch's row order, the validation holdout
and class weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .defaults import (BATCH_SIZE, DROPOUT, EPOCHS, GPU_MIN_STEP_WORK, HIDDEN, LOGREG_CS, LOGREG_MAX_ITER,
                       LOGREG_PATIENCE, LR, PATIENCE, SEED, SHUFFLE_BLOCK, SHUFFLE_WINDOW, WEIGHT_DECAY,
                       check_ranges)
from .errors import UserError
from .heads import Head
from .threads import torch_threads
from .rows import ArrayRows
from .tasks import SCORE, pearson, spearman

SMALL_STEP_FLOPS = 1 << 26  # step_work below which the CPU training loop runs on one thread


def step_work(batch_size: int, dim: int, head: str, hidden: int, outputs: int, rows: int | None = None) -> int:
    """Numbers an optimizer step multiplies, batch x input x output of the head's first layer (a logreg
    head's steps are full-batch: `rows` x input x output): what decides its device (`head_device`) and
    its CPU threads."""
    if head == "logreg" and rows is not None:
        return rows * dim * outputs
    return batch_size * dim * (hidden if head == "mlp" else outputs)


def gpu_pays(work: int) -> bool:
    """Whether a head whose optimizer step multiplies `work` numbers (`step_work`) trains faster on a GPU
    than on a CPU (defaults.GPU_MIN_STEP_WORK: below it, kernel launches cost a GPU more than the
    arithmetic costs a CPU).

        >>> gpu_pays(step_work(256, 768, "linear", 256, 2)), gpu_pays(step_work(256, 768, "mlp", 256, 2))
        (False, True)
    """
    return int(work) >= GPU_MIN_STEP_WORK


def head_device(device: str | None, work: int, found: torch.device | None = None) -> torch.device:
    """The device a head trains on: `device` as given, or for "auto" the accelerator `found` (default:
    what resolve_device("auto") finds) only when `gpu_pays` for a step of `work`, else the CPU.

        >>> head_device("auto", 256 * 768 * 2, torch.device("cuda")), head_device("cpu", 10 ** 12)
        (device(type='cpu'), device(type='cpu'))
    """
    from .encoder import resolve_device

    if device not in (None, "auto"):
        return resolve_device(device)
    found = found if found is not None else resolve_device("auto")
    return found if found.type == "cpu" or gpu_pays(work) else torch.device("cpu")


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


def _strata(y: np.ndarray) -> list[np.ndarray]:
    """The row groups a split is stratified over: one per class for class ids; all rows as one group for
    targets and label matrices."""
    if y.ndim > 1 or y.dtype.kind == "f":
        return [np.arange(len(y))]
    return [np.flatnonzero(y == c) for c in np.unique(y)]


def holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation index split of one labelled array: stratified by class for class ids,
    a plain random share for targets and label matrices."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for group in _strata(y):
        idx = rng.permutation(group)
        k = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def fold_ids(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Seeded fold number (0 .. folds-1) of every row: stratified by class for class ids (each class dealt
    round-robin from a shuffle), a plain shuffle dealt round-robin for targets and label matrices.

    >>> np.bincount(fold_ids(np.array([0] * 6 + [1] * 4), 2, 0)).tolist()
    [5, 5]
    """
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    start = 0
    for idx in _strata(y):  # each group continues the deal where the last stopped, so fold sizes differ by one at most
        out[rng.permutation(idx)] = (start + np.arange(len(idx))) % folds
        start += len(idx)
    return out


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
             shuffle_window: int = SHUFFLE_WINDOW, task: str = "classification",
             from_first_column: bool = False, logreg_cs=None) -> FitResult:
    """Train a head with AdamW; keep the best (validation score, then loss) and last weights.

    `head="logreg"` is fit by `fit_logreg` instead (full-batch L-BFGS for every C in `logreg_cs`,
    default defaults.LOGREG_CS): the epoch-loop options do not apply to it.

    `train` and `val` are row sources (rows.ArrayRows in memory, rows.StoredRows from HDF5): `moments()`,
    `standardize(shift, scale)`, `batches(order, batch_size)` and `chunks()`, yielding (x, y) tensors on
    `device`. With `standardize`, the head shifts and scales its input by the train split's mean and
    standard deviation (buffers saved with the weights, so predict applies them identically).
    `num_classes` is the output width (1 for regression). With `from_first_column` (a linear head whose
    first input is a cosine), the head starts as the best fit of that column alone, epoch 0 is validated
    too, and training keeps it unless an epoch scores better: training can only add to the cosine.
    """
    if head == "logreg":
        return fit_logreg(train, val, num_classes, cs=logreg_cs or LOGREG_CS, class_weights=class_weights, seed=seed,
                          device=device, log=log, task=task, standardize=standardize)
    if train.n == 0:
        raise UserError("the train split has no labelled rows to train on")
    check_ranges(hidden=hidden, dropout=dropout, epochs=epochs, lr=lr, weight_decay=weight_decay,
                 batch_size=batch_size, patience=patience, label_smoothing=label_smoothing, seed=seed)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))  # a numpy integer too (GridSearchCV's grid from np.arange)
    torch.manual_seed(seed)
    model = Head(train.dim, num_classes, head, hidden, dropout, task).to(device)
    _fit_statistics(model, train, val, standardize)
    classify = task == "classification"
    net = model.net
    if from_first_column:
        _start_from_first_column(model, train, task, num_classes)
    weight = torch.as_tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    if classify:
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    elif task == "multilabel":
        loss_fn = nn.BCEWithLogitsLoss()
    else:
        y_mean, y_std = model.target_mean, model.target_std
        loss_fn = (lambda out, y: nn.functional.mse_loss(out[:, 0], (y - y_mean) / y_std))
    opt = _adamw(model.parameters(), lr, weight_decay)
    n, has_val, history = train.n, val.n > 0, []
    best_key, best_state, best_epoch, since_best = None, None, 0, 0
    steps = -(-n // batch_size)
    sizes = torch.tensor([min(batch_size, n - k * batch_size) for k in range(steps)], dtype=torch.float32,
                         device=device)
    step_loss = torch.empty(steps, device=device)
    train_logits = torch.empty((n, num_classes) if classify else (0,), device=device)
    train_y = torch.empty(n if classify else 0, dtype=torch.long, device=device)
    score = SCORE[task]

    def validate() -> dict:
        return _validate(model, val, task, weight)

    def consider(row: dict, epoch: int):
        nonlocal best_key, best_state, best_epoch, since_best
        # no validation: the last is the best
        key = (rank_value(row, score), -row["val_loss"]) if has_val else (epoch, 0.0)
        if best_key is None or key > best_key:
            best_key = key
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_epoch, since_best = epoch, 0
        else:
            since_best += 1

    t0 = time.perf_counter()
    # One CPU thread for small heads: their per-step ops are too small to split, and on a shared machine every
    # op of a two-thread loop waits for the thread the scheduler put aside (10x slower).
    small = step_work(batch_size, train.dim, head, hidden, num_classes) <= SMALL_STEP_FLOPS
    with torch_threads(1, when=device.type == "cpu" and small):
        if from_first_column and has_val:  # epoch 0: the cosine alone, which training has to beat
            model.eval()
            with torch.no_grad():
                row = {"epoch": 0, "train_loss": float("nan"), **validate()}
            history.append(row)
            consider(row, 0)
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
                if classify:
                    train_logits[start:start + len(yb)] = logits.detach()
                    train_y[start:start + len(yb)] = yb
                start += len(yb)
            model.eval()
            with torch.no_grad():
                train_loss = (step_loss * sizes).sum() / n
                if classify:
                    train_loss, train_accuracy = torch.stack(
                        [train_loss, (train_logits.argmax(1) == train_y).float().mean()]).tolist()
                    row = {"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_accuracy}
                else:
                    row = {"epoch": epoch, "train_loss": float(train_loss)}
                row.update(validate())
            history.append(row)
            val_loss = row["val_loss"]
            consider(row, epoch)
            if log and (epoch % log_every == 0 or epoch == 1):
                name = score[4:].replace("_", "-")
                log(f"epoch {epoch:4d}  train loss {row['train_loss']:.4f}"
                    + (f" accuracy {row['train_accuracy']:.4f}" if classify else "")
                    + f"  val loss {val_loss:.4f} {name} {row[score]:.4f}")
            if patience and has_val and since_best >= patience:
                break
    seconds = time.perf_counter() - t0
    last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(model, best_state, last_state, history, best_epoch, seconds)


def fit_logreg(train, val, num_classes: int, *, cs=LOGREG_CS, max_iter: int = LOGREG_MAX_ITER,
               class_weights: np.ndarray | None = None, seed: int = SEED, device: str | torch.device = "cpu",
               log=None, task: str = "classification", standardize: bool = True, **_ignored) -> FitResult:
    """A linear head on standardized rows fit full-batch to convergence by L-BFGS for every L2 strength in
    `cs`; keep the C with the best validation score (then loss).

    Multinomial logistic regression for classification, one per label for multilabel, ridge regression on
    the standardized target for regression. The objective per C is scikit-learn's (LogisticRegression(C),
    binomial for two classes and one per label for multilabel; for ridge, Ridge(alpha = 1 / (2 C))) divided
    by C * n: the mean loss + |W|^2 / (2 C n), the bias not penalized. (Two classes: the softmax's two rows
    are w / 2 and -w / 2 of the binomial's w, so their penalty counts twice; multilabel: the loss is summed
    over the labels; ridge: the loss is the squared error, not half of it.)
    Cs run from strong to weak regularization, each warm-started from the previous solution; the path stops
    once `LOGREG_PATIENCE` Cs in a row have not beaten the best validation score. `history` has one row per
    C fit (its "epoch" is the C's position, "C" the value); "last" is the weakest fit C's weights. Options
    of the epoch loop (lr, epochs, batch size, ...) do not apply and are ignored.

    >>> X = np.r_[np.zeros((5, 2)), np.ones((5, 2))]; y = np.r_[[0] * 5, [1] * 5]
    >>> r = fit_logreg(ArrayRows(X, y, torch.device("cpu")), ArrayRows(X, y, torch.device("cpu")), 2, cs=[1.0])
    >>> r.history[0]["val_accuracy"]
    1.0
    """
    if train.n == 0:
        raise UserError("the train split has no labelled rows to train on")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = Head(train.dim, num_classes, "logreg", task=task).to(device)
    _fit_statistics(model, train, val, standardize)
    X, y = _whole(train)
    weight = torch.as_tensor(class_weights, dtype=torch.float32, device=device) if class_weights is not None else None
    score = SCORE[task]

    def data_loss(out):
        if task == "classification":
            return nn.functional.cross_entropy(out, y, weight=weight)
        if task == "multilabel":
            return nn.functional.binary_cross_entropy_with_logits(out, y)
        return nn.functional.mse_loss(out[:, 0], (y - model.target_mean) / model.target_std)

    # data_loss is what the rows report (the mean per output, as validation's); the objective is scikit-learn's
    labels = num_classes if task == "multilabel" else 1
    binomial = 2.0 if task == "classification" and num_classes == 2 else 1.0

    lin = model.net
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    history, best_key, best_state, best_epoch = [], None, None, 0
    t0 = time.perf_counter()
    small = step_work(len(y), train.dim, "logreg", 0, num_classes, rows=len(y)) <= SMALL_STEP_FLOPS
    with torch_threads(1, when=device.type == "cpu" and small):
        for i, c in enumerate(sorted(float(c) for c in cs), 1):
            if val.n and i - best_epoch > LOGREG_PATIENCE:
                break  # weaker L2 only overfits more from here: the path stops (the remaining Cs are not fit)
            penalty = binomial / (c * len(y))
            # gradient tolerance as scikit-learn's lbfgs (tol 1e-4 on the same mean-scaled objective), tighter
            opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=max_iter, history_size=10,
                                    tolerance_grad=1e-5, tolerance_change=1e-9, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = labels * data_loss(lin(X)) + 0.5 * penalty * lin.weight.square().sum()
                loss.backward()
                return loss

            opt.step(closure)
            model.eval()
            with torch.no_grad():
                logits = lin(X)
                row = {"epoch": i, "C": c, "train_loss": float(data_loss(logits))}
                if task == "classification":
                    row["train_accuracy"] = (logits.argmax(1) == y).float().mean().item()
                row.update(_validate(model, val, task, weight))
                row["iterations"] = int(opt.state[opt._params[0]].get("n_iter", 0))
            history.append(row)
            # no validation: the strongest L2
            key = (rank_value(row, score), -row["val_loss"]) if val.n else (0.0, -c)
            if best_key is None or key > best_key:
                best_key, best_epoch = key, i
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if log:
                log(f"C {c:<8g} train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f} "
                    f"{score[4:].replace('_', '-')} {row[score]:.4f}  ({row['iterations']} iterations)")
    last_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(model, best_state, last_state, history, best_epoch, time.perf_counter() - t0)


@torch.no_grad()
def _validate(model: Head, val, task: str, weight: torch.Tensor | None = None) -> dict:
    """The validation loss and score(s) of a head's current weights over standardized rows (one host sync;
    Spearman on the host)."""
    score = SCORE[task]
    if not val.n:
        return {"val_loss": float("nan"), score: float("nan")}
    net = model.net
    if task == "regression":
        preds, ys = zip(*[(net(xb)[:, 0], yb) for xb, yb in val.chunks()])
        p, y = torch.cat(preds).cpu().numpy(), torch.cat(ys).cpu().numpy()
        std = float(model.target_std)
        return {"val_loss": float(np.mean((p - (y - float(model.target_mean)) / std) ** 2)),
                "val_spearman": spearman(p, y), "val_pearson": pearson(p, y)}
    device = model.shift.device
    vloss = vweight = hits = torch.zeros((), device=device)
    tp = fp = fn = torch.zeros((), device=device)
    for xb, yb in val.chunks():
        vlogits = net(xb)
        if task == "classification":  # weighted mean cross-entropy = sum of weighted losses / sum of weights
            vloss = vloss + nn.functional.cross_entropy(vlogits, yb, weight=weight, reduction="sum")
            vweight = vweight + (weight[yb].sum() if weight is not None else len(yb))
            hits = hits + (vlogits.argmax(1) == yb).sum()
        else:
            vloss = vloss + nn.functional.binary_cross_entropy_with_logits(vlogits, yb, reduction="sum")
            vweight = vweight + yb.numel()
            pred, truth = vlogits > 0, yb > 0.5
            tp, fp, fn = tp + (pred & truth).sum(), fp + (pred & ~truth).sum(), fn + (~pred & truth).sum()
    if task == "classification":
        loss, value = torch.stack([vloss / vweight, hits / val.n]).tolist()
    else:
        loss, value = torch.stack([vloss / vweight, 2 * tp / torch.clamp(2 * tp + fp + fn, min=1)]).tolist()
    return {"val_loss": loss, score: value}


@torch.no_grad()
def _fit_statistics(model: Head, train, val, standardize: bool) -> None:
    """What a head takes from the train split before training: with `standardize`, its input's mean and
    standard deviation (buffers saved with the weights, so predict applies them identically; both row
    sources hand over standardized rows from then on, and training runs the bare net); for regression,
    the target's mean and standard deviation."""
    if standardize:
        mean, std = train.moments()
        model.shift.copy_(torch.from_numpy(mean).float())
        model.scale.copy_(torch.from_numpy(1.0 / np.where(std > 1e-6, std, 1.0)).float())
        for rows in (train, val):
            rows.standardize(model.shift, model.scale)
    if model.task == "regression":
        y = np.concatenate([y.cpu().numpy() for _, y in train.chunks()]).astype(np.float64)
        model.target_mean.fill_(float(y.mean()))
        model.target_std.fill_(float(y.std()) if y.std() > 1e-12 else 1.0)


def rank_value(row: dict, score: str) -> float:
    """A history or sweep row's validation score for ranking: NaN (constant outputs) ranks last."""
    return row[score] if row[score] == row[score] else -float("inf")


def _whole(rows) -> tuple[torch.Tensor, torch.Tensor]:
    """A row source's rows as two tensors (full-batch methods need them all at once)."""
    parts = list(rows.chunks())
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


@torch.no_grad()
def _start_from_first_column(model: Head, train, task: str, num_classes: int) -> None:
    """Weights that read the (standardized) first column alone, as its best fit would: regression,
    the correlation (the least-squares slope on standardized data); classification, linear discriminant
    analysis on the column (class c: mean_c / var * x - mean_c^2 / (2 var) + log prior_c, var the
    pooled within-class variance), whose thresholds sit where the classes' densities cross. Everything
    else 0."""
    x, y = zip(*[(xb[:, 0], yb) for xb, yb in train.chunks()])
    x, y = torch.cat(x).double(), torch.cat(y)
    lin = model.net
    lin.weight.zero_()
    lin.bias.zero_()
    if task == "regression":
        lin.weight[0, 0] = float(pearson(x.cpu().numpy(), y.cpu().numpy()))
        return
    means = {c: x[y == c].mean() for c in range(num_classes) if (y == c).any()}
    var = float(sum(((x[y == c] - m) ** 2).sum() for c, m in means.items()) / max(1, len(x) - len(means)))
    var = var if var > 1e-12 else 1.0
    for c in range(num_classes):
        if c in means:
            m = float(means[c])
            lin.weight[c, 0] = m / var
            lin.bias[c] = -m * m / (2 * var) + float(np.log(float((y == c).float().mean())))
        else:
            lin.bias[c] = -30.0  # a class train never shows: never predicted at the start


@torch.no_grad()
def predict_rows(head: Head, rows) -> np.ndarray:
    """The head's outputs (class / label probabilities, or regression values) for every row, in order."""
    head.eval()
    out = [head.outputs(head(x)).cpu().numpy() for x, _ in rows.chunks()]
    if out:
        return np.concatenate(out)
    return np.zeros((0,) if head.task == "regression" else (0, head.num_classes), np.float32)


def _adamw(params, lr, weight_decay):
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused AdamW is not built for every device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
