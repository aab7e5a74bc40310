"""Optimal-transport fusion (Singh & Jaggi, 2020, arXiv:1910.05653; Imfeld et al., 2024,
arXiv:2310.05719)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.align.ot import SOLVERS
from workers.align.transforms import merged, stored
from workers.merge.registry import Alignment, internal, merge_method, param


@dataclass(frozen=True)
class OtFusionParams:
    cost: str = param("activations", choices=("activations", "weights"))  # weights: no data
    solver: str = param("emd", choices=SOLVERS)  # exact transport, or entropic (Sinkhorn)
    reg: float = param(0.05, ge=0)  # Sinkhorn's regularisation, relative to the largest cost
    finetune_steps: int = param(0, ge=0)  # > 0: distil the fused model from its parents
    finetune_lr: float = param(1e-4, ge=0)  # Adam's learning rate for that
    transforms: str = internal("", "driver")  # the solved alignment (URI#sha256)
    finetuned: str = internal("", "driver")  # the fine-tuned model's tensors (URI#sha256)


def _reads(params: dict) -> str:
    return "weights" if params.get("cost") == "weights" else "activations"


def _solver(params: dict) -> str:  # on weights: a chain over the groups, on the driver
    return "transport_chain" if _reads(params) == "weights" else "groups"


@merge_method("ot_fusion", params=OtFusionParams, needs_base=False, min_models=2,
              alignment=Alignment(reads=_reads, solver=_solver, unit="plan"),
              wants_name=True, any_widths=True)
def ot_fusion(tensors: Sequence[torch.Tensor], p: OtFusionParams, *,
              name: str) -> torch.Tensor:
    """Soft-align the other models' units to the first's by optimal transport, then average.

    Per free group (residual stream, MLP hidden), the transport between the models' unit
    activations on the job's ``data`` (cost: mean squared difference) moves the other model's
    units into the first's: exact (``emd``; a permutation at equal widths) or entropic
    (``sinkhorn``, a soft map). Attention heads are matched whole, then transported dim by
    dim inside each matched pair (heads only permuted under rotary embeddings or GQA).
    `cost: weights` builds the costs from the weights instead (no data): the residual
    stream from the embeddings, then each block's groups from their aligned rows.
    The other models may be wider (MLP and residual widths; same tensors and heads): the
    output has the first model's shapes. `finetune_steps` > 0 then distils the fused
    model from the parents on `data` (each source's head against its own parent).
    """
    if p.finetuned:
        return stored(p.finetuned, name).to(tensors[0].dtype)
    return merged(list(tensors), p.transforms, name)
