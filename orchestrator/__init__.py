"""The raymerge driver: config, index, plan, Ray scheduling, commit, CLI.

``run_job`` runs a merge from Python exactly as ``raymerge run`` does.
"""

from orchestrator.job import JobResult, run_job

__all__ = ["JobResult", "run_job"]
