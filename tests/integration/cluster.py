"""Ray heads for tests: `ray start --head --block` on 127.0.0.1 in a temp folder of its own,
stopped by its own processes (never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(temp: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if temp.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def kill_session(temp: str) -> None:
    """GCS, raylet and agents outlive `ray start --block` in their own process groups: kill
    every process whose command line names this head's temp folder (and nothing else)."""
    for pid in session_pids(temp):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


@contextlib.contextmanager
def ray_head(temp: str, *options: str, env: dict | None = None,
             cwd: str | None = None) -> Iterator[tuple[str, str]]:
    """A one-node cluster with its dashboard (Jobs API) on 127.0.0.1; yields the dashboard
    URL and the GCS address. ``options``: more `ray start` flags (`--num-cpus=2`, ...)."""
    dashboard, gcs = free_port(), free_port()
    log = open(os.path.join(temp, "head.log"), "wb")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", *options,
         "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
         # fixed default ports would collide with the session's own local Ray
         f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env or dict(os.environ), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
        start_new_session=True)
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
                    raise RuntimeError("ray head did not start: " + open(
                        os.path.join(temp, "head.log")).read()[-2000:])
                time.sleep(1)
        yield address, f"127.0.0.1:{gcs}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        kill_session(temp)
        log.close()
