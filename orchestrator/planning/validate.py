"""Whether checkpoints can be merged at all: the same tensors, shapes and dtypes."""

from __future__ import annotations

from orchestrator.errors import PlanError
from workers.io.index import CheckpointIndex
from workers.io.index import listing as _listing


def validate_models(indexes: list[CheckpointIndex], reference: CheckpointIndex,
                    widths: bool = False) -> None:
    """Check that every checkpoint has exactly the reference's tensors, shapes and dtypes
    (with ``widths``, only the number of dimensions of each shape).

    All problems of all models are collected into one PlanError, before any tensor is read.
    """
    problems = []
    ref = reference.tensors
    for idx in indexes:
        if idx is reference:
            continue
        missing = sorted(set(ref) - set(idx.tensors))
        extra = sorted(set(idx.tensors) - set(ref))
        shapes, dtypes = [], []
        for t in sorted(set(ref) & set(idx.tensors)):
            a, b = ref[t].info, idx.tensors[t].info
            if (len(a.shape) != len(b.shape)) if widths else (a.shape != b.shape):
                shapes.append(f"{t} {list(b.shape)} vs {list(a.shape)}")
            elif a.dtype != b.dtype:
                dtypes.append(f"{t} {b.dtype} vs {a.dtype}")
        parts = [
            _listing("missing tensors", missing),
            _listing("extra tensors", extra),
            _listing("shape mismatches", shapes),
            _listing("dtype mismatches", dtypes),
        ]
        parts = [p for p in parts if p]
        if parts:
            problems.append(
                f"source {idx.name!r} ({idx.uri}) does not match {reference.name!r}: "
                + "; ".join(parts)
            )
    if problems:
        raise PlanError("checkpoints cannot be merged:\n  " + "\n  ".join(problems))
