"""Similarity task bodies: one layer's K x K cosines of the models' weights and task vectors.

A task reads its layer's tensors from every model (and the base), one tensor at a time, and
sums the Gram matrices in float64 in the order the group lists them, so the result does not
depend on how many workers ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workers.io.index import TensorLocation
from workers.io.safetensors_io import read_tensor
from workers.threads import torch_threads


@dataclass(frozen=True)
class LayerGroup:
    """One layer's tensors: per tensor, its location in every model (then the base's)."""

    layer: str
    tensors: tuple[tuple[str, tuple[TensorLocation, ...]], ...]
    input_bytes: int  # what the task reads (progress, largest first)


@dataclass(frozen=True)
class SimilarityContext:
    stores: tuple[Any, ...]  # the models' stores, then the base's when there is one
    n_models: int
    threads: int


def cosines(gram: torch.Tensor) -> list[list[float]]:
    """Cosine similarities from a Gram matrix of flattened vectors."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    return (gram / torch.outer(norms, norms).clamp(min=1e-300)).tolist()


def layer_cosines(group: LayerGroup, ctx: SimilarityContext) -> dict[str, list[list[float]]]:
    """``weights_cosine`` of the layer, and ``task_vectors_cosine`` (θ_i − θ0) with a base."""
    k = ctx.n_models
    weights: Any = 0
    deltas: Any = 0
    with torch_threads(ctx.threads):
        for _, locations in group.tensors:
            values = [read_tensor(store, loc.file, loc.info).double().reshape(-1)
                      for store, loc in zip(ctx.stores, locations)]
            x = torch.stack(values[:k])
            weights = weights + x @ x.T
            if len(values) > k:
                d = x - values[k]
                deltas = deltas + d @ d.T
    found = {"weights_cosine": cosines(weights)}
    if len(ctx.stores) > k:
        found["task_vectors_cosine"] = cosines(deltas)
    return found
