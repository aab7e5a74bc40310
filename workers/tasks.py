"""Task bodies: what one worker does with one work unit. Plain functions, no Ray import;
``orchestrator/schedule.py`` wraps them in ``ray.remote`` (or calls them in-process).

A unit reads its own input byte ranges from the source stores, computes tensor by tensor in the
compute dtype and streams each result into its output shard, so a worker holds the inputs of one
tensor at a time and the driver never sees tensor bytes.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from workers.merge import get_method
from workers.safetensors_io import ShardWriter, read_tensor, torch_dtype

SHARD_METADATA = {"format": "pt"}  # transformers expects it in every safetensors file


@dataclass(frozen=True)
class TaskContext:
    """What every task of a job shares: where inputs and output live, and how to compute."""

    stores: tuple[Any, ...]  # one per Plan.sources entry
    output: Any
    model_names: tuple[str, ...]
    compute_dtype: str
    seed: int
    threads: int


@dataclass(frozen=True)
class ShardRecord:
    shard: str
    bytes: int
    sha256: str
    tensors: int


def keyed_generator(seed: int, model: str, tensor_name: str) -> torch.Generator:
    """A generator seeded from (seed, model, tensor) alone, never from a worker's RNG stream."""
    digest = hashlib.sha256(f"{seed}\x00{model}\x00{tensor_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Pin torch's intra-op threads: reductions round differently with other thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def merge_unit(unit: Any, ctx: TaskContext, stats: dict[int, Any]) -> ShardRecord:
    """Compute every tensor of ``unit`` and write them, in order, to its output shard."""
    entries = [(it.tensor_name, it.out_dtype, it.inputs[0].info.shape) for it in unit.items]
    with torch_threads(ctx.threads), ctx.output.open_writer(unit.shard) as sink:
        writer = ShardWriter(sink, entries, SHARD_METADATA)
        for item in unit.items:
            writer.write(item.tensor_name, _guarded(item, unit, _merge_item, item, ctx, stats))
        sha = writer.finish()
    return ShardRecord(unit.shard, writer.bytes_written, sha, len(unit.items))


def collect_unit(unit: Any, ctx: TaskContext, pass_index: int,
                 states: dict[int, Any]) -> dict[int, torch.Tensor]:
    """One statistics pass over ``unit``: the summed partials of each global-statistics group."""
    sums: dict[int, torch.Tensor] = {}
    with torch_threads(ctx.threads):
        for item in unit.items:
            if item.stats_group < 0:
                continue
            partial = _guarded(item, unit, _collect_item, item, ctx, pass_index,
                               states.get(item.stats_group))
            group = item.stats_group
            sums[group] = partial if group not in sums else sums[group] + partial
    return sums


def _guarded(item: Any, unit: Any, fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        raise RuntimeError(f"tensor {item.tensor_name!r} (output shard {unit.shard}): "
                           f"{type(e).__name__}: {e}") from e


def _read(ctx: TaskContext, ref: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = read_tensor(ctx.stores[ref.source], ref.file, ref.info)
    return t if dtype is None else t.to(dtype)


def _inputs(item: Any, ctx: TaskContext) -> tuple[Sequence[torch.Tensor], torch.Tensor | None]:
    dtype = torch_dtype(ctx.compute_dtype)
    tensors = [_read(ctx, ref, dtype) for ref in item.inputs]
    base = _read(ctx, item.base, dtype) if item.base is not None else None
    return tensors, base


def _merge_item(item: Any, ctx: TaskContext, stats: dict[int, Any]) -> torch.Tensor:
    if item.method is None:
        return _read(ctx, item.inputs[0])
    spec = get_method(item.method)
    tensors, base = _inputs(item, ctx)
    kwargs: dict[str, Any] = {}
    if spec.needs_base:
        kwargs["base"] = base
    if spec.uses_rng:
        kwargs["rng"] = [keyed_generator(ctx.seed, m, item.tensor_name) for m in ctx.model_names]
    if spec.stats is not None:
        kwargs["stats"] = stats.get(item.stats_group)
    out = spec.fn(tensors, item.params, **kwargs)
    return out.to(torch_dtype(item.out_dtype))


def _collect_item(item: Any, ctx: TaskContext, pass_index: int, state: Any) -> torch.Tensor:
    spec = get_method(item.method)
    tensors, base = _inputs(item, ctx)
    return spec.stats.collect(pass_index, tensors, item.params, base=base, state=state)
