"""The models of a statistics pass: built on a worker from their checkpoint bytes with
transformers (``config.json``'s architecture, no remote code), and the data batches they read.
Shared by the alignment statistics and the data-aware merges (Fisher, RegMean)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from workers.io.safetensors_io import read_elements, read_tensor, torch_dtype


@dataclass(frozen=True)
class ModelRef:
    """Where one model's tensors are: its store, (name, file, TensorInfo) triples, config."""

    store: Any
    tensors: tuple[tuple[str, str, Any], ...]
    config: dict
    key: str  # identifies this version (its pins): the per-process model cache key


_MODELS: dict[str, torch.nn.Module] = {}


def build_model(ref: ModelRef) -> torch.nn.Module:
    """The transformers model of ``config.json``'s first architecture with these weights (no
    remote code); kept per process, so a worker loads each model once."""
    if ref.key not in _MODELS:
        _MODELS[ref.key] = model_from_state(ref.config, read_state(ref))
    return _MODELS[ref.key]


def model_from_state(config: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The transformers model of ``config`` (config.json's dict; its first architecture, no
    remote code) with these tensors (checkpoint names), in eval mode."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "config_class"):
        raise ValueError(f"config.json names no transformers architecture raymerge can build "
                         f"({arch!r}); data-aware merges need one for the statistics pass")
    transformers.utils.logging.disable_progress_bar()
    # from_pretrained applies the library's renamings of older checkpoints' tensor names
    return cls.from_pretrained(None, config=cls.config_class.from_dict(config),
                               state_dict=state).eval()


def read_state(ref: ModelRef) -> dict[str, torch.Tensor]:
    """Every tensor of the model, by checkpoint name."""
    return {name: read_tensor(ref.store, file, info) for name, file, info in ref.tensors}


def build_models(refs: tuple[ModelRef, ...]) -> list[torch.nn.Module]:
    """``build_model`` of each; models of an earlier job are dropped from the process cache."""
    keys = {ref.key for ref in refs}
    for key in [k for k in _MODELS if k not in keys]:
        del _MODELS[key]
    return [build_model(ref) for ref in refs]


def read_batch(store: Any, file: str, info: Any, batch: int, batch_size: int,
               samples: int) -> torch.Tensor:
    """Samples ``[batch * batch_size, ...)`` (at most ``samples`` in all) of a data tensor;
    float inputs in float32."""
    row = math.prod(info.shape[1:])
    start = batch * batch_size
    stop = min(samples, start + batch_size)
    x = read_elements(store, file, info, start * row, stop * row).reshape(
        stop - start, *info.shape[1:])
    return x.to(torch_dtype("float32")) if x.is_floating_point() else x


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Each state-dict name of a built model -> its name in the checkpoint it was built from
    (transformers renames older checkpoints' tensors on load, e.g. ViT's
    ``encoder.layer.N.attention.attention.query`` -> ``layers.N.attention.q_proj``), found by
    reverting the renaming as ``save_pretrained`` does and matching tensors by storage.
    Tensors that a conversion fused or split have no single checkpoint name and are left out."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time conversions: names are kept
        return {n: n for n in state}
    by_storage: dict[tuple, str] = {}
    for name, t in state.items():
        if t.numel():
            by_storage.setdefault((t.data_ptr(), tuple(t.shape)), name)
    reverted = revert_weight_conversion(model, dict(state))
    return {by_storage[key]: name for name, t in reverted.items()
            if (key := (t.data_ptr(), tuple(t.shape))) in by_storage}
