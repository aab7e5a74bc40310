"""Errors raised by the driver. Each says what went wrong, where, and how to fix it.

The base ``MergeError`` and ``StorageError`` live in ``workers.io.errors`` (workers raise
them too) and are re-exported here. Every class pickles with its message for Ray.
"""

from __future__ import annotations

from workers.io.errors import MergeError, StorageError

__all__ = ["ClusterError", "ConfigError", "MergeError", "PlanError", "StorageError",
           "WorkerError"]


class ConfigError(MergeError):
    """The job config is invalid. ``errors`` lists every problem as ``path: message``."""

    exit_code = 2

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        head = "invalid job config" if len(self.errors) > 1 else "invalid job config:"
        body = "\n  ".join(self.errors)
        super().__init__(f"{head}\n  {body}" if len(self.errors) > 1 else f"{head} {body}")

    def __reduce__(self):
        return (type(self), (self.errors,))


class PlanError(MergeError):
    """The inputs cannot be merged as configured (missing tensors, shape mismatches, ...)."""


class WorkerError(MergeError):
    """A work unit failed on a worker; the message names the unit, its shard and the cause."""


class ClusterError(MergeError):
    """A Ray cluster could not be reached, refused a request, or reports a failed job."""
