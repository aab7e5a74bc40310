"""Merge kernels: one module per method, each registered in ``registry.METHODS`` on import."""

from workers.merge import (  # noqa: F401  (imported to register each method)
    breadcrumbs,
    dare_linear,
    dare_ties,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)
from workers.merge.registry import METHODS, MethodSpec, get_method

__all__ = ["METHODS", "MethodSpec", "get_method"]
