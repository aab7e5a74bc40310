"""The raymerge driver: config, planning, the engine (Ray lives only in ``engine.executor``),
the phases that prepare a merge, periodic operations, and the CLI.

``run_job`` runs a merge from Python exactly as ``raymerge run`` does. It is imported on first
use, so that ``import orchestrator.cli`` (``raymerge --help``) loads neither torch nor Ray.
"""

from typing import Any

__all__ = ["JobResult", "run_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from orchestrator.engine import job

        return getattr(job, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
