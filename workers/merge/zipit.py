"""ZipIt! (Stoica et al., ICLR 2024, arXiv:2305.03053)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.align.transforms import merged
from workers.merge.registry import Alignment, internal, merge_method, param


@dataclass(frozen=True)
class ZipItParams:
    alpha: float = param(0.3)  # a fused feature's similarities are scaled by alpha (<= 0: final)
    beta: float = param(0.125, ge=0)  # within-model fusion budget, share of fusions per model
    stop: int = param(-1, ge=-1)  # partial: merge the stem and the first `stop` layers only,
    # each model keeping the rest (written with its head); -1: every layer (full)
    transforms: str = internal("", "driver")  # the solved alignment (URI#sha256)


def _check(params: dict, n: int) -> list[str]:
    alpha = params["alpha"]
    if n > 2 and isinstance(alpha, (int, float)) and alpha <= 0:
        return [f"merge.params.alpha: a zip of {n} models needs alpha > 0 (a fused feature "
                "must be able to take a third model's unit)"]
    return []


@merge_method("zipit", params=ZipItParams, needs_base=False, min_models=2, check=_check,
              alignment=Alignment(reads="activations", solver="groups", unit="zip",
                                  zips=lambda params: True, joint=True),
              wants_name=True)
def zipit(tensors: Sequence[torch.Tensor], p: ZipItParams, *, name: str) -> torch.Tensor:
    """Zip the models' features by activation correlation, within and across models.

    Models need not share a base; `data` gives unlabelled inputs. MLP-hidden and residual
    spaces are zipped (merge/unmerge matrices), attention heads matched and averaged.
    `stop: L` zips partially: the embeddings and first L layers are merged, and each
    source keeps the later layers (residual stream permuted, not zipped, in transformers).
    """
    return merged(list(tensors), p.transforms, name)
