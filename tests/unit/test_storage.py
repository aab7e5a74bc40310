import pytest

from orchestrator.errors import StorageError
from orchestrator.storage import LocalStore, check_relpath, open_store


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "a\\b", "", "a//b",
                                  "./a", "a\x00b"])
def test_unsafe_names_are_refused(name):
    """Names that could escape the folder never become paths."""
    with pytest.raises(StorageError, match="unsafe"):
        check_relpath(name)


def test_atomic_writer_leaves_nothing_on_error(tmp_path):
    """A failed write leaves neither a partial file nor a changed old file."""
    store = LocalStore(str(tmp_path))
    store.write_bytes("f.bin", b"old")
    with pytest.raises(RuntimeError):
        with store.open_writer("f.bin") as f:
            f.write(b"new-but-broken")
            raise RuntimeError("boom")
    assert store.read_bytes("f.bin") == b"old"
    assert store.list_files() == ["f.bin"]


def test_short_read_is_reported(tmp_path):
    """Reading past the end names the file and says it was truncated or replaced."""
    store = LocalStore(str(tmp_path))
    store.write_bytes("f.bin", b"12345")
    with pytest.raises(StorageError, match="truncated or replaced"):
        store.read_range("f.bin", 2, 10)


def test_uris_pick_the_store():
    """s3:// becomes an S3 store with a validated prefix; unknown schemes are refused rather
    than mistaken for local folder names."""
    s3 = open_store("s3://bucket/models/llama/")
    assert (s3.bucket, s3.prefix, s3.key("config.json")) == ("bucket", "models/llama",
                                                             "models/llama/config.json")
    with pytest.raises(StorageError, match="unsafe"):
        open_store("s3://bucket/a/../../b")
    with pytest.raises(StorageError, match="unsafe"):
        s3.key("../secret")
    with pytest.raises(StorageError, match="gs:// is not a storage"):
        open_store("gs://bucket/x")
    assert open_store("file:///tmp/x").root == "/tmp/x"


def test_pinned_store_detects_a_replaced_file(tmp_path):
    """A file rewritten after indexing fails the next read instead of mixing versions."""
    import dataclasses
    import os

    store = LocalStore(str(tmp_path))
    store.write_bytes("f.bin", b"0123456789")
    pinned = dataclasses.replace(store, pins={"f.bin": store.pin("f.bin")})
    assert pinned.read_range("f.bin", 2, 4) == b"23"
    store.write_bytes("f.bin", b"0123456789abc")
    with pytest.raises(StorageError, match="changed after it was indexed"):
        pinned.read_range("f.bin", 2, 4)
    os.utime(tmp_path / "f.bin", ns=(1, 1))
    with pytest.raises(StorageError, match="mtime"):
        pinned.read_range("f.bin", 0, 1)


def test_mapped_ranges_equal_reads_and_never_write_the_file(tmp_path):
    """``map_range`` gives the bytes ``read_range`` gives, at any offset (mappings start on
    page boundaries), is checked as a read is, and writes to it stay private."""
    import dataclasses
    import mmap

    data = bytes(range(256)) * (3 * mmap.ALLOCATIONGRANULARITY // 256 + 7)
    store = LocalStore(str(tmp_path))
    store.write_bytes("f.bin", data)
    for offset, n in [(0, 10), (5, mmap.ALLOCATIONGRANULARITY), (mmap.ALLOCATIONGRANULARITY + 3,
                                                                 1000), (len(data) - 9, 9)]:
        assert store.map_range("f.bin", offset, n).tobytes() == store.read_range(
            "f.bin", offset, offset + n)
    assert store.map_range("f.bin", 4, 0).size == 0
    view = store.map_range("f.bin", 100, 50)
    view[:] = 0
    assert store.read_bytes("f.bin") == data
    with pytest.raises(StorageError, match="truncated or replaced"):
        store.map_range("f.bin", len(data) - 5, 10)
    pinned = dataclasses.replace(store, pins={"f.bin": store.pin("f.bin")})
    store.write_bytes("f.bin", data + b"x")
    with pytest.raises(StorageError, match="changed after it was indexed"):
        pinned.map_range("f.bin", 0, 4)
