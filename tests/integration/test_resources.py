"""Ray-native resources: tasks ask for their CPUs and the plan's memory estimate, so Ray packs
them per node, and a unit no node can hold is refused before any task runs."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest
import yaml

from tests.integration import cluster

pytestmark = pytest.mark.integration


def test_a_unit_no_node_can_hold_is_refused_with_the_numbers(llama_family, tmp_path,
                                                             tmp_path_factory):
    """A head offering 200 MB of task memory: every unit asks for its working set plus a worker
    process (~300 MiB), so the job fails before any task, naming the unit, both sizes and the
    fix, and leaves no output folder."""
    out = tmp_path / "out"
    doc = {"base": {"name": "base", "uri": llama_family["base"]},
           "sources": [{"name": n, "uri": llama_family[n]} for n in ("ft1", "ft2")],
           "merge": {"method": "task_arithmetic"}, "output": {"uri": str(out)}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    temp = str(tmp_path_factory.mktemp("head"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    with cluster.ray_head(temp, "--num-cpus=1", "--memory=200000000", env=env) as (_, gcs):
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(path),
                               f"runtime.address={gcs}"],
                              capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "work unit 0 (output shard model-00001-of-00001.safetensors) needs about" in \
        proc.stderr
    assert "the largest: 190.7 MiB" in proc.stderr and "runtime.worker_memory" in proc.stderr
    assert not out.exists()  # the folder the job's lock made is removed again, left empty
