"""MuDSC: merging under dual-space constraints (Xu et al., CVPR 2024, arXiv:2403.17441)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from workers.align.transforms import merged
from workers.merge.registry import Alignment, internal, merge_method, param


@dataclass(frozen=True)
class MudscParams:
    variant: str = param("zip", choices=("zip", "perm"))  # zip units, or permute and average
    f: float = param(0.5, ge=0, le=1)  # weight of the weight-space similarity
    alpha: float = param(0.5)  # zip: as ZipIt!'s (MuDSC's code defaults)
    beta: float = param(1.0, ge=0)
    max_sweeps: int = param(100, ge=1)  # coordinate descent over the groups
    stop: int = param(-1, ge=-1)  # partial: merge the stem and the first `stop` layers only,
    # each model keeping the rest (written with its head); -1: every layer (full)
    transforms: str = internal("", "driver")  # the solved alignment (URI#sha256)


def _zips(params: dict) -> bool:
    return params["variant"] == "zip"


def _check(params: dict, n: int) -> list[str]:
    if _zips(params) and n > 2:
        return ["sources: mudsc with variant: zip zips exactly 2 models; for more, use zipit "
                "(one joint zip) or variant: perm (each model aligned to the first)"]
    return []


@merge_method("mudsc", params=MudscParams, needs_base=False, min_models=2, check=_check,
              alignment=Alignment(reads="dual", solver="pairwise", zips=_zips),
              wants_name=True)
def mudsc(tensors: Sequence[torch.Tensor], p: MudscParams, *, name: str) -> torch.Tensor:
    """Align models on weight- and activation-space similarity together, then merge.

    Models need not share a base; `data` gives unlabelled inputs. Similarity is
    f * weight-signature correlation + (1 - f) * activation correlation; `variant: perm`
    permutes and averages, `zip` zips free groups as ZipIt! does (heads permuted).
    """
    return merged(list(tensors), p.transforms, name)
