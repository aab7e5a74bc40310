"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., 2023, arXiv:2306.01708)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from workers.merge import quantile
from workers.merge.registry import merge_method, param, per_model
from workers.merge.task_vectors import combine, keep_largest, task_vectors

TRIM_SCOPES = ("global", "tensor")


@dataclass(frozen=True)
class TiesParams:
    weight: tuple[float, ...] = per_model(1.0)
    density: tuple[float, ...] = per_model(0.2, ge=0, le=1)  # fraction of τ_i kept (k)
    trim_scope: str = param("global", choices=TRIM_SCOPES)
    scale: float = param(1.0)  # λ; mergekit's `lambda`
    normalize: bool = param(True)  # disjoint mean (True) or disjoint sum (False)


class GlobalTrim:
    """R stage of global trimming: per model, the exact magnitude of its k-th largest task-vector
    entry over every tensor of the group, k = int(density * entries). State after the last pass:
    one threshold per model (None keeps nothing)."""

    passes = 2

    def key(self, p: TiesParams) -> Hashable | None:
        return p.density if p.trim_scope == "global" else None

    def collect(self, pass_index: int, tensors: Sequence[torch.Tensor], p: TiesParams, *,
                base: torch.Tensor, state: Any) -> torch.Tensor:
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


def _locate(hist: torch.Tensor, density: float) -> str | tuple[int, int]:
    """"none", "all", or (high bin, rank inside it) of the k-th largest magnitude."""
    n = int(hist.sum())
    keep = int(density * n)
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


@merge_method("ties", params=TiesParams, needs_base=True, stats=GlobalTrim())
def ties(tensors: Sequence[torch.Tensor], p: TiesParams, *, base: torch.Tensor,
         stats: list[float | None] | None) -> torch.Tensor:
    """Trim each task vector, elect a sign per entry, merge only the entries that agree.

    Keeps the top-``density`` entries of each task vector by magnitude, elects the sign of the
    weighted sum per entry, and averages (``normalize``) or sums only the agreeing entries.

    ``trim_scope: global`` (default, the paper and FusionBench) trims with one threshold per model
    over the whole model (``stats`` holds it; entries with |τ| >= threshold survive, so ties at
    the threshold are kept); ``trim_scope: tensor`` trims each tensor on its own (mergekit).
    A zero weighted sum elects the positive sign (the paper's code uses the model-wide majority).
    """
    deltas = task_vectors(tensors, base)
    for i in range(len(tensors)):
        if p.trim_scope == "tensor":
            deltas[i] = keep_largest(deltas[i], p.density[i])
        elif stats[i] is None:
            deltas[i].zero_()
        else:
            deltas[i] *= deltas[i].abs().float() >= stats[i]
    return combine(deltas, p.weight, base=base, sign_consensus=True, normalize=p.normalize,
                   scale=p.scale)
