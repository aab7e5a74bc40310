import os

import pytest

from orchestrator.errors import StorageError
from workers.io.storage import LocalStore, check_relpath, open_store


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


def test_direct_writes_keep_every_byte(tmp_path, monkeypatch):
    """Written past the page cache where the filesystem allows it: whatever the sizes of the
    writes (empty, unaligned, larger than the staging buffer) and wherever ``flush`` falls
    (the last block goes out padded, then is rewritten as writing goes on), the file holds
    exactly the bytes written."""
    import fcntl
    import random

    from workers.io import storage

    monkeypatch.setattr(storage, "_STAGE", 3 * storage._ALIGN)  # many whole-buffer writes
    store = LocalStore(str(tmp_path))
    rng = random.Random(0)
    sizes = [0, 1, 7, storage._ALIGN, storage._ALIGN + 5, 3 * storage._ALIGN,
             7 * storage._ALIGN + 3]
    for trial in range(30):
        pieces = [rng.randbytes(rng.choice(sizes)) for _ in range(rng.randint(0, 6))]
        with store.open_writer("a.bin") as f:
            if hasattr(os, "O_DIRECT"):
                assert fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT
            for piece in pieces:
                assert f.write(memoryview(piece)) == len(piece)
                if rng.random() < 0.3:
                    f.flush()
        assert (tmp_path / "a.bin").read_bytes() == b"".join(pieces), trial
    assert store.list_files() == ["a.bin"]


def test_a_failed_direct_write_is_raised_and_leaves_nothing(tmp_path, monkeypatch):
    """A disk error in the writing thread (here: the disk fills up on the third whole-buffer
    write) reaches the writer, and the half-written file is removed."""
    import errno

    from workers.io import storage

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system: every write is buffered")
    monkeypatch.setattr(storage, "_STAGE", storage._ALIGN)
    real_pwrite, calls = os.pwrite, []

    def filling(fd, data, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", filling)
    store = LocalStore(str(tmp_path))
    with pytest.raises(OSError, match="No space left"):
        with store.open_writer("a.bin") as f:
            for _ in range(10):
                f.write(bytes(storage._ALIGN))
    assert store.list_files() == [] and os.listdir(tmp_path) == []


def test_writes_fall_back_to_the_page_cache(tmp_path, monkeypatch):
    """A filesystem that refuses O_DIRECT (EINVAL) gets ordinary buffered writes; any other
    error opening the file is the caller's."""
    import errno

    from workers.io import storage

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system: every write is buffered")
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    store = LocalStore(str(tmp_path))
    with store.open_writer("a.bin") as f:
        assert not isinstance(f, storage._DirectFile)
        f.write(b"buffered")
    assert store.read_bytes("a.bin") == b"buffered"
    monkeypatch.setattr(os, "open", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        with store.open_writer("b.bin"):
            pass


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
