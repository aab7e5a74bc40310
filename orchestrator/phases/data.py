"""The inputs of a statistics pass: the models (as ``workers.models.ModelRef``) and the
unlabelled data tensor each runs on."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from orchestrator.config.schema import DataConfig, JobConfig, SourceConfig
from orchestrator.config.tensor_params import tensor_matcher
from orchestrator.errors import ConfigError
from workers.io.index import CheckpointIndex, index_checkpoint, read_header
from workers.io.storage import Store, open_store
from workers.models import ModelRef


def read_config(store: Store, name: str) -> dict:
    if not store.exists("config.json"):
        return {}
    try:
        return json.loads(store.read_bytes("config.json"))
    except ValueError:
        raise ConfigError(f"{name}: config.json is not valid JSON") from None


def model_ref(idx: CheckpointIndex, store: Store, config: dict) -> ModelRef:
    tensors = tuple((n, loc.file, loc.info) for n, loc in sorted(idx.tensors.items()))
    key = hashlib.sha256(json.dumps([idx.uri, idx.pins], sort_keys=True, default=str)
                         .encode()).hexdigest()
    return ModelRef(store, tensors, config, key)


def open_model(source: SourceConfig) -> ModelRef:
    """A source as a model for a statistics pass or training (its headers and config)."""
    store = open_store(source.uri)
    return model_ref(index_checkpoint(source.name, store), store,
                     read_config(store, source.name))


def head_names(cfg: JobConfig, names: list[str]) -> list[str]:
    """The tensors of ``names`` that ``align.heads`` picks (each task's classifier), in
    ``names`` order; a pattern that picks none is an error."""
    picked = set()
    for pattern in cfg.align.heads:
        hit = {n for n in names if tensor_matcher(pattern)(n)}
        if not hit:
            raise ConfigError(f"align.heads: {pattern!r} matches no tensor of "
                              f"{cfg.sources[0].name}")
        picked |= hit
    return [n for n in names if n in picked]


@dataclass(frozen=True)
class OpenedData:
    store: Store
    file: str
    info: Any  # TensorInfo of the inputs tensor
    samples: int  # used: at most data.max_samples
    input_name: str  # the forward() argument
    pin: tuple  # what identifies these inputs (cache keys)

    @property
    def task_input(self) -> tuple:
        """What a worker needs to read batches: (store, file, info, samples, input name)."""
        return self.store, self.file, self.info, self.samples, self.input_name


def open_data(data: DataConfig, where: str = "data") -> OpenedData:
    """Check ``data`` (the file, its tensor, at least 2 samples) and say how to read it."""
    folder, name = os.path.split(data.uri.rstrip("/"))
    store = open_store(folder or ".")
    header = read_header(store, name)[0]
    if data.key not in header:
        raise ConfigError(f"{where}.key: {data.uri} has no tensor {data.key!r}; it has "
                          f"{', '.join(sorted(header)) or 'none'}")
    info = header[data.key]
    samples = info.shape[0] if data.max_samples is None else min(info.shape[0],
                                                                  data.max_samples)
    if samples < 2:
        raise ConfigError(f"{where}: {data.uri}[{data.key}] needs at least 2 samples")
    floating = info.dtype in ("F16", "BF16", "F32", "F64")
    input_name = data.input_name or ("pixel_values" if floating else "input_ids")
    return OpenedData(store, name, info, samples, input_name,
                      (store.pin(name), data.key, input_name, samples))
