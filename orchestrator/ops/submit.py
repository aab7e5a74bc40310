"""``raymerge submit / status / logs / stop``: merge jobs on a running Ray cluster through the
Ray Jobs API (the dashboard address, ``http://HEAD:8265``).

A submitted job is validated here first, so config errors never reach the cluster. The job's
runtime_env carries the resolved config (one ``job.yaml`` in its working_dir) and, unless told
otherwise, this process's storage settings that are no secret (``storage_env``: endpoints,
region, profile name), as ``raymerge run`` hands them to its workers. Keys and tokens never go:
Ray records a job's runtime_env in its logs, so the job uses the cluster's own credential chain
(instance roles, IRSA, mounted files). raymerge's own packages travel with the job
(``py_modules``), so the cluster needs only Ray and raymerge's dependencies; the entry point is
``python -m orchestrator.cli run job.yaml`` against the cluster (``runtime.address: auto``),
whose first step checks every node's dependencies.
Local paths in the config are made absolute: they must exist on the cluster's nodes as well.

Token auth (Ray's ``RAY_AUTH_MODE=token``) is handled by Ray's client: set ``RAY_AUTH_MODE=token``
and ``RAY_AUTH_TOKEN`` (or the token file Ray reads) in this process's environment.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import yaml
from omegaconf import OmegaConf

from orchestrator.config.schema import JobConfig
from orchestrator.engine.executor import shipped_packages
from orchestrator.errors import ClusterError
from workers.io.s3 import storage_env

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ENTRYPOINT = "python -m orchestrator.cli run job.yaml"  # no console script on PATH needed
AGENT_WAIT = 90  # seconds to wait for the job agent of a cluster that is still starting


def client(address: str | None):
    """A JobSubmissionClient for ``address`` (else ``RAY_ADDRESS``); ClusterError if unreachable
    or refused."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set "
                           "RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # Ray raises ConnectionError, RuntimeError or HTTP errors here
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {_reason(e)}") from None


def submit(cfg: JobConfig, address: str | None, *, forward_env: bool = True,
           job_id: str | None = None) -> str:
    """Submit a validated config; returns the job id."""
    doc = OmegaConf.to_container(OmegaConf.structured(cfg))
    doc["runtime"]["address"] = "auto"
    doc["runtime"]["executor"] = "ray"
    for src in doc["sources"] + ([doc["base"]] if doc.get("base") else []):
        src["uri"] = _absolute(src["uri"])
    doc["output"]["uri"] = _absolute(doc["output"]["uri"])
    jobs = client(address)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "job.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        runtime_env = {"working_dir": tmp, **shipped_packages()}
        if forward_env:
            runtime_env["env_vars"] = storage_env()
        deadline = time.monotonic() + AGENT_WAIT
        while True:
            try:
                return jobs.submit_job(entrypoint=ENTRYPOINT,
                                       runtime_env=runtime_env, submission_id=job_id,
                                       metadata={"raymerge_output": doc["output"]["uri"]})
            except Exception as e:
                # a cluster that just started answers before its job agent is up
                if "try again later" in str(e) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                raise ClusterError(f"the cluster refused the job: {_reason(e)}") from None


def status(address: str | None, job_id: str) -> dict:
    """The job's status, message, entry point and times, as the Jobs API reports them."""
    jobs = client(address)
    with _about(job_id):
        info = jobs.get_job_info(job_id)
    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value")
                                            else info.status),
            "message": info.message, "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time,
            "output": (info.metadata or {}).get("raymerge_output")}


def logs(address: str | None, job_id: str, *, follow: bool = False) -> Iterator[str]:
    """The job's log so far, or (``follow``) every new piece until the job ends."""
    jobs = client(address)
    with _about(job_id):
        if not follow:
            yield jobs.get_job_logs(job_id)
            return
        stream = jobs.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()


def stop(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    jobs = client(address)
    with _about(job_id):
        return jobs.stop_job(job_id)


def wait(address: str | None, job_id: str, timeout: float | None = None,
         poll: float = 1.0) -> dict:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns its last status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = status(address, job_id)
        if info["status"] in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterError(f"job {job_id!r} still {info['status']} after {timeout:.0f} s")
        time.sleep(poll)


@contextmanager
def _about(job_id: str) -> Iterator[None]:
    """Jobs API failures about one job (unknown id, refused) as ClusterError naming it."""
    try:
        yield
    except Exception as e:  # the SDK raises RuntimeError, HTTP and auth errors alike
        raise ClusterError(f"job {job_id!r}: {_reason(e)}") from None


def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
