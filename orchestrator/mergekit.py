"""Read mergekit YAML configs: translate them into raymerge's native job document.

The translation keeps mergekit's semantics so that the merge computes what mergekit computes:
its per-method defaults (e.g. ``ties`` trims per tensor with density 1.0 unless told otherwise,
DARE's ``rescale: true`` restores the L1 norm), its ``dtype`` as the arithmetic dtype and
``out_dtype`` (else ``dtype``) as the output dtype. Features not supported yet are refused with
a clear message rather than ignored.
"""

from __future__ import annotations

import os
import re
from typing import Any

from orchestrator.errors import ConfigError

_KNOWN_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "tokenizer", "chat_template", "slices", "name"}
_PARAM_NAMES = {"lambda": "scale"}
# mergekit's defaults where ours differ (ours follow the papers)
_MERGEKIT_DEFAULTS = {
    "ties": {"density": 1.0, "trim_scope": "tensor"},
    "dare_linear": {"density": 1.0, "rescale": "l1"},
    "dare_ties": {"density": 1.0, "rescale": "l1"},
    "breadcrumbs": {"density": 1.0},
}
_BASE_IS_FIRST_MODEL = {"slerp"}  # v0 = base_model, v1 = the other model
_BASE_IGNORED = {"linear"}
_NOT_NUMERIC = {"int8_mask"}  # changes only a mask's storage dtype in mergekit


def is_mergekit(doc: dict) -> bool:
    return "merge_method" in doc


def from_mergekit(doc: dict) -> dict:
    """The native job document for a mergekit config (without ``output``)."""
    errors = []
    for key in doc:
        if key not in _KNOWN_KEYS:
            errors.append(f"{key}: unknown mergekit key")
    if doc.get("slices") is not None:
        errors.append("slices: mergekit slices are not supported yet; list the models under "
                      "`models:` to merge whole models")
    for key in ("tokenizer", "chat_template"):
        if doc.get(key) is not None:
            errors.append(f"{key}: not supported yet (raymerge copies the base model's "
                          "tokenizer files)")
    if doc.get("tokenizer_source") not in (None, "base"):
        errors.append("tokenizer_source: only 'base' is supported yet")

    method = doc.get("merge_method")
    models = doc.get("models") or []
    if not isinstance(models, list):
        errors.append("models: expected a list of {model: path, parameters: {...}}")
        models = []
    base_path = doc.get("base_model")
    if base_path is not None and not isinstance(base_path, str):
        errors.append("base_model: expected a path")
        base_path = None

    entries = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        path = entry.get("model") if isinstance(entry, dict) else None
        if not isinstance(path, str):
            errors.append(f"models[{i}].model: expected a path")
            continue
        if "+" in path:
            errors.append(f"models[{i}].model: LoRA adapters ({path!r}) are not supported yet")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            errors.append(f"models[{i}]: unknown keys {', '.join(sorted(extra))}")
        entries.append((path, _params(entry.get("parameters"), f"models[{i}].parameters",
                                      errors)))
    params = dict(_MERGEKIT_DEFAULTS.get(method, {}))
    params.update(_params(doc.get("parameters"), "parameters", errors))
    if errors:
        raise ConfigError(errors)

    native: dict[str, Any] = {"merge": {"method": method, "params": params}}
    used: set[str] = set()
    if base_path is not None and method not in _BASE_IGNORED:
        others = [(p, q) for p, q in entries if p != base_path]
        base_params = next((q for p, q in entries if p == base_path), {})
        if method in _BASE_IS_FIRST_MODEL:
            entries = [(base_path, base_params)] + others
        else:
            entries = others
            native["base"] = {"name": _unique_name(base_path, used), "uri": base_path}
    native["sources"] = [
        {"name": _unique_name(path, used), "uri": path, **({"params": p} if p else {})}
        for path, p in entries
    ]
    if doc.get("dtype") is not None:
        native["compute_dtype"] = doc["dtype"]
    out_dtype = doc.get("out_dtype") or doc.get("dtype")
    if out_dtype is not None:
        native["output"] = {"dtype": out_dtype}
    return native


def _params(raw: Any, path: str, errors: list[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a mapping")
        return {}
    out = {}
    for key, value in raw.items():
        if isinstance(value, (list, dict)):
            errors.append(f"{path}.{key}: per-layer gradients and tensor filters are not "
                          "supported yet; give a single value (or use merge.overrides in a "
                          "native raymerge config)")
        elif key == "rescale":
            out["rescale"] = "l1" if value else "none"
        elif key not in _NOT_NUMERIC:
            out[_PARAM_NAMES.get(key, key)] = value
    return out


def _unique_name(path: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.normpath(path)))
    stem = stem.strip("-._") or "model"
    name, n = stem, 2
    while name in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name)
    return name
