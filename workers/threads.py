"""How a worker's torch computes: a pinned thread count and an allocator that keeps freed memory.

A leaf module, so that task bodies, alignment and training code can all import it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager
from typing import Iterator

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


@functools.cache
def _keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks up to 256 MiB in the heap instead of returning them to the
    kernel: every chunk allocates fresh tensors, and with the default dynamic mmap threshold
    each of them costs page faults and zeroing, which more than doubled the merge time."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Pin torch's intra-op threads: reductions round differently with other thread counts."""
    _keep_freed_memory()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
