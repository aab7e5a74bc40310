"""Task-aware outputs (tall, emr): one unified model plus, per task, a 1-bit mask (and for EMR
a rescaler); ``task_state`` rebuilds one task's model from them and the base.

Layout of such an output: the unified model θ0 + τ (a standard checkpoint), ``masks/`` (a
checkpoint of uint8 tensors, one per float tensor: ``[ceil(numel / 8), K]``, bit j of row r =
entry 8r + j of task k's mask, little-endian bit order; committed by its own manifest, which the
main manifest lists) and, for EMR, the rescalers in the main manifest's ``method_state``. Task
t's model is θ0 + s_t · m_t ⊙ (θ_out − θ0), computed in float32 and stored in the output's dtype.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch

from orchestrator.errors import ConfigError, MergeError

log = logging.getLogger(__name__)

MASKS = "masks"  # the masks' folder inside a task-aware output


def _open(uri: str, hub_settings: dict):
    from workers.io import hub
    from workers.io.storage import open_store

    if hub.is_hub_uri(uri):
        return hub.resolve(uri, hub_settings.get("cache_dir"), hub_settings.get("offline",
                                                                                 False))[0]
    return open_store(uri)


def task_state(output: str, task: str, base: str | None = None) -> dict[str, torch.Tensor]:
    """Task ``task``'s model (a source name of the merge) from a finished task-aware output;
    ``base`` overrides where the base is read (default: the manifest's base source)."""
    from orchestrator.engine.commit import MANIFEST, finished_manifest
    from workers.io.index import index_checkpoint
    from workers.io.safetensors_io import read_tensor
    from workers.io.storage import open_store
    from workers.merge import get_method
    from workers.tasks import unpack_masks

    out = open_store(output)
    manifest = finished_manifest(out)
    if get_method(manifest["method"]).masks is None:
        raise ConfigError(f"{output}: a {manifest['method']} merge has no per-task models "
                          "(task-aware methods: tall, emr)")
    tasks = [s["name"] for s in manifest["sources"] if s["role"] == "model"]
    if task not in tasks:
        raise ConfigError(f"{output}: no task {task!r}; tasks: {', '.join(tasks)}")
    t = tasks.index(task)
    masks = open_store(f"{output.rstrip('/')}/{MASKS}")
    listed = {f["file"]: f["sha256"] for f in manifest["files"]}
    if not masks.exists(MANIFEST) or hashlib.sha256(masks.read_bytes(MANIFEST)).hexdigest() \
            != listed.get(f"{MASKS}/{MANIFEST}"):
        raise MergeError(f"{output}/{MASKS}: its manifest is missing or is not the one the "
                         "output's manifest lists")
    base_uri = base or next(s["uri"] for s in manifest["sources"] if s["role"] == "base")
    base_store = _open(base_uri, manifest["config"].get("hub") or {})
    merged, packed = index_checkpoint("output", out), index_checkpoint(MASKS, masks)
    base_index = index_checkpoint("base", base_store)
    scale = (manifest.get("method_state") or {}).get("rescalers", [1.0] * len(tasks))[t]
    state = {}
    for name, loc in merged.tensors.items():
        value = read_tensor(out, loc.file, loc.info)
        if name not in packed.tensors:  # integer buffers: as merged
            state[name] = value
            continue
        if name not in base_index.tensors:
            raise ConfigError(f"{base_uri}: no tensor {name!r}; is it the merge's base?")
        b = base_index.tensors[name]
        theta0 = read_tensor(base_store, b.file, b.info)
        if theta0.shape != value.shape:
            raise ConfigError(f"{base_uri}: {name!r} is {list(theta0.shape)}, the output's "
                              f"{list(value.shape)}; is it the merge's base?")
        m = packed.tensors[name]
        mask = unpack_masks(read_tensor(masks, m.file, m.info), t, value.numel())
        work = torch.float64 if value.dtype == torch.float64 else torch.float32
        tau = (value.to(work) - theta0.to(work)) * mask.reshape(value.shape).to(work)
        state[name] = (theta0.to(work) + (tau * scale if scale != 1 else tau)).to(value.dtype)
    return state


def export_task(output: str, task: str, dest: str, base: str | None = None) -> str:
    """Write task ``task``'s model to the local folder ``dest``: ``model.safetensors`` and the
    output's config and tokenizer files."""
    from safetensors.torch import save_file

    from orchestrator.engine.commit import finished_manifest, is_metadata
    from orchestrator.engine.guard import check_destination
    from workers.io.storage import open_store

    sources = finished_manifest(open_store(output))["sources"]
    check_destination(dest, [("the merge", output), *[(f"source {s['name']!r}", s["uri"])
                                                      for s in sources],
                             *([("the base", base)] if base else [])])
    state = task_state(output, task, base)
    os.makedirs(dest, exist_ok=True)
    out = open_store(output)
    for name in out.list_files():
        if "/" not in name and is_metadata(name):
            with open(os.path.join(dest, name), "wb") as f:
                f.write(out.read_bytes(name))
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    log.info(f"wrote {task}'s model ({len(state)} tensors) to {dest}")
    return dest
