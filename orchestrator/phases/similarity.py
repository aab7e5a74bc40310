"""``raymerge similarity JOB OUT_DIR``: how alike the job's models are, layer by layer.

For K models, K x K matrices per layer (tensors grouped by their layer number; the rest under
``other``):

* ``weights_cosine``: cosine of the models' flattened weights;
* ``task_vectors_cosine`` (with a base): cosine of θ_i − θ0;
* ``cka`` (with ``data``): linear CKA of the models' unit activations, per alignment group
  (residual stream, each block's MLP hidden units and attention), from one statistics pass on
  Ray over all models together.

Written to OUT_DIR as ``similarity.json``, one CSV per metric (layer, model, model, value) and
one PNG heatmap per metric (a K x K block per layer, top to bottom; 0 dark, 1 bright).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import struct
import zlib

import torch

from orchestrator.config.schema import JobConfig
from orchestrator.errors import PlanError
from orchestrator.planning.layout import layer_of
from workers.io.index import index_checkpoint
from workers.io.safetensors_io import read_tensor
from workers.io.storage import open_store
from workers.threads import torch_threads

log = logging.getLogger(__name__)

FLOAT = ("F16", "BF16", "F32", "F64")


def _layer(name: str) -> str:
    found = layer_of(name)
    return "other" if found is None else f"{found[0]}{found[1]}"


def _cosines(grams: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
    out = {}
    for layer, g in grams.items():
        norms = g.diagonal().clamp(min=0).sqrt()
        out[layer] = (g / torch.outer(norms, norms).clamp(min=1e-300)).tolist()
    return out


def compute(cfg: JobConfig, cache=None) -> dict:
    """Every metric the job's inputs allow, as {"models": names, metric: {layer: K x K}}.
    ``cache``: a store where activation statistics are kept between runs."""
    specs_ = list(cfg.sources) + ([cfg.base] if cfg.base is not None else [])
    stores = [open_store(s.uri) for s in specs_]
    indexes = [index_checkpoint(s.name, st) for s, st in zip(specs_, stores)]
    k = len(cfg.sources)
    names = sorted(n for n, loc in indexes[0].tensors.items() if loc.info.dtype in FLOAT)
    for s, idx in zip(specs_[1:], indexes[1:]):
        missing = [n for n in names if n not in idx.tensors
                   or idx.tensors[n].info.shape != indexes[0].tensors[n].info.shape]
        if missing:
            raise PlanError(f"{s.name}: tensors missing or of another shape than in "
                            f"{specs_[0].name}: {missing[:5]}")
    weights: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    with torch_threads(cfg.runtime.threads_per_worker):
        for n in names:  # one tensor of every model at a time
            values = [read_tensor(st, idx.tensors[n].file, idx.tensors[n].info).double()
                      .reshape(-1) for st, idx in zip(stores, indexes)]
            x = torch.stack(values[:k])
            layer = _layer(n)
            weights[layer] = weights.get(layer, 0) + x @ x.T
            if cfg.base is not None:
                d = x - values[k]
                deltas[layer] = deltas.get(layer, 0) + d @ d.T
    result = {"models": [s.name for s in cfg.sources], "weights_cosine": _cosines(weights)}
    if deltas:
        result["task_vectors_cosine"] = _cosines(deltas)
    if cfg.data is not None:
        from orchestrator.phases.align import statistics
        from orchestrator.phases.data import model_ref, read_config
        from workers.align import spec as specs

        configs = [read_config(st, s.name) for s, st in zip(specs_[:k], stores)]
        spec = specs.build({n: indexes[0].tensors[n].info.shape for n in names}, configs[0])
        refs = tuple(model_ref(i, st, c) for i, st, c in zip(indexes, stores, configs))
        stats = statistics(cfg, spec, refs, joint=True, cache=cache)
        result["cka"] = {g: s.cka().tolist() for g, s in stats.items()}
    return result


def _png(blocks: list[list[list[float]]], cell: int = 12, gap: int = 4) -> bytes:
    """A grayscale PNG: the K x K blocks stacked vertically, values clamped to [0, 1]."""
    k = len(blocks[0])
    width = k * cell
    rows = []
    for block in blocks:
        for r in range(k):
            line = bytes(int(255 * min(1.0, max(0.0, v))) for v in block[r] for _ in range(cell))
            rows += [line] * cell
        rows += [bytes(width)] * gap
    raw = b"".join(b"\x00" + line for line in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, len(rows), 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def write(result: dict, folder: str) -> list[str]:
    """similarity.json, a CSV and a PNG per metric; returns the file names."""
    os.makedirs(folder, exist_ok=True)
    written = ["similarity.json"]
    with open(os.path.join(folder, "similarity.json"), "w") as f:
        json.dump(result, f, indent=1)
    models = result["models"]
    for metric, layers in result.items():
        if metric == "models":
            continue
        text = io.StringIO()
        table = csv.writer(text)
        table.writerow(["layer", "model", "other", metric])
        for layer, matrix in layers.items():
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    table.writerow([layer, models[i], models[j], f"{value:.6g}"])
        with open(os.path.join(folder, f"{metric}.csv"), "w") as f:
            f.write(text.getvalue())
        with open(os.path.join(folder, f"{metric}.png"), "wb") as f:
            f.write(_png(list(layers.values())))
        written += [f"{metric}.csv", f"{metric}.png"]
    return written


def run(cfg: JobConfig, folder: str) -> list[str]:
    result = compute(cfg, cache=open_store(folder))
    files = write(result, folder)
    log.info(f"similarity of {len(result['models'])} models: "
             f"{', '.join(m for m in result if m != 'models')} -> {folder}")
    return files
