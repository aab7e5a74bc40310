import json
import os

import pytest
import torch
from safetensors.torch import save_file

from orchestrator.errors import PlanError, StorageError
from orchestrator.planning.validate import validate_models
from workers.io.index import index_checkpoint
from workers.io.storage import LocalStore


def checkpoint(folder, tensors, shards=1):
    """Write ``tensors`` as one file or as ``shards`` files with an HF index."""
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return LocalStore(str(folder))
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(folder, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return LocalStore(str(folder))


TENSORS = {"a.0.w": torch.zeros(2, 3), "a.1.w": torch.zeros(2, 3), "b": torch.zeros(4),
           "ids": torch.arange(3)}


def test_sharded_and_single_file_index_agree(tmp_path):
    """A sharded checkpoint and a single-file one index the same tensors and shapes."""
    one = index_checkpoint("one", checkpoint(tmp_path / "one", TENSORS))
    three = index_checkpoint("three", checkpoint(tmp_path / "three", TENSORS, shards=3))
    assert one.files == ("model.safetensors",) and len(three.files) == 3
    assert {n: (t.info.shape, t.info.dtype) for n, t in one.tensors.items()} == \
        {n: (t.info.shape, t.info.dtype) for n, t in three.tensors.items()}
    assert set(three.pins) == set(three.files)
    assert all(len(p["header_sha256"]) == 64 for p in three.pins.values())


def test_mismatches_are_all_listed_before_reading(tmp_path):
    """Missing, extra, shape and dtype mismatches of every model in one PlanError."""
    ref = index_checkpoint("ref", checkpoint(tmp_path / "ref", TENSORS))
    bad = dict(TENSORS)
    del bad["b"]
    bad["extra"] = torch.zeros(1)
    bad["a.0.w"] = torch.zeros(3, 2)
    bad["a.1.w"] = torch.zeros(2, 3, dtype=torch.float16)
    other = index_checkpoint("other", checkpoint(tmp_path / "other", bad))
    short = index_checkpoint("short", checkpoint(tmp_path / "short", {"b": torch.zeros(4)}))
    with pytest.raises(PlanError) as e:
        validate_models([ref, other, short], ref)
    text = str(e.value)
    for want in ("'other'", "1 missing tensors: b", "1 extra tensors: extra",
                 "1 shape mismatches: a.0.w [3, 2] vs [2, 3]",
                 "1 dtype mismatches: a.1.w F16 vs F32",
                 "'short'", "3 missing tensors: a.0.w, a.1.w, ids"):
        assert want in text, (want, text)


def test_pickle_checkpoints_are_refused(tmp_path):
    """A folder with only pytorch_model.bin is refused, with the reason."""
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(StorageError, match="pickle files can run arbitrary code"):
        index_checkpoint("p", LocalStore(str(tmp_path)))


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    store = checkpoint(tmp_path / "c", TENSORS)
    path = tmp_path / "c" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(StorageError, match=r"c/model.safetensors: corrupt .*truncated"):
        index_checkpoint("c", store)
    path.write_bytes(data[:8] + b"#" + data[9:])
    with pytest.raises(StorageError, match=r"c/model.safetensors: corrupt .*not valid JSON"):
        index_checkpoint("c", store)


def test_index_json_must_agree_with_headers(tmp_path):
    store = checkpoint(tmp_path / "s", TENSORS, shards=2)
    idx_path = tmp_path / "s" / "model.safetensors.index.json"
    doc = json.loads(idx_path.read_text())
    doc["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    idx_path.write_text(json.dumps(doc))
    with pytest.raises(StorageError, match="ghost"):
        index_checkpoint("s", store)
    doc["weight_map"] = {"b": "missing-file.safetensors"}
    idx_path.write_text(json.dumps(doc))
    with pytest.raises(StorageError, match="missing-file.safetensors"):
        index_checkpoint("s", store)


def test_pins_cost_header_reads_unless_content_is_asked_for(tmp_path):
    """Default pins: size, mtime, a sha256 of the first and last MiB and the header's sha256;
    pin_content adds the file's sha256."""
    import hashlib

    store = checkpoint(tmp_path / "p", TENSORS)
    pin = index_checkpoint("p", store).pins["model.safetensors"]
    assert set(pin) == {"size", "mtime_ns", "sample_sha256", "header_sha256"}
    full = index_checkpoint("p", store, pin_content=True).pins["model.safetensors"]
    data = (tmp_path / "p" / "model.safetensors").read_bytes()
    assert full["sha256"] == hashlib.sha256(data).hexdigest()


def test_index_json_naming_a_file_outside_the_folder_is_refused(tmp_path):
    store = checkpoint(tmp_path / "t", TENSORS, shards=2)
    (tmp_path / "t" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"b": "../../outside.safetensors"}}))
    with pytest.raises(StorageError, match="unsafe file name '../../outside.safetensors'"):
        index_checkpoint("t", store)
