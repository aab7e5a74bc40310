"""Read mergekit YAML configs: translate them into raymerge's native job document.

The translation keeps mergekit's semantics so that the merge computes what mergekit computes:
its per-method defaults (e.g. ``ties`` trims per tensor with density 1.0 unless told otherwise,
DARE's ``rescale: true`` restores the L1 norm), its ``dtype`` as the arithmetic dtype and
``out_dtype`` (else ``dtype``) as the output dtype, its parameter gradients and filters, its
slices and their parameter precedence (slice source > slice > global). Features not supported
yet are refused with a clear message rather than ignored.

One difference: mergekit tests a per-model parameter's ``filter`` against that model's input
tensor name, raymerge against the output tensor name; they differ only for a filter naming a
layer number inside a slice that takes other layer numbers.
"""

from __future__ import annotations

import os
import re
from typing import Any

from orchestrator.errors import ConfigError

_KNOWN_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "tokenizer", "chat_template", "slices", "name"}
_PARAM_NAMES = {"lambda": "scale", "normalize_weights": "normalize",
                "nuslerp_row_wise": "row_wise", "nuslerp_flatten": "flatten"}
# mergekit's defaults where ours differ (ours follow the papers)
_MERGEKIT_DEFAULTS = {
    "ties": {"density": 1.0, "trim_scope": "tensor"},
    "dare_linear": {"density": 1.0, "rescale": "l1"},
    "dare_ties": {"density": 1.0, "rescale": "l1"},
    "breadcrumbs": {"density": 1.0},
    "breadcrumbs_ties": {"density": 1.0},
    "della": {"density": 1.0, "rescale": "l1", "normalize": True},
    "della_linear": {"density": 1.0, "rescale": "l1"},
}
_BASE_IS_FIRST_MODEL = {"slerp"}  # v0 = base_model, v1 = the other model
_BASE_IGNORED = {"linear"}
_NOT_NUMERIC = {"int8_mask"}  # changes only a mask's storage dtype in mergekit
_GLOB_CHARS = re.compile(r"[*?\[\]]")


def is_mergekit(doc: dict) -> bool:
    return "merge_method" in doc


def from_mergekit(doc: dict) -> dict:
    """The native job document for a mergekit config (without ``output``)."""
    errors = []
    for key in doc:
        if key not in _KNOWN_KEYS:
            errors.append(f"{key}: unknown mergekit key")
    if (doc.get("models") is None) == (doc.get("slices") is None):
        errors.append("models, slices: give exactly one of them")

    method = doc.get("merge_method")
    base_path = doc.get("base_model")
    if base_path is not None and not isinstance(base_path, str):
        errors.append("base_model: expected a path")
        base_path = None
    base_role = (None if base_path is None or method in _BASE_IGNORED
                 else "first" if method in _BASE_IS_FIRST_MODEL else "base")
    params = dict(_MERGEKIT_DEFAULTS.get(method, {}))
    params.update(_params(doc.get("parameters"), "parameters", errors))
    native: dict[str, Any] = {"merge": {"method": method, "params": params}}
    names: dict[str, str] = {}  # path -> native source name
    used: set[str] = set()

    def name_of(path: str) -> str:
        if path not in names:
            names[path] = _unique_name(path, used)
        return names[path]

    if doc.get("slices") is not None:
        slices = _slices(doc["slices"], base_path, base_role, name_of, errors)
        sources = [{"name": n, "uri": p} for p, n in names.items() if p != base_path
                   or base_role != "base"]
        native["slices"] = slices
    else:
        sources = _models(doc.get("models"), base_path, base_role, name_of, errors)
    if base_role == "base":
        native["base"] = {"name": name_of(base_path), "uri": base_path}
    tokenizer = _tokenizer(doc, name_of, errors)
    if tokenizer is not None:
        native["tokenizer"] = tokenizer
    if doc.get("chat_template") is not None:
        native["chat_template"] = doc["chat_template"]
    if errors:
        raise ConfigError(errors)
    native["sources"] = sources
    if doc.get("dtype") is not None:
        native["compute_dtype"] = doc["dtype"]
    out_dtype = doc.get("out_dtype") or doc.get("dtype")
    if out_dtype is not None:
        native["output"] = {"dtype": out_dtype}
    return native


def _tokenizer(doc: dict, name_of, errors: list[str]) -> dict | None:
    """``tokenizer_source`` or ``tokenizer: {source, pad_to_multiple_of}`` -> native
    ``tokenizer`` (a model path becomes that source's name)."""
    if doc.get("tokenizer_source") is not None and doc.get("tokenizer") is not None:
        errors.append("tokenizer, tokenizer_source: give one of them")
        return None
    block = doc.get("tokenizer")
    if block is None:
        source = doc.get("tokenizer_source")
        block = {} if source is None else {"source": source}
        if source is None:
            return None
    if not isinstance(block, dict):
        errors.append("tokenizer: expected a mapping with source (and pad_to_multiple_of)")
        return None
    extra = set(block) - {"source", "pad_to_multiple_of"}
    if extra:
        errors.append(f"tokenizer: {', '.join(sorted(extra))} not supported (per-token "
                      "embedding sources)" if "tokens" in extra
                      else f"tokenizer: unknown keys {', '.join(sorted(extra))}")
    source = block.get("source", "base")
    if not isinstance(source, str):
        errors.append("tokenizer.source: expected base, union or a model path")
        return None
    out = {"source": source if source in ("base", "union") else name_of(source)}
    if block.get("pad_to_multiple_of") is not None:
        out["pad_to_multiple_of"] = block["pad_to_multiple_of"]
    return out


def _model_path(entry: Any, where: str, errors: list[str]) -> str | None:
    path = entry.get("model") if isinstance(entry, dict) else None
    if not isinstance(path, str):
        errors.append(f"{where}.model: expected a path")
        return None
    if "+" in path:
        errors.append(f"{where}.model: LoRA adapters ({path!r}) are not supported yet")
    return path


def _models(models: Any, base_path: str | None, base_role: str | None, name_of,
            errors: list[str]) -> list[dict]:
    """``models:`` -> native sources (the base moved out of them, or first, per method)."""
    if not isinstance(models, list):
        errors.append("models: expected a list of {model: path, parameters: {...}}")
        return []
    entries = []
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        path = _model_path(entry, f"models[{i}]", errors)
        if path is None:
            continue
        extra = set(entry) - {"model", "parameters"}
        if extra:
            errors.append(f"models[{i}]: unknown keys {', '.join(sorted(extra))}")
        entries.append((path, _params(entry.get("parameters"), f"models[{i}].parameters",
                                      errors)))
    if base_role is not None:
        base_params = next((q for p, q in entries if p == base_path), {})
        entries = [(p, q) for p, q in entries if p != base_path]
        if base_role == "first":
            entries = [(base_path, base_params)] + entries
        else:
            name_of(base_path)  # named before the models, as mergekit lists it first
    return [{"name": name_of(path), "uri": path, **({"params": p} if p else {})}
            for path, p in entries]


def _slices(slices: Any, base_path: str | None, base_role: str | None, name_of,
            errors: list[str]) -> list[dict]:
    """``slices:`` -> native slices: per-source ``layer_range`` -> ``layers``, parameters at
    slice and slice-source level kept where mergekit reads them."""
    if not isinstance(slices, list) or not slices:
        errors.append("slices: expected a non-empty list of {sources: [...]}")
        return []
    out = []
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
            errors.append(f"{where}.sources: expected a list of {{model, layer_range}}")
            continue
        extra = set(sl) - {"sources", "parameters", "base_model"}
        if "residual_weight" in extra:
            errors.append(f"{where}.residual_weight: not supported")
        elif extra:
            errors.append(f"{where}: unknown keys {', '.join(sorted(extra))}")
        if sl.get("base_model") not in (None, base_path):
            errors.append(f"{where}.base_model: a slice's own base model is not supported; "
                          "use the top-level base_model")
        entries = []
        for j, src in enumerate(sl["sources"]):
            at = f"{where}.sources[{j}]"
            path = _model_path(src, at, errors)
            if path is None:
                continue
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                errors.append(f"{at}: unknown keys {', '.join(sorted(extra))}")
            layers = src.get("layer_range")
            if not (isinstance(layers, list) and len(layers) == 2
                    and all(isinstance(v, int) for v in layers)):
                errors.append(f"{at}.layer_range: expected [start, end], got {layers!r}")
                continue
            p = _params(src.get("parameters"), f"{at}.parameters", errors)
            entries.append((path, {"source": name_of(path), "layers": layers,
                                   **({"params": p} if p else {})}))
        if base_role == "first":
            entries.sort(key=lambda e: e[0] != base_path)
        native = {"sources": [e for _, e in entries]}
        p = _params(sl.get("parameters"), f"{where}.parameters", errors)
        if p:
            native["params"] = p
        out.append(native)
    return out


def _params(raw: Any, path: str, errors: list[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a mapping")
        return {}
    out = {}
    for key, value in raw.items():
        if key in _NOT_NUMERIC:
            continue
        native = _setting(value, f"{path}.{key}", errors)
        if key == "rescale":
            native = _map_scalars(native, lambda v: ("l1" if v else "none")
                                  if isinstance(v, bool) else v)
        out[_PARAM_NAMES.get(key, key)] = native
    return out


def _setting(value: Any, path: str, errors: list[str]) -> Any:
    """A mergekit parameter value -> a native setting: gradients stay lists; ``filter``
    conditions (a substring test on the tensor name) become ``tensors`` patterns."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        return value
    out = []
    for i, cond in enumerate(value):
        extra = set(cond) - {"filter", "value"}
        if extra:
            errors.append(f"{path}[{i}]: unknown keys {', '.join(sorted(extra))}")
        native = {"value": cond.get("value")}
        f = cond.get("filter")
        if f is not None and f != "*":
            native = {"tensors": (f"*{f}*" if not _GLOB_CHARS.search(str(f))
                                  else "re:" + re.escape(str(f))), **native}
        out.append(native)
    return out


def _map_scalars(setting: Any, fn) -> Any:
    if isinstance(setting, list):
        return [({**e, "value": _map_scalars(e["value"], fn)} if isinstance(e, dict)
                 else fn(e)) for e in setting]
    return fn(setting)


def _unique_name(path: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.normpath(path)))
    stem = stem.strip("-._") or "model"
    name, n = stem, 2
    while name in used:
        name, n = f"{stem}-{n}", n + 1
    used.add(name)
    return name
