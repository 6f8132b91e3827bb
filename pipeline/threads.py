"""Torch's intra-op thread count, changed for a block of code and then put back."""
from __future__ import annotations

import contextlib
import threading

import torch

_lock = threading.RLock()  # the count is process-wide: two blocks changing it at once would restore the wrong value


@contextlib.contextmanager
def torch_threads(n: int, when: bool = True):
    """Run the block with `n` torch threads (threads started inside inherit the setting), if `when`.

    Example:
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
    """
    if not when:
        yield
        return
    with _lock:
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)
