"""The job config: one dataclass tree, loaded from YAML plus ``key=value`` overrides.

Validation walks the raw document against the schema and the chosen method's params dataclass
and reports every problem at once, each prefixed by its full key path with list indices
(``sources[1].params.weight: expected a number, got 'x'``). Only then is the document merged
onto ``OmegaConf.structured(JobConfig)`` and turned into typed objects.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import MISSING, OmegaConf

from orchestrator.config import tensor_params
from orchestrator.errors import ConfigError
from workers.io.safetensors_io import DTYPE_NAMES
from workers.merge import METHODS
from workers.merge.registry import INTERNAL, PER_MODEL, MethodSpec

COMPUTE_DTYPES = ("float32", "float64", "bfloat16", "float16")
EXECUTORS = ("ray", "local")
_BYTES = {"bytes": True}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass
class DataConfig:
    """Unlabelled inputs for data-aware methods: one tensor of a safetensors file."""

    uri: str = MISSING  # the safetensors file (local path or s3://bucket/key)
    key: str = "inputs"  # the tensor holding model-ready inputs: [N, ...]
    input_name: Optional[str] = None  # the forward() argument; default: input_ids for integer
    # inputs, pixel_values for float ones
    max_samples: Optional[int] = None  # use the first N samples only
    batch_size: int = 32  # samples per forward pass (and per statistics task)


@dataclass
class SourceConfig:
    name: str = MISSING  # used in the model card, manifest and DARE's random keys
    uri: str = MISSING  # a local folder, s3://bucket/prefix or hf://org/name[@revision]
    params: dict[str, Any] = field(default_factory=dict)  # this model's per-model params
    data: Optional[DataConfig] = None  # this model's own unlabelled inputs (fisher, regmean);
    # default: the job's data


@dataclass
class OverrideConfig:
    tensors: str = MISSING  # glob on tensor names, or "re:<regex>" (re.search)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSourceConfig:
    source: str = MISSING  # the name of a model in `sources` (or of the base)
    layers: list[int] = MISSING  # [start, end): that model's layers start .. end-1
    params: dict[str, Any] = field(default_factory=dict)  # per-model params in this slice


@dataclass
class SliceConfig:
    """A run of output layers, each merged from one layer of every listed source."""

    sources: list[SliceSourceConfig] = MISSING
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    method: str = MISSING
    params: dict[str, Any] = field(default_factory=dict)
    overrides: list[OverrideConfig] = field(default_factory=list)  # later entries win


@dataclass
class LayoutConfig:
    """Where a model's layers are, when its tensor names do not say it unambiguously."""

    layers: Optional[str] = None  # the prefix of the stack slices cut, e.g. "model.layers."
    first: list[str] = field(default_factory=list)  # patterns of tensors outside the layers
    # taken from the first slice (default: names holding embed, wte or wpe)


@dataclass
class TokenizerConfig:
    source: str = "base"  # "base", "union", or the name of a source whose tokenizer to use
    pad_to_multiple_of: Optional[int] = None  # pad the vocabulary (mean embedding rows)


@dataclass
class OutputConfig:
    uri: str = MISSING
    shard_size: str = field(default="1GB", metadata=_BYTES)
    dtype: Optional[str] = None  # default: each tensor keeps the reference model's dtype
    push_to_hub: Optional[str] = None  # "org/name": upload the finished local output there


@dataclass
class RuntimeConfig:
    executor: str = "ray"  # "local" runs every unit in this process, without Ray
    address: Optional[str] = None  # None: embedded local Ray; else ray.init(address=...)
    num_workers: Optional[int] = None  # None: one per CPU Ray sees
    worker_memory: str = field(default="2GB", metadata=_BYTES)
    threads_per_worker: int = 1
    max_retries: int = 3
    forward_credentials: bool = False  # hand this process's AWS/HF credentials to the workers
    # of a cluster it did not start (through Ray's object store; never a runtime_env)


@dataclass
class HubConfig:
    cache_dir: Optional[str] = None  # default: huggingface_hub's own (HF_HUB_CACHE)
    offline: bool = False  # use the cache only, never contact the hub


@dataclass
class AlignConfig:
    heads: list[str] = field(default_factory=list)  # tensors each source keeps (classifiers):
    # not merged; moved into the merged units, written to heads/<source>.safetensors


@dataclass
class JobConfig:
    sources: list[SourceConfig] = MISSING
    merge: MergeConfig = MISSING
    output: OutputConfig = MISSING
    base: Optional[SourceConfig] = None
    slices: list[SliceConfig] = field(default_factory=list)  # empty: whole models, layer by layer
    tokenizer: Optional[TokenizerConfig] = None  # None: copy the reference's tokenizer files
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    chat_template: Optional[str] = None  # "auto", "chatml" or a Jinja template
    compute_dtype: str = "float32"
    seed: int = 0
    pin_content: bool = False  # also pin sources by a sha256 of every byte (one more full read)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    data: Optional[DataConfig] = None  # inputs for activation-based alignment methods
    align: AlignConfig = field(default_factory=AlignConfig)


NO_OUTPUT = "OUTPUT_DIR"  # the output of a mergekit config planned without one


def parse_bytes(value: str | int) -> int:
    """``"512MB"`` / ``"1GiB"`` / ``1000`` -> bytes. ValueError if unreadable."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size like 512MB or 2GiB, got {value!r}")
    return int(float(m[1]) * _UNITS[(m[2] or "B").lower()])


def load_config(path: str, overrides: list[str] = (), output: str | None = None, *,
                output_required: bool = True) -> JobConfig:
    """Load a native or mergekit YAML job, apply an output URI and dotlist overrides, validate.
    Without ``output_required`` (a dry run) a mergekit config needs no output folder."""
    from orchestrator.config.mergekit import from_mergekit, is_mergekit

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if is_mergekit(doc):
        if output is None and not output_required:
            output = NO_OUTPUT
        if output is None:
            raise ConfigError(f"{path} is a mergekit config: give the output folder, "
                              "as in `raymerge run config.yml OUT_DIR`")
        doc = from_mergekit(doc)
    if output is not None:
        doc.setdefault("output", {})
        if isinstance(doc["output"], dict):
            doc["output"]["uri"] = output
    return config_from_dict(apply_overrides(doc, overrides))


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """Apply ``a.b[0].c=value`` overrides (values parsed as YAML) to a copy of ``doc``."""
    doc = yaml.safe_load(yaml.safe_dump(doc))  # deep copy of plain data
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = [p for p in re.split(r"\.|\[(\d+)\]", key.strip()) if p]
        if not sep or not parts:
            errors.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node: Any = doc
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    errors.append(f"override {item!r}: {_fmt(parts[:i])} has no index {part}")
                    break
                part = int(part)
            elif not isinstance(node, dict):
                errors.append(f"override {item!r}: {_fmt(parts[:i])} is not a mapping")
                break
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    if errors:
        raise ConfigError(errors)
    return doc


def _fmt(parts: list) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) or str(p).isdigit() else (f".{p}" if out else p)
    return out or "<root>"


def config_from_dict(doc: dict) -> JobConfig:
    """Validate a plain job document and return the typed config; ConfigError lists all errors."""
    errors: list[str] = []
    _check_type(doc, JobConfig, "", errors)
    _check_semantics(doc, errors)
    if errors:
        raise ConfigError(errors)
    schema = OmegaConf.structured(JobConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, _stringify_bytes(doc, JobConfig)))


def _stringify_bytes(value: Any, tp: Any) -> Any:
    """Byte sizes may be ints in YAML; the schema stores them as strings."""
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        fields = {f.name: f for f in dataclasses.fields(tp)}
        hints = typing.get_type_hints(tp)
        return {
            k: (str(v) if fields[k].metadata.get("bytes") else _stringify_bytes(v, hints[k]))
            for k, v in value.items()
        }
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_stringify_bytes(v, item) for v in value]
    return value


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def _at(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def _check_type(value: Any, tp: Any, path: str, errors: list[str]) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        if value is not None:
            _check_type(value, _unwrap_optional(tp), path, errors)
        return
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path or '<root>'}: expected a mapping, got {_show(value)}")
            return
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        for key in value:
            if key not in fields:
                errors.append(f"{_at(path, str(key))}: unknown key; expected one of "
                              f"{', '.join(fields)}")
        for name, f in fields.items():
            if name in value:
                if f.metadata.get("bytes"):
                    _check_bytes(value[name], _at(path, name), errors)
                else:
                    _check_type(value[name], hints[name], _at(path, name), errors)
            elif f.default is MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{_at(path, name)}: missing required key")
        return
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {_show(value)}")
            return
        for i, item in enumerate(value):
            _check_type(item, args[0], _at(path, i), errors)
        return
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            errors.append(f"{path}: expected a mapping with string keys, got {_show(value)}")
        return
    _check_scalar(value, tp, path, errors)


def _check_scalar(value: Any, tp: Any, path: str, errors: list[str]) -> bool:
    ok = {
        str: isinstance(value, str),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(tp, True)
    if not ok:
        want = {str: "a string", bool: "true or false", int: "an integer",
                float: "a number"}[tp]
        errors.append(f"{path}: expected {want}, got {_show(value)}")
    return ok


def _check_bytes(value: Any, path: str, errors: list[str]) -> None:
    try:
        if isinstance(value, bool) or parse_bytes(value) <= 0:
            raise ValueError(f"expected a positive size, got {value!r}")
    except ValueError as e:
        errors.append(f"{path}: {e}")


def _show(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _check_semantics(doc: dict, errors: list[str]) -> None:
    """Checks beyond types: names, method and params, dtypes, counts. Defensive on bad types."""
    sources = doc.get("sources") if isinstance(doc.get("sources"), list) else []
    base = doc.get("base") if isinstance(doc.get("base"), dict) else None
    names: dict[str, str] = {}
    for path, src in [(f"sources[{i}]", s) for i, s in enumerate(sources)] + [("base", base)]:
        name = src.get("name") if isinstance(src, dict) else None
        if not isinstance(name, str):
            continue
        if not _NAME.match(name):
            errors.append(f"{path}.name: {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        elif name in names:
            errors.append(f"{path}.name: {name!r} is already used by {names[name]}")
        names.setdefault(name, path)
    if not sources and isinstance(doc.get("sources"), list):
        errors.append("sources: at least one model is needed")

    dtype = doc.get("compute_dtype")
    if isinstance(dtype, str) and dtype not in COMPUTE_DTYPES:
        errors.append(f"compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, "
                      f"got {dtype!r}")
    out = doc.get("output") if isinstance(doc.get("output"), dict) else {}
    if isinstance(out.get("dtype"), str) and out["dtype"] not in DTYPE_NAMES:
        errors.append(f"output.dtype: expected one of {', '.join(COMPUTE_DTYPES)}, "
                      f"got {out['dtype']!r}")
    if isinstance(out.get("uri"), str) and not out["uri"].strip():
        errors.append("output.uri: must not be empty")
    if isinstance(out.get("push_to_hub"), str):
        from workers.io.hub import check_repo_id

        if not check_repo_id(out["push_to_hub"], namespaced=True):
            errors.append(f"output.push_to_hub: expected a repository id like org/name, "
                          f"got {out['push_to_hub']!r}")
        elif isinstance(out.get("uri"), str) and out["uri"].startswith("s3://"):
            errors.append("output.push_to_hub: needs a local output folder (output.uri is on "
                          "S3)")
    run = doc.get("runtime") if isinstance(doc.get("runtime"), dict) else {}
    if isinstance(run.get("executor"), str) and run["executor"] not in EXECUTORS:
        errors.append(f"runtime.executor: expected one of {', '.join(EXECUTORS)}, "
                      f"got {run['executor']!r}")
    for key, low in (("num_workers", 1), ("threads_per_worker", 1), ("max_retries", 0)):
        v = run.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v < low:
            errors.append(f"runtime.{key}: expected >= {low}, got {v}")

    layout = doc.get("layout") if isinstance(doc.get("layout"), dict) else {}
    if isinstance(layout.get("layers"), str) and not layout["layers"].endswith("."):
        errors.append(f"layout.layers: a prefix ending in '.', like 'model.layers.', got "
                      f"{layout['layers']!r}")
    for i, pattern in enumerate(layout.get("first") or []):
        if isinstance(pattern, str):
            try:
                tensor_params.tensor_matcher(pattern)
            except re.error as e:
                errors.append(f"layout.first[{i}]: invalid regex ({e})")
    tok = doc.get("tokenizer") if isinstance(doc.get("tokenizer"), dict) else {}
    if isinstance(tok.get("source"), str) and tok["source"] not in ("base", "union") \
            and tok["source"] not in names:
        errors.append(f"tokenizer.source: expected base, union or the name of a source, "
                      f"got {tok['source']!r}")
    pad = tok.get("pad_to_multiple_of")
    if isinstance(pad, int) and not isinstance(pad, bool) and pad < 1:
        errors.append(f"tokenizer.pad_to_multiple_of: expected >= 1, got {pad}")

    merge = doc.get("merge") if isinstance(doc.get("merge"), dict) else {}
    method = merge.get("method")
    if not isinstance(method, str):
        return
    if method not in METHODS:
        errors.append(f"merge.method: unknown method {method!r}; valid methods: "
                      f"{', '.join(sorted(METHODS))}")
        return
    spec = METHODS[method]
    params = merge.get("params") if isinstance(merge.get("params"), dict) else {}
    if spec.check is not None:  # the method's own demands on its params and models
        errors.extend(spec.check(_with_defaults(spec, params), len(sources)))
    align = doc.get("align") if isinstance(doc.get("align"), dict) else {}
    if spec.heads == "required" and not align.get("heads"):
        errors.append(f"align.heads: {method} needs the classifier tensors each task keeps, "
                      "e.g. [\"classifier.*\"]")
    if spec.alignment:
        if doc.get("slices") or doc.get("tokenizer"):
            errors.append(f"merge.method: {method!r} aligns whole models: no slices or "
                          "tokenizer settings")
        reads = spec.alignment.reads_for(params)
        if reads in ("activations", "dual") and not isinstance(doc.get("data"), dict):
            errors.append(f"data: method {method!r} needs unlabelled inputs: "
                          "data: {uri: inputs.safetensors, key: inputs}")
        _check_alignment(spec, params, len(sources), isinstance(doc.get("data"), dict), errors)
    if (spec.statistics or spec.dynamic) and not isinstance(doc.get("data"), dict):
        for i, src in enumerate(sources):
            if isinstance(src, dict) and not isinstance(src.get("data"), dict):
                errors.append(f"sources[{i}].data: method {method!r} needs each model's "
                              "unlabelled inputs: sources[].data or data: "
                              "{uri: inputs.safetensors, key: inputs}")
    datas = [("data", doc.get("data"))] + [(f"sources[{i}].data", s.get("data"))
                                            for i, s in enumerate(sources) if isinstance(s, dict)]
    for where, data in datas:
        data = data if isinstance(data, dict) else {}
        for key in ("max_samples", "batch_size"):
            if isinstance(data.get(key), int) and not isinstance(data[key], bool) \
                    and data[key] < 1:
                errors.append(f"{where}.{key}: expected >= 1, got {data[key]}")
    if spec.needs_base and doc.get("base") is None:
        errors.append(f"base: method {method!r} needs a base model (the common ancestor)")
    slices = doc.get("slices") if isinstance(doc.get("slices"), list) else []
    if slices:
        _check_slices(spec, slices, names, base, errors)
    elif sources:
        _check_count(spec, len(sources), "sources", errors,
                     merge.get("params") if isinstance(merge.get("params"), dict) else {})
    if isinstance(merge.get("params"), dict):
        _check_params(spec, merge["params"], "merge.params", errors, per_model_only=False)
    for i, src in enumerate(sources):
        if isinstance(src, dict) and isinstance(src.get("params"), dict):
            _check_params(spec, src["params"], f"sources[{i}].params", errors,
                          per_model_only=True)
    overrides = merge.get("overrides") if isinstance(merge.get("overrides"), list) else []
    for i, ov in enumerate(overrides):
        if not isinstance(ov, dict):
            continue
        if isinstance(ov.get("tensors"), str):
            try:
                tensor_params.tensor_matcher(ov["tensors"])
            except re.error as e:
                errors.append(f"merge.overrides[{i}].tensors: invalid regex ({e})")
        if isinstance(ov.get("params"), dict):
            _check_params(spec, ov["params"], f"merge.overrides[{i}].params", errors,
                          per_model_only=False)
    _check_weights_sum(spec, merge, sources, errors)


def _with_defaults(spec: MethodSpec, params: dict) -> dict:
    defaults = {f.name: f.default for f in dataclasses.fields(spec.params)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **params}


def _check_alignment(spec: MethodSpec, params: dict, n: int, has_data: bool,
                     errors: list[str]) -> None:
    """What an alignment method's params ask that its models or inputs cannot give (checked
    here so that ``plan`` refuses what ``run`` would, before any solve)."""
    full = _with_defaults(spec, params)
    value = full.get
    zipped = spec.alignment.zips(full)
    stop = value("stop")
    if isinstance(stop, int) and stop >= 0 and not zipped:
        errors.append("merge.params.stop: partial merging is for zips (zipit, or mudsc with "
                      "variant: zip)")
    if value("finetune_steps") and not has_data:
        errors.append("merge.params.finetune_steps: the fine-tune needs unlabelled inputs: "
                      "data: {uri: inputs.safetensors, key: inputs}")


def _check_count(spec: MethodSpec, n: int, path: str, errors: list[str],
                 params: dict | None = None) -> None:
    want = spec.models_for(params) if spec.models_for and params is not None else None
    if want is not None:
        if n != want:
            errors.append(f"{path}: method {spec.name!r} with these merge.params merges "
                          f"exactly {want} models, got {n}")
        return
    if n < spec.min_models or (spec.max_models and n > spec.max_models):
        want = (f"exactly {spec.min_models}" if spec.min_models == spec.max_models
                else f"at least {spec.min_models}")
        if spec.max_models and spec.min_models != spec.max_models:
            want = f"{spec.min_models} to {spec.max_models}"
        errors.append(f"{path}: method {spec.name!r} merges {want} models, got {n}")


def _check_slices(spec: MethodSpec, slices: list, names: dict[str, str], base: dict | None,
                  errors: list[str]) -> None:
    """Each slice names known sources with equally long layer ranges; the base appears in a
    slice exactly when the method needs it."""
    base_name = base.get("name") if base else None
    for i, sl in enumerate(slices):
        entries = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(entries, list):
            continue
        where = f"slices[{i}]"
        if isinstance(sl.get("params"), dict):
            _check_params(spec, sl["params"], f"{where}.params", errors, per_model_only=False)
        lengths, models, has_base = set(), 0, False
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            at = f"{where}.sources[{j}]"
            name = entry.get("source")
            if isinstance(name, str):
                if name not in names:
                    errors.append(f"{at}.source: {name!r} is not the name of a source or the "
                                  f"base; known: {', '.join(names) or '(none)'}")
                elif name == base_name:
                    has_base = True
                    if not spec.uses_base:
                        errors.append(f"{at}.source: {name!r} is the base, which method "
                                      f"{spec.name!r} does not take; list it under sources")
                else:
                    models += 1
            layers = entry.get("layers")
            if isinstance(layers, list) and all(isinstance(v, int) for v in layers):
                if len(layers) != 2 or not 0 <= layers[0] < layers[1]:
                    errors.append(f"{at}.layers: expected [start, end) with 0 <= start < end, "
                                  f"got {layers}")
                else:
                    lengths.add(layers[1] - layers[0])
            if isinstance(entry.get("params"), dict):
                _check_params(spec, entry["params"], f"{at}.params", errors,
                              per_model_only=True)
        if len(lengths) > 1:
            errors.append(f"{where}.sources: every source of a slice gives the same number of "
                          f"layers, got ranges of {sorted(lengths)} layers")
        if spec.uses_base and base_name is not None and not has_base:
            errors.append(f"{where}.sources: method {spec.name!r} needs the base "
                          f"{base_name!r} in every slice, with its layer range")
        _check_count(spec, models, f"{where}.sources", errors)


def _check_params(spec: MethodSpec, params: dict, path: str, errors: list[str], *,
                  per_model_only: bool) -> None:
    fields = {f.name: f for f in dataclasses.fields(spec.params)}
    hints = typing.get_type_hints(spec.params)
    allowed = [n for n, f in fields.items() if INTERNAL not in f.metadata
               and (not per_model_only or PER_MODEL in f.metadata)]
    for key, value in params.items():
        where = f"{path}.{key}"
        if key in fields and INTERNAL in fields[key].metadata:
            errors.append(f"{where}: set by raymerge, not by the config")
            continue
        if key not in allowed:
            what = "per-model " if per_model_only else ""
            errors.append(f"{where}: unknown {what}parameter of {spec.name!r}; expected one of "
                          f"{', '.join(allowed) or '(none)'}")
            continue
        meta = fields[key].metadata
        tp = float if PER_MODEL in meta else hints[key]

        def check_value(v: Any, at: str, tp=tp, meta=meta) -> bool:
            if not _check_scalar(v, tp, at, errors):
                return False
            if meta.get("choices") and v not in meta["choices"]:
                errors.append(f"{at}: expected one of {', '.join(meta['choices'])}, got {v!r}")
            if meta.get("ge") is not None and v < meta["ge"]:
                errors.append(f"{at}: expected >= {meta['ge']}, got {v}")
            if meta.get("le") is not None and v > meta["le"]:
                errors.append(f"{at}: expected <= {meta['le']}, got {v}")
            return True

        tensor_params.check(value, where, check_value, errors)


def _check_weights_sum(spec: MethodSpec, merge: dict, sources: list, errors: list[str]) -> None:
    """A normalized weighted sum with weights that add up to zero has no meaning."""
    params = merge.get("params") if isinstance(merge.get("params"), dict) else {}
    if not {"weight", "normalize"} <= {f.name for f in dataclasses.fields(spec.params)}:
        return
    normalize = params.get("normalize", spec.params().normalize)
    default = params.get("weight", 1.0)
    weights = [
        s.get("params", {}).get("weight", default) if isinstance(s, dict) else default
        for s in sources
    ]
    if (normalize is True and sources
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
            and abs(sum(weights)) < 1e-12):
        errors.append(f"merge.params.weight: the model weights {weights} add up to zero, "
                      "which normalize: true cannot divide by")
