"""Who may write into an output now.

``Lock`` is the scheduler's lock on a schedule's output: a small object taken by exclusive
create or by a conditional replace of an expired one, renewed while held (S3 conditional writes;
locally under a ``flock``), so two schedulers on any machines never both hold it.

``output_lock`` is what every ``raymerge run`` holds on its output folder for the whole job: a
``flock`` held on ``.raymerge-lock`` for local folders (it goes when the process does, even when
it is killed), a ``Lock`` for object storage. A second run into the same output fails at once
with who holds it since when, or waits for it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from orchestrator.errors import MergeError, StorageError
from workers.io.storage import LocalStore, Store

log = logging.getLogger(__name__)

OUTPUT_LOCK = ".raymerge-lock"
OUTPUT_LOCK_TTL = 300.0  # seconds an object-storage output lock holds without renewal
_WAIT_POLL = 5.0  # seconds between tries of a waiting run on object storage


class OutputBusyError(MergeError):
    """Another run is writing into the same output."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def log_timestamped(message: str, level: int = logging.INFO) -> None:
    """The scheduler's lines carry their time: a scheduler runs for days."""
    log.log(level, f"{utc_now()} {message}")


def json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lock:
    """Exclusive right to merge into one output, held until ``expires`` and renewed by a
    background thread every third of the TTL. Taken by exclusive create, or by a conditional
    replace of an expired or released lock, so two holders never both have it. ``clock``
    gives the time expiry is judged by (seconds since the epoch; tests pass their own)."""

    def __init__(self, store: Store, ttl: float, name: str = "lock", *,
                 clock: Callable[[], float] = time.time):
        self.store, self.ttl, self.name, self.clock = store, ttl, name, clock
        self.owner = f"{_owner()}:{uuid.uuid4().hex[:8]}"
        self.since = utc_now()
        self.token: str | None = None
        self.lost = threading.Event()

    def _doc(self, expires: float) -> bytes:
        return json_bytes({"owner": self.owner, "expires": expires, "since": self.since,
                      "updated": utc_now()})

    def acquire(self) -> str | None:
        """None when taken; otherwise who holds it, since and until when."""
        data = self._doc(self.clock() + self.ttl)
        self.token = self.store.create_exclusive(self.name, data)
        if self.token is not None:
            return None
        held = self.store.read_versioned(self.name)
        if held is None:  # released and removed by hand in between: try once more
            self.token = self.store.create_exclusive(self.name, data)
            return None if self.token else "another run (it just took the lock)"
        current, token = held
        try:
            doc = json.loads(current)
            expires, owner = float(doc["expires"]), doc.get("owner", "?")
        except (ValueError, KeyError, TypeError):
            expires, owner, doc = 0.0, "an unreadable lock", {}  # corrupt: treat as expired
        if expires > self.clock():
            until = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc)
            since = f" since {doc['since']}" if doc.get("since") else ""
            return f"{owner}{since} (lock held until {until.isoformat(timespec='seconds')})"
        self.token = self.store.replace_if(self.name, data, token)
        return None if self.token else "another run (it took the expired lock first)"

    def renew(self) -> bool:
        token = self.store.replace_if(self.name, self._doc(self.clock() + self.ttl), self.token)
        if token is None:
            self.lost.set()
            return False
        self.token = token
        return True

    def release(self) -> None:
        if self.token is not None and not self.lost.is_set():
            self.store.replace_if(self.name, self._doc(0.0), self.token)
        self.token = None

    def kept_alive(self) -> "_Renewer":
        return _Renewer(self)


class _Renewer:
    def __init__(self, lock: Lock):
        self.lock, self.stop = lock, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="raymerge-lock")

    def _run(self) -> None:
        while not self.stop.wait(self.lock.ttl / 3):
            try:
                if not self.lock.renew():
                    log_timestamped(f"lost the lock of {self.lock.store.uri} (it expired and "
                                    "was taken)", logging.WARNING)
                    return
            except StorageError as e:  # keep trying until the lock expires
                log_timestamped(f"could not renew the lock of {self.lock.store.uri}: {e}",
                                logging.WARNING)

    def __enter__(self) -> Lock:
        self.thread.start()
        return self.lock

    def __exit__(self, *exc) -> bool:
        self.stop.set()
        self.thread.join()
        return False


def _busy(uri: str, holder: str) -> OutputBusyError:
    return OutputBusyError(f"{uri} is being written by {holder}; wait for that run to end, "
                           "choose another output, or pass --wait-lock to wait for it")


def _waiting(uri: str, holder: str) -> None:
    log_timestamped(f"{uri} is being written by {holder}; waiting for it (--wait-lock)")


@contextmanager
def output_lock(out: Store, *, wait: bool = False) -> Iterator[None]:
    """Hold the output's lock while the body runs: at once, or (``wait``) once the run that
    holds it ends; an ``OutputBusyError`` naming the holder otherwise."""
    if isinstance(out, LocalStore):
        with _flocked(out, wait):
            yield
        return
    out.check_writable()
    lock = Lock(out, OUTPUT_LOCK_TTL, OUTPUT_LOCK)
    told = False
    while (holder := lock.acquire()) is not None:
        if not wait:
            raise _busy(out.uri, holder)
        if not told:
            _waiting(out.uri, holder)
            told = True
        time.sleep(_WAIT_POLL)
    try:
        with lock.kept_alive():
            yield
            if lock.lost.is_set():
                raise MergeError(f"{out.uri}: lost the output lock during the run (renewing it "
                                 f"failed for {OUTPUT_LOCK_TTL:.0f} s and another run took it); "
                                 "both may have written there: check it with raymerge verify")
    finally:
        lock.release()


@contextmanager
def _flocked(out: LocalStore, wait: bool) -> Iterator[None]:
    """An exclusive ``flock`` on ``OUTPUT/.raymerge-lock``, which says who took it and when.
    The holder removes the file before it lets go, so a waiter that locked the removed file
    tries again on the new one. A folder this made is removed again if the body leaves it
    empty (a job that failed before writing anything)."""
    import fcntl

    path = out.path(OUTPUT_LOCK)
    made = not os.path.isdir(out.root)
    told = False
    try:
        while True:
            try:  # again after a wait: the holder may have removed the folder it made
                os.makedirs(out.root, exist_ok=True)
            except OSError as e:
                raise StorageError(f"{out.root}: cannot create the output folder "
                                   f"({e.strerror})") from None
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise StorageError(f"{path}: cannot create the output lock "
                                   f"({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another run"
                if not wait:
                    os.close(fd)
                    raise _busy(out.uri, holder) from None
                if not told:
                    _waiting(out.uri, holder)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file we locked: lock the current one
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{_owner()} since {utc_now()}\n".encode(), 0)
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):  # the folder went with the job
                os.unlink(path)
            os.close(fd)
    finally:
        if made:
            with contextlib.suppress(OSError):  # only if empty
                os.rmdir(out.root)
