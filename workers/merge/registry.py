"""The registry of merge methods: a decorator adds each kernel to a plain dict.

Kernel contract: ``fn(tensors, p, **kw) -> Tensor`` where ``tensors`` are the K models' values of
one parameter in the compute dtype, ``p`` is the method's frozen params dataclass with per-model
fields already resolved to one value per model, and ``kw`` holds only what the spec asks for:
``base`` (the base model's tensor; None for a ``takes_base`` method run without one), ``rng``
(one numpy bit generator per model, keyed by seed, model, tensor and chunk so results never
depend on scheduling), ``stats`` (the reduced global
statistics of an R stage) and ``tensor_stats`` (the reduced statistics of this one tensor).
The result has the inputs' shape and the compute dtype.

An ``elementwise`` kernel computes each output entry from the same entry of its inputs (given
``stats`` and ``tensor_stats``), so workers run it on fixed-size chunks of a tensor's flattened
values and never hold a whole tensor: memory stays flat in model size and count. Its
``tensor_stats`` (if any) are collected over the chunks first. Called on whole tensors (tests,
references) with ``tensor_stats=None``, a kernel computes them from the tensors it is given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

import torch

PER_MODEL = "per_model"
INTERNAL = "internal"


def param(default: Any, *, ge: float | None = None, le: float | None = None,
          choices: tuple[str, ...] | None = None) -> Any:
    """A params field with the bounds or choices that config validation enforces."""
    return dataclasses.field(default=default, metadata={"ge": ge, "le": le, "choices": choices})


def internal(default: Any, filled_by: str) -> Any:
    """A params field raymerge sets itself, never the config: ``filled_by`` says what fills
    it ("position": the planner, with the tensor's depth in [0, 1] (0 outside a stack of
    layers); "driver": a method's preparation step, e.g. the location of solved transforms)."""
    return dataclasses.field(default=default, metadata={INTERNAL: filled_by, "ge": None,
                                                        "le": None, "choices": None})


def internal_fields(params_cls: type) -> dict[str, str]:
    """Names of a params dataclass's internal fields and what fills each."""
    return {f.name: f.metadata[INTERNAL] for f in dataclasses.fields(params_cls)
            if INTERNAL in f.metadata}


def per_model(default: float, *, ge: float | None = None, le: float | None = None) -> Any:
    """A params field given once per model: a scalar in config applies to every model.

    The resolved field holds a tuple with one value per model, in merge order.
    """
    return dataclasses.field(
        default=(default,), metadata={PER_MODEL: default, "ge": ge, "le": le, "choices": None}
    )


def per_model_fields(params_cls: type) -> dict[str, float]:
    """Names and defaults of the per-model fields of a params dataclass."""
    return {
        f.name: f.metadata[PER_MODEL]
        for f in dataclasses.fields(params_cls)
        if PER_MODEL in f.metadata
    }


class GlobalStats(Protocol):
    """An R stage: statistics collected over every tensor, reduced on the driver, then applied.

    ``key(p)`` groups tensors that share one set of global statistics (None: the tensor needs
    none). Each of ``passes`` rounds runs ``collect`` on every tensor of a group (partials are
    summed exactly, so they must be integer-valued tensors) and ``reduce`` on the sum; in the
    ``tensor_passes`` the partials are not summed and ``reduce`` gets the list of them, one per
    tensor of the group in plan order. ``for_tensor(state, slot)`` is what the kernel of the
    group's ``slot``-th tensor gets as ``stats``. A method that is not elementwise collects on
    whole tensors, the others chunk by chunk. An optional ``report(state)`` returns what the
    manifest records as ``method_state`` (e.g. a continual method's running state).
    """

    passes: int
    tensor_passes: frozenset[int]

    def key(self, p: Any) -> Hashable | None: ...

    def collect(
        self, pass_index: int, tensors: Sequence[torch.Tensor], p: Any, *, base: torch.Tensor,
        state: Any,
    ) -> torch.Tensor: ...

    def reduce(self, pass_index: int, total: Any, p: Any, state: Any) -> Any: ...

    def for_tensor(self, state: Any, slot: int) -> Any: ...


class TensorStats(Protocol):
    """Per-tensor statistics of an elementwise kernel (per-tensor TIES trim, DARE's L1 rescale):
    ``passes`` rounds of ``collect`` on each chunk of the tensor (partials summed in chunk
    order) and ``reduce`` on the sum. ``needed(p)`` says whether these params use them."""

    passes: int

    def needed(self, p: Any) -> bool: ...

    def collect(
        self, pass_index: int, tensors: Sequence[torch.Tensor], p: Any, *, base: torch.Tensor,
        state: Any, rng: Sequence[Any] | None,
    ) -> torch.Tensor: ...

    def reduce(self, pass_index: int, total: torch.Tensor, p: Any, state: Any) -> Any: ...


def single_pass_stats(stats: TensorStats, tensors: Sequence[torch.Tensor], p: Any,
                      base: torch.Tensor) -> Any:
    """Tensor statistics of whole tensors: every pass over one chunk, the tensors themselves."""
    state = None
    for i in range(stats.passes):
        part = stats.collect(i, tensors, p, base=base, state=state, rng=None)
        state = stats.reduce(i, part, p, state)
    return state


@dataclass(frozen=True, kw_only=True)
class Alignment:
    """What a method's alignment phase solves before the merge (``orchestrator/phases/align.py``).

    ``reads``: "weights", "activations" or "dual" (both), or a function of the merge params'
    dict giving one. ``solver``, likewise fixed or a function of the params:
    "coordinate_descent" (weight matching over every group at once), "groups" (one independent
    solve per model and free group, each a Ray task, finding a ``unit``: "perm", "zip" or a
    transport "plan"), "transport_chain" (optimal transport group after group, on weights),
    "pairwise" (MuDSC's joint weight and activation solve, model by model) or "refit" (matched
    partially, then each layer refitted by least squares, as PLeaS does). ``zips(params)``:
    whether these params zip (merge/unmerge features) rather than permute; ``joint``: more
    than two models zip together in one solve.
    """

    reads: str | Callable[[dict], str]
    solver: str | Callable[[dict], str]
    unit: str = "perm"
    zips: Callable[[dict], bool] = lambda params: False
    joint: bool = False

    def reads_for(self, params: dict) -> str:
        return self.reads(params) if callable(self.reads) else self.reads

    def solver_for(self, params: dict) -> str:
        return self.solver(params) if callable(self.solver) else self.solver


@dataclass(frozen=True)
class ContinualStep:
    """How one new model joins the previous merge in a periodic re-merge: the merge params,
    and the params of the previous version's and the new model's source entries (None:
    leave that entry as it is)."""

    params: dict
    previous: dict | None = None
    new: dict | None = None


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """Everything raymerge knows of a method; built by ``merge_method``, by keyword."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: type

    # -- inputs: the models a merge takes
    needs_base: bool
    takes_base: bool = False  # uses the base when one is given (``base`` is None otherwise)
    min_models: int = 1
    max_models: int | None = None
    models_for: Callable[[dict], int | None] | None = None  # exact input count, given params
    # (None: any count, merged one model at a time by a sequence of steps)
    any_widths: bool = False  # models after the first may differ in width (same tensors);
    # the output has the first's shapes
    check: Callable[[dict, int], list[str]] | None = None  # given the params (defaults filled
    # in) and the number of models: what they ask that the models cannot give, as
    # ``key: message`` lines, checked with the config

    # -- the kernel: how workers call ``fn``
    elementwise: bool | Callable[[Any], bool] = False
    uses_rng: bool = False
    wants_name: bool = False  # the kernel gets ``name=`` (the output tensor's name)
    stored_inputs: bool = False  # elementwise kernels and statistics get the inputs as
    # stored (one ``[n, elements]`` tensor when they share a dtype) and ``dtype=`` the compute
    # dtype, and cast what they do not convert in a fused loop themselves
    stats: GlobalStats | None = None
    tensor_stats: TensorStats | None = None
    out_shapes: Callable[[Any], Mapping[str, tuple[int, ...]]] | None = None  # given the
    # resolved params: the output tensors whose shapes differ from the inputs' (the driver's
    # preparation then writes the config.json that fits them)

    # -- phases around the merge, each run by the driver on the executor
    alignment: Alignment | None = None
    statistics: str | None = None  # "fisher" or "grams": each model's statistics over its
    # data, computed by orchestrator/phases/statistics.py before the merge
    dynamic: str | None = None  # "wemoe" or "gating": an input-dependent runtime, trained by
    # orchestrator/phases/dynamic.py before the merge (which writes its static part)
    heads: str | None = None  # "required": the job must name the tensors each model keeps
    # (align.heads: its classifier), which the method's runtime routes between
    masks: Callable[..., torch.Tensor] | None = None  # task-aware: ``masks(tensors, p, *,
    # base) -> bool [K, *shape]``, each task's mask, stored bit-packed next to the output
    continual: Callable[[dict, bool, int, dict], ContinualStep | None] | None = None  # a
    # periodic re-merge's update by one model: given the merge params, whether sources set
    # their own params, how many models the previous version holds and its method_state, the
    # step, or None when these params cannot add a model to their previous result

    @property
    def uses_base(self) -> bool:
        return self.needs_base or self.takes_base

    @property
    def phase(self) -> str | None:
        """The driver phase that prepares the merge: "align", "statistics", "training", or
        "task_masks" (a task-aware method's masks, committed before the merged model)."""
        if self.alignment is not None:
            return "align"
        if self.statistics:
            return "statistics"
        if self.dynamic:
            return "training"
        return "task_masks" if self.masks is not None else None

    def sequential(self, params: dict, n_models: int) -> bool:
        """Whether the merge runs as a sequence of steps, one model at a time (OPCM)."""
        return (self.models_for is not None and self.models_for(params) is None
                and n_models > 1)

    def is_elementwise(self, p: Any) -> bool:
        return self.elementwise(p) if callable(self.elementwise) else self.elementwise

    @property
    def reads_windows(self) -> bool:
        """Whether kernels and statistics get whole read windows: stored inputs whose random
        draws, if any, are not keyed by chunk."""
        return self.stored_inputs and not self.uses_rng

    def tensor_stats_for(self, p: Any) -> TensorStats | None:
        return self.tensor_stats if self.tensor_stats and self.tensor_stats.needed(p) else None

    @property
    def summary(self) -> str:
        """The docstring's first sentence (which may wrap over several lines)."""
        paragraph = " ".join((self.fn.__doc__ or "").strip().split("\n\n")[0].split())
        end = paragraph.find(". ")
        return paragraph if end < 0 else paragraph[:end + 1]


METHODS: dict[str, MethodSpec] = {}


def merge_method(name: str, **spec: Any):
    """Register ``fn`` under ``name`` (also its file, test file and YAML ``merge.method``);
    ``spec`` holds the ``MethodSpec`` fields by keyword."""

    def register(fn):
        if name in METHODS:
            raise RuntimeError(f"merge method {name!r} registered twice")
        METHODS[name] = MethodSpec(name=name, fn=fn, **spec)
        return fn

    return register


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r}; valid methods: {', '.join(sorted(METHODS))}"
        ) from None
