"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., 2023, arXiv:2306.01708)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from workers.merge import quantile
from workers.merge.registry import merge_method, param, per_model, single_pass_stats
from workers.merge.task_vectors import as_float, combine, keep_largest, task_vectors

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
    """R stage of global trimming: per model, the exact magnitude of its k-th largest task-vector
    entry over every tensor of the group, k = int(density * entries). State after the last pass:
    one threshold per model (None keeps nothing). ``TensorTrim`` runs the same two passes over
    the chunks of one tensor for the per-tensor trim."""

    passes = 2

    def key(self, p: TiesParams) -> Hashable | None:
        return p.density if p.trim_scope == "global" else None

    def collect(self, pass_index: int, tensors: Sequence[torch.Tensor], p: TiesParams, *,
                base: torch.Tensor, state: Any, rng: Any = None) -> torch.Tensor:
        hists = []
        for i, t in enumerate(tensors):
            bits = quantile.magnitude_bits(t - base)
            if pass_index == 0:
                hists.append(quantile.high_histogram(bits))
            elif isinstance(state[i], tuple):
                hists.append(quantile.low_histogram(bits, state[i][0]))
            else:
                hists.append(torch.zeros(quantile.BINS, dtype=torch.int64))
        return torch.stack(hists)

    def reduce(self, pass_index: int, total: torch.Tensor, p: TiesParams, state: Any) -> Any:
        if pass_index == 0:
            return [_locate(hist, density) for hist, density in zip(total, p.density)]
        return [_threshold(hist, s) for hist, s in zip(total, state)]


class TensorTrim(GlobalTrim):
    """Per-tensor trim to exactly k = max(1, int(density * n)) entries per model, as mergekit
    counts them. State: per model None (keep nothing), or ``[threshold, quota]``: keep every
    entry above the threshold and the first ``quota`` entries equal to it, in index order.
    The kernel consumes the quota chunk by chunk, so chunks must come in order."""

    def needed(self, p: TiesParams) -> bool:
        return p.trim_scope == "tensor" and p.trim_ties == "index"

    def reduce(self, pass_index: int, total: torch.Tensor, p: TiesParams, state: Any) -> Any:
        if pass_index == 0:
            return [_locate(h, d, at_least=1 if d > 0 else 0) for h, d in zip(total, p.density)]
        out = []
        for hist, located in zip(total, state):
            if located in ("none", "all"):
                out.append(None if located == "none" else [0.0, int(hist.sum())])
            else:
                low, quota = quantile.select(hist, located[1])
                out.append([quantile.bits_to_float(located[0], low), quota])
        return out


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


def _threshold(hist: torch.Tensor, located: str | tuple[int, int]) -> float | None:
    if located == "none":
        return None
    if located == "all":
        return 0.0
    high, rank = located
    return quantile.bits_to_float(high, quantile.select(hist, rank)[0])


def _keep_quota(delta: torch.Tensor, state: list | None) -> None:
    """Zero ``delta`` (a chunk) below the threshold, and past the quota of tied entries."""
    if state is None:
        delta.zero_()
        return
    threshold, quota = state
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
              elementwise=lambda p: not _sorted_trim(p), tensor_stats=TensorTrim())
def ties(tensors: Sequence[torch.Tensor], p: TiesParams, *, base: torch.Tensor,
         stats: list[float | None] | None,
         tensor_stats: list[float | None] | None = None) -> torch.Tensor:
    """Trim each task vector, elect a sign per entry, merge only the entries that agree.

    Keeps the top-``density`` entries of each task vector by magnitude, elects the sign of the
    weighted sum per entry, and averages (``normalize``) or sums only the agreeing entries.

    ``trim_scope: global`` (default, the paper and FusionBench) trims with one threshold per model
    over the whole model (``stats`` holds it; entries with |τ| >= threshold survive, so ties at
    the threshold are kept); ``trim_scope: tensor`` trims each tensor on its own (mergekit) to
    exactly k entries, ties at the threshold taken in index order (``trim_ties: index``, a
    linear-time selection) or in mergekit's argsort order (``sort``, bit for bit mergekit).
    A zero weighted sum elects the positive sign (the paper's code uses the model-wide majority).
    """
    deltas = task_vectors(tensors, base)
    if p.trim_scope == "tensor" and not _sorted_trim(p) and tensor_stats is None:
        tensor_stats = single_pass_stats(TensorTrim(), tensors, p, base)
    for i in range(len(tensors)):
        if _sorted_trim(p):
            deltas[i] = keep_largest(deltas[i], p.density[i])
        elif p.trim_scope == "tensor":
            _keep_quota(deltas[i], tensor_stats[i])
        elif stats[i] is None:
            deltas[i].zero_()
        elif stats[i] > 0:
            deltas[i] *= as_float(deltas[i].abs().float() >= stats[i], deltas.dtype)
    return combine(deltas, p.weight, base=base, sign_consensus=True, normalize=p.normalize,
                   scale=p.scale)
