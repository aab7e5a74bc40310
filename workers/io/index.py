"""Header-only index of safetensors checkpoints.

Reading a checkpoint's index costs one small range read per file (the 8-byte length, then the
JSON header): no tensor byte is read. The pins recorded here (size, mtime, header hash) let a
later run tell whether a source changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from workers.io.errors import StorageError
from workers.io.safetensors_io import TensorInfo, header_length, parse_header
from workers.io.storage import Store, check_relpath, file_sha256

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LIST_LIMIT = 20


@dataclass(frozen=True)
class TensorLocation:
    file: str
    info: TensorInfo


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of one checkpoint: name -> (file, byte range, dtype, shape)."""

    name: str
    uri: str
    tensors: dict[str, TensorLocation]
    files: tuple[str, ...]
    pins: dict[str, dict] = field(default_factory=dict)  # file -> store pin + header_sha256
    revision: str | None = None  # the commit sha of a hub source


def index_checkpoint(name: str, store: Store, *, pin_content: bool = False) -> CheckpointIndex:
    """Index the safetensors files of the checkpoint in ``store`` (single file or sharded).

    Pins cost one header read per file; ``pin_content`` adds a sha256 of each whole file."""
    names = store.list_files()
    if INDEX_FILE in names:
        files = _files_from_index(store, names)
    elif SINGLE_FILE in names:
        files = [SINGLE_FILE]
    else:
        files = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    if not files:
        pickled = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
        if pickled:
            raise StorageError(
                f"source {name!r} ({store.uri}) has only pickled weights ({', '.join(pickled)}); "
                "pickle files can run arbitrary code when loaded, so raymerge reads safetensors "
                "only. Convert them once with a trusted tool and point the source at the result."
            )
        raise StorageError(f"source {name!r} ({store.uri}) has no .safetensors files")

    tensors: dict[str, TensorLocation] = {}
    pins: dict[str, dict] = {}
    for file in files:
        header, raw = read_header(store, file)
        for tensor_name, info in header.items():
            if tensor_name in tensors:
                raise StorageError(
                    f"source {name!r}: tensor {tensor_name!r} appears in both "
                    f"{tensors[tensor_name].file} and {file}"
                )
            tensors[tensor_name] = TensorLocation(file, info)
        pins[file] = {**store.pin(file), "header_sha256": hashlib.sha256(raw).hexdigest()}
        if pin_content:
            pins[file]["sha256"] = file_sha256(store, file)
    if INDEX_FILE in names:
        _check_weight_map(name, store, tensors)
    return CheckpointIndex(name, store.uri, tensors, tuple(files), pins)


def _files_from_index(store: Store, names: list[str]) -> list[str]:
    weight_map = _load_weight_map(store)
    files = sorted(check_relpath(f) for f in set(weight_map.values()))
    missing = [f for f in files if f not in names]
    if missing:
        raise StorageError(
            f"{store.path(INDEX_FILE)} names shard files that do not exist: {', '.join(missing)}"
        )
    return files


def _load_weight_map(store: Store) -> dict[str, str]:
    try:
        doc = json.loads(store.read_bytes(INDEX_FILE))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise StorageError(
            f"{store.path(INDEX_FILE)}: not a valid index (expected JSON with a 'weight_map' "
            "object of tensor name -> file name)"
        ) from None
    return weight_map


def _check_weight_map(name: str, store: Store, tensors: dict[str, TensorLocation]) -> None:
    weight_map = _load_weight_map(store)
    wrong = [
        f"{t} (index says {f}, found in {tensors[t].file if t in tensors else 'no file'})"
        for t, f in weight_map.items()
        if t not in tensors or tensors[t].file != f
    ]
    unlisted = [t for t in tensors if t not in weight_map]
    if wrong or unlisted:
        raise StorageError(
            f"source {name!r}: {store.path(INDEX_FILE)} disagrees with the shard headers: "
            + listing("wrong or missing", wrong)
            + ("; " if wrong and unlisted else "")
            + listing("not in the index", unlisted)
        )


def read_header(store: Store, file: str) -> tuple[dict[str, TensorInfo], bytes]:
    size = store.size(file)
    try:
        n = header_length(store.read_range(file, 0, min(8, size)), size)
        raw = store.read_range(file, 8, 8 + n)
        tensors, _ = parse_header(raw, size)
    except ValueError as e:
        raise StorageError(f"{store.path(file)}: corrupt safetensors file: {e}") from None
    return tensors, raw


def listing(label: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:_LIST_LIMIT])
    more = f", ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"{len(items)} {label}: {shown}{more}"
