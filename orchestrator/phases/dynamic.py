"""Input-dependent merges (wemoe, gating): train the runtime, then write its static part.

``prepare`` trains the runtime data-parallel: one Ray actor per worker (``workers.dynamic_runtime.
Trainer``) assembles the runtime from the models and the base (experts, heads) and computes,
each step, the loss gradients of its share of the tasks on their unlabelled inputs
(``sources[].data``, else ``data``); this driver adds them in task order and takes the Adam
step (so 1 and N workers train the same bits), then the first actor returns the runtime's
files. The job merges the static part (the method's kernel) and commits both, manifest last.
``load`` and ``predict`` (``raymerge predict``) run a finished output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import torch

from orchestrator.config.schema import JobConfig
from orchestrator.engine.executor import actor_pool, pool_size
from orchestrator.errors import ConfigError, MergeError
from orchestrator.phases.data import head_names, open_data, open_model
from orchestrator.phases.statistics import model_data
from workers.io.index import index_checkpoint
from workers.io.storage import Store, open_store
from workers.merge import get_method
from workers.merge.registry import internal_fields

log = logging.getLogger(__name__)

RUNTIME = "runtime"


def prepare(cfg: JobConfig, out: Store) -> tuple[JobConfig, dict[str, bytes]]:
    from workers.dynamic_runtime import DynamicContext

    method = get_method(cfg.merge.method)
    refs = tuple(open_model(s) for s in cfg.sources)
    base = open_model(cfg.base)
    heads = head_names(cfg, [n for n, _, _ in refs[0].tensors])
    _check_head_shapes(cfg, refs, heads)
    opened = [open_data(d, f"sources[{i}].data" if cfg.sources[i].data else "data")
              for i, d in enumerate(model_data(cfg))]
    if len({o.input_name for o in opened}) > 1:
        raise ConfigError("data: every model's inputs must feed the same forward() argument")
    hidden = internal_fields(method.params)
    p = method.params(**{k: v for k, v in cfg.merge.params.items() if k not in hidden})
    ctx = DynamicContext(method.dynamic, refs, base, tuple(s.name for s in cfg.sources),
                         tuple(heads), tuple(o.task_input for o in opened), p, cfg.seed,
                         cfg.runtime.threads_per_worker)
    k = len(cfg.sources)
    workers = pool_size(cfg.runtime, k)
    shares = [list(range(i, k, workers)) for i in range(workers)]  # tasks per worker
    try:
        return _train(cfg, ctx, shares, p, method.name)
    except ValueError as e:  # the models do not fit the method (no MLP sites, no logits, ...)
        raise ConfigError(f"{method.name}: {e}") from None


def _check_head_shapes(cfg: JobConfig, refs: tuple, heads: list[str]) -> None:
    """Each task's head must have the first's shape (checked before training, which the
    merge's own check would only follow)."""
    first = {n: info.shape for n, _, info in refs[0].tensors}
    errors = []
    for src, ref in zip(cfg.sources[1:], refs[1:]):
        shapes = {n: info.shape for n, _, info in ref.tensors}
        for name in heads:
            if shapes.get(name) != first[name]:
                errors.append(f"source {src.name!r}: head tensor {name} has shape "
                              f"{shapes.get(name)}, {cfg.sources[0].name} has {first[name]}")
    if errors:
        raise ConfigError(errors)


def _train(cfg: JobConfig, ctx, shares: list, p, name: str) -> tuple[JobConfig, dict[str, bytes]]:
    from workers.dynamic_runtime import Trainer, fit

    k = len(cfg.sources)
    with actor_pool(Trainer, [(ctx, share) for share in shares], cfg.runtime) as pool:
        def gradients(values, step):  # every task's, from the workers holding them
            parts: dict = {}
            for part in pool.call_all("gradients", values, step):
                parts.update(part)
            return parts

        values, losses = fit(pool.call(0, "initial"), gradients, tasks=k, steps=p.steps,
                             lr=p.lr, progress=_progress(name))
        files = pool.call(0, "files", values, losses)
    trained = hashlib.sha256(files[f"{RUNTIME}/router.safetensors"]).hexdigest()
    merge = dataclasses.replace(cfg.merge, params={**cfg.merge.params, "runtime": trained})
    return dataclasses.replace(cfg, merge=merge), files


def load(output: str):
    """The runtime of a finished wemoe or gating output
    (``workers.dynamic_runtime.DynamicModel``)."""
    from safetensors.torch import load as load_safetensors

    from orchestrator.engine.commit import finished_manifest
    from workers.dynamic_runtime import load_runtime
    from workers.io.safetensors_io import read_tensor

    out = open_store(output)
    manifest = finished_manifest(out)
    if get_method(manifest["method"]).dynamic is None:
        raise ConfigError(f"{output}: a {manifest['method']} merge is a plain checkpoint; "
                          "load it with transformers (runtimes: wemoe, gating)")
    listed = {f["file"]: f["sha256"] for f in manifest["files"]}
    files = {}
    for name in ("runtime.json", "router.safetensors", "experts.safetensors",
                 "heads.safetensors"):
        data = out.read_bytes(f"{RUNTIME}/{name}")
        if hashlib.sha256(data).hexdigest() != listed.get(f"{RUNTIME}/{name}"):
            raise MergeError(f"{output}/{RUNTIME}/{name} is not the file the manifest lists")
        files[name] = data
    index = index_checkpoint("output", out)
    static = {n: read_tensor(out, loc.file, loc.info) for n, loc in index.tensors.items()}
    return load_runtime(json.loads(out.read_bytes("config.json")), static,
                        json.loads(files["runtime.json"]),
                        load_safetensors(files["router.safetensors"]),
                        load_safetensors(files["experts.safetensors"]),
                        load_safetensors(files["heads.safetensors"]))


def predict(output: str, inputs: torch.Tensor, task: str | None = None) -> dict:
    """Logits and predicted classes for a batch (gating: also the task probabilities and the
    task whose head was used; WEMoE needs ``task``)."""
    model = load(output)
    if task is not None and task not in model.tasks:
        raise ConfigError(f"{output}: no task {task!r}; tasks: {', '.join(model.tasks)}")
    if model.needs_task and task is None:
        raise ConfigError(f"{output}: WEMoE runs one task's head: pass a task "
                          f"({', '.join(model.tasks)})")
    x = inputs.float() if inputs.is_floating_point() else inputs
    with torch.no_grad():
        result: dict = {}
        if not model.needs_task:  # the gate's task probabilities pick the head
            p = model.probabilities(x)
            result["task_probabilities"] = p.tolist()
            result["tasks"] = [task or model.tasks[int(i)] for i in p.argmax(1)]
            logits = model(x, task, probabilities=p)
        else:
            logits = model(x, task)
    result["logits"] = logits.tolist()
    result["predictions"] = logits.argmax(-1).tolist()
    return result


def _progress(label: str):
    """A log line about every 10 % of the training steps."""

    def report(step: int, steps: int, loss: float) -> None:
        if step == steps or step % max(1, steps // 10) == 0:
            log.info(f"[{label} training] step {step}/{steps}  loss {loss:.4f}")
    return report
