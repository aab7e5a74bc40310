"""`raymerge submit / status / logs / stop` against a real Ray head started with
`ray start --head --block` on 127.0.0.1 (stopped by its own process group, never `ray stop`),
with Ray's token auth on."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from orchestrator.cli import main

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node cluster with its dashboard (Jobs API) on 127.0.0.1 and a token of its own."""
    token = secrets.token_hex(16)
    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp = tmp_path_factory.mktemp("rayhead")
    log = open(temp / "head.log", "wb")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray head did not start: "
                                       + (temp / "head.log").read_text()[-2000:])
                time.sleep(1)
        yield address, token
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        _kill_session(str(temp))
        log.close()


def _kill_session(temp: str) -> None:
    """GCS, raylet and agents outlive `ray start --block` in their own process groups: kill
    every process whose command line names this head's temp folder (and nothing else)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if temp.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


def test_submitted_job_succeeds_and_its_output_verifies(ray_head, llama_family, tmp_path,
                                                        monkeypatch, capsys):
    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "base": {"name": "base", "uri": llama_family["base"]},
        "sources": [{"name": "ft1", "uri": llama_family["ft1"]},
                    {"name": "ft2", "uri": llama_family["ft2"]}],
        "merge": {"method": "ties", "params": {"density": 0.5}},
        "output": {"uri": "merged"}}))  # relative: made absolute at submission
    monkeypatch.chdir(tmp_path)
    assert main(["submit", str(job), "--address", address, "--job-id", "merge-1",
                 "--wait"]) == 0
    out = capsys.readouterr()
    assert "merge-1: SUCCEEDED" in out.out and "merged 30 tensors" in out.err
    assert main(["verify", str(tmp_path / "merged")]) == 0
    assert main(["status", "merge-1", "--address", address]) == 0
    assert f"output: {tmp_path / 'merged'}" in capsys.readouterr().out
    assert main(["logs", "merge-1", "--address", address]) == 0
    assert "merged 30 tensors" in capsys.readouterr().out
    assert main(["stop", "merge-1", "--address", address]) == 0
    assert "had already ended" in capsys.readouterr().out

    # a wrong token is refused with a message, in a fresh process (Ray caches the token)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "merge-1",
                           "--address", address],
                          env={**os.environ, "RAY_AUTH_MODE": "token",
                               "RAY_AUTH_TOKEN": "0" * 32},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "raymerge: error:" in proc.stderr, proc.stderr[-2000:]


def test_bad_config_never_reaches_the_cluster_and_stop_works(ray_head, llama_family,
                                                             tmp_path, monkeypatch, capsys):
    address, token = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "sources": [{"name": "a", "uri": llama_family["ft1"]}],
        "merge": {"method": "tiess"}, "output": {"uri": str(tmp_path / "o")}}))
    assert main(["submit", str(job), "--address", address]) == 2
    assert "unknown method 'tiess'" in capsys.readouterr().err
    assert main(["status", "no-such-job", "--address", address]) == 1
    assert "no-such-job" in capsys.readouterr().err
    assert main(["status", "x", "--address", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the Ray Jobs API" in capsys.readouterr().err

    # a job stopped at once ends STOPPED with no manifest (or, if it won the race, SUCCEEDED
    # with one): never a partial output that looks finished
    from orchestrator import submit

    job.write_text(yaml.safe_dump({
        "sources": [{"name": "a", "uri": llama_family["ft1"]},
                    {"name": "b", "uri": llama_family["ft2"]}],
        "merge": {"method": "linear"}, "output": {"uri": str(tmp_path / "stopped")}}))
    assert main(["submit", str(job), "--address", address, "--job-id", "to-stop"]) == 0
    assert main(["stop", "to-stop", "--address", address]) == 0
    final = submit.wait(address, "to-stop", timeout=120)
    manifest = tmp_path / "stopped" / "raymerge-manifest.json"
    assert (final["status"], manifest.exists()) in (("STOPPED", False), ("SUCCEEDED", True))
