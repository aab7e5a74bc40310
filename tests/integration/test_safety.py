"""Safety and integrity through the real command line: no source is ever written, a folder
that is not a raymerge output is not taken over, one run at a time writes an output, a damaged
output is never vouched for, a resume never mixes two versions of an input, metadata copying
stays inside the model folder, driver-side disk errors end in one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

from orchestrator import run_job
from orchestrator.cli import main
from orchestrator.engine.commit import PROGRESS, write_progress
from orchestrator.engine.job import plan_job, resolve_config
from orchestrator.engine.lock import OUTPUT_LOCK, output_lock
from orchestrator.errors import MergeError
from tests.integration.test_bad_input import assert_failed, first_shard, job, raymerge
from workers.io.storage import open_store

pytestmark = pytest.mark.integration
__all__ = ["job"]  # the fixture, shared with test_bad_input


def tree_digest(folder) -> dict[str, str]:
    """Every file below ``folder`` (links not followed) by its sha256: what a source is."""
    found = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return found


def run_in(cwd, *args):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def relative_job(llama_family, tmp_path):
    """The family copied under tmp/ov/ and a job naming it by relative URIs, as the shipped
    examples do."""
    for name, folder in llama_family.items():
        shutil.copytree(folder, tmp_path / "ov" / name)
    doc = {"base": {"name": "base", "uri": "ov/base"},
           "sources": [{"name": "ft1", "uri": "ov/ft1"},
                       {"name": "ft2", "uri": "X/out/../../ov/ft2"}],
           "merge": {"method": "task_arithmetic"}, "output": {"uri": "merged"},
           "runtime": {"executor": "local"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "X" / "out").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("output", ["ov/ft1", "ov/ft1/merged", "./ov/./ft2", "ov/ft2/x/..",
                                    "X/out/../../ov/base/merged", "link", "link/inside"])
def test_an_output_overlapping_a_source_is_refused_before_anything_is_read(relative_job,
                                                                          output):
    """Item 1: sources and outputs are compared by real path (relative URIs, ``..``, ``.``,
    a symlink to a source); exit 2, every source byte unchanged."""
    (relative_job / "link").symlink_to(relative_job / "ov" / "ft2")
    before = tree_digest(relative_job / "ov")
    proc = run_in(relative_job, "run", "job.yaml", output)
    assert_failed(proc, "overlaps", "refusing to write where inputs are read", code=2)
    assert tree_digest(relative_job / "ov") == before
    if output == "ov/ft1":  # plan refuses it too (one spelling: each call starts a process)
        assert_failed(run_in(relative_job, "plan", "job.yaml", output), "overlaps", code=2)


def test_overlap_covers_base_data_files_steps_and_object_storage():
    """Item 1: the base, data files, a continual merge's OUTPUT.steps/ folder and S3 prefixes
    (normalised, compared by whole path parts) count too."""
    from orchestrator.config.schema import config_from_dict
    from orchestrator.engine.guard import check_locations
    from orchestrator.errors import ConfigError

    def cfg(out, **extra):
        return config_from_dict({"sources": [{"name": "a", "uri": "s3://b/m/a"}],
                                 "merge": {"method": "linear"}, "output": {"uri": out},
                                 **extra})

    check_locations(cfg("s3://b/m/a0"))  # a sibling whose name starts alike
    check_locations(cfg("s3://other/m/a"))
    for out in ("s3://b/m/a", "s3://b/m/a/", "s3://b/m/a/merged", "s3://b/m", "s3://b"):
        with pytest.raises(ConfigError, match="overlaps source 'a'"):
            check_locations(cfg(out))
    with pytest.raises(ConfigError, match="overlaps the base 'base'"):
        check_locations(cfg("/tmp/rm-base/out",
                            base={"name": "base", "uri": "/tmp/rm-base/out/../out"}))
    with pytest.raises(ConfigError, match="overlaps the data file"):
        check_locations(cfg("/tmp/rm-out", data={"uri": "/tmp/rm-out/inputs.safetensors"}))
    with pytest.raises(ConfigError, match="overlaps source 'b'"):  # OUTPUT.steps/
        check_locations(config_from_dict({
            "sources": [{"name": "b", "uri": "/tmp/rm-out.steps/step-1"}],
            "merge": {"method": "linear"}, "output": {"uri": "/tmp/rm-out"}}))


def test_a_folder_that_is_not_a_raymerge_output_is_not_taken_over(job):
    """Item 2: a non-empty folder without a manifest or progress record is refused (its
    README.md is not replaced by the model card) unless --force."""
    path = job()
    job.out.mkdir()
    (job.out / "README.md").write_text("my notes\n")
    assert_failed(raymerge("run", path), str(job.out), "is not empty and holds no raymerge "
                  "output", "README.md", "--force")
    assert (job.out / "README.md").read_text() == "my notes\n"
    assert sorted(os.listdir(job.out)) == ["README.md"]
    proc = raymerge("run", path, "--force")
    assert proc.returncode == 0, proc.stderr
    assert raymerge("verify", str(job.out)).returncode == 0


def test_a_second_run_into_a_locked_output_fails_at_once_or_waits(job):
    """Item 3: while a run holds the output, another fails at once naming HOST:PID and since
    when, without touching the output; with --wait-lock it runs once the first is done."""
    import socket

    path = job()
    with output_lock(open_store(str(job.out))):
        started = time.monotonic()
        proc = raymerge("run", path)
        assert_failed(proc, f"is being written by {socket.gethostname()}:{os.getpid()} since",
                      "--wait-lock")
        assert time.monotonic() - started < 60
        assert sorted(os.listdir(job.out)) == [OUTPUT_LOCK]
        log = job.out.parent / "waiting.log"
        with open(log, "w") as err:
            waiting = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", path,
                                        "--wait-lock"], stdout=subprocess.PIPE, stderr=err,
                                       text=True)
        deadline = time.monotonic() + 120
        while "waiting for it" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert waiting.poll() is None  # still waiting for the lock
    out, _ = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, log.read_text()
    assert "waiting for it (--wait-lock)" in log.read_text() and "merged" in out
    assert raymerge("verify", str(job.out)).returncode == 0
    assert OUTPUT_LOCK not in os.listdir(job.out)  # let go with the run


def test_the_output_lock_on_object_storage(s3):
    """Item 3 on S3: the lock is a conditionally written object; a second holder is refused
    with the first's HOST:PID and since when."""
    from orchestrator.engine.lock import OutputBusyError

    s3.create_bucket(Bucket="locks")
    out = open_store("s3://locks/merged")
    with output_lock(out):
        with pytest.raises(OutputBusyError, match=r"is being written by .+:\d+:\w+ since "):
            with output_lock(out):
                pass
    with output_lock(out):  # released
        pass


def test_a_damaged_finished_output_is_not_trusted_and_is_repaired(job, tmp_path):
    """Item 4: a re-run checks every listed file's size (a missing or truncated shard is
    named, exit 1, even with --force); ``verify --repair`` re-hashes everything, redoes only
    the damaged shards and rewrites the manifest: the bytes of an undisturbed run."""
    path = job(output={"uri": str(job.out), "shard_size": "12KB"})
    assert raymerge("run", path).returncode == 0
    manifest = json.loads((job.out / "raymerge-manifest.json").read_text())
    good = {s["file"]: s["sha256"] for s in manifest["shards"]}
    shards = sorted(good)
    assert len(shards) >= 3
    (job.out / shards[0]).unlink()
    for args in ((), ("--force",)):
        assert_failed(raymerge("run", path, *args), "is damaged", f"{shards[0]}: missing",
                      f"raymerge verify --repair {job.out}")
    flipped = bytearray((job.out / shards[1]).read_bytes())
    flipped[-3] ^= 0x40
    (job.out / shards[1]).write_bytes(bytes(flipped))
    proc = raymerge("verify", "--repair", str(job.out))
    assert proc.returncode == 0, proc.stderr
    assert "repaired (2 shards redone" in proc.stdout
    assert f"{shards[1]}: sha256" in proc.stderr
    after = json.loads((job.out / "raymerge-manifest.json").read_text())
    assert {s["file"]: s["sha256"] for s in after["shards"]} == good
    assert raymerge("verify", str(job.out)).returncode == 0
    again = raymerge("verify", "--repair", str(job.out))
    assert again.returncode == 0 and "nothing to repair" in again.stdout


def test_resume_after_an_input_was_rewritten_in_place_merges_everything_again(llama_family,
                                                                              tmp_path):
    """Item 5: a source rewritten between an interrupted run and its resume, same size and
    mtime, is told apart by the pinned sample of its content: nothing of the interrupted run
    is kept, the output is the merge of the new bytes, and the change is named."""
    family = {n: str(tmp_path / n) for n in llama_family}
    for n, folder in llama_family.items():
        shutil.copytree(folder, family[n])
    doc = {"base": {"name": "base", "uri": family["base"]},
           "sources": [{"name": n, "uri": family[n]} for n in ("ft1", "ft2")],
           "merge": {"method": "task_arithmetic"},
           "output": {"uri": str(tmp_path / "out"), "shard_size": "12KB"},
           "runtime": {"executor": "local"}}
    first = run_job(doc)
    # as if the driver had died right after the last shard: a progress record, no manifest
    cfg = resolve_config(doc)
    out = open_store(cfg.output.uri)
    from workers.tasks import ShardRecord
    write_progress(out, first.plan, [ShardRecord(s["file"], s["bytes"], s["sha256"],
                                                 s["tensors"])
                                     for s in first.manifest["shards"]])
    out.remove("raymerge-manifest.json")

    shard = first_shard(family["ft2"])
    st = os.stat(shard)
    from safetensors.torch import load_file, save_file
    tensors = load_file(shard)
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 1.0  # same shape and dtype: same header, same size
    save_file(tensors, shard, metadata={"format": "pt"})
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_size == st.st_size and plan_job(cfg)[0].digest() != \
        first.plan.digest()

    proc = raymerge("run", _write(tmp_path / "job.yaml", doc))
    assert proc.returncode == 0, proc.stderr
    assert "not resuming the interrupted run: its inputs changed" in proc.stderr
    assert f"ft2/{os.path.basename(shard)}: sample_sha256 changed" in proc.stderr
    fresh = run_job({**doc, "output": {**doc["output"], "uri": str(tmp_path / "fresh")}})
    got = json.loads((tmp_path / "out" / "raymerge-manifest.json").read_text())
    assert [s["sha256"] for s in got["shards"]] == [s["sha256"] for s in fresh.manifest["shards"]]
    assert got["shards"] != first.manifest["shards"]


def _write(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_metadata_copying_takes_known_files_only_and_no_link_out_of_the_folder(job, tmp_path):
    """Item 7: the reference's notes, other files and deeper folders are not copied; a
    metadata file that links out of the model folder is refused, and nothing is published."""
    secret = tmp_path / "secret.txt"
    secret.write_text("SENTINEL-not-model-metadata\n")
    base = job.family["base"]
    os.symlink(secret, os.path.join(base, "notes.txt"))
    os.makedirs(os.path.join(base, "extra"))
    shutil.copy(secret, os.path.join(base, "extra", "tokenizer.json"))
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        f.write('{"do_sample": false}\n')
    path = job()
    proc = raymerge("run", path)
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(job.out))
    assert "notes.txt" not in names and "extra" not in names
    assert "generation_config.json" in names and "config.json" in names
    for f in names:
        assert b"SENTINEL" not in (job.out / f).read_bytes(), f

    os.rename(os.path.join(base, "config.json"), tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", os.path.join(base, "config.json"))
    again = raymerge("run", path, str(tmp_path / "out2"))
    assert_failed(again, "config.json is a link to a file outside", base)
    assert not (tmp_path / "out2" / "raymerge-manifest.json").exists()


def test_a_driver_side_disk_error_is_one_line_naming_the_file(job, monkeypatch, capsys):
    """Item 8: an OSError on the driver (here: the disk fills while the manifest is written)
    ends as one ``raymerge: error:`` line naming the file, exit 1, no traceback, no manifest."""
    import errno

    from orchestrator.engine import commit
    from workers.io.storage import LocalStore

    path = job()
    real = LocalStore.write_bytes

    def full_disk(self, name, data):
        if name == "raymerge-manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path(name))
        return real(self, name, data)

    monkeypatch.setattr(LocalStore, "write_bytes", full_disk)
    assert main(["run", path, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raymerge: error: {job.out}/raymerge-manifest.json: No space left on device; "
                   "no manifest was written for unfinished work"]
    assert not (job.out / commit.MANIFEST).exists() and (job.out / PROGRESS).exists()


def test_a_finished_output_of_another_job_is_refused_before_any_work(job, monkeypatch):
    """Item 9: the manifest records the job as given; another job into that output is refused
    naming the keys that differ, before any source is indexed (an alignment solve or a
    training run would come first)."""
    path = job()
    assert raymerge("run", path).returncode == 0

    def no_work(*args, **kwargs):
        raise AssertionError("planned before refusing")

    monkeypatch.setattr("orchestrator.engine.job.plan_job", no_work)
    with pytest.raises(MergeError, match=r"another job than this one \(they differ in "
                                         r"merge\.params\.scale\)"):
        run_job(path, ["merge.params.scale=0.5"])
    with pytest.raises(MergeError, match="differ in seed"):
        run_job(path, ["seed=3"], wait_lock=True)


def test_plan_takes_a_mergekit_config_without_an_output(mergekit_config):
    """Item 12: ``raymerge plan`` of a mergekit YAML needs no OUT folder."""
    proc = raymerge("plan", mergekit_config)
    assert proc.returncode == 0, proc.stderr
    assert "units" in proc.stdout


@pytest.fixture
def mergekit_config(llama_family, tmp_path):
    doc = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": llama_family["ft1"], "parameters": {"weight": 1.0}},
                      {"model": llama_family["ft2"], "parameters": {"weight": 1.0}}]}
    return _write(tmp_path / "mk.yml", doc)


def test_no_secret_reaches_the_embedded_clusters_files(job, s3):
    """Item 6, embedded mode: the job's own Ray inherits the environment; no file under its
    session folder holds this shell's secret key or hub token."""
    import secrets
    import tempfile

    from tests.integration.test_submit import files_holding

    s3.create_bucket(Bucket="embedded-secrets")
    secret, hf_secret = f"SENTINEL{secrets.token_hex(8)}", f"HFSENTINEL{secrets.token_hex(8)}"
    path = job(output={"uri": "s3://embedded-secrets/merged"}, runtime={"num_workers": 2})
    ray_tmp = tempfile.mkdtemp(prefix="rm-", dir="/tmp")  # short: Ray's socket paths
    try:
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", path],
                              env={**os.environ, "AWS_SECRET_ACCESS_KEY": secret,
                                   "HF_TOKEN": hf_secret, "RAY_TMPDIR": ray_tmp},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert os.listdir(os.path.join(ray_tmp, "ray"))  # the session was there
        assert files_holding(ray_tmp, secret) == [] and files_holding(ray_tmp, hf_secret) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert main(["verify", "s3://embedded-secrets/merged"]) == 0


def test_ctrl_c_during_a_merge_exits_130_and_the_rerun_resumes(tmp_path):
    """Item 8: Ctrl-C while Ray tasks run: the still-running tasks are cancelled (only those
    not finished), Ray goes down without a crash, exit 130, no manifest; a re-run finishes
    and verifies."""
    import signal

    from tests.conftest import tiny_llama

    base = tiny_llama(str(tmp_path / "base"), seed=0, hidden_size=128, intermediate_size=512,
                      num_hidden_layers=6, shard_size="2MB")
    fts = [tiny_llama(str(tmp_path / f"ft{i}"), seed=i, base=base, hidden_size=128,
                      intermediate_size=512, num_hidden_layers=6, shard_size="2MB")
           for i in (1, 2, 3)]
    path = _write(tmp_path / "job.yaml", {
        "base": {"name": "base", "uri": base},
        "sources": [{"name": f"ft{i}", "uri": f} for i, f in enumerate(fts)],
        "merge": {"method": "ties", "params": {"trim_ties": "sort"}},
        "output": {"uri": str(tmp_path / "out"), "shard_size": "300KB"},
        "runtime": {"num_workers": 2}})
    log = tmp_path / "run.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", path],
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 180
    while "[statistics 1/3] 1/" not in log.read_text() and proc.poll() is None \
            and time.monotonic() < deadline:  # the first of 25 units of the first pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    text = log.read_text()
    assert "Check failed" not in text and "Traceback" not in text, text[-3000:]
    if code == 0:  # it finished before the signal came: then the output is whole
        assert main(["verify", str(tmp_path / "out")]) == 0
        return
    assert code == 130, text[-3000:]
    assert "interrupted; no manifest was written" in text
    assert not (tmp_path / "out" / "raymerge-manifest.json").exists()
    again = raymerge("run", path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_nan_and_inf_in_an_input_are_reported_and_fail_with_strict(job, capsys):
    """Item 10: NaN/Inf that reach the output are counted as the output is written, traced
    to the input that holds them, reported, and recorded in the manifest; --strict fails the
    job naming tensor and model, and writes no manifest."""
    from safetensors.torch import load_file, save_file

    shard = first_shard(job.family["ft2"])
    tensors = load_file(shard)
    name = sorted(n for n in tensors if tensors[n].dim() == 2)[0]
    bad = tensors[name].clone()
    bad.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    tensors[name] = bad
    save_file(tensors, shard, metadata={"format": "pt"})
    path = job()
    assert main(["run", path, "--strict", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 output tensors hold NaN/Inf entries (--strict)" in err
    assert f"{name}: 3 in the output; ft2 3" in err
    assert not (job.out / "raymerge-manifest.json").exists()
    assert main(["run", path, "--quiet"]) == 0  # resumes: the shards are kept, and counted
    err = capsys.readouterr().err
    assert "warning: 1 tensors of" in err and f"{name}: 3 in the output; ft2 3" in err
    manifest = json.loads((job.out / "raymerge-manifest.json").read_text())
    flagged = {t: c for s in manifest["shards"] for t, c in s.get("nonfinite", {}).items()}
    assert flagged == {name: {"output": 3, "inputs": {"ft2": 3}}}
