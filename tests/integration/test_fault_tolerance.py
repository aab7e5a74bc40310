"""Losing a worker node mid-merge: Ray retries its tasks elsewhere and the output is
bit-identical to an undisturbed run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from orchestrator import run_job
from tests.conftest import tiny_llama

pytestmark = pytest.mark.integration


def test_killed_worker_node_still_gives_identical_output(tmp_path):
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, vocab_size=512,
                shard_size="1MB")
    base = tiny_llama(str(tmp_path / "base"), **size)
    fts = [tiny_llama(str(tmp_path / f"ft{i}"), seed=i, base=base, **size) for i in (1, 2)]
    doc = {"base": {"name": "base", "uri": base},
           "sources": [{"name": f"ft{i}", "uri": f} for i, f in enumerate(fts)],
           "merge": {"method": "ties", "params": {"density": 0.3, "trim_scope": "tensor"}},
           "output": {"uri": str(tmp_path / "out"), "shard_size": "100KB"},
           "runtime": {"num_workers": 2, "max_retries": 3}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "tests.integration.node_loss",
                           str(tmp_path / "job.yaml"), str(tmp_path / "result.json")],
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    disturbed = json.loads((tmp_path / "result.json").read_text())
    assert disturbed["killed_mid_job"] and disturbed["units"] > 4

    reference = run_job({**doc, "output": {"uri": str(tmp_path / "ref"),
                                           "shard_size": "100KB"},
                         "runtime": {"executor": "local"}})
    assert disturbed["shards"] == {s["file"]: s["sha256"] for s in reference.manifest["shards"]}
