"""WEMoE: weight-ensembling mixture of experts (Tang et al., ICML 2024, arXiv:2402.00433)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.dynamic_runtime import OBJECTIVES
from workers.merge.registry import internal, merge_method, param
from workers.merge.task_vectors import combine, task_vectors


@dataclass(frozen=True)
class WemoeParams:
    init_lambda: float = param(0.3)  # λ0: the router's start and the static parts' scale
    objective: str = param("entropy", choices=OBJECTIVES)  # test-time adaptation objective
    steps: int = param(200, ge=0)  # router training steps (the paper: 1000)
    lr: float = param(1e-4, ge=0)  # Adam's learning rate
    batch_size: int = param(16, ge=1)  # unlabelled inputs per task and step
    runtime: str = internal("", "driver")  # sha256 of the trained router


@merge_method("wemoe", params=WemoeParams, needs_base=True, min_models=1, elementwise=True,
              dynamic="wemoe", heads="required")
def wemoe(tensors: Sequence[torch.Tensor], p: WemoeParams, *,
          base: torch.Tensor) -> torch.Tensor:
    """Input-dependent: each transformer MLP's weights are θ0 + Σ_k λ_k(x) τ_k per input.

    A router per MLP (two layers on the MLP's input tokens, averaged over tokens) gives the K
    coefficients; it starts at λ0 for every input (exactly task arithmetic) and is trained on
    each task's unlabelled inputs (``data``) by entropy minimisation or by distillation from
    the individual models. The checkpoint holds task arithmetic with λ0 (the runtime's static
    part); the runtime is in ``runtime/`` (``raymerge predict``).
    """
    return combine(task_vectors(tensors, base), [1.0] * len(tensors), base=base,
                   sign_consensus=False, normalize=False, scale=p.init_lambda)
