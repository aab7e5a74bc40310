"""``raymerge similarity JOB OUT_DIR``: how alike the job's models are, layer by layer.

For K models, K x K matrices per layer (tensors grouped by their layer number; the rest under
``other``):

* ``weights_cosine``: cosine of the models' flattened weights;
* ``task_vectors_cosine`` (with a base): cosine of θ_i − θ0;
* ``cka`` (with ``data``): linear CKA of the models' unit activations, per alignment group
  (residual stream, each block's MLP hidden units and attention), from one statistics pass on
  Ray over all models together.

The weight metrics run as one Ray task per layer (``workers/similarity.py``), each reading its
layer's tensors itself; the driver only assembles the matrices and draws them. Written to
OUT_DIR as ``similarity.json``, one CSV per metric (layer, model, model, value) and, with
matplotlib installed (``pip install 'raymerge[plot]'``), one PNG per metric: a labelled K x K
heatmap per layer.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os

from orchestrator.config.schema import JobConfig
from orchestrator.engine.executor import ray_session, run_tasks
from orchestrator.errors import PlanError
from orchestrator.planning.layout import layer_of
from workers.io.index import index_checkpoint
from workers.io.storage import open_store
from workers.similarity import LayerGroup, SimilarityContext, layer_cosines

log = logging.getLogger(__name__)

FLOAT = ("F16", "BF16", "F32", "F64")


def _layer(name: str) -> str:
    found = layer_of(name)
    return "other" if found is None else f"{found[0]}{found[1]}"


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
    layers: dict[str, list] = {}  # in the order the sorted names first reach each layer
    for n in names:
        layers.setdefault(_layer(n), []).append(
            (n, tuple(idx.tensors[n] for idx in indexes)))
    groups = [LayerGroup(layer, tuple(tensors),
                         sum(loc.info.end - loc.info.start for _, locs in tensors for loc in locs))
              for layer, tensors in layers.items()]
    ctx = SimilarityContext(tuple(stores), k, cfg.runtime.threads_per_worker)
    result: dict = {"models": [s.name for s in cfg.sources]}
    with ray_session(cfg.runtime):  # the weight tasks and the activation statistics
        for group, found in zip(groups, run_tasks(layer_cosines, groups, (ctx,), cfg.runtime,
                                                  label="similarity")):
            for metric, matrix in found.items():
                result.setdefault(metric, {})[group.layer] = matrix
        if cfg.data is not None:
            result["cka"] = _cka(cfg, specs_[:k], stores, indexes, names, cache)
    return result


def _cka(cfg: JobConfig, sources: list, stores: list, indexes: list, names: list[str],
         cache) -> dict:
    """Linear CKA per alignment group, from one statistics pass over all models together."""
    from orchestrator.phases.align import statistics
    from orchestrator.phases.data import model_ref, read_config
    from workers.align import spec as specs

    configs = [read_config(st, s.name) for s, st in zip(sources, stores)]
    spec = specs.build({n: indexes[0].tensors[n].info.shape for n in names}, configs[0])
    refs = tuple(model_ref(i, st, c) for i, st, c in zip(indexes, stores, configs))
    stats = statistics(cfg, spec, refs, joint=True, cache=cache)
    return {g: s.cka().tolist() for g, s in stats.items()}


def _heatmaps(metric: str, layers: dict, models: list[str], path: str) -> None:
    """One labelled K x K heatmap per layer (models on both axes, values in the cells when
    they fit), on one shared colour scale."""
    from matplotlib.figure import Figure

    k, cols = len(models), min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    size = 1.2 + 0.45 * k
    fig = Figure(figsize=(cols * size + 1, rows * size + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    low = min(0.0, min(v for m in layers.values() for row in m for v in row))
    image = None
    for ax, (layer, matrix) in zip(axes.flat, layers.items()):
        image = ax.imshow(matrix, vmin=low, vmax=1.0, cmap="viridis")
        ax.set_title(layer, fontsize=8)
        ax.set_xticks(range(k), models, rotation=90, fontsize=7)
        ax.set_yticks(range(k), models, fontsize=7)
        if k <= 6:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center",
                            fontsize=6, color="white" if matrix[i][j] < 0.6 else "black")
    for ax in list(axes.flat)[len(layers):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.8, label=metric)
    fig.suptitle(metric)
    fig.savefig(path, dpi=110)


def write(result: dict, folder: str) -> list[str]:
    """similarity.json, a CSV per metric and (with matplotlib) a PNG per metric; returns the
    file names."""
    os.makedirs(folder, exist_ok=True)
    written = ["similarity.json"]
    with open(os.path.join(folder, "similarity.json"), "w") as f:
        json.dump(result, f, indent=1)
    models = result["models"]
    try:
        import matplotlib  # noqa: F401
        plots = True
    except ImportError:
        plots = False
        log.warning("no heatmaps: they need matplotlib (pip install 'raymerge[plot]'); the "
                    "JSON and CSV files hold every value")
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
        written.append(f"{metric}.csv")
        if plots:
            _heatmaps(metric, layers, models, os.path.join(folder, f"{metric}.png"))
            written.append(f"{metric}.png")
    return written


def run(cfg: JobConfig, folder: str) -> list[str]:
    result = compute(cfg, cache=open_store(folder))
    files = write(result, folder)
    log.info(f"similarity of {len(result['models'])} models: "
             f"{', '.join(m for m in result if m != 'models')} -> {folder}")
    return files
