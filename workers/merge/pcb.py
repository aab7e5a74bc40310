"""PCB-Merging: parameter competition balancing (Du et al., 2024, arXiv:2410.02396)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from workers.merge import quantile
from workers.merge.registry import merge_method, param
from workers.merge.task_vectors import task_vectors

CLIP = 0.0001  # each |τ_i| is clipped at its own 0.01 % and 99.99 % order statistics


@dataclass(frozen=True)
class PcbParams:
    ratio: float = param(0.1, ge=0, le=1)  # share of each model's scores kept
    scale: float = param(1.0)  # λ


def _indices(n: int, ratio: float) -> tuple[int, int, int]:
    """Ascending-order positions (as the reference's sort-and-index) of the clip bounds of
    |τ| and of the drop threshold of the scores, among n entries."""
    return int(n * CLIP), int(n * (1 - CLIP) - 1), min(n - 1, int(n * (1 - ratio)))


def scores(deltas: torch.Tensor, bounds: list[tuple[float, float]]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped τ, score β) per model, float32, for one chunk: intra-balance
    exp(K · minmax(|τ_i|)²) times inter-balance tanh(τ_i ⊙ Σ_j τ_j)."""
    tau = deltas.float()
    k = len(tau)
    lo = torch.tensor([b[0] for b in bounds]).reshape(k, *([1] * (tau.dim() - 1)))
    hi = torch.tensor([b[1] for b in bounds]).reshape(lo.shape)
    magnitude = torch.minimum(torch.maximum(tau.abs(), lo), hi)
    span = hi - lo
    intra = torch.where(span > 0, (magnitude - lo) / torch.where(span > 0, span, 1), 0)
    beta = torch.exp(intra.square() * k) * torch.tanh(tau * tau.sum(dim=0))
    return torch.sign(tau) * magnitude, beta


class Balance:
    """The R stage: per model, exact order statistics over the whole model (radix selects on
    integer histograms, so any split over workers gives the same bits): passes 0-1 the clip
    bounds of |τ_i|, passes 2-3 the drop threshold and the maximum of the scores β_i."""

    passes = 4
    tensor_passes = frozenset()

    def key(self, p: PcbParams) -> Hashable | None:
        return p.ratio

    def collect(self, pass_index: int, tensors: Sequence[torch.Tensor], p: PcbParams, *,
                base: torch.Tensor, state: Any, rng: Any = None) -> torch.Tensor:
        deltas = task_vectors(tensors, base)
        if pass_index < 2:
            keys = [quantile.signed_keys(d.abs()) for d in deltas]
        else:
            keys = [quantile.signed_keys(b) for b in scores(deltas, state["bounds"])[1]]
        if pass_index in (0, 2):
            return torch.stack([quantile.high_histogram(k) for k in keys])
        located = state["located"]
        return torch.stack([torch.stack([quantile.low_histogram(k, high) for high, _ in bins])
                            for k, bins in zip(keys, located)])

    def reduce(self, pass_index: int, total: torch.Tensor, p: PcbParams, state: Any) -> Any:
        state = dict(state or {})
        if pass_index in (0, 2):
            n = int(total[0].sum())
            lo, hi, drop = _indices(n, p.ratio)
            wanted = (lo, hi) if pass_index == 0 else (drop, n - 1)
            state["located"] = [[quantile.select(h, quantile.kth_smallest_rank(n, i))
                                 for i in wanted] for h in total]
            return state
        values = []
        for hists, bins in zip(total, state["located"]):
            values.append(tuple(quantile.key_to_float(high, quantile.select(h, rank)[0])
                                for h, (high, rank) in zip(hists, bins)))
        state["bounds" if pass_index == 1 else "drops"] = values
        return state

    def for_tensor(self, state: dict, slot: int) -> dict:
        return {"bounds": state["bounds"], "drops": state["drops"]}


@merge_method("pcb", params=PcbParams, needs_base=True, elementwise=True, stats=Balance())
def pcb(tensors: Sequence[torch.Tensor], p: PcbParams, *, base: torch.Tensor,
        stats: dict | None = None) -> torch.Tensor:
    """Weigh each task vector's entries by how much they matter to it and agree with the rest.

    Each |τ_i| is clipped at its own 0.01 % / 99.99 % order statistics; the score
    β_i = exp(K · minmax(|τ_i|)²) · tanh(τ_i ⊙ Σ_j τ_j) keeps its top ``ratio`` share (over
    the whole model), min-max normalised to weights ω_i; θ0 + λ Σ ω_i τ_i / Σ ω_i. The order
    statistics are exact, found over all tensors by radix selection. Called on one tensor
    alone (tests), that tensor is the model.
    """
    deltas = task_vectors(tensors, base)
    if stats is None:
        stats = _whole_model_stats(tensors, p, base)
    clipped, beta = scores(deltas, stats["bounds"])
    shape = (len(tensors), *([1] * base.dim()))
    drop = torch.tensor([d[0] for d in stats["drops"]]).reshape(shape)
    top = torch.tensor([d[1] for d in stats["drops"]]).reshape(shape)
    span = top - drop
    weight = torch.where(span > 0, (torch.maximum(beta, drop) - drop)
                         / torch.where(span > 0, span, 1), 0)
    merged = (clipped * weight).sum(dim=0) / weight.sum(dim=0).clamp(min=1e-12)
    return base + (merged * p.scale).to(base.dtype)


def _whole_model_stats(tensors: Sequence[torch.Tensor], p: PcbParams,
                       base: torch.Tensor) -> dict:
    stage, state = Balance(), None
    for i in range(stage.passes):
        state = stage.reduce(i, stage.collect(i, tensors, p, base=base, state=state), p, state)
    return stage.for_tensor(state, 0)
