"""The statistics pass of data-aware merges (fisher, regmean): each model's statistics over its
own unlabelled data, before the merge.

Every (model, data batch) is one Ray task (``workers.data_stats.data_stats_task``): the model
is built from its checkpoint bytes with transformers, run on the batch, and its sums come back.
The driver adds each model's batches in batch order (float64: the same sums whatever ran
where), divides by the count and writes one safetensors file, ``{i}/<tensor>`` per model i, to
``OUTPUT/raymerge-stats/<kind>-<key>.safetensors``; the key covers the models, data and
settings, so a re-run (other merge params) reads it back instead. The merge tasks read the
tensors they need from it. Next to it, ``<kind>-<key>.json`` records the data each model used
(file, tensor, samples, the file's pin); both are listed in the manifest with the shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math

import torch
from safetensors.torch import save as save_safetensors

from orchestrator.config.schema import DataConfig, JobConfig
from orchestrator.engine.executor import fold_tasks
from orchestrator.errors import ConfigError
from orchestrator.phases.data import open_data, open_model
from workers.data_stats import COUNT, FISHER, NORM, DataStatsContext, data_stats_task
from workers.io.storage import Store
from workers.merge import get_method
from workers.threads import torch_threads

log = logging.getLogger(__name__)

FOLDER = "raymerge-stats"


def model_data(cfg: JobConfig) -> list[DataConfig]:
    """Each model's data: its own ``sources[i].data``, else the job's ``data``."""
    out = []
    for src in cfg.sources:
        data = src.data or cfg.data
        if data is None:
            raise ConfigError(f"sources: {src.name} has no data (set sources[].data or data)")
        out.append(data)
    return out


def prepare(cfg: JobConfig, out: Store) -> tuple[JobConfig, dict[str, bytes]]:
    """Compute (or read back) the statistics; return the config whose ``statistics`` param
    names the file, and the file (to be listed in the manifest)."""
    kind = get_method(cfg.merge.method).statistics
    refs = tuple(open_model(s) for s in cfg.sources)
    datas = model_data(cfg)
    opened = [open_data(d, f"sources[{i}].data" if cfg.sources[i].data else "data")
              for i, d in enumerate(datas)]
    batch_size = datas[0].batch_size
    key = hashlib.sha256(json.dumps(
        [kind, [r.key for r in refs], [o.pin for o in opened], batch_size, cfg.seed,
         cfg.runtime.threads_per_worker], sort_keys=True, default=str).encode()).hexdigest()
    name = f"{FOLDER}/{kind}-{key[:24]}.safetensors"
    if out.exists(name):
        log.info(f"{kind}: reusing {out.path(name)}")
        data = out.read_bytes(name)
    else:
        ctx = DataStatsContext(kind, refs, tuple(s.name for s in cfg.sources),
                               tuple(o.task_input for o in opened), batch_size, cfg.seed,
                               cfg.runtime.threads_per_worker)
        items = [(i, b) for i, o in enumerate(opened)
                 for b in range(math.ceil(o.samples / batch_size))]
        totals = fold_tasks(data_stats_task, items, (ctx,), cfg.runtime, _add,
                            [{} for _ in refs], label=f"{kind} statistics")
        with torch_threads(cfg.runtime.threads_per_worker):
            data = _reduced(kind, totals)  # written by the job, before the merge tasks
    params = {**cfg.merge.params, "statistics": f"{out.uri}/{name}"}
    merge = dataclasses.replace(cfg.merge, params=params)
    used = [{"model": s.name, "data": d.uri, "key": d.key, "input_name": o.input_name,
             "samples": o.samples, "batch_size": batch_size, "pin": o.pin[0]}
            for s, d, o in zip(cfg.sources, datas, opened)]
    record = json.dumps({"statistics": kind, "file": name, "seed": cfg.seed, "data": used},
                        indent=1, sort_keys=True, default=str).encode()
    return dataclasses.replace(cfg, merge=merge), {name: data,
                                                   name.replace(".safetensors", ".json"): record}


def _add(totals: list[dict[str, torch.Tensor]], item: tuple[int, int],
         part: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Fold one batch's sums into its model's totals (float64; batches come in order)."""
    total = totals[item[0]]
    for n, v in part.items():
        total[n] = total[n] + v.double() if n in total else v.double()
    return totals


def _reduced(kind: str, totals: list[dict[str, torch.Tensor]]) -> bytes:
    """Each model's sums divided by their count, as one safetensors file."""
    tensors = {}
    for i, total in enumerate(totals):
        for n, v in total.items():
            if n.endswith(COUNT):
                continue
            count = total[COUNT] if kind == FISHER else total[f"{n}/{COUNT}"]
            tensors[f"{i}/{n}"] = (v / count).to(torch.float32 if kind == FISHER
                                                 else torch.float64).contiguous()
        if kind == FISHER:  # for ``normalize``: the norm of the model's whole Fisher
            tensors[f"{i}/{NORM}"] = torch.tensor(
                [math.sqrt(sum(float(t.double().square().sum()) for n, t in tensors.items()
                               if n.startswith(f"{i}/")))])
    return save_safetensors(tensors, metadata={"format": "pt"})
