"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., 2023, arXiv:2306.01708)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from workers.merge import quantile
from workers.merge.registry import merge_method, param, per_model, single_pass_stats
from workers.merge.task_vectors import (
    as_float,
    cast_inputs,
    combine,
    keep_largest,
    task_vectors,
)

TRIM_SCOPES = ("global", "tensor")
TRIM_TIES = ("index", "sort")


@dataclass(frozen=True)
class TiesParams:
    weight: tuple[float, ...] = per_model(1.0)
    density: tuple[float, ...] = per_model(0.2, ge=0, le=1)  # fraction of τ_i kept (k)
    trim_scope: str = param("global", choices=TRIM_SCOPES)
    # per-tensor trim keeps exactly k entries; entries tied with the k-th largest |τ| are taken
    # in index order (O(n), chunked) or as a full argsort orders them (mergekit's, bit for bit)
    trim_ties: str = param("index", choices=TRIM_TIES)
    scale: float = param(1.0)  # λ; mergekit's `lambda`
    normalize: bool = param(True)  # disjoint mean (True) or disjoint sum (False)


class GlobalTrim:
    """R stage of global trimming to exactly k = int(density * entries) per model over every
    tensor of the group. Passes 0 and 1 find each model's k-th largest |τ| exactly (radix
    histograms) and how many entries equal to it are kept (the quota); pass 2 counts, per tensor,
    the entries equal to the threshold, and the quota goes to them in tensor order, then index
    order. ``for_tensor`` gives one tensor's ``[threshold, quota]`` per model (None keeps
    nothing). ``TensorTrim`` runs passes 0 and 1 over the chunks of one tensor instead."""

    passes = 3
    tensor_passes = frozenset({2})

    def key(self, p: TiesParams) -> Hashable | None:
        return p.density if p.trim_scope == "global" else None

    def collect(self, pass_index: int, tensors: Sequence[torch.Tensor], p: TiesParams, *,
                base: torch.Tensor, state: Any, rng: Any = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """Inputs as stored with ``dtype`` (the compute dtype), else already cast."""
        from workers.merge import kernels

        high = None if pass_index == 0 else [s[0] if isinstance(s, tuple) else -1 for s in state]
        fused = pass_index < 2 and kernels.fused_inputs(tensors, base, dtype or base.dtype)
        if fused:
            return kernels.histograms(fused, high)
        tensors, base = cast_inputs(tensors, base, dtype)
        if pass_index == 2:
            return torch.tensor([0 if s is None else int(((t - base).abs().float() == s[0]).sum())
                                 for t, s in zip(tensors, state)], dtype=torch.int64)
        return kernels.magnitude_histograms(task_vectors(tensors, base), high)

    def reduce(self, pass_index: int, total: Any, p: TiesParams, state: Any) -> Any:
        if pass_index == 0:
            return [_locate(hist, density) for hist, density in zip(total, p.density)]
        if pass_index == 1:
            return [_threshold(hist, s) for hist, s in zip(total, state)]
        quotas, left = [], [0 if s is None else s[1] for s in state]
        for counts in total:  # one tensor after the other, in plan order
            taken = [min(q, int(c)) for q, c in zip(left, counts)]
            quotas.append(taken)
            left = [q - t for q, t in zip(left, taken)]
        return state, quotas

    def for_tensor(self, state: Any, slot: int) -> list[list | None]:
        thresholds, quotas = state
        return [None if t is None else [t[0], q] for t, q in zip(thresholds, quotas[slot])]


class TensorTrim(GlobalTrim):
    """Per-tensor trim to exactly k = max(1, int(density * n)) entries per model, as mergekit
    counts them. State: per model None (keep nothing), or ``[threshold, quota]``: keep every
    entry above the threshold and the first ``quota`` entries equal to it, in index order.
    The kernel consumes the quota chunk by chunk, so chunks must come in order."""

    passes = 2

    def needed(self, p: TiesParams) -> bool:
        return p.trim_scope == "tensor" and p.trim_ties == "index"

    def reduce(self, pass_index: int, total: torch.Tensor, p: TiesParams, state: Any) -> Any:
        if pass_index == 0:  # like mergekit, a positive density keeps at least one entry
            return [_locate(h, d, at_least=1 if d > 0 else 0) for h, d in zip(total, p.density)]
        return super().reduce(pass_index, total, p, state)


def _sorted_trim(p: TiesParams) -> bool:
    return p.trim_scope == "tensor" and p.trim_ties == "sort"


def _locate(hist: torch.Tensor, density: float, at_least: int = 0) -> str | tuple[int, int]:
    """"none", "all", or (high bin, rank inside it) of the k-th largest magnitude."""
    n = int(hist.sum())
    keep = max(at_least, int(density * n)) if n else 0
    if keep <= 0:
        return "none"
    if keep >= n:
        return "all"
    return quantile.select(hist, keep)


def _threshold(hist: torch.Tensor, located: str | tuple[int, int]) -> list | None:
    """``[threshold, entries equal to it to keep]``, or None to keep nothing."""
    if located == "none":
        return None
    if located == "all":
        return [0.0, int(hist.sum())]
    low, quota = quantile.select(hist, located[1])
    return [quantile.bits_to_float(located[0], low), quota]


def _keep_quota(delta: torch.Tensor, state: list | None) -> None:
    """Zero ``delta`` (a chunk) below the threshold, and past the quota of tied entries."""
    from workers.merge import kernels

    if state is None:
        delta.zero_()
        return
    threshold, quota = state
    if kernels.fused(delta):
        state[1] = kernels.trim(delta, threshold, quota)
        return
    magnitude = delta.abs().float()
    keep = magnitude > threshold
    tied = magnitude == threshold
    n_tied = int(tied.sum())
    if n_tied <= quota:
        keep |= tied
    elif quota > 0:
        keep.view(-1)[tied.view(-1).nonzero()[:quota, 0]] = True
    state[1] = max(0, quota - n_tied)
    delta *= as_float(keep, delta.dtype)


@merge_method("ties", params=TiesParams, needs_base=True, stats=GlobalTrim(),
              elementwise=lambda p: not _sorted_trim(p), tensor_stats=TensorTrim(),
              stored_inputs=True)
def ties(tensors: Sequence[torch.Tensor], p: TiesParams, *, base: torch.Tensor,
         stats: list[list | None] | None,
         tensor_stats: list[list | None] | None = None,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Trim each task vector, elect a sign per entry, merge only the entries that agree.

    Keeps the top-``density`` entries of each task vector by magnitude, elects the sign of the
    weighted sum per entry, and averages (``normalize``) or sums only the agreeing entries.

    ``trim_scope: global`` (default, the paper and FusionBench) keeps exactly k entries per model
    over the whole model (``stats``: this tensor's threshold and share of the tied entries);
    ``trim_scope: tensor`` trims each tensor on its own (mergekit) to exactly k entries, ties at
    the threshold taken in index order (``trim_ties: index``, a linear-time selection) or in
    mergekit's argsort order (``sort``, bit for bit mergekit).
    A zero weighted sum elects the positive sign (the paper's code uses the model-wide majority).
    With ``dtype`` the inputs come as stored: float32 arithmetic on bfloat16 or float32 inputs
    runs as one fused loop (``kernels.ties_merge``), anything else is cast first.
    """
    from workers.merge import kernels

    if p.trim_scope == "tensor" and not _sorted_trim(p) and tensor_stats is None:
        whole, whole_base = cast_inputs(tensors, base, dtype)  # a whole tensor, outside the engine
        tensor_stats = single_pass_stats(TensorTrim(), whole, p, whole_base)
    trims = tensor_stats if p.trim_scope == "tensor" else stats
    fused = not _sorted_trim(p) and kernels.fused_inputs(tensors, base, dtype or base.dtype)
    if fused:
        return kernels.ties_merge(fused, trims, p.weight, unit=all(w == 1 for w in p.weight),
                                  normalize=p.normalize, scale=p.scale).reshape(base.shape)
    tensors, base = cast_inputs(tensors, base, dtype)
    deltas = task_vectors(tensors, base)
    for i in range(len(tensors)):
        if _sorted_trim(p):
            deltas[i] = keep_largest(deltas[i], p.density[i])
        else:
            _keep_quota(deltas[i], trims[i])
    return combine(deltas, p.weight, base=base, sign_consensus=True, normalize=p.normalize,
                   scale=p.scale)
