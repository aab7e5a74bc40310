"""Small seeded tensors and resolved params for kernel tests."""

from __future__ import annotations

import dataclasses

import torch

from workers.merge.registry import per_model_fields


def tensors(k: int, shape=(4, 6), seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g) for _ in range(k)]


def params(cls, k: int, /, **values):
    """Params with per-model fields broadcast to ``k`` models (lists are taken as given)."""
    fields = per_model_fields(cls)
    resolved = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            v = values[f.name]
            resolved[f.name] = tuple(v) if isinstance(v, (list, tuple)) else (
                (float(v),) * k if f.name in fields else v)
        elif f.name in fields:
            resolved[f.name] = (fields[f.name],) * k
    return cls(**resolved)
