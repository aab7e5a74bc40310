"""Merge kernels: one module per method, each registered in ``registry.METHODS`` on import."""

from workers.merge import (  # noqa: F401  (imported to register each method)
    activation_matching,
    arcee_fusion,
    breadcrumbs,
    breadcrumbs_ties,
    consensus,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    emr,
    fisher,
    karcher,
    linear,
    lines,
    model_stock,
    mudsc,
    multislerp,
    nearswap,
    nuslerp,
    opcm,
    passthrough,
    pcb,
    ram,
    ramplus_tl,
    regmean,
    sce,
    slerp,
    tall,
    task_arithmetic,
    ties,
    weight_matching,
    zipit,
)
from workers.merge.registry import METHODS, MethodSpec, get_method

__all__ = ["METHODS", "MethodSpec", "get_method"]
