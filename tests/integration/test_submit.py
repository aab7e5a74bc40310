"""`raymerge submit / status / logs / stop` against a real Ray head started with
`ray start --head --block` on 127.0.0.1 (stopped by its own process group, never `ray stop`),
with Ray's token auth on."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest
import yaml

from orchestrator.cli import main
from tests.integration import cluster
from tests.integration.test_loopback import (
    _is_loopback,
    _listen_addresses,
    _socket_inodes,
    _tree_pids,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node cluster with its dashboard (Jobs API) on 127.0.0.1 and a token of its own."""
    token = secrets.token_hex(16)
    # the cluster has no storage credentials of its own (as one whose workers must be given
    # them, or use their own chain): none of this shell's AWS_* / HF_* settings
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))},
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp = str(tmp_path_factory.mktemp("rayhead"))
    with cluster.ray_head(temp, "--num-cpus=2", env=env) as (address, gcs):
        yield address, token, temp, gcs


def cli(*args: str, token: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """`raymerge ...` in a fresh process: Ray's client caches the first token a process reads,
    so each call gets its own environment (``env``: more variables)."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                               **(env or {})},
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_submitted_job_succeeds_and_its_output_verifies(ray_head, llama_family, tmp_path):
    address, token, temp, _ = ray_head
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "base": {"name": "base", "uri": llama_family["base"]},
        "sources": [{"name": "ft1", "uri": llama_family["ft1"]},
                    {"name": "ft2", "uri": llama_family["ft2"]}],
        "merge": {"method": "ties", "params": {"density": 0.5}},
        "output": {"uri": "merged"}}))  # relative: made absolute at submission
    proc = cli("submit", str(job), "--address", address, "--job-id", "merge-1", "--wait",
               token=token, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merge-1: SUCCEEDED" in proc.stdout and "merged 30 tensors" in proc.stderr
    assert main(["verify", str(tmp_path / "merged")]) == 0
    proc = cli("status", "merge-1", "--address", address, token=token)
    assert proc.returncode == 0 and f"output: {tmp_path / 'merged'}" in proc.stdout
    proc = cli("logs", "merge-1", "--address", address, token=token)
    assert proc.returncode == 0 and "merged 30 tensors" in proc.stdout
    proc = cli("stop", "merge-1", "--address", address, token=token)
    assert proc.returncode == 0 and "had already ended" in proc.stdout
    proc = cli("status", "merge-1", "--address", address, token="0" * 32)
    assert proc.returncode == 1 and "Invalid authentication token" in proc.stderr, proc.stderr

    # every socket the head's processes listen on is on 127.0.0.1
    listening = _listen_addresses()
    inodes = set()
    for pid in cluster.session_pids(temp):
        inodes |= _socket_inodes(_tree_pids(pid))
    addresses = {listening[i] for i in inodes if i in listening}
    assert addresses and all(_is_loopback(a) for a in addresses), addresses


def test_bad_config_never_reaches_the_cluster_and_stop_works(ray_head, llama_family,
                                                             tmp_path):
    address, token, _, _ = ray_head
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "sources": [{"name": "a", "uri": llama_family["ft1"]}],
        "merge": {"method": "tiess"}, "output": {"uri": str(tmp_path / "o")}}))
    proc = cli("submit", str(job), "--address", address, token=token)
    assert proc.returncode == 2 and "unknown method 'tiess'" in proc.stderr
    proc = cli("status", "no-such-job", "--address", address, token=token)
    assert proc.returncode == 1 and "no-such-job" in proc.stderr
    proc = cli("status", "x", "--address", "http://127.0.0.1:9", token=token)
    assert proc.returncode == 1 and "cannot reach the Ray Jobs API" in proc.stderr

    # a job stopped at once ends STOPPED, with no manifest unless it committed first:
    # never a partial output that looks finished
    job.write_text(yaml.safe_dump({
        "sources": [{"name": "a", "uri": llama_family["ft1"]},
                    {"name": "b", "uri": llama_family["ft2"]}],
        "merge": {"method": "linear"}, "output": {"uri": str(tmp_path / "stopped")}}))
    assert cli("submit", str(job), "--address", address, "--job-id", "to-stop",
               token=token).returncode == 0
    assert cli("stop", "to-stop", "--address", address, token=token).returncode == 0
    deadline = time.monotonic() + 120
    while True:
        status = cli("status", "to-stop", "--address", address, token=token).stdout
        if "STOPPED" in status or "SUCCEEDED" in status or time.monotonic() > deadline:
            break
        time.sleep(2)
    manifest = tmp_path / "stopped" / "raymerge-manifest.json"
    assert "STOPPED" in status or "SUCCEEDED" in status, status
    if manifest.exists():  # the job committed before the stop reached it (a stop can even
        # land between the commit and the job's exit): then the output is whole
        assert main(["verify", str(tmp_path / "stopped")]) == 0
    else:
        assert "STOPPED" in status, status


def files_holding(folder: str, needle: str) -> list[str]:
    """Every file below ``folder`` whose bytes contain ``needle``."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if needle.encode() in f.read():
                        found.append(path)
            except OSError:  # a socket or a file removed meanwhile
                continue
    return found


def test_no_secret_reaches_the_clusters_files(ray_head, llama_family, tmp_path, s3):
    """Secrets never go into a runtime_env (Ray writes those to its logs): on a cluster this
    process did not start, the workers get the non-secret settings (the S3 endpoint) and
    use their own credentials, or, with --forward-credentials, this shell's through the
    object store; a submitted job gets the settings only. Afterwards no file under the
    cluster's session folder holds the secrets, while the endpoint is there (the grep sees
    what Ray records)."""
    address, token, temp, gcs = ray_head
    s3.create_bucket(Bucket="no-secrets")
    secret, hf_secret = f"SENTINEL{secrets.token_hex(8)}", f"HFSENTINEL{secrets.token_hex(8)}"
    env = {"AWS_SECRET_ACCESS_KEY": secret, "HF_TOKEN": hf_secret}
    job = tmp_path / "job.yaml"
    doc = {"base": {"name": "base", "uri": llama_family["base"]},
           "sources": [{"name": "ft1", "uri": llama_family["ft1"]},
                       {"name": "ft2", "uri": llama_family["ft2"]}],
           "merge": {"method": "task_arithmetic"},
           "output": {"uri": "s3://no-secrets/merged", "shard_size": "12KB"},
           "runtime": {"address": gcs}}
    job.write_text(yaml.safe_dump(doc))
    proc = cli("run", str(job), "--quiet", token=token, env=env)
    assert proc.returncode == 1 and "Unable to locate credentials" in proc.stderr, proc.stderr
    proc = cli("run", str(job), "--quiet", "--forward-credentials", token=token, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["verify", "s3://no-secrets/merged"]) == 0

    doc.update(output={"uri": str(tmp_path / "submitted")}, runtime={})
    job.write_text(yaml.safe_dump(doc))
    proc = cli("submit", str(job), "--address", address, "--wait", token=token, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert files_holding(temp, secret) == [] and files_holding(temp, hf_secret) == []
    assert files_holding(temp, os.environ["AWS_ENDPOINT_URL_S3"])  # recorded runtime_envs
