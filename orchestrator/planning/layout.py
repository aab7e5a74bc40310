"""Which input tensors make each output tensor: whole models, or slices of their layers.

Without ``slices`` every tensor of the reference model is merged from the same tensor of every
model. With ``slices`` the output's layers are listed slice by slice: output layer ``j`` of a
slice is merged from layer ``start + j`` of each of the slice's sources, and renumbered to
follow the layers of the slices before it (a slice with one source copies or scales layers:
"frankenmerges" stack ranges of different models). Tensors outside the layers come from the
first slice's sources if they are embeddings (the name holds ``embed``, or GPT-2's ``wte`` /
``wpe``) and from the last slice's otherwise (final norm, output head), as in mergekit.

Layers are found from tensor names alone: ``<prefix>.<index>.<rest>``, the first number in the
name (``model.layers.3.mlp...``, ``encoder.layer.3...``, ``transformer.h.3...``), so no model
family is hard-coded; ``layout.layers`` names the stack to slice where a model has several
(CLIP's towers), ``layout.first`` which outside tensors come from the first slice. Each tensor
also gets its position ``t`` in its run of layers (0 first, 1 last, 0 outside the layers) for
gradient parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.config.schema import JobConfig
from orchestrator.config.tensor_params import tensor_matcher
from orchestrator.errors import PlanError
from workers.io.index import CheckpointIndex

_LAYER = re.compile(r"^(.*?\.)(\d+)\.(.*)$")
_PRE = re.compile(r"embed|(^|\.)(wte|wpe)\.")


@dataclass(frozen=True)
class Input:
    member: int  # index into the job's sources followed by its base
    name: str  # the tensor's name in that checkpoint
    slice_source: int = -1  # its position in the slice's sources, -1 without slices


@dataclass(frozen=True)
class Placement:
    """One output tensor and where its values come from."""

    name: str
    models: tuple[Input, ...]  # the merge inputs, in merge order
    base: Input | None
    t: float  # position in its run of layers, for gradient parameters
    slice: int = -1  # index into JobConfig.slices, -1 without slices


def layer_of(name: str) -> tuple[str, int, str] | None:
    """``(prefix, index, rest)`` of a tensor inside a stack of layers, else None."""
    m = _LAYER.match(name)
    return (m[1], int(m[2]), m[3]) if m else None


def layer_counts(names: list[str] | dict) -> dict[str, int]:
    """Number of layers of each stack (prefix) among tensor names."""
    counts: dict[str, int] = {}
    for name in names:
        hit = layer_of(name)
        if hit:
            counts[hit[0]] = max(counts.get(hit[0], 0), hit[1] + 1)
    return counts


def _position(index: int, n: int) -> float:
    return index / (n - 1) if n > 1 else 1.0


def whole_models(reference: CheckpointIndex, n_models: int, base: int | None,
                 order: list[str]) -> list[Placement]:
    """Every tensor of the reference (in ``order``) from the same tensor of every model."""
    counts = layer_counts(order)
    out = []
    for name in order:
        hit = layer_of(name)
        t = _position(hit[1], counts[hit[0]]) if hit else 0.0
        out.append(Placement(name, tuple(Input(i, name) for i in range(n_models)),
                             Input(base, name) if base is not None else None, t))
    return out


def sliced(cfg: JobConfig, indexes: list[CheckpointIndex]) -> tuple[list[Placement], tuple]:
    """Placements for ``cfg.slices`` and, per output layer, the input layer it was made from
    (of the slice's first source): the output config's layer list follows it."""
    member = {src.name: i for i, src in enumerate(cfg.sources)}
    base_name = cfg.base.name if cfg.base is not None else None
    if cfg.base is not None:
        member[base_name] = len(cfg.sources)
    ref = indexes[member[cfg.slices[0].sources[0].source]]
    prefixes = layer_counts(ref.tensors)
    prefix = cfg.layout.layers
    if prefix is None and len(prefixes) == 1:
        (prefix,) = prefixes
    if prefix is None or prefix not in prefixes:
        found = ", ".join(repr(p) for p in prefixes) or "none"
        raise PlanError(
            f"slices: cannot tell which stack of layers to slice in {ref.name!r} (stacks found: "
            f"{found}); name it with layout.layers" if prefix is None else
            f"layout.layers: {prefix!r} is not a stack of layers in {ref.name!r} (stacks found: "
            f"{found})")
    problems: list[str] = []
    for i, sl in enumerate(cfg.slices):
        for j, src in enumerate(sl.sources):
            idx = indexes[member[src.source]]
            n = layer_counts(idx.tensors).get(prefix, 0)
            if src.layers[1] > n:
                problems.append(f"slices[{i}].sources[{j}].layers: {list(src.layers)} but "
                                f"{idx.name!r} has {n} layers under {prefix!r}")
    if problems:
        raise PlanError("slices do not fit the models:\n  " + "\n  ".join(problems))

    def inputs(sl_index: int, name_of) -> tuple[tuple[Input, ...], Input | None]:
        models, base = [], None
        for j, src in enumerate(cfg.slices[sl_index].sources):
            item = Input(member[src.source], name_of(src), j)
            if src.source == base_name:
                base = item
            else:
                models.append(item)
        return tuple(models), base

    hits = {n: layer_of(n) for n in ref.tensors}
    outside = [n for n, hit in hits.items() if hit is None or hit[0] != prefix]
    matchers = [tensor_matcher(p) for p in cfg.layout.first]

    def first_slice(name: str) -> bool:
        return any(m(name) for m in matchers) if matchers else bool(_PRE.search(name))

    pre = [n for n in outside if first_slice(n)]
    post = [n for n in outside if not first_slice(n)]
    placements = []
    for name in pre:
        placements.append(Placement(name, *inputs(0, lambda src, name=name: name), 0.0, 0))
    layer_map = []
    first = cfg.slices[0].sources[0]
    rests = [hit[2] for hit in hits.values() if hit and hit[:2] == (prefix, first.layers[0])]
    for i, sl in enumerate(cfg.slices):
        length = sl.sources[0].layers[1] - sl.sources[0].layers[0]
        for offset in range(length):
            out_layer = len(layer_map)
            layer_map.append(sl.sources[0].layers[0] + offset)
            for rest in rests:
                placements.append(Placement(
                    f"{prefix}{out_layer}.{rest}",
                    *inputs(i, lambda src, rest=rest, offset=offset:
                            f"{prefix}{src.layers[0] + offset}.{rest}"),
                    _position(offset, length), i))
    last = len(cfg.slices) - 1
    for name in post:
        placements.append(Placement(name, *inputs(last, lambda src, name=name: name), 0.0, last))
    return placements, tuple(layer_map)
