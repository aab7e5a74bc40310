"""Unit activations of every alignment group, read by forward hooks at the spec's probes.

One forward pass per model and batch fills the statistics of all groups at once; the models are
the original, unmerged ones (as ZipIt! and MuDSC do), so statistics of different batches simply
add up (data-parallel)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from workers.align.match import ActivationStats
from workers.align.spec import Group, Probe, Spec


def _units(group: Group, probe: Probe, x: torch.Tensor) -> torch.Tensor:
    """[samples, group.size] from a probed tensor [..., size * repeat] (query-head copies
    become extra samples)."""
    width = group.size * probe.repeat
    if x.shape[-1] != width:
        raise ValueError(f"probe {probe.module} ({probe.side}) of group {group.name} has "
                         f"{x.shape[-1]} features, expected {width}")
    x = x.detach().reshape(-1, width)
    if probe.repeat == 1:
        return x
    hd = group.head_dim
    return x.reshape(len(x), group.size // hd, probe.repeat, hd).transpose(1, 2).reshape(
        -1, group.size)


@contextmanager
def _probed(model: nn.Module, spec: Spec) -> Iterator[dict[str, list[torch.Tensor]]]:
    seen: dict[str, list[torch.Tensor]] = {g.name: [] for g in spec.groups}
    handles = []

    def hook(group: Group, probe: Probe) -> Callable:
        def on_input(_module, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values()
                                          if isinstance(v, torch.Tensor))
            seen[group.name].append(_units(group, probe, x))

        def on_output(_module, _args, output):
            x = output[0] if isinstance(output, tuple) else output
            seen[group.name].append(_units(group, probe, x))

        return on_input if probe.side == "input" else on_output

    try:
        for g in spec.groups:
            if not g.probes:
                raise ValueError(f"group {g.name} has no probe: activations cannot be read")
            for probe in g.probes:
                module = model.get_submodule(probe.module)
                if probe.side == "input":
                    handles.append(module.register_forward_pre_hook(hook(g, probe),
                                                                    with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(hook(g, probe)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def _features(spec: Spec, models: list[nn.Module], batches: Iterable[Any],
              forward: Callable[[nn.Module, Any], Any], specs: list[Spec] | None = None
              ) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per batch: each model's [samples, size] activations of every group (one forward pass
    per model; each probe's activations become samples: every token, every residual probe);
    ``specs``: each model's own spec, where widths differ."""
    with torch.no_grad():
        for batch in batches:
            features = []
            for i, model in enumerate(models):
                with _probed(model, specs[i] if specs else spec) as seen:
                    forward(model, batch)
                features.append({g: torch.cat(v) for g, v in seen.items()})
            yield features


def pairwise_stats(spec: Spec, models: list[nn.Module], batches: Iterable[Any],
                   forward: Callable[[nn.Module, Any], Any], specs: list[Spec] | None = None
                   ) -> list[dict[str, ActivationStats]]:
    """Statistics of every group over ``batches`` for each pair (model 0, model i), i >= 1;
    ``forward(model, batch)`` runs a model; ``specs``: each model's own spec (other widths)."""
    specs = specs or [spec] * len(models)
    stats = [{g.name: ActivationStats(g.size, other=other.group(g.name).size)
              for g in spec.groups} for other in specs[1:]]
    for features in _features(spec, models, batches, forward, specs):
        for i, pair in enumerate(stats, start=1):
            for g in spec.groups:
                pair[g.name].update(features[0][g.name], features[i][g.name])
    return stats


def joint_stats(spec: Spec, models: list[nn.Module], batches: Iterable[Any],
                forward: Callable[[nn.Module, Any], Any]) -> dict[str, ActivationStats]:
    """Statistics of every group over all models together (for K x K similarities)."""
    stats = {g.name: ActivationStats(g.size, len(models)) for g in spec.groups}
    for features in _features(spec, models, batches, forward):
        for g in spec.groups:
            stats[g.name].update(*(f[g.name] for f in features))
    return stats


def activation_stats(spec: Spec, model_a: nn.Module, model_b: nn.Module,
                     batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
                     spec_b: Spec | None = None) -> dict[str, ActivationStats]:
    """``pairwise_stats`` of two models (``spec_b``: B's spec, if its widths differ)."""
    return pairwise_stats(spec, [model_a, model_b], batches, forward,
                          [spec, spec_b] if spec_b else None)[0]
