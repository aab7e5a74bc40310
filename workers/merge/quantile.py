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
