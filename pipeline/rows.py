"""Row sources for the training loop: a split's pooled rows in memory (`ArrayRows`), or read from the
HDF5 cache a window of blocks at a time (`StoredRows`) when they do not fit the memory budget.

fit-head holds the train / validation / test matrices in memory when they fit `--max-memory` (default:
half the memory the machine has available), and otherwise trains on `StoredRows`, which give the
training loop (training.fit_rows) exactly the batches the in-memory path would, in the same order.
Both offer `n`, `dim`, `moments()`, `standardize(shift, scale)`, `batches(order, batch_size)` and
`chunks()`, yielding (x, y) tensors on the training device.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from .defaults import SHUFFLE_BLOCK, SHUFFLE_WINDOW
from .errors import UserError
from .poolings import build_features, pooled_width, pooling_features
from .store import FeatureStore

MEMORY_FRACTION = 0.5  # of MemAvailable, the default --max-memory
GPU_MEMORY_FRACTION = 0.8  # of free GPU memory, for the in-memory path's tensors on the GPU
IN_MEMORY_COPIES = 3  # peak copies while loading: float32 features, the pooled concatenation, the kept rows
_GAP = 16  # file rows between two wanted ones past which a streamed read starts a new slab (StoredRows.read)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value) -> int:
    """Bytes from 123, '512M', '4G', '1.5T' (powers of 1024)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
    if not m:
        raise UserError(f"cannot read --max-memory {value!r}; give bytes or a size like 512M, 4G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def available_memory() -> int:
    """Memory available to this process: MemAvailable (Linux), else what psutil, the OS or, at worst, half the
    physical memory says. Every platform gets an answer: Windows has no os.sysconf, macOS no SC_AVPHYS_PAGES."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    if os.name == "nt":
        return _windows_available_memory()
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    try:  # macOS: the free page count leaves out the reclaimable cache, so half the physical memory instead
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return FALLBACK_MEMORY


FALLBACK_MEMORY = 4 << 30  # when no source answers: a laptop's share


def _windows_available_memory() -> int:
    import ctypes

    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return FALLBACK_MEMORY
    return int(status.ullAvailPhys)


def memory_budget(max_memory=None, device: torch.device | None = None) -> int:
    if max_memory is not None:
        return parse_size(max_memory)
    budget = int(available_memory() * MEMORY_FRACTION)
    if device is not None and device.type == "cuda":
        budget = min(budget, int(torch.cuda.mem_get_info(device)[0] * GPU_MEMORY_FRACTION))
    return budget


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


def label_tensor(y: np.ndarray, device) -> torch.Tensor:
    """Class ids as long; regression targets and multilabel 0/1 matrices as float32 (tasks.py)."""
    y = np.asarray(y)
    if y.ndim == 1 and y.dtype.kind in "iu":
        return torch.as_tensor(y, dtype=torch.long, device=device)
    return torch.as_tensor(y.astype(np.float32), device=device)


class ArrayRows:
    """A split's rows held on the training device. (The streamed counterpart is StoredRows.)"""

    def __init__(self, X: np.ndarray, y: np.ndarray, device: torch.device):
        self.array = X
        self.X = torch.as_tensor(X, dtype=torch.float32, device=device)
        self.y = label_tensor(y, device)
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


class StoredRows:
    """Rows `index` (sorted row numbers) of a cached split, pooled on the fly, read in contiguous runs."""

    def __init__(self, store: FeatureStore, split: str, pooling: str, index: np.ndarray, labels: np.ndarray,
                 device: torch.device, chunk_rows: int, window: int = SHUFFLE_WINDOW, block: int = SHUFFLE_BLOCK):
        self.group = store.require_split(split)
        self.pooling, self.layers = pooling, store.settings["layers"]
        self.names = pooling_features(pooling, self.layers)
        self.index, self.labels = np.asarray(index), np.asarray(labels)  # labels: those of `index`
        self.device, self.chunk_rows, self.window, self.block = device, max(1, int(chunk_rows)), int(window), int(block)
        self.n, self.dim = len(self.index), pooled_width(pooling, self.layers, store.settings["hidden_size"],
                                                             store.settings.get("feature_dims"))
        self.shift = self.scale = None

    def standardize(self, shift: torch.Tensor, scale: torch.Tensor):
        """Give (x - shift) * scale from now on (applied to each batch as it is read)."""
        self.shift, self.scale = shift, scale

    def read(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of positions `pos` (into `index`), in that order."""
        order = np.sort(pos)
        # One slab read per shuffle block touched: few reads, and a bounded overread when the memory
        # budget makes a read hold only part of a shuffle window (scattered rows of several blocks). A gap
        # of more than _GAP rows in the file (labelled rows sparse among unlabelled ones, a hold-out taken
        # from train) starts a new read too, so a slab never holds more than _GAP unwanted rows per wanted one.
        file_rows = self.index[order]
        breaks = np.flatnonzero((np.diff(order // self.block) != 0) | (np.diff(file_rows) > _GAP)) + 1
        parts = {n: [] for n in self.names}
        for run in np.split(order, breaks):
            rows = self.index[run]
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            for n in self.names:
                parts[n].append(self.group[n][lo:hi][rows - lo].astype(np.float32, copy=False))
        X = build_features({n: np.concatenate(v) for n, v in parts.items()}, self.pooling, self.layers)
        where = np.searchsorted(order, pos)
        return X[where], self.labels[pos]

    def _tensors(self, X, y):
        x = torch.as_tensor(X, device=self.device)
        if self.shift is not None:
            x = (x - self.shift) * self.scale
        return x, label_tensor(y, self.device)

    def _read_chunks(self):
        """(features, labels) of every row in order, `chunk_rows` at a time."""
        for a in range(0, self.n, self.chunk_rows):
            yield self.read(np.arange(a, min(a + self.chunk_rows, self.n)))

    def moments(self):
        return moments(X for X, _ in self._read_chunks())

    def batches(self, order: torch.Tensor, batch_size: int):
        """The batches ArrayRows.batches gives for `order`: consecutive slices of it, read a window at a time."""
        order = order.numpy()
        carry_x, carry_y = None, None
        for start in range(0, self.n, self.window):
            X, y = self.read(order[start:start + self.window])
            if carry_x is not None:
                X, y = np.concatenate([carry_x, X]), np.concatenate([carry_y, y])
            full = len(X) // batch_size * batch_size
            for a in range(0, full, batch_size):
                yield self._tensors(X[a:a + batch_size], y[a:a + batch_size])
            carry_x, carry_y = X[full:], y[full:]
        if carry_x is not None and len(carry_x):
            yield self._tensors(carry_x, carry_y)

    def chunks(self):
        for X, y in self._read_chunks():
            yield self._tensors(X, y)
