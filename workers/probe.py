"""What a node can run: whether the modules raymerge's tasks import are there, and their
versions. The task body of the probe the executor sends to every node of a cluster it did
not start."""

from __future__ import annotations

import importlib
import importlib.metadata
import socket


def installed(modules: dict[str, str]) -> dict:
    """For each distribution -> the module it provides: its version on this node ("?" when
    the module imports but its metadata is missing), or None when the module cannot be
    imported; with the node's host name under ``"host"``."""
    versions: dict = {}
    for dist, module in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            versions[dist] = None
            continue
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "?"
    return {"host": socket.gethostname(), "versions": versions}
