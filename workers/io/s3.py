"""S3 (and S3-compatible) storage: byte-range reads and streamed multipart writes.

The store is a small picklable value (bucket, prefix, pins); each process builds its own boto3
client from the standard AWS chain (``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, profiles,
instance roles...), so no credential is ever pickled, logged or written to a manifest.
Throttling, 5xx answers and dropped connections are retried with backoff by botocore; access
denied, a missing bucket or a missing object fail at once with a clear message.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from workers.io.errors import StorageError
from workers.io.names import check_relpath

PART_SIZE = 8 * 2**20  # multipart part size (S3 needs >= 5 MiB for every part but the last)
_clients: dict[tuple, Any] = {}
_lock = threading.Lock()


def _client():
    """One boto3 S3 client per process and AWS environment (clients are thread-safe)."""
    key = (os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items()
                                     if k.startswith("AWS_"))))
    with _lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            _clients[key] = boto3.session.Session().client("s3", config=Config(
                retries={"max_attempts": 8, "mode": "standard"},
                connect_timeout=10, read_timeout=60))
        return _clients[key]


@dataclass(frozen=True)
class S3Store:
    """``s3://bucket/prefix``: every file name is a key below the prefix.

    With ``pins`` (file -> the ``pin`` taken at indexing, with its ETag) every range read is
    conditional on that ETag, so an object replaced during a merge fails the read (HTTP 412)
    instead of mixing two versions.
    """

    bucket: str
    prefix: str
    pins: dict | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, name: str) -> str:
        name = check_relpath(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def path(self, name: str) -> str:
        """The object's URI, for messages."""
        return f"s3://{self.bucket}/{self.key(name)}"

    def _call(self, what: str, fn: Callable, **kwargs) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            raise self._explain(what, e) from None
        except BotoCoreError as e:  # connection refused, timeouts: after botocore's retries
            raise _unreachable(what, e) from None

    def _explain(self, what: str, e: Any) -> StorageError:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StorageError(f"{what}: bucket {self.bucket!r} does not exist")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            return StorageError(f"{what}: access denied ({code}); check the credentials in the "
                                "AWS environment variables or profile, and the bucket policy")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return StorageError(f"{what}: no such object")
        if code == "PreconditionFailed" or status == 412:
            return StorageError(f"{what}: the object changed after it was indexed (ETag "
                                "differs); refusing to mix two versions of a source: re-run")
        return StorageError(f"{what}: S3 error {code or status}: {e}")

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            _client().head_object(Bucket=self.bucket, Key=self.key(name))
            return True
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise self._explain(self.path(name), e) from None

    def _head(self, name: str) -> dict:
        return self._call(self.path(name), _client().head_object, Key=self.key(name))

    def size(self, name: str) -> int:
        return self._head(name)["ContentLength"]

    def pin(self, name: str) -> dict:
        """What identifies this version of the object: size, ETag and version id (if any)."""
        head = self._head(name)
        pin = {"size": head["ContentLength"], "etag": head["ETag"]}
        if head.get("VersionId"):
            pin["version_id"] = head["VersionId"]
        return pin

    def list_files(self) -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        names = []
        pages = _client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                   Prefix=start)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for page in pages:
                names.extend(o["Key"][len(start):] for o in page.get("Contents", []))
        except ClientError as e:
            raise self._explain(self.uri, e) from None
        except BotoCoreError as e:
            raise _unreachable(self.uri, e) from None
        return sorted(n for n in names if n and not n.endswith("/"))

    def read_range(self, name: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        kwargs = {"Key": self.key(name), "Range": f"bytes={start}-{end - 1}"}
        pin = (self.pins or {}).get(name)
        if pin is not None:
            kwargs["IfMatch"] = pin["etag"]
        data = self._call(self.path(name), _client().get_object, **kwargs)["Body"].read()
        if len(data) != end - start:
            raise StorageError(f"{self.path(name)}: asked for {end - start} bytes at {start}, "
                               f"got {len(data)} (object truncated?)")
        return data

    def readinto(self, name: str, offset: int, buffer: memoryview) -> None:
        buffer[:] = self.read_range(name, offset, offset + len(buffer))

    def read_bytes(self, name: str) -> bytes:
        return self._call(self.path(name), _client().get_object, Key=self.key(name))[
            "Body"].read()

    def write_bytes(self, name: str, data: bytes) -> None:
        self._call(self.path(name), _client().put_object, Key=self.key(name), Body=data)

    def _put_if(self, name: str, data: bytes, **condition: str) -> str | None:
        """A conditional PUT (S3 conditional writes): the new ETag, or None when the
        condition fails."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return _client().put_object(Bucket=self.bucket, Key=self.key(name), Body=data,
                                        **condition)["ETag"]
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412) or e.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return None
            raise self._explain(self.path(name), e) from None
        except BotoCoreError as e:
            raise _unreachable(self.path(name), e) from None

    def create_exclusive(self, name: str, data: bytes) -> str | None:
        """PUT with ``If-None-Match: *``: only if no object has the key."""
        return self._put_if(name, data, IfNoneMatch="*")

    def read_versioned(self, name: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None if missing."""
        if not self.exists(name):
            return None
        got = self._call(self.path(name), _client().get_object, Key=self.key(name))
        return got["Body"].read(), got["ETag"]

    def replace_if(self, name: str, data: bytes, token: str) -> str | None:
        """PUT with ``If-Match: ETag``: only if the object is still that version."""
        return self._put_if(name, data, IfMatch=token)

    @contextmanager
    def open_writer(self, name: str) -> Iterator[_MultipartWriter]:
        """Stream an object: parts of ``PART_SIZE`` are uploaded as they fill; the object
        appears only when the upload completes, and a failed write aborts the upload."""
        writer = _MultipartWriter(self, name)
        try:
            yield writer
            writer.complete()
        except BaseException:
            writer.abort()
            raise

    def remove(self, name: str) -> None:
        self._call(self.path(name), _client().delete_object, Key=self.key(name))

    def check_writable(self) -> None:
        """Fail fast on a missing bucket or missing permissions, before any work is done."""
        from botocore.exceptions import ClientError

        try:
            _client().head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise StorageError(f"{self.uri}: bucket {self.bucket!r} does not exist") from None
            raise self._explain(self.uri, e) from None


class _MultipartWriter:
    def __init__(self, store: S3Store, name: str):
        self.store, self.name = store, name
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def write(self, data) -> int:
        self.buffer += data
        while len(self.buffer) >= PART_SIZE:
            self._upload(bytes(self.buffer[:PART_SIZE]))
            del self.buffer[:PART_SIZE]
        return len(data)

    def _upload(self, part: bytes) -> None:
        s = self.store
        if self.upload_id is None:
            self.upload_id = s._call(s.path(self.name), _client().create_multipart_upload,
                                     Key=s.key(self.name))["UploadId"]
        number = len(self.parts) + 1
        etag = s._call(s.path(self.name), _client().upload_part, Key=s.key(self.name),
                       UploadId=self.upload_id, PartNumber=number, Body=part)["ETag"]
        self.parts.append({"PartNumber": number, "ETag": etag})

    def complete(self) -> None:
        s = self.store
        if self.upload_id is None:  # small object: one plain PUT
            s.write_bytes(self.name, bytes(self.buffer))
            return
        if self.buffer:
            self._upload(bytes(self.buffer))
            self.buffer.clear()
        s._call(s.path(self.name), _client().complete_multipart_upload, Key=s.key(self.name),
                UploadId=self.upload_id, MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        if self.upload_id is not None:
            s = self.store
            try:
                _client().abort_multipart_upload(Bucket=s.bucket, Key=s.key(self.name),
                                                 UploadId=self.upload_id)
            except Exception:  # the original error matters more than a failed cleanup
                pass


def _unreachable(what: str, e: Exception) -> StorageError:
    from botocore.exceptions import NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return StorageError(
            f"{what}: no AWS credentials on {socket.gethostname()} ({e}); give this node its "
            "own (instance role, IRSA, a mounted credentials file or profile) or, on a cluster "
            "this command did not start, pass --forward-credentials")
    return StorageError(f"{what}: cannot reach S3 ({e})")


_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|AUTH", re.IGNORECASE)


def _storage_vars() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.startswith(("AWS_", "HF_", "HUGGINGFACE_", "HUGGING_FACE_"))}


def storage_env() -> dict[str, str]:
    """This process's AWS and Hugging Face settings that are no secret (endpoints, region,
    profile name, hub endpoint, cache settings), for a runtime_env: Ray records a runtime_env
    in its logs, so keys, tokens and passwords never go there; a cluster's workers use their
    own credential chain (instance roles, IRSA, mounted files), or get the secrets through
    ``storage_secrets`` where the user forwards them."""
    return {k: v for k, v in _storage_vars().items() if not _SECRET_NAME.search(k)}


def storage_secrets() -> dict[str, str]:
    """This process's AWS and Hugging Face credentials (what ``storage_env`` leaves out)."""
    return {k: v for k, v in _storage_vars().items() if _SECRET_NAME.search(k)}
