"""EMR-merging: elect, mask, rescale (Huang et al., 2024, arXiv:2405.17461)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from workers.merge.registry import merge_method
from workers.merge.task_vectors import as_float, task_vectors


@dataclass(frozen=True)
class EmrParams:
    pass  # no hyper-parameters, no data


def elect(tensors: Sequence[torch.Tensor],
          base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ_i stacked, the elected sign γ = sign(Σ τ_i) with zeros -> −1, the unified task
    vector τ_uni = γ · max{|τ_i| : τ_i agrees with γ})."""
    deltas = task_vectors(tensors, base)
    gamma = as_float(deltas.sum(dim=0) > 0, deltas.dtype) * 2 - 1
    agree = as_float(deltas * gamma > 0, deltas.dtype)
    return deltas, gamma, (deltas.abs() * agree).amax(dim=0) * gamma


def emr_masks(tensors: Sequence[torch.Tensor], p: EmrParams, *,
              base: torch.Tensor) -> torch.Tensor:
    """Task i's mask M_i = 1{τ_i ⊙ γ > 0}: where its task vector agrees with the election."""
    deltas, gamma, _ = elect(tensors, base)
    return deltas * gamma > 0


class Rescalers:
    """The R stage: per task, Σ|τ_i| and Σ|M_i ⊙ τ_uni| over the whole model (the paper's
    sums over all parameters; float partials added in plan order), giving the rescaler
    s_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| that the task-aware loader applies."""

    passes = 1
    tensor_passes = frozenset({0})

    def key(self, p: EmrParams) -> Hashable | None:
        return "model"

    def collect(self, pass_index: int, tensors: Sequence[torch.Tensor], p: EmrParams, *,
                base: torch.Tensor, state: Any, rng: Any = None) -> torch.Tensor:
        deltas, gamma, uni = elect(tensors, base)
        masked = (deltas * gamma > 0).to(torch.float64) * uni.double().abs()
        flat = deltas.double().abs().reshape(len(tensors), -1).sum(dim=1)
        return torch.cat([flat, masked.reshape(len(tensors), -1).sum(dim=1)])

    def reduce(self, pass_index: int, total: list[torch.Tensor], p: EmrParams,
               state: Any) -> dict:
        k = len(total[0]) // 2
        sums = [0.0] * (2 * k)
        for part in total:
            for j in range(2 * k):
                sums[j] += float(part[j])
        return {"rescalers": [a / b if b > 0 else 1.0 for a, b in zip(sums[:k], sums[k:])]}

    def for_tensor(self, state: dict, slot: int) -> None:
        return None  # the output holds τ_uni; the rescalers are applied per task on load

    def report(self, state: dict) -> dict:
        return state


@merge_method("emr", params=EmrParams, needs_base=True, elementwise=True, stats=Rescalers(),
              masks=emr_masks)
def emr(tensors: Sequence[torch.Tensor], p: EmrParams, *, base: torch.Tensor,
        stats: Any = None) -> torch.Tensor:
    """Task-aware: one unified model plus a 1-bit mask and a rescaler per task.

    The sign of Σ τ_i is elected per entry; the unified task vector takes, per entry, the
    largest magnitude among the task vectors of that sign. The output is θ0 + τ_uni; task i's
    model θ0 + s_i M_i ⊙ τ_uni (``raymerge task-model``) needs its mask M_i (where τ_i agrees
    with the election; ``masks/``) and rescaler s_i (``method_state`` in the manifest).
    """
    return base + elect(tensors, base)[2]
