"""The safetensors format, read by byte ranges and written incrementally.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``name -> {dtype, shape, data_offsets}`` plus an optional ``__metadata__`` map of strings),
then the tensor bytes. Offsets in the JSON are relative to the end of the header.

Nothing here touches a whole file: ``parse_header`` needs only the header bytes, ``read_tensor``
reads one tensor's byte range from a store, and ``ShardWriter`` writes the header first (it is
known from shapes and dtypes alone) and then each tensor's bytes as they are produced.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Protocol

import torch

# safetensors dtype code -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# user-facing dtype names (config files, mergekit YAML) -> safetensors code
DTYPE_NAMES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "fp32": "F32",
    "fp16": "F16",
    "bf16": "BF16",
    "fp64": "F64",
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def itemsize(code: str) -> int:
    return DTYPES[code].itemsize


def torch_dtype(name_or_code: str) -> torch.dtype:
    """Torch dtype for a safetensors code (``BF16``) or a config name (``bfloat16``)."""
    return DTYPES[DTYPE_NAMES.get(name_or_code, name_or_code)]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in its file: ``[start, end)`` from byte 0 of the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def header_length(prefix: bytes, file_size: int) -> int:
    """Length of the JSON header given the file's first 8 bytes; ValueError if implausible."""
    if len(prefix) < 8:
        raise ValueError(f"file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise ValueError(
            f"header length field says {n} bytes but the file is {file_size} bytes: "
            "not a safetensors file, or a truncated one"
        )
    return n


def parse_header(raw: bytes, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the JSON header ``raw`` of a file of ``file_size`` bytes.

    Returns ``(tensors, metadata)``. Raises ValueError naming the offending tensor when the
    header is not JSON, names an unknown dtype, has a shape that does not match its byte range,
    or points past the end of the file (a truncated download).
    """
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError("header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    data_start = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if not name or name.startswith("/") or ".." in name.replace("\\", "/").split("/") or \
                any(ord(c) < 32 for c in name):
            raise ValueError(f"tensor name {name!r} is empty, absolute, has control characters "
                             "or a '..' path part: refused")
        try:
            code = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"tensor {name!r}: malformed header entry {entry!r}") from None
        if code not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown dtype {code!r}")
        if any(s < 0 for s in shape) or begin < 0 or end < begin:
            raise ValueError(f"tensor {name!r}: negative shape or offsets {shape} {begin}..{end}")
        if math.prod(shape) * itemsize(code) != end - begin:
            raise ValueError(
                f"tensor {name!r}: shape {list(shape)} of {code} needs "
                f"{math.prod(shape) * itemsize(code)} bytes but its offsets span {end - begin}"
            )
        if data_start + end > file_size:
            raise ValueError(
                f"tensor {name!r} ends at byte {data_start + end} but the file has only "
                f"{file_size} bytes (truncated file?)"
            )
        tensors[name] = TensorInfo(code, shape, data_start + begin, data_start + end)
    spans = sorted((t.start, t.end, n) for n, t in tensors.items() if t.end > t.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(f"tensors {a!r} and {b!r} overlap in the file")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> bytes:
    """Length prefix + JSON header for tensors ``(name, dtype code, shape)`` laid out in order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the safetensors library does,
    so that every tensor starts aligned.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for name, code, shape in entries:
        n = math.prod(shape) * itemsize(code)
        doc[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class RangeReader(Protocol):
    def readinto(self, path: str, offset: int, buffer: memoryview) -> None: ...


def read_tensor(store: RangeReader, path: str, info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes from ``store`` into a fresh tensor (no whole-file load)."""
    return read_elements(store, path, info, 0, info.numel).reshape(info.shape)


def read_elements(store: RangeReader, path: str, info: TensorInfo, start: int, stop: int,
                  buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Read elements ``[start, stop)`` of one tensor (row-major, flattened) from ``store``,
    into the front of ``buffer`` (a uint8 tensor, reused across reads) if given."""
    size = itemsize(info.dtype)
    n = (stop - start) * size
    raw = torch.empty(n, dtype=torch.uint8) if buffer is None else buffer[:n]
    if stop > start:
        store.readinto(path, info.start + start * size, memoryview(raw.numpy()))
    return raw.view(DTYPES[info.dtype])


def map_elements(store: Any, path: str, info: TensorInfo, start: int,
                 stop: int) -> torch.Tensor:
    """Elements ``[start, stop)`` of one tensor without a copy, from a ``store`` that maps its
    files (``map_range``: local files)."""
    size = itemsize(info.dtype)
    raw = store.map_range(path, info.start + start * size, (stop - start) * size)
    return torch.from_numpy(raw).view(DTYPES[info.dtype])


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class ShardWriter:
    """Writes one safetensors file incrementally: header first, then tensors in the given order.

    ``sink`` is any binary file-like object; the writer hashes what it writes (sha256), so the
    checksum of a shard costs no second read. Tensors must arrive in order, with exactly the
    declared dtype and shape; a tensor may arrive whole (``write``) or as consecutive flat
    pieces (``write_pieces``).
    """

    def __init__(
        self,
        sink: BinaryIO,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self._sink = sink
        self._entries = entries
        self._next = 0
        self._sha = hashlib.sha256()
        self.bytes_written = 0
        self._write(encode_header(entries, metadata))

    def _write(self, data: bytes | memoryview) -> None:
        self._sink.write(data)
        self._sha.update(data)
        self.bytes_written += len(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        code, shape = self._expect(name)
        if tensor.dtype != DTYPES[code] or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r}: declared {code}{list(shape)}, "
                             f"got {tensor.dtype}{list(tensor.shape)}")
        self.write_pieces(name, [tensor])

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Write tensor ``name`` from consecutive pieces of its flattened values."""
        code, shape = self._expect(name)
        want, got = math.prod(shape), 0
        for piece in pieces:
            if piece.dtype != DTYPES[code]:
                raise ValueError(f"tensor {name!r}: declared {code}, got {piece.dtype}")
            got += piece.numel()
            if got > want:
                break
            self._write(tensor_bytes(piece))
        if got != want:
            raise ValueError(f"tensor {name!r}: declared {want} elements, got {got}")
        self._next += 1

    def _expect(self, name: str) -> tuple[str, tuple[int, ...]]:
        if self._next >= len(self._entries):
            raise ValueError(f"tensor {name!r}: all declared tensors were already written")
        want_name, code, shape = self._entries[self._next]
        if name != want_name:
            raise ValueError(f"tensor {name!r} written out of order: expected {want_name!r}")
        return code, shape

    def finish(self) -> str:
        """Check that every declared tensor was written; return the file's sha256 hex digest."""
        if self._next != len(self._entries):
            missing = self._entries[self._next][0]
            raise ValueError(f"shard closed before tensor {missing!r} was written")
        return self._sha.hexdigest()
