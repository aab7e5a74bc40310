"""The errors both sides raise: the base of every raymerge error, and storage failures.

They live in the I/O layer because workers raise them too; ``orchestrator.errors`` adds the
driver's own. Every class pickles with its message so that Ray can carry it back from a worker.
"""

from __future__ import annotations


class MergeError(Exception):
    """Base class of every error raiseable by raymerge; the CLI prints it and exits non-zero."""

    exit_code = 1

    def __reduce__(self):
        return (type(self), self.args)


class StorageError(MergeError):
    """A source or the output could not be read or written (missing file, corrupt header, ...)."""
