import io
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from workers.io.safetensors_io import ShardWriter, header_length, parse_header, read_tensor
from workers.io.storage import LocalStore

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b.bias": torch.randn(7).to(torch.bfloat16),
    "pos_ids": torch.arange(4, dtype=torch.int64),
    "empty": torch.zeros(0, 3),
    "flag": torch.tensor([True, False]),
}


def write(tensors, metadata=None):
    buf = io.BytesIO()
    w = ShardWriter(buf, [(n, {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
                                torch.bool: "BOOL"}[t.dtype], tuple(t.shape))
                          for n, t in tensors.items()], metadata)
    for n, t in tensors.items():
        w.write(n, t)
    return buf.getvalue(), w.finish()


def test_incremental_writer_output_reads_with_safetensors(tmp_path):
    """Files from ShardWriter load with the safetensors library, tensors and metadata intact."""
    data, sha = write(TENSORS, {"format": "pt"})
    loaded = load(data)
    for name, t in TENSORS.items():
        assert torch.equal(loaded[name], t)
    (tmp_path / "x.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    import hashlib

    assert sha == hashlib.sha256(data).hexdigest()


def test_header_parse_and_range_read_match_library(tmp_path):
    """Headers parsed by us point at the bytes the library wrote."""
    data = save(TENSORS)
    (tmp_path / "m.safetensors").write_bytes(data)
    store = LocalStore(str(tmp_path))
    n = header_length(data[:8], len(data))
    infos, _ = parse_header(data[8:8 + n], len(data))
    for name, t in TENSORS.items():
        assert torch.equal(read_tensor(store, "m.safetensors", infos[name]), t)


def test_writer_rejects_wrong_order_dtype_and_missing():
    """Tensors must come in the declared order, dtype and shape; finish() needs them all."""
    w = ShardWriter(io.BytesIO(), [("a", "F32", (2,)), ("b", "F32", (2,))])
    with pytest.raises(ValueError, match="out of order"):
        w.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="declared F32"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'b' was written"):
        w.finish()


def header(doc):
    raw = json.dumps(doc).encode()
    return raw


@pytest.mark.parametrize("doc,size,message", [
    (b"{not json", 100, "not valid JSON"),
    (header({"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}), 100, "unknown dtype"),
    (header({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}), 100, "needs 8 bytes"),
    (header({"t": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}), 100,
     "truncated"),
    (header({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}), 1000, "overlap"),
    (header({"t": {"dtype": "F32"}}), 100, "malformed"),
])
def test_corrupt_headers_name_the_problem(doc, size, message):
    """Every corruption is reported with the tensor it concerns."""
    with pytest.raises(ValueError, match=message):
        parse_header(doc, size)


def test_header_length_rejects_garbage():
    """A length field larger than the file means not-safetensors or truncated."""
    with pytest.raises(ValueError, match="truncated"):
        header_length(struct.pack("<Q", 10**6), 1000)
    with pytest.raises(ValueError, match="too short"):
        header_length(b"abc", 3)


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/../b", "/abs", "", "bad\x00name",
                                  "a\\..\\b"])
def test_tensor_names_with_path_traversal_are_refused(name):
    doc = header({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    with pytest.raises(ValueError, match="refused"):
        parse_header(doc, 1000)
