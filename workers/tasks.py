"""Task bodies: what one worker does with one work unit. Plain functions, no Ray import;
``orchestrator/engine/executor.py`` wraps them in ``ray.remote`` (or calls them in-process).

A unit reads its own input byte ranges from the source stores, computes tensor by tensor in the
compute dtype and streams each result into its output shard; the driver never sees tensor bytes.
Elementwise methods run on fixed chunks of CHUNK elements, read a window of chunks at a time, so a
worker's memory does not grow with tensor size or model count (local files are mapped, not
copied: a window is views of the page cache); methods whose fused loops take the inputs as
stored (``stored_inputs``) get whole windows unless their random draws are keyed by chunk, and
methods with per-tensor statistics passes hold a tensor's inputs for all passes when they fit
in HOLD_BYTES. The others hold one tensor's inputs at a time.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from workers.io.safetensors_io import (
    ShardWriter,
    itemsize,
    map_elements,
    read_elements,
    read_tensor,
    torch_dtype,
)
from workers.merge import get_method
from workers.threads import torch_threads

SHARD_METADATA = {"format": "pt"}  # transformers expects it in every safetensors file
CHUNK = 1 << 18  # elements per compute chunk; fixed, since DARE masks are keyed by chunk
READ_WINDOW = 64 << 20  # bytes read at once per tensor, all its inputs together


@dataclass(frozen=True)
class TaskContext:
    """What every task of a job shares: where inputs and output live, and how to compute."""

    stores: tuple[Any, ...]  # one per Plan.sources entry
    output: Any
    source_names: tuple[str, ...]  # of Plan.sources: what keys each model's random draws
    compute_dtype: str
    seed: int
    threads: int


@dataclass(frozen=True)
class ShardRecord:
    shard: str
    bytes: int
    sha256: str
    tensors: int
    # tensor -> {"output": NaN/Inf entries written, "inputs": {source: NaN/Inf entries}}, for
    # the tensors whose output holds any
    nonfinite: dict = field(default_factory=dict)


def keyed_generator(seed: int, model: str, tensor_name: str,
                    chunk: int = 0) -> np.random.SFC64:
    """A bit generator seeded from (seed, model, tensor, chunk) alone, never from a worker's RNG
    stream: chunk ``c`` covers flat elements ``[c * CHUNK, (c + 1) * CHUNK)`` of the tensor."""
    key = f"{seed}\x00{model}\x00{tensor_name}\x00{chunk}"
    return np.random.SFC64(int.from_bytes(hashlib.sha256(key.encode()).digest(), "little"))


def merge_unit(unit: Any, ctx: TaskContext, stats: dict[int, Any]) -> ShardRecord:
    """Compute every tensor of ``unit`` and write them, in order, to its output shard."""
    from workers.merge.kernels import count_nonfinite

    entries = [(it.tensor_name, it.out_dtype, it.shape) for it in unit.items]
    nonfinite = {}
    with torch_threads(ctx.threads), ctx.output.open_writer(unit.shard) as sink:
        writer = ShardWriter(sink, entries, SHARD_METADATA)
        for item in unit.items:
            counted = [0]

            def pieces(item=item, counted=counted) -> Iterator[torch.Tensor]:
                for piece in _merge_item(item, ctx, stats):
                    counted[0] += count_nonfinite(piece)
                    yield piece

            _guarded(item, unit, writer.write_pieces, item.tensor_name, pieces())
            if counted[0]:  # where it came from: each input's own count (a rare second read)
                nonfinite[item.tensor_name] = {
                    "output": counted[0],
                    "inputs": _guarded(item, unit, _nonfinite_inputs, item, ctx)}
        sha = writer.finish()
    return ShardRecord(unit.shard, writer.bytes_written, sha, len(unit.items), nonfinite)


def _nonfinite_inputs(item: Any, ctx: TaskContext) -> dict[str, int]:
    """NaN/Inf entries of each of the item's inputs (then base), by source name."""
    from workers.merge.kernels import count_nonfinite

    refs = _refs(item)
    counts = [0] * len(refs)
    for _, values in _chunks(item, ctx, whole_windows=True):
        for i, v in enumerate(values):
            counts[i] += count_nonfinite(v)
    return {ctx.source_names[r.source]: n for r, n in zip(refs, counts) if n}


def collect_unit(unit: Any, ctx: TaskContext, pass_index: int,
                 states: dict[int, Any]) -> dict[tuple[int, int], torch.Tensor]:
    """One statistics pass over ``unit``: partials keyed by (group, slot). In summed passes all
    of a group's partials are added under slot -1; in the method's ``tensor_passes`` each
    tensor's partial stays under its own slot.

    Summed statistics are integer counts, so adding them in any order is exact; float
    statistics (OPCM's norms) live in tensor passes, added on the driver in plan order."""
    sums: dict[tuple[int, int], torch.Tensor] = {}
    with torch_threads(ctx.threads):
        for item in unit.items:
            if item.stats_group < 0:
                continue
            stats = get_method(item.method).stats
            key = (item.stats_group,
                   item.stats_slot if pass_index in stats.tensor_passes else -1)
            if item.numel == 0:
                if key[1] >= 0:  # an empty tensor still holds its place
                    sums[key] = torch.zeros(len(item.inputs), dtype=torch.int64)
                continue
            partial = _guarded(item, unit, _collect_item, item, ctx, pass_index,
                               states.get(item.stats_group))
            sums[key] = partial if key not in sums else sums[key] + partial
    return sums


def _guarded(item: Any, unit: Any, fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        raise RuntimeError(f"tensor {item.tensor_name!r} (output shard {unit.shard}): "
                           f"{type(e).__name__}: {e}") from e


def _refs(item: Any) -> list[Any]:
    return list(item.inputs) + ([item.base] if item.base is not None else [])


def _chunks(item: Any, ctx: TaskContext, whole_windows: bool = False,
            held: list[tuple[int, Any]] | None = None) -> Iterator[tuple[int, Any]]:
    """``(chunk index, flat stored values of every input)`` for each CHUNK elements of the
    item's tensor; inputs are read a window of several chunks at a time, READ_WINDOW bytes for
    all inputs together (fewer, larger reads from object storage), or come from ``held``
    (``_held``'s one window, read before). The values are one ``[inputs, elements]`` tensor
    (rows of one buffer) when the inputs share a dtype, else a list. With ``whole_windows``
    the pieces are whole windows (no cast, or a fused loop that converts block by block:
    cache-sized chunks are for torch's separate passes)."""
    if item.rows:
        gathered = _gathered(item, ctx)
        for c0 in range(0, item.numel, CHUNK):
            yield c0 // CHUNK, [g[c0:c0 + CHUNK] for g in gathered]
        return
    for w0, block in held if held is not None else _windows(item, ctx, READ_WINDOW):
        if whole_windows:
            yield w0 // CHUNK, block
            continue
        w1 = w0 + (block.shape[1] if isinstance(block, torch.Tensor) else len(block[0]))
        for c0 in range(w0, w1, CHUNK):
            yield c0 // CHUNK, (block[:, c0 - w0:c0 - w0 + CHUNK]
                                if isinstance(block, torch.Tensor) else
                                [v[c0 - w0:c0 - w0 + CHUNK] for v in block])


def _windows(item: Any, ctx: TaskContext, nbytes: int) -> Iterator[tuple[int, Any]]:
    """``(first element, values)`` of each read window of at most ``nbytes`` (whole chunks,
    at least one) of all the item's inputs: views of the mapped files where every input is a
    local file (no copy: 4x less CPU than reading), else read into this process's buffer."""
    refs = _refs(item)
    numel = refs[0].info.numel
    sizes = [itemsize(r.info.dtype) for r in refs]
    window = max(1, nbytes // (sum(sizes) * CHUNK)) * CHUNK
    if all(hasattr(ctx.stores[r.source], "map_range") for r in refs):
        for w0 in range(0, numel, window):
            w1 = min(w0 + window, numel)
            yield w0, [map_elements(ctx.stores[r.source], r.file, r.info, w0, w1) for r in refs]
        return
    stride = min(window, numel) * max(sizes)
    rows = _buffer(len(refs) * stride)[:len(refs) * stride].view(len(refs), stride)
    same = len({r.info.dtype for r in refs}) == 1
    for w0 in range(0, numel, window):
        w1 = min(w0 + window, numel)
        views = [read_elements(ctx.stores[r.source], r.file, r.info, w0, w1, row)
                 for r, row in zip(refs, rows)]
        yield w0, rows[:, :(w1 - w0) * sizes[0]].view(views[0].dtype) if same else views


HOLD_BYTES = 256 << 20  # a tensor whose inputs fit is read once for all of its passes


def _held(item: Any, ctx: TaskContext) -> list[tuple[int, Any]] | None:
    """The item's inputs as one window when they take at most HOLD_BYTES, for methods that
    pass over a tensor more than once (its statistics, then the merge) to read it once; None
    for larger tensors (read again each pass) and vocabulary items. One window of whole
    chunks covering the tensor: several would share the read buffer, each read over the last."""
    refs = _refs(item)
    if item.rows or sum(r.info.nbytes for r in refs) > HOLD_BYTES:
        return None
    chunks = -(-refs[0].info.numel // CHUNK)
    return list(_windows(item, ctx, chunks * CHUNK * sum(itemsize(r.info.dtype) for r in refs)))


_BUFFER = [torch.empty(0, dtype=torch.uint8)]  # read windows, reused: fresh pages cost more


def _buffer(nbytes: int) -> torch.Tensor:
    """This process's read buffer, at least ``nbytes`` long. A worker runs one task at a time
    and consumes a window's chunks before the next read, so one buffer serves."""
    if _BUFFER[0].numel() < nbytes:
        _BUFFER[0] = torch.empty(nbytes, dtype=torch.uint8)
    return _BUFFER[0]


def _split(item: Any, values: Any, dtype: torch.dtype,
           stored: bool = False) -> tuple[Any, torch.Tensor | None]:
    """(inputs, base) in ``dtype``; as stored with ``stored`` (the method casts)."""
    cast = values if stored else [v.to(dtype) for v in values]
    return (cast[:-1], cast[-1]) if item.base is not None else (cast, None)


def _gathered(item: Any, ctx: TaskContext) -> list[torch.Tensor]:
    """A vocabulary item's inputs (then base), flat, each row-permuted into the output
    vocabulary in the compute dtype: own rows read in runs, missing rows borrowed from the
    other inputs (one donor's row, or the mean of several; zeros for none), padding rows the
    mean of the real ones (mergekit's rules, in its arithmetic order)."""
    dtype = torch_dtype(ctx.compute_dtype)
    refs = _refs(item)
    width = math.prod(refs[0].info.shape[1:])

    def rows(ref: Any, start: int, stop: int) -> torch.Tensor:
        return read_elements(ctx.stores[ref.source], ref.file, ref.info, start * width,
                             stop * width).to(dtype).reshape(stop - start, width)

    out = []
    for ref, rmap in zip(refs, item.rows):
        table = torch.zeros(rmap.rows, width, dtype=dtype)
        for o, s, n in rmap.runs:
            table[o:o + n] = rows(ref, s, s + n)
        out.append(table)
    for table, rmap in zip(out, item.rows):
        for o, donors in rmap.borrowed:
            row = torch.zeros(width, dtype=dtype)
            for j, s in donors:
                row = row + rows(refs[j], s, s + 1)[0]
            if len(donors) > 1:
                row /= len(donors)
            table[o] = row
        if rmap.rows > rmap.tokens:
            table[rmap.tokens:] = torch.mean(table[:rmap.tokens], dim=0)
    return [t.reshape(-1) for t in out]


def _merge_item(item: Any, ctx: TaskContext, stats: dict[int, Any]) -> Iterator[torch.Tensor]:
    """The item's output values, as consecutive flat pieces in the output dtype."""
    if item.method is None:  # a copied (integer) tensor
        yield from (values[0] for _, values in _chunks(item, ctx, whole_windows=True))
        return
    spec = get_method(item.method)
    dtype, out_dtype = torch_dtype(ctx.compute_dtype), torch_dtype(item.out_dtype)
    if item.masks:  # chunks hold whole bytes of bits (CHUNK is a multiple of 8)
        for _, values in _chunks(item, ctx):
            tensors, base = _split(item, values, dtype)
            yield pack_masks(spec.masks(tensors, item.params, base=base))
        return
    kwargs: dict[str, Any] = {}
    if spec.stats is not None:
        kwargs["stats"] = (spec.stats.for_tensor(stats[item.stats_group], item.stats_slot)
                           if item.stats_group >= 0 else None)
    if spec.wants_name:
        kwargs["name"] = item.tensor_name
    if not spec.is_elementwise(item.params):  # needs the whole tensor at once
        tensors, base = _split(item, _whole(item, ctx), dtype)
        if spec.uses_rng:
            kwargs["rng"] = _generators(ctx, item, 0)
        if spec.uses_base:
            kwargs["base"] = base
        yield spec.fn(tensors, item.params, **kwargs).to(out_dtype).reshape(-1)
        return
    tensor_stats = spec.tensor_stats_for(item.params)
    held = None
    if tensor_stats is not None and item.numel:
        held = _held(item, ctx)
        kwargs["tensor_stats"] = _tensor_stats(tensor_stats, item, ctx, held)
    if spec.stored_inputs:
        kwargs["dtype"] = dtype
    for chunk, values in _chunks(item, ctx, spec.reads_windows, held):
        tensors, base = _split(item, values, dtype, spec.stored_inputs)
        if spec.uses_base:
            kwargs["base"] = base
        if spec.uses_rng:
            kwargs["rng"] = _generators(ctx, item, chunk)
        yield spec.fn(tensors, item.params, **kwargs).to(out_dtype)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """Bool ``[K, n]`` -> uint8 ``[ceil(n / 8), K]``: bit j of row r is entry 8r + j."""
    packed = np.packbits(masks.reshape(len(masks), -1).numpy(), axis=1, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(packed.T))


def unpack_masks(packed: torch.Tensor, task: int, numel: int) -> torch.Tensor:
    """Task ``task``'s bool mask (flat, ``numel`` entries) from ``pack_masks``' layout."""
    bits = np.unpackbits(np.ascontiguousarray(packed[:, task].numpy()), bitorder="little")
    return torch.from_numpy(bits[:numel].astype(bool))


def _whole(item: Any, ctx: TaskContext) -> list[torch.Tensor]:
    """Every input of the item (then the base), whole and shaped."""
    if item.rows:
        return [g.reshape(item.shape) for g in _gathered(item, ctx)]
    return [read_tensor(ctx.stores[r.source], r.file, r.info) for r in _refs(item)]


def _tensor_stats(stats: Any, item: Any, ctx: TaskContext,
                  held: list[tuple[int, Any]] | None) -> Any:
    state = None
    for p in range(stats.passes):
        total = _sum_over_chunks(item, ctx, lambda tensors, base, rng, **kw: stats.collect(
            p, tensors, item.params, base=base, state=state, rng=rng, **kw), held)
        state = stats.reduce(p, total, item.params, state)
    return state


def _collect_item(item: Any, ctx: TaskContext, pass_index: int, state: Any) -> torch.Tensor:
    spec = get_method(item.method)
    stats = spec.stats
    if not spec.is_elementwise(item.params):  # e.g. an SVD: the whole tensor at once
        tensors, base = _split(item, _whole(item, ctx), torch_dtype(ctx.compute_dtype))
        return stats.collect(pass_index, tensors, item.params, base=base, state=state)
    return _sum_over_chunks(item, ctx, lambda tensors, base, _, **kw: stats.collect(
        pass_index, tensors, item.params, base=base, state=state, **kw))


def _sum_over_chunks(item: Any, ctx: TaskContext, collect: Callable[..., torch.Tensor],
                     held: list[tuple[int, Any]] | None = None) -> torch.Tensor:
    """``collect(tensors, base, rng)`` on every chunk (cache-sized: casts there are ten times
    cheaper than on whole windows), partials summed in chunk order. A method that takes its
    inputs as stored gets them (and ``dtype=``) a whole window at a time unless keyed."""
    spec = get_method(item.method)
    dtype = torch_dtype(ctx.compute_dtype)
    kwargs = {"dtype": dtype} if spec.stored_inputs else {}
    total = None
    for chunk, values in _chunks(item, ctx, spec.reads_windows, held):
        tensors, base = _split(item, values, dtype, spec.stored_inputs)
        part = collect(tensors, base, _generators(ctx, item, chunk) if spec.uses_rng else None,
                       **kwargs)
        total = part if total is None else total + part
    return total


def _generators(ctx: TaskContext, item: Any, chunk: int) -> list[np.random.SFC64]:
    return [keyed_generator(ctx.seed, ctx.source_names[r.source], item.tensor_name, chunk)
            for r in item.inputs]
