"""What a job may write where, checked from the config alone, before anything is read.

An output must never share a location with anything the job reads: a source, the base, a data
file. Locations are compared as the filesystem sees them (real paths: ``..``, ``.`` and
symlinks resolved) and, on object storage, as bucket and normalised prefix, so two spellings of
one folder cannot pass for two. The folders a job writes besides its output (``OUTPUT.steps/``
of a continual merge; ``OUTPUT/masks/`` lies inside the output) count as output.

An output folder that holds files but no raymerge output (no manifest, progress record or
lock) is somebody else's folder: it is refused unless the user says ``--force``.
"""

from __future__ import annotations

import os
import posixpath

from orchestrator.config.schema import JobConfig
from orchestrator.engine.commit import MANIFEST, PROGRESS
from orchestrator.engine.lock import OUTPUT_LOCK
from orchestrator.errors import ConfigError, MergeError
from workers.io.hub import is_hub_uri
from workers.io.storage import Store

STEPS_SUFFIX = ".steps"  # a continual merge's intermediate outputs: OUTPUT.steps/step-N
# files that mark a folder as raymerge's own (a finished, interrupted or running output)
RAYMERGE_FILES = (MANIFEST, PROGRESS, OUTPUT_LOCK)


def location(uri: str) -> tuple[str, ...]:
    """A location as path components: ``("s3", bucket, *prefix parts)`` or ``("file", *real
    path parts)``; one folder has one location however it is spelled."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        parts = [p for p in posixpath.normpath("/" + prefix).split("/") if p]
        return ("s3", bucket, *parts)
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    real = os.path.realpath(os.path.expanduser(path))
    return ("file", *[p for p in real.split(os.sep) if p])


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether one location is the other or lies inside it."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _shown(loc: tuple[str, ...]) -> str:
    return f"s3://{'/'.join(loc[1:])}" if loc[0] == "s3" else os.sep + os.sep.join(loc[1:])


def _inputs(cfg: JobConfig) -> list[tuple[str, str]]:
    """(what, uri) of every location the job reads, hub sources aside (they live in the hub
    cache, which no output path names)."""
    found = [(f"source {s.name!r}", s.uri) for s in cfg.sources]
    if cfg.base is not None:
        found.append((f"the base {cfg.base.name!r}", cfg.base.uri))
    if cfg.data is not None:
        found.append(("the data file (data.uri)", cfg.data.uri))
    found += [(f"the data file of source {s.name!r}", s.data.uri) for s in cfg.sources
              if s.data is not None]
    return [(what, uri) for what, uri in found if not is_hub_uri(uri)]


def check_locations(cfg: JobConfig) -> None:
    """A ConfigError (exit 2) listing every input the output (or its steps folder) contains or
    lies inside of."""
    out = cfg.output.uri.rstrip("/")
    written = [("output.uri", location(out)), ("output.uri", location(out + STEPS_SUFFIX))]
    errors = []
    for what, uri in _inputs(cfg):
        read = location(uri)
        for key, loc in written:
            if _overlap(loc, read):
                errors.append(f"{key}: {cfg.output.uri} overlaps {what} ({uri}): one is the "
                              f"other or lies inside it ({_shown(loc)}, {_shown(read)}); "
                              "refusing to write where inputs are read: choose an output "
                              "outside every source")
                break
    if errors:
        raise ConfigError(errors)


def check_destination(dest: str, reads: list[tuple[str, str]], key: str = "DEST") -> None:
    """A ConfigError when the folder a command writes, ``dest``, overlaps one of ``reads``
    ((what, uri) pairs; hub URIs are skipped)."""
    where = location(dest)
    errors = [f"{key}: {dest} overlaps {what} ({uri}); refusing to write where inputs are "
              "read: choose a folder outside them"
              for what, uri in reads if not is_hub_uri(uri)
              and _overlap(where, location(uri))]
    if errors:
        raise ConfigError(errors)


def check_output_folder(out: Store, force: bool) -> None:
    """Refuse a folder that holds files but is not a raymerge output, unless ``force``."""
    try:
        names = out.list_files()
    except MergeError:  # no such folder yet
        return
    if not names or force or any(n in names for n in RAYMERGE_FILES):
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise MergeError(f"{out.uri} is not empty and holds no raymerge output ({shown}); raymerge "
                     "would replace files there. Choose an empty or new folder, or pass --force "
                     "to write into it anyway")
