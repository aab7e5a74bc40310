"""Finish an output: index, config and tokenizer files, model card, and the manifest LAST.

The manifest (``raymerge-manifest.json``) is the commit marker: an output folder without it is
incomplete, whatever else it holds. ``verify_output`` re-reads every file the manifest lists and
checks its size and sha256.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from omegaconf import OmegaConf

from orchestrator.config.schema import JobConfig
from orchestrator.errors import StorageError
from orchestrator.planning.plan import Plan
from orchestrator.planning.vocab import TOKENIZER_FILES
from workers.io.hub import is_hub_uri, parse_uri
from workers.io.index import INDEX_FILE, CheckpointIndex
from workers.io.safetensors_io import DTYPE_NAMES
from workers.io.storage import TMP_SUFFIX, LocalStore, Store, file_sha256
from workers.tasks import ShardRecord

MANIFEST = "raymerge-manifest.json"
PROGRESS = "raymerge-progress.json"  # finished shards of an unfinished job, for resuming
MODEL_CARD = "README.md"
MANIFEST_FORMAT = "raymerge-manifest/1"
# the model metadata copied from the reference's top level (never anything else a folder holds:
# notes, secrets, other checkpoints' files): config, generation and processor configs,
# tokenizer files and chat templates, and sentence-transformers' module list
METADATA_FILES = frozenset({
    "config.json", "generation_config.json", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "chat_template.json",
    "spiece.model", "sentencepiece.bpe.model", "source.spm", "target.spm", "tekken.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    *TOKENIZER_FILES,
})
_METADATA_SUFFIXES = (".tiktoken",)
_MODULE_DIR = re.compile(r"^\d+_[A-Za-z][\w-]*$")  # a sentence-transformers module: 1_Pooling
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_MAX_COPY_BYTES = 64 * 2**20
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_PER_LAYER_KEYS = ("layer_types",)
_TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def raymerge_version() -> str:
    try:
        return version("raymerge")
    except PackageNotFoundError:
        return "unknown"


def read_manifest(out: Store) -> dict | None:
    if not out.exists(MANIFEST):
        return None
    try:
        doc = json.loads(out.read_bytes(MANIFEST))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT else None


def finished_manifest(out: Store) -> dict:
    """The manifest of a finished output, or a MergeError saying there is none."""
    from orchestrator.errors import MergeError

    manifest = read_manifest(out)
    if manifest is None:
        raise MergeError(f"{out.uri}: no finished merge (no raymerge manifest)")
    return manifest


def output_metadata(plan: Plan, cfg: JobConfig, stores: list[Store],
                    tokenizer_files: dict[str, bytes] | None = None,
                    extra_files: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The config, tokenizer and other metadata files the output gets from its reference
    model (``tokenizer_files``, a built tokenizer, replace the reference's; a file among
    ``extra_files`` is the method's own); read before the merge, so that a source's bad
    metadata fails the job before any tensor is merged."""
    copied = _copied_files(stores[plan.reference], cfg, plan.layer_map, plan.vocab_rows)
    copied = {n: d for n, d in copied.items() if n not in (extra_files or {})}  # e.g. the
    # config.json of a merge whose widths differ from the reference's
    if tokenizer_files:
        copied = {n: d for n, d in copied.items() if n not in TOKENIZER_FILES}
        copied.update(tokenizer_files)
    return copied


def commit(plan: Plan, cfg: JobConfig, records: list[ShardRecord],
           indexes: list[CheckpointIndex], out: Store, metadata: dict[str, bytes],
           method_state: dict | None = None, extra_files: dict[str, bytes] | None = None,
           job: dict | None = None) -> dict:
    """Write everything but the shards, then the manifest; return the manifest.
    ``metadata`` (``output_metadata``) is written as it is; ``method_state`` (a continual
    method's running state) is recorded for the next step; ``extra_files`` (an alignment's
    transforms and heads, statistics, a runtime), written by the job before the merge, are
    listed with the others, not written again; ``job`` (the job as given, see
    ``job.job_document``) lets a later run tell another job's output apart before it does
    any work."""
    files: dict[str, bytes] = {}
    weight_map = {it.tensor_name: u.shard for u in plan.units for it in u.items}
    files[INDEX_FILE] = _json({"metadata": {"total_size": plan.output_bytes},
                               "weight_map": weight_map})
    files.update(metadata)
    files[MODEL_CARD] = model_card(plan, cfg, indexes).encode()
    for name, data in files.items():
        out.write_bytes(name, data)
    files.update(extra_files or {})
    planned = {u.shard for u in plan.units}
    for stale in out.list_files():  # shards of an earlier layout, temp files of killed tasks
        if (_SHARD_NAME.match(stale) and stale not in planned) or stale.endswith(TMP_SUFFIX):
            out.remove(stale)
    manifest = {
        "format": MANIFEST_FORMAT,
        "raymerge_version": raymerge_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "plan_digest": plan.digest(),
        "method": plan.method,
        "config": OmegaConf.to_container(OmegaConf.structured(cfg)),
        "job": job,
        "sources": [
            {"name": s.name, "role": s.role, "uri": s.uri, "revision": idx.revision,
             "pins": idx.pins}
            for s, idx in zip(plan.sources, indexes)
        ],
        "shards": [{"file": r.shard, "bytes": r.bytes, "sha256": r.sha256, "tensors": r.tensors,
                    **({"nonfinite": r.nonfinite} if r.nonfinite else {})}
                   for r in records],
        "files": [{"file": n, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                  for n, d in files.items()],
    }
    if method_state is not None:
        manifest["method_state"] = method_state
    out.write_bytes(MANIFEST, _json(manifest))
    out.remove(PROGRESS)
    return manifest


def read_progress(out: Store, plan: Plan) -> tuple[dict[str, ShardRecord], list[str]]:
    """Shards an interrupted run of this same plan finished, still intact (re-hashed), and
    (when an interrupted run of another plan left its record) what changed since: the files
    of sources that are not what they were, by what tells them apart."""
    if not out.exists(PROGRESS):
        return {}, []
    try:
        doc = json.loads(out.read_bytes(PROGRESS))
        if doc.get("plan_digest") != plan.digest():
            return {}, _changes(doc.get("sources") or {}, plan)
        records = [ShardRecord(**r) for r in doc["shards"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}, []
    planned = {u.shard for u in plan.units}
    return {r.shard: r for r in records
            if r.shard in planned and out.exists(r.shard) and out.size(r.shard) == r.bytes
            and file_sha256(out, r.shard) == r.sha256}, []


def _changes(recorded: dict[str, str], plan: Plan) -> list[str]:
    changes = []
    for src in plan.sources:
        if src.name not in recorded or recorded[src.name] == src.pin:
            continue
        was, now = json.loads(recorded[src.name]), json.loads(src.pin)
        if was.get("revision") != now.get("revision"):
            changes.append(f"{src.name}: revision {was.get('revision')} -> {now.get('revision')}")
        for file in sorted(set(was.get("files", {})) | set(now.get("files", {}))):
            a, b = was.get("files", {}).get(file), now.get("files", {}).get(file)
            if a != b:
                keys = sorted(k for k in set(a or {}) | set(b or {})
                              if (a or {}).get(k) != (b or {}).get(k))
                changes.append(f"{src.name}/{file}: {', '.join(keys) or 'added or removed'} "
                               "changed")
    return changes


def write_progress(out: Store, plan: Plan, records: list[ShardRecord]) -> None:
    out.write_bytes(PROGRESS, _json({"plan_digest": plan.digest(),
                                     "sources": {s.name: s.pin for s in plan.sources},
                                     "shards": [dataclasses.asdict(r) for r in records]}))


def _json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()


def is_metadata(name: str) -> bool:
    """Whether ``name`` (relative to a model folder) is model metadata an output carries: a
    known file at the top level, or a JSON file of a sentence-transformers module folder."""
    folder, slash, file = name.rpartition("/")
    if not slash:
        return file in METADATA_FILES or file.endswith(_METADATA_SUFFIXES)
    return "/" not in folder and bool(_MODULE_DIR.match(folder)) and file.endswith(".json")


def _confined(src: Store, name: str) -> bool:
    """Whether reading ``name`` stays inside the source: a local file must not be a symlink
    out of its folder (a hub snapshot's links into its repository's blobs are its own)."""
    if not isinstance(src, LocalStore):
        return True
    root = os.path.realpath(src.root)
    if os.path.basename(os.path.dirname(root)) == "snapshots":  # models--org--name/snapshots/sha
        root = os.path.dirname(os.path.dirname(root))
    return os.path.commonpath([root, os.path.realpath(src.path(name))]) == root


def _copied_files(src: Store, cfg: JobConfig, layer_map: tuple[int, ...],
                  vocab_rows: int | None) -> dict[str, bytes]:
    """Config, tokenizer and other small metadata files of the reference model."""
    out = {}
    for name in src.list_files():
        if not is_metadata(name) or src.size(name) > _MAX_COPY_BYTES:
            continue
        if not _confined(src, name):
            raise StorageError(f"{src.path(name)} is a link to a file outside {src.uri}; "
                               "refusing to copy it into the output (replace the link by the "
                               "file itself)")
        data = src.read_bytes(name)
        if name == "config.json" and (cfg.output.dtype or layer_map or vocab_rows):
            data = _output_config(data, cfg.output.dtype, layer_map, vocab_rows)
        out[name] = data
    return out


def _output_config(config_json: bytes, dtype: str | None, layer_map: tuple[int, ...],
                   vocab_rows: int | None) -> bytes:
    """The reference's config.json with the output dtype, the output vocabulary's size and,
    after slicing, the output's number of layers (and per-layer lists such as ``layer_types``
    re-indexed to match)."""
    try:
        doc = json.loads(config_json)
    except ValueError:
        return config_json
    if dtype:
        name = _TORCH_DTYPE_NAMES.get(DTYPE_NAMES[dtype], dtype)
        for key in ("torch_dtype", "dtype"):
            if key in doc:
                doc[key] = name
    if vocab_rows:
        doc["vocab_size"] = vocab_rows
    if layer_map:
        for key in _LAYER_KEYS:
            if key in doc:
                doc[key] = len(layer_map)
        for key in _PER_LAYER_KEYS:
            value = doc.get(key)
            if isinstance(value, list) and all(i < len(value) for i in layer_map):
                doc[key] = [value[i] for i in layer_map]
    return _json(doc)


def model_card(plan: Plan, cfg: JobConfig, indexes: list[CheckpointIndex]) -> str:
    """The hub model card: metadata by huggingface_hub's ``ModelCardData`` (``base_model``:
    the hub repositories merged, the base first, from which the hub builds its model tree; a
    local path is no repository id), then the sources with their pins and the config."""
    from huggingface_hub import ModelCard, ModelCardData

    order = sorted(plan.sources, key=lambda s: s.role != "base")
    repos = list(dict.fromkeys(parse_uri(s.uri)[0] for s in order if is_hub_uri(s.uri)))
    data = ModelCardData(base_model=repos or None, tags=["merge", "raymerge"])
    lines = [f"# Merged model ({plan.method})", "",
              f"Produced by raymerge {raymerge_version()} with the `{plan.method}` method.", "",
              "| source | role | files (header sha256) |", "| --- | --- | --- |"]
    for s, idx in zip(plan.sources, indexes):
        pins = ", ".join(f"{f} ({p['header_sha256'][:12]})" for f, p in idx.pins.items())
        at = f" @ {idx.revision}" if idx.revision else ""
        lines.append(f"| {s.name} (`{s.uri}`{at}) | {s.role} | {pins} |")
    lines += ["", "## Configuration", "", "```yaml",
              OmegaConf.to_yaml(OmegaConf.structured(cfg)).rstrip(), "```", "",
              f"Seed {plan.seed}, compute dtype {plan.compute_dtype}, "
              f"{plan.n_tensors} tensors in {len(plan.units)} shards, plan digest "
              f"`{plan.digest()}`.", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def verify_output(out: Store) -> tuple[dict | None, list[str]]:
    """Re-check every file listed in the manifest; returns (manifest, problems)."""
    manifest = read_manifest(out)
    if manifest is None:
        return None, [f"{out.uri}: no {MANIFEST}: the output is incomplete (never finished, "
                      "or still being written)"]
    return manifest, [f"{name}: {why}" for name, why in
                      damaged_files(out, manifest, full=True).items()]


def damaged_files(out: Store, manifest: dict, *, full: bool) -> dict[str, str]:
    """What is wrong with each file the manifest lists (file -> why): missing, another size
    or (``full``: every byte read) another sha256. Sizes cost one stat each."""
    problems = {}
    for entry in manifest["shards"] + manifest["files"]:
        name = entry["file"]
        if not out.exists(name):
            problems[name] = "missing"
            continue
        size = out.size(name)
        if size != entry["bytes"]:
            problems[name] = f"{size} bytes, manifest says {entry['bytes']}"
            continue
        if full:
            digest = file_sha256(out, name)
            if digest != entry["sha256"]:
                problems[name] = f"sha256 {digest} does not match the manifest"
    return problems
