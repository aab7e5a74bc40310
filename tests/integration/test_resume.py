"""Resume and idempotence: an interrupted job redoes only its missing or corrupt shards and
ends with the same bytes as an undisturbed run; a killed driver is resumed the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from orchestrator import run_job
from orchestrator.errors import WorkerError
from tests.conftest import tiny_llama

pytestmark = pytest.mark.integration


def job_doc(family, out, **runtime):
    return {"base": {"name": "base", "uri": family["base"]},
            "sources": [{"name": n, "uri": family[n]} for n in ("ft1", "ft2", "ft3")],
            "merge": {"method": "ties", "params": {"density": 0.4}},
            "output": {"uri": str(out), "shard_size": "12KB"},
            "runtime": {"executor": "local", **runtime}}


def digests(out):
    manifest = json.loads((out / "raymerge-manifest.json").read_text())
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


def test_interrupted_job_redoes_only_missing_and_corrupt_shards(llama_family, tmp_path):
    reference = run_job(job_doc(llama_family, tmp_path / "ref"))
    shards = [s["file"] for s in reference.manifest["shards"]]
    assert len(shards) >= 4

    out = tmp_path / "out"
    (out / shards[2]).mkdir(parents=True)  # unit 2 cannot write: the run stops there
    with pytest.raises(WorkerError, match=shards[2]):
        run_job(job_doc(llama_family, out))
    assert not (out / "raymerge-manifest.json").exists()
    progress = json.loads((out / "raymerge-progress.json").read_text())
    assert [s["shard"] for s in progress["shards"]] == shards[:2]

    (out / shards[2]).rmdir()
    corrupt = bytearray((out / shards[1]).read_bytes())
    corrupt[-1] ^= 1
    (out / shards[1]).write_bytes(bytes(corrupt))
    result = run_job(job_doc(llama_family, out))
    assert result.kept_shards == 1  # shard 0 kept; the corrupt shard 1 was redone
    assert digests(out) == digests(tmp_path / "ref")
    assert not (out / "raymerge-progress.json").exists()

    again = run_job(job_doc(llama_family, out))
    assert again.skipped


def test_killed_driver_is_resumed_with_identical_bytes(tmp_path):
    """SIGKILL the whole `raymerge run` process group (driver and its embedded Ray) once some
    shards are done; the re-run keeps them, redoes the rest, and matches an undisturbed run."""
    size = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, vocab_size=512,
                shard_size="1MB")
    base = tiny_llama(str(tmp_path / "base"), **size)
    family = {"base": base}
    for i in (1, 2, 3):
        family[f"ft{i}"] = tiny_llama(str(tmp_path / f"ft{i}"), seed=i, base=base, **size)
    doc = job_doc(family, tmp_path / "out", executor="ray", num_workers=1)
    doc["merge"]["params"]["trim_scope"] = "tensor"
    doc["output"]["shard_size"] = "100KB"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(tmp_path / "job.yaml"),
           "--quiet"]

    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    progress = tmp_path / "out" / "raymerge-progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "raymerge-manifest.json").exists()

    rerun = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming:" in rerun.stderr
    kept = int(rerun.stderr.split("resuming: ")[1].split()[0])
    assert kept >= 2

    doc["output"]["uri"] = str(tmp_path / "ref")
    doc["runtime"] = {"executor": "local"}
    run_job(doc)
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")
