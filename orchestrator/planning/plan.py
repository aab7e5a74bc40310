"""Config + checkpoint indexes -> a Plan of frozen, layer-aligned work units. Pure: no Ray, no
tensor bytes.

Tensors are ordered naturally (``layers.2`` before ``layers.10``) and grouped by layer; groups
are packed in order into units, each written as one output shard, so that a unit's output stays
within ``output.shard_size`` and its inputs (every model's bytes for the unit) within
``runtime.worker_memory``. A layer too large for one unit is split at tensor boundaries. The
layout depends only on the inputs and the config, never on the number of workers, so every
worker count writes the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from orchestrator.config.schema import JobConfig, parse_bytes
from orchestrator.config.tensor_params import evaluate, tensor_matcher
from orchestrator.errors import PlanError
from orchestrator.planning.layout import Input, Placement, layer_of, sliced, whole_models
from orchestrator.planning.validate import validate_models
from orchestrator.planning.vocab import RowMap, Vocabulary, is_vocab_tensor, row_maps
from workers.io.index import CheckpointIndex
from workers.io.safetensors_io import DTYPE_NAMES, FLOAT_CODES, TensorInfo, itemsize
from workers.merge import get_method
from workers.merge.registry import MethodSpec, internal_fields, per_model_fields
from workers.tasks import CHUNK, HOLD_BYTES, READ_WINDOW

PROCESS_BYTES = 300 << 20  # what a worker process holds with torch loaded, before any unit
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class TensorRef:
    """One input tensor: which source (index into ``Plan.sources``), which file, which bytes."""

    source: int
    file: str
    info: TensorInfo


@dataclass(frozen=True)
class WorkItem:
    """One output tensor. ``method`` None copies ``inputs[0]`` unchanged (non-float tensors)."""

    tensor_name: str
    inputs: tuple[TensorRef, ...]
    base: TensorRef | None
    method: str | None
    params: Any
    out_dtype: str
    stats_group: int = -1  # index into Plan.stats_groups, -1 when no global statistics
    stats_slot: int = -1  # this tensor's position among its group's tensors
    rows: tuple[RowMap, ...] | None = None  # vocabulary tensors: per input (then base), its
    # rows in the output vocabulary
    masks: bool = False  # a task-aware method's per-task masks of this tensor, bit-packed:
    # uint8 [ceil(numel / 8), K], bit j of row r = entry 8r + j (little-endian bit order)
    out_shape: tuple[int, ...] | None = None  # where the method writes another shape than
    # its inputs' (PLeaS' merged widths)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.out_shape is not None:
            return self.out_shape
        shape = self.inputs[0].info.shape
        if self.masks:
            return (math.ceil(math.prod(shape) / 8), len(self.inputs))
        return (self.rows[0].rows, *shape[1:]) if self.rows else shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)


@dataclass(frozen=True)
class WorkUnit:
    index: int
    shard: str  # output file name
    items: tuple[WorkItem, ...]
    input_bytes: int  # all inputs of all items, as stored
    output_bytes: int
    peak_bytes: int  # estimated worker memory while computing the largest item


@dataclass(frozen=True)
class StatsGroup:
    """Tensors that share one set of global statistics (an R stage), e.g. TIES' global trim."""

    method: str
    params: Any
    n_tensors: int


@dataclass(frozen=True)
class SourceRef:
    name: str
    uri: str = dataclasses.field(metadata={"digest": False})  # how it was named, not what it is
    role: str  # "model" or "base"
    pin: str  # JSON of the source's revision and file pins: part of the plan digest, so a
    # changed input is never mistaken for the merge already in the output


def source_ref(index: CheckpointIndex, role: str) -> SourceRef:
    pin = json.dumps({"revision": index.revision, "files": index.pins}, sort_keys=True)
    return SourceRef(index.name, index.uri, role, pin)


@dataclass(frozen=True)
class Plan:
    sources: tuple[SourceRef, ...]
    units: tuple[WorkUnit, ...]
    stats_groups: tuple[StatsGroup, ...]
    method: str
    compute_dtype: str
    seed: int
    threads: int
    reference: int  # the source whose config and tokenizer files the output copies
    layer_map: tuple[int, ...] = ()  # with slices: the input layer behind each output layer
    vocab_rows: int | None = None  # with a built tokenizer: the output's vocab_size
    tokenizer_files: tuple[tuple[str, str], ...] = ()  # its files: (name, sha256)

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    @property
    def input_bytes(self) -> int:
        return sum(u.input_bytes for u in self.units)

    @property
    def output_bytes(self) -> int:
        return sum(u.output_bytes for u in self.units)

    @property
    def n_tensors(self) -> int:
        return sum(len(u.items) for u in self.units)

    def digest(self) -> str:
        """sha256 of everything that determines the output bytes (not of worker counts);
        computed once (the plan is frozen; the progress record asks after every shard)."""
        if "_digest" not in self.__dict__:
            doc = json.dumps(_plain(self), sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_digest", hashlib.sha256(doc.encode()).hexdigest())
        return self.__dict__["_digest"]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {"__type__": type(value).__name__,
                **{f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                   if f.metadata.get("digest", True)}}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(name))


def layer_key(name: str) -> tuple:
    """Tensors with the same key belong to one layer (``model.layers.3.*``)."""
    hit = layer_of(name)
    return hit[:2] if hit else (name,)


def make_plan(cfg: JobConfig, models: list[CheckpointIndex], base: CheckpointIndex | None,
              vocab: Vocabulary | None = None, masks: bool = False) -> Plan:
    """The plan of the merge; with ``masks``, of a task-aware method's per-task masks instead
    (one packed uint8 tensor per merged float tensor, no global statistics)."""
    spec = get_method(cfg.merge.method)
    if masks and (spec.masks is None or vocab is not None):
        raise PlanError(f"{spec.name}: no per-task masks (a task-aware method without a "
                        "tokenizer block has them)")
    indexes = models + ([base] if base is not None else [])
    sources = tuple(source_ref(m, "model") for m in models) + (
        (source_ref(base, "base"),) if base is not None else ())
    reference = reference_member(cfg)
    if cfg.slices:
        placements, layer_map = sliced(cfg, indexes)
    else:
        validate_models(indexes, indexes[reference], spec.any_widths)
        order = sorted(indexes[reference].tensors, key=natural_key)
        placements = whole_models(indexes[reference], len(models),
                                  len(models) if base is not None else None, order)
        layer_map = ()
    out_code = DTYPE_NAMES[cfg.output.dtype] if cfg.output.dtype else None
    compute_size = itemsize(DTYPE_NAMES[cfg.compute_dtype])
    matchers = [(tensor_matcher(o.tensors), o.params) for o in cfg.merge.overrides]

    def ref(inp: Input) -> TensorRef:
        loc = indexes[inp.member].tensors.get(inp.name)
        if loc is None:
            raise PlanError(f"source {indexes[inp.member].name!r} has no tensor {inp.name!r}")
        return TensorRef(inp.member, loc.file, loc.info)

    stats_keys: dict[Any, int] = {}
    stats_params: list[Any] = []
    stats_counts: list[int] = []
    items, problems = [], []
    for place in sorted(placements, key=lambda p: natural_key(p.name)):
        refs = tuple(ref(i) for i in place.models)
        base_ref = ref(place.base) if place.base is not None else None
        every = refs + ((base_ref,) if base_ref else ())
        first = every[0]
        vocab_item = (vocab is not None and vocab.permutes and layer_of(place.name) is None
                      and first.info.dtype in FLOAT_CODES
                      and all(is_vocab_tensor(r.info.shape, vocab.vocab_sizes.get(r.source))
                              for r in every))
        skip = 1 if vocab_item else 0  # vocabulary rows may differ: they are permuted

        def kind(r: TensorRef) -> tuple:  # what must agree (widths may differ: ot_fusion)
            return (len(r.info.shape) if spec.any_widths else r.info.shape[skip:], r.info.dtype)

        mismatched = [f"{indexes[r.source].name}: {r.info.dtype} {list(r.info.shape)}"
                      for r in every if kind(r) != kind(first)]
        if mismatched:
            problems.append(f"{place.name} (from {indexes[first.source].name}: "
                            f"{first.info.dtype} {list(first.info.shape)}; "
                            + ", ".join(mismatched) + ")")
            continue
        if first.info.dtype not in FLOAT_CODES:
            if masks:  # integer buffers are copied, never masked
                continue
            # integer buffers (position ids, counters) are copied from the reference model
            copy_from = base_ref if base_ref is not None else refs[0]
            items.append(WorkItem(place.name, (copy_from,), None, None, None, first.info.dtype))
            continue
        if not spec.uses_base:
            base_ref = None  # a base given to a base-free method is the reference, not an input
        rows = None
        if vocab_item:
            members = [r.source for r in refs] + ([base_ref.source] if base_ref else [])
            rows = row_maps(vocab, members, base_ref.source if base_ref else None)
        params = resolve_params(spec, cfg, place, matchers)
        if masks:
            items.append(WorkItem(place.name, refs, base_ref, spec.name, params, "U8",
                                  masks=True))
            continue
        group = slot = -1
        key = spec.stats.key(params) if spec.stats is not None else None
        if key is not None:
            if key not in stats_keys:
                stats_keys[key] = len(stats_params)
                stats_params.append(params)
                stats_counts.append(0)
            group = stats_keys[key]
            slot = stats_counts[group]
            stats_counts[group] += 1
        out_shape = spec.out_shapes(params).get(place.name) if spec.out_shapes else None
        items.append(WorkItem(place.name, refs, base_ref, spec.name, params,
                              out_code or first.info.dtype, group, slot, rows,
                              out_shape=out_shape))
    if problems:
        raise PlanError("inputs of one output tensor differ in shape or dtype:\n  "
                        + "\n  ".join(problems[:20]))

    units = _pack_units(items, parse_bytes(cfg.output.shard_size),
                        parse_bytes(cfg.runtime.worker_memory), compute_size, len(sources),
                        lambda it: _window(spec, it))
    groups = tuple(StatsGroup(spec.name, p, n) for p, n in zip(stats_params, stats_counts))
    return Plan(sources, units, groups, spec.name, cfg.compute_dtype, cfg.seed,
                cfg.runtime.threads_per_worker, reference, layer_map,
                vocab.rows if vocab is not None and vocab.permutes else None,
                tuple((n, hashlib.sha256(d).hexdigest()) for n, d in vocab.files.items())
                if vocab is not None else ())


def reference_member(cfg: JobConfig) -> int:
    """The source whose config.json and tokenizer the output starts from: the base, else the
    first model (of the first slice)."""
    if cfg.base is not None:
        return len(cfg.sources)
    if cfg.slices:
        return next(i for i, s in enumerate(cfg.sources)
                    if s.name == cfg.slices[0].sources[0].source)
    return 0


def resolve_params(spec: MethodSpec, cfg: JobConfig, place: Placement,
                   matchers: list) -> Any:
    """The method's params for one output tensor. Each value comes from the first scope that
    sets it for this tensor (``orchestrator.config.tensor_params``: gradients and conditions):
    matching ``merge.overrides`` (later first) > the slice source's params > the model's own
    ``sources[i].params`` > the slice's params > ``merge.params`` > the dataclass default."""
    name, t = place.name, place.t
    overrides = [params for match, params in reversed(matchers) if match(name)]
    sl = cfg.slices[place.slice] if place.slice >= 0 else None
    general = ([sl.params] if sl else []) + [cfg.merge.params]  # below any model's own params

    def pick(scopes: list[dict], key: str) -> Any:
        for scope in scopes:
            if key in scope:
                value = evaluate(scope[key], name, t)
                if value is not None:
                    return value
        return None

    per_model = per_model_fields(spec.params)
    resolved = {}
    for field_name, default in per_model.items():
        values = []
        for inp in place.models:
            own = ([sl.sources[inp.slice_source].params] if sl else []) + \
                [cfg.sources[inp.member].params]
            value = pick(overrides + own + general, field_name)
            values.append(float(default if value is None else value))
        resolved[field_name] = tuple(values)
    internal = internal_fields(spec.params)
    for f in dataclasses.fields(spec.params):
        if f.name in internal:
            value = t if internal[f.name] == "position" else cfg.merge.params.get(f.name)
            if value is not None:
                resolved[f.name] = value
        elif f.name not in per_model:
            value = pick(overrides + general, f.name)
            if value is not None:
                resolved[f.name] = value
    return spec.params(**resolved)


def _window(spec: MethodSpec, item: WorkItem) -> int:
    """Input bytes a worker holds at once for a chunked item (a read window, or the whole
    tensor up to HOLD_BYTES for methods that pass over it twice); 0 for whole-tensor items."""
    if item.method is None:
        return READ_WINDOW
    if not spec.is_elementwise(item.params):
        return 0
    return HOLD_BYTES if spec.tensor_stats_for(item.params) is not None else READ_WINDOW


def _pack_units(items: list[WorkItem], shard_size: int, memory: int, compute_size: int,
                n_sources: int, window: Callable[[WorkItem], int]) -> tuple[WorkUnit, ...]:
    """Units of whole layers (a layer is split at tensor boundaries only when it alone exceeds
    a unit): at most ``shard_size`` of output and ``memory`` of input each, and at most 1/16 of
    all input (not below MIN_UNIT_INPUT), so that up to 16 workers have units to share whatever
    the model size. The layout depends on sizes only, never on the number of workers."""
    layers: dict[tuple, list[WorkItem]] = {}
    for item in items:
        layers.setdefault(layer_key(item.tensor_name), []).append(item)

    def in_bytes(item: WorkItem) -> int:
        return sum(r.info.nbytes for r in item.inputs) + (item.base.info.nbytes if item.base
                                                         else 0)

    def peak(item: WorkItem) -> int:
        # stored inputs + their compute-dtype copies + stacked task vectors + output (+ cast);
        # chunked items hold one read window and the working set of one chunk
        k = len(item.inputs) + (1 if item.base else 0)
        if window(item) and not item.rows:
            elements = min(item.numel, CHUNK)
            return min(in_bytes(item), window(item) + k * CHUNK * 8) + \
                k * elements * compute_size * 4
        n = item.numel
        return in_bytes(item) + n * compute_size * (2 * k + 2) + item.out_bytes

    for item in items:
        if peak(item) > memory:
            raise PlanError(
                f"tensor {item.tensor_name!r} {list(item.shape)} needs about "
                f"{format_bytes(peak(item))} on a worker (all {n_sources} inputs of it), more than "
                f"runtime.worker_memory={format_bytes(memory)}; raise runtime.worker_memory"
            )

    memory = min(memory, max(MIN_UNIT_INPUT, _total(items, in_bytes) // 16))
    chunks: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    for layer in layers.values():
        if current and (_total(current + layer, lambda i: i.out_bytes) > shard_size
                        or _total(current + layer, in_bytes) > memory):
            chunks.append(current)
            current = []
        for item in layer:  # a layer larger than one unit is split at tensor boundaries
            if current and (_total(current + [item], lambda i: i.out_bytes) > shard_size
                            or _total(current + [item], in_bytes) > memory):
                chunks.append(current)
                current = []
            current.append(item)
    if current:
        chunks.append(current)
    n = len(chunks)
    return tuple(
        WorkUnit(i, f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(chunk),
                 _total(chunk, in_bytes), _total(chunk, lambda it: it.out_bytes),
                 max(peak(it) for it in chunk))
        for i, chunk in enumerate(chunks)
    )


MIN_UNIT_INPUT = 64 << 20


def _total(items: list[WorkItem], size) -> int:
    return sum(size(i) for i in items)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def describe(plan: Plan) -> str:
    """Human-readable plan: sources, stages, units with bytes and estimated peak memory."""
    lines = [
        f"method: {plan.method}   compute dtype: {plan.compute_dtype}   seed: {plan.seed}",
        "sources: " + ", ".join(f"{s.name} ({s.role}: {s.uri})" for s in plan.sources),
        f"tensors: {plan.n_tensors}   input: {format_bytes(plan.input_bytes)}   "
        f"output: {format_bytes(plan.output_bytes)}   units: {len(plan.units)}",
    ]
    for g in plan.stats_groups:
        lines.append(f"global statistics pass ({g.method}): {g.n_tensors} tensors, "
                     f"params {g.params}")
    peak = max((u.peak_bytes for u in plan.units), default=0)
    lines.append(f"estimated peak memory per worker: {format_bytes(peak)} (working set, on top "
                 f"of the ~{format_bytes(PROCESS_BYTES)} a Python process with torch holds; "
                 "each Ray task asks for both)")
    lines.append(f"{'unit':>5}  {'shard':<32} {'tensors':>7} {'input':>11} {'output':>11} "
                 f"{'peak':>11}  first .. last tensor")
    for u in plan.units:
        lines.append(
            f"{u.index:>5}  {u.shard:<32} {len(u.items):>7} {format_bytes(u.input_bytes):>11} "
            f"{format_bytes(u.output_bytes):>11} {format_bytes(u.peak_bytes):>11}  "
            f"{u.items[0].tensor_name} .. {u.items[-1].tensor_name}"
        )
    lines.append(f"plan digest: {plan.digest()}")
    return "\n".join(lines)
