"""Exact k-th largest magnitude over many tensors, computed in two mergeable passes.

The bit pattern of a non-negative float32, read as an int32, is monotone in its value. So the
k-th largest |x| over all shards is found exactly by a radix select on 16 + 16 bits: pass one
counts the high halves (65,536 bins), the driver finds the bin holding rank k, pass two counts
the low halves inside that bin. The counts are integers, so summing them over any number of
workers in any order gives the same answer: distributed == single process, bit for bit.
"""

from __future__ import annotations

import struct

import torch

BINS = 1 << 16


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| as float32, flattened."""
    return x.abs().float().contiguous().reshape(-1).view(torch.int32)


def high_histogram(bits: torch.Tensor) -> torch.Tensor:
    return torch.bincount(bits >> 16, minlength=BINS)


def low_histogram(bits: torch.Tensor, high: int) -> torch.Tensor:
    # clamping values outside the bin to two spare bins is cheaper than selecting those inside
    low = bits - (high << 16)
    low.clamp_(-1, BINS).add_(1)
    return torch.bincount(low, minlength=BINS + 2)[1:BINS + 1]


def select(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th largest value (1 = largest) and its rank inside that bin."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(rank)))
    b = BINS - 1 - idx
    above = int(from_top[idx]) - int(hist[b])
    return b, rank - above


def bits_to_float(high: int, low: int) -> float:
    return struct.unpack("<f", struct.pack("<I", (high << 16) | low))[0]


def signed_keys(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving non-negative int64 keys < 2^32 of the float32 values of ``x`` (any
    sign), flattened: non-negative floats map to 2^31 + bits, negative ones to −1 − bits (as
    int32); ``high_histogram``/``low_histogram``/``select`` then work on them unchanged."""
    bits = x.float().contiguous().reshape(-1).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), -1 - bits)


def key_to_float(high: int, low: int) -> float:
    """The float32 value of a ``signed_keys`` key given as (high, low) halves."""
    key = (high << 16) | low
    bits = key - (1 << 31) if key >= 1 << 31 else -1 - key
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def kth_smallest_rank(n: int, index: int) -> int:
    """``select``'s rank (1 = largest) of the value at ``index`` of the ascending order."""
    return n - index
