"""Gating merge of models from different tasks or domains (our reconstruction of Ye et al.,
2023, arXiv:2312.16240; see workers/dynamic_runtime.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.merge.registry import internal, merge_method, param
from workers.merge.task_vectors import task_vectors


@dataclass(frozen=True)
class GatingParams:
    threshold: float = param(1.0)  # layers whose task vectors' mean cosine is at least this
    # are merged statically (averaged); the others are gated. −1: all static; > 1: all gated
    steps: int = param(300, ge=0)  # gate training steps
    lr: float = param(1e-3, ge=0)
    batch_size: int = param(32, ge=1)  # inputs per task and step
    runtime: str = internal("", "driver")  # sha256 of the trained gate


@merge_method("gating", params=GatingParams, needs_base=True, min_models=1, elementwise=True,
              dynamic="gating", heads="required")
def gating(tensors: Sequence[torch.Tensor], p: GatingParams, *,
           base: torch.Tensor) -> torch.Tensor:
    """Input-dependent: a gate picks task probabilities p(x); gated layers are θ0 + Σ p_k τ_k.

    The gate (a small network on the input) is trained on each task's unlabelled inputs
    (``data``) to tell which task an input came from; the classifier of the most probable task
    is used. Layers where the models' task vectors agree (mean pairwise cosine >= threshold)
    are averaged once (static); the rest stay per model (gated). The checkpoint holds the
    average of the models (the static part); the runtime is in ``runtime/``.
    """
    return base + task_vectors(tensors, base).mean(dim=0)
