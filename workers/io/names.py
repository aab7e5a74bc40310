"""Names checked before they become paths or object keys (shared by every store)."""

from __future__ import annotations

from pathlib import PurePosixPath

from workers.io.errors import StorageError

TMP_SUFFIX = ".raymerge-partial"


def check_relpath(name: str) -> str:
    """Validate a file or object name before it becomes a path: relative, no ``..``, no NUL."""
    if (
        not name
        or "\x00" in name
        or "\\" in name
        or name.startswith("/")
        or any(part in ("", ".", "..") for part in PurePosixPath(name).parts)
        or name != str(PurePosixPath(name))
    ):
        raise StorageError(f"refusing unsafe file name {name!r}: names must be relative paths "
                           "without '..', backslashes or empty parts")
    return name
