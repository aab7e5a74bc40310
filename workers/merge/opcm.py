"""OPCM: orthogonal projection for continual merging (Tang et al., 2025, arXiv:2501.09522).

Models arrive one at a time and only the running merge is kept. One step merges the newly
arrived model into the previous merge: inputs ``[previous merge, new model]`` and the base,
plus the running state the previous step left in its manifest (``merged``, ``prior_scale``,
``norm_sum``); the first step has the first model alone (``merged: 0``). A job with K models
and ``merged: 0`` runs as K steps (``orchestrator/engine/job.py``); the scheduler
(``orchestrator/ops/schedule.py``) runs one step per arriving model. The state is model-wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from workers.merge.registry import ContinualStep, merge_method, param


@dataclass(frozen=True)
class OpcmParams:
    alpha: float = param(0.5, ge=0, le=1)  # share of Δ's singular value mass that is protected
    merged: int = param(0, ge=0)  # how many models the first input already holds (t − 1)
    prior_scale: float = param(1.0, ge=0)  # λ_{t−1} of the previous step
    norm_sum: float = param(0.0, ge=0)  # Σ ‖τ_i‖ over the models merged so far


def models_for(params: dict) -> int | None:
    """Inputs of one step: [previous merge, new model] once ``merged`` > 0; before that any
    number, which ``raymerge run`` merges as a sequence of steps in source order."""
    merged = params.get("merged", 0)
    return None if isinstance(merged, int) and merged == 0 else 2


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def project(delta: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """The part of ``tau`` that leaves the merged task vector ``delta``'s main directions alone.

    With ``delta = U Σ Vᵀ`` (full SVD), ``P = Uᵀ τ V`` loses its diagonal and its top-left
    r × r block, r the number of leading singular values whose share of Σ σ stays at or below
    ``alpha``; ``U P Vᵀ`` maps it back. A zero ``delta`` protects nothing but its (empty)
    diagonal: τ is returned whole."""
    if delta.dim() != 2 or min(delta.shape) == 0:
        return tau
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    total = s.sum()
    if not total > 0:
        return tau
    over = (s.cumsum(0) / total > alpha).nonzero()
    r = int(over[0, 0]) if len(over) else 0
    p = u.T @ tau @ vh.T
    p.diagonal().zero_()
    p[:r, :r] = 0
    return u @ p @ vh


def unscaled(tensors: Sequence[torch.Tensor], p: OpcmParams,
             base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_t, λ_{t−1} Δ_{t−1} + τ̃_t) of one tensor in float32 (float64 for float64 inputs)."""
    expected = 1 if p.merged == 0 else 2
    if len(tensors) != expected:
        raise ValueError(f"opcm with merged={p.merged} takes {expected} input(s) "
                         "([previous merge, new model] after the first step), "
                         f"got {len(tensors)}")
    work = _work_dtype(base)
    b = base.to(work)
    tau = tensors[-1].to(work) - b
    if p.merged == 0:
        return tau, tau
    delta = tensors[0].to(work) - b
    return tau, delta * p.prior_scale + project(delta, tau, p.alpha)


class Rescale:
    """The R stage: ‖τ_t‖ and ‖λ_{t−1} Δ_{t−1} + τ̃_t‖ over the whole model (one partial per
    tensor, added in plan order in float64: the same sum whatever the worker count), then the
    factor that gives the new merged task vector the mean norm of the task vectors seen."""

    passes = 1
    tensor_passes = frozenset({0})

    def key(self, p: OpcmParams) -> Hashable | None:
        return "model"

    def collect(self, pass_index: int, tensors: Sequence[torch.Tensor], p: OpcmParams, *,
                base: torch.Tensor, state: Any, rng: Any = None) -> torch.Tensor:
        tau, update = unscaled(tensors, p, base)
        return torch.stack([tau.double().square().sum(), update.double().square().sum()])

    def reduce(self, pass_index: int, total: list[torch.Tensor], p: OpcmParams,
               state: Any) -> dict:
        tau_sq = update_sq = 0.0
        for part in total:
            tau_sq += float(part[0])
            update_sq += float(part[1])
        merged = p.merged + 1
        norm_sum = p.norm_sum + math.sqrt(tau_sq)
        target = norm_sum / merged
        norm = math.sqrt(update_sq)
        scale = target / norm if norm > 0 else 1.0
        return {"merged": merged, "prior_scale": norm / target if target > 0 else 1.0,
                "norm_sum": norm_sum, "scale": scale}

    def for_tensor(self, state: dict, slot: int) -> float:
        return state["scale"]

    def report(self, state: dict) -> dict:
        """What the next step needs, for the manifest (``method_state``)."""
        return {k: state[k] for k in ("merged", "prior_scale", "norm_sum")}


def _continual(params: dict, per_model: bool, held: int, state: dict) -> ContinualStep:
    """The next step of the sequence, from the state the previous version recorded."""
    return ContinualStep({**params, **state})


@merge_method("opcm", params=OpcmParams, needs_base=True,
              stats=Rescale(), models_for=models_for, continual=_continual)
def opcm(tensors: Sequence[torch.Tensor], p: OpcmParams, *, base: torch.Tensor,
         stats: float | None) -> torch.Tensor:
    """Continual merging: add one new model to the previous merge, orthogonally to it.

    The new task vector τ_t is projected off the main singular directions of the merged task
    vector Δ_{t−1} (matrices; other tensors pass whole), added to λ_{t−1} Δ_{t−1}, and the sum is
    rescaled model-wide so that ‖Δ_t‖ is the mean of ‖τ_1‖ … ‖τ_t‖. The first step returns the
    first model unchanged. One step reads the base, the previous merge and the new model only.
    """
    if p.merged == 0:
        return tensors[0].clone()
    if stats is None:  # a whole model in one call (tests): this tensor is the model
        stats = Rescale().reduce(0, [Rescale().collect(0, tensors, p, base=base, state=None)],
                                 p, None)["scale"]
    _, update = unscaled(tensors, p, base)
    return (base.to(update.dtype) + update * stats).to(base.dtype)
