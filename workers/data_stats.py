"""Per-model statistics of data-aware merges, one data batch at a time (pure: no Ray).

* Fisher: the diagonal Fisher information ``Σ_x (∂ log p(ŷ|x) / ∂θ)²`` with ŷ drawn from the
  model's own prediction (unlabelled data suffices), squared per example, never per batch.
* Grams: for every ``nn.Linear``, ``Σ XᵀX`` of its inputs X (rows: every sample and token), in
  float64, keyed ``<module>.weight`` (the tensor RegMean solves for).

A batch's sums of different models, batches and workers simply add up; ``data_stats_task``
is the unit of work the orchestrator runs as a Ray task.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from workers.threads import torch_threads

FISHER, GRAMS = "fisher", "grams"
COUNT = "__count__"  # examples (Fisher) or input rows (Grams) behind the sums
NORM = "__norm__"  # in the reduced file: the L2 norm of a model's whole Fisher


def _logits(output: Any) -> torch.Tensor:
    logits = output.logits if hasattr(output, "logits") else output
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"fisher needs a model that returns logits (a transformers "
                         f"*For...Classification or *ForCausalLM class); this one returns "
                         f"{type(output).__name__}")
    return logits


def fisher_sums(model: nn.Module, inputs: torch.Tensor, input_name: str,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Σ over the examples of ``inputs`` of each parameter's squared gradient of
    ``log p(ŷ | x)``, ŷ sampled from the model (one label per output position)."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for x in inputs:
        logits = _logits(model(**{input_name: x[None]})).float()
        logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=generator)
        grads = torch.autograd.grad(logp.gather(1, y).sum(), list(params.values()),
                                    allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                sums[name] += g.float().square()
    sums[COUNT] = torch.tensor([float(len(inputs))], dtype=torch.float64)
    return sums


def gram_sums(model: nn.Module, inputs: torch.Tensor,
              input_name: str) -> dict[str, torch.Tensor]:
    """``Σ XᵀX`` (float64) of the inputs of every ``nn.Linear``, keyed by its weight's name,
    with the number of rows under ``<name>/__count__``."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def pre(module: nn.Linear, args: tuple) -> None:
            x = args[0].detach().reshape(-1, module.in_features).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            key = f"{name}/{COUNT}"
            sums[key] = sums.get(key, 0) + torch.tensor([float(len(x))], dtype=torch.float64)
        return pre

    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(f"{module_name}.weight")))
    try:
        with torch.no_grad():
            model(**{input_name: inputs})
    finally:
        for h in handles:
            h.remove()
    return sums


@dataclass(frozen=True)
class DataStatsContext:
    kind: str  # FISHER or GRAMS
    models: tuple[Any, ...]  # workers.models.ModelRef per model
    names: tuple[str, ...]  # the models' source names (key Fisher's label draws)
    data: tuple[tuple[Any, str, Any, int, str], ...]  # per model: store, file, TensorInfo,
    # samples, input name
    batch_size: int
    seed: int
    threads: int


def label_generator(seed: int, model: str, batch: int) -> torch.Generator:
    """Fisher's label draws, keyed by (seed, model, batch): the same whatever ran where."""
    key = hashlib.sha256(f"{seed}\x00{model}\x00{batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def data_stats_task(item: tuple[int, int], ctx: DataStatsContext) -> dict[str, torch.Tensor]:
    """The sums of model ``item[0]`` over its data batch ``item[1]``."""
    from workers.models import build_models, checkpoint_names, read_batch

    i, batch = item
    store, file, info, samples, input_name = ctx.data[i]
    with torch_threads(ctx.threads):
        x = read_batch(store, file, info, batch, ctx.batch_size, samples)
        model = build_models((ctx.models[i],))[0]  # one model per process at a time
        if ctx.kind == FISHER:
            sums = fisher_sums(model, x, input_name, label_generator(ctx.seed, ctx.names[i],
                                                                      batch))
        else:
            sums = gram_sums(model, x, input_name)
        return _renamed(sums, checkpoint_names(model))


def _renamed(sums: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Statistics keyed by the checkpoint's tensor names (those the merge computes)."""
    out = {}
    for key, value in sums.items():
        tensor, sep, rest = key.partition("/")
        if key == COUNT:
            out[key] = value
        elif tensor in names:
            out[names[tensor] + sep + rest] = value
    return out


@functools.lru_cache(maxsize=4)
def _stats_file(uri: str) -> tuple[Any, str, dict]:
    """The store, file name and header of a reduced statistics file (read once per process)."""
    import os

    from workers.io.safetensors_io import header_length, parse_header
    from workers.io.storage import open_store

    folder, name = os.path.split(uri.rstrip("/"))
    store = open_store(folder)
    size = store.size(name)
    n = header_length(store.read_range(name, 0, min(8, size)), size)
    return store, name, parse_header(store.read_range(name, 8, 8 + n), size)[0]


def model_stats(uri: str, tensor_name: str, models: int) -> list[torch.Tensor] | None:
    """Each model's statistic of ``tensor_name`` from the reduced file at ``uri`` (written
    by ``orchestrator/phases/statistics.py``: ``{i}/<name>`` per model i), or None if some model has
    none (a tensor outside every ``nn.Linear``, or one no gradient reached)."""
    from workers.io.safetensors_io import read_tensor

    store, name, header = _stats_file(uri)
    keys = [f"{i}/{tensor_name}" for i in range(models)]
    if not all(k in header for k in keys):
        return None
    return [read_tensor(store, name, header[k]) for k in keys]


def fisher_norms(uri: str, models: int) -> list[float]:
    """Each model's whole-Fisher L2 norm (``{i}/__norm__``)."""
    return [float(t) for t in model_stats(uri, NORM, models)]
