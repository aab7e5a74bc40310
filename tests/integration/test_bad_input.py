"""Bad input through the real command line: a clear message naming the file, tensor or key,
a non-zero exit, and never a manifest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.integration


def raymerge(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def job(llama_family, tmp_path):
    """A copy of the family (to damage) and a writer of job files over it."""
    family = {}
    for name, folder in llama_family.items():
        family[name] = str(tmp_path / name)
        shutil.copytree(folder, family[name])

    def write(method="task_arithmetic", params=None, **changes):
        doc = {"base": {"name": "base", "uri": family["base"]},
               "sources": [{"name": n, "uri": family[n]} for n in ("ft1", "ft2")],
               "merge": {"method": method, "params": params or {}},
               "output": {"uri": str(tmp_path / "out")},
               "runtime": {"executor": "local"}}
        doc.update(changes)
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(doc))
        return str(path)

    write.family = family
    write.out = tmp_path / "out"
    return write


def assert_failed(proc, *needles, code=None):
    assert proc.returncode != 0 and (code is None or proc.returncode == code), proc
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def first_shard(folder):
    return os.path.join(folder, sorted(f for f in os.listdir(folder)
                                       if f.endswith(".safetensors"))[0])


def test_corrupt_header(job):
    path = job()
    shard = first_shard(job.family["ft1"])
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage")
    assert_failed(raymerge("run", path), shard, "corrupt safetensors file", "not valid JSON")
    assert not job.out.exists()


def test_truncated_file(job):
    path = job()
    shard = first_shard(job.family["ft2"])
    os.truncate(shard, os.path.getsize(shard) - 100)
    assert_failed(raymerge("run", path), shard, "truncated file")
    assert not (job.out / "raymerge-manifest.json").exists()


def test_mismatched_shapes(job):
    from safetensors.torch import load_file, save_file

    shard = first_shard(job.family["ft2"])
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].reshape(-1)[:5].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_failed(raymerge("run", job()), "source 'ft2'", "1 shape mismatches", name)
    assert not job.out.exists()


def test_unknown_method(job):
    assert_failed(raymerge("run", job(method="tiess")), "merge.method: unknown method 'tiess'",
                  "valid methods: activation_matching, arcee_fusion", "ties", code=2)


def test_bad_param(job):
    proc = raymerge("run", job(method="ties", params={"density": 2, "temperature": 1}))
    assert_failed(proc, "merge.params.density: expected <= 1, got 2",
                  "merge.params.temperature: unknown parameter of 'ties'", code=2)


def test_bad_override_and_missing_source(job):
    proc = raymerge("run", job(), "sources[1].uri=/does/not/exist")
    assert_failed(proc, "/does/not/exist: no such folder")
    proc = raymerge("run", job(), "merge.params.scale=big")
    assert_failed(proc, "merge.params.scale: expected a number, got 'big'", code=2)


def test_output_inside_a_source_is_refused(job):
    proc = raymerge("run", job(), f"output.uri={job.family['ft1']}/merged")
    assert_failed(proc, "overlaps source 'ft1'", "refusing to write where inputs are read")
    assert not os.path.exists(os.path.join(job.family["ft1"], "merged"))


def test_impossible_output_fails_before_any_work(job, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    proc = raymerge("run", job(), f"output.uri={blocker}/out")
    assert_failed(proc, f"{blocker}/out: cannot create the output folder (Not a directory)")


def test_failing_write_on_a_ray_worker_names_unit_and_shard(job, ray_session, capsys):
    """A task that cannot write its shard fails the job with the unit, shard and cause named;
    nothing is committed."""
    from orchestrator.cli import main
    from orchestrator.engine.job import plan_job, resolve_config

    path = job()
    first = plan_job(resolve_config(path))[0].units[0].shard
    (job.out / first).mkdir(parents=True)
    code = main(["run", path, "runtime.executor=ray", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and f"work unit 0 (output shard {first})" in err, err
    assert "IsADirectoryError" in err, err
    assert not (job.out / "raymerge-manifest.json").exists()
