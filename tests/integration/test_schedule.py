"""OPCM through the engine, and the re-merge scheduler: versions, continual updates, the lock,
a tick killed mid-merge, S3 (moto) and hub-cache sources whose revisions change between ticks."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from orchestrator import run_job
from orchestrator.cli import main
from orchestrator.engine.lock import Lock
from orchestrator.ops import schedule
from tests.conftest import load_state, tiny_llama, upload
from tests.integration.test_hub import add_to_cache, sha
from tests.unit.merge.test_opcm import _naive
from workers.io.storage import open_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def family(llama_family, tmp_path_factory):
    """The session's base and ft1-ft3, plus ft4 and ft2b (another fine-tune, to replace ft2)."""
    root = tmp_path_factory.mktemp("more")
    return {**llama_family,
            "ft4": tiny_llama(str(root / "ft4"), seed=4, base=llama_family["base"]),
            "ft2b": tiny_llama(str(root / "ft2b"), seed=7, base=llama_family["base"])}


def folder_digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def opcm_job(family, names, out, **runtime):
    return {"base": {"name": "base", "uri": family["base"]},
            "sources": [{"name": n, "uri": family[n]} for n in names],
            "merge": {"method": "opcm", "params": {"alpha": 0.5}},
            "output": {"uri": str(out), "shard_size": "12KB"}, "runtime": runtime}


def shards(folder):
    manifest = json.loads(open(os.path.join(folder, "raymerge-manifest.json")).read())
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


def test_opcm_sequence_workers_agree_and_equal_the_naive_recursion(family, ray_session,
                                                                   tmp_path):
    """K = 3 models as three steps: 1 and 2 Ray workers and in-process write the same bits,
    equal (to float32 precision) to the paper's recursion in float64; ‖θ − θ0‖ is the mean
    task-vector norm; the base is untouched and the intermediate steps are gone."""
    before = folder_digest(family["base"])
    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        path = tmp_path / f"{label}.yaml"
        path.write_text(yaml.safe_dump(opcm_job(family, ["ft1", "ft2", "ft3"], outs[label],
                                                **runtime)))
        assert main(["run", str(path), "--quiet"]) == 0
        assert not os.path.exists(f"{outs[label]}.steps")
    assert shards(outs["w1"]) == shards(outs["w2"]) == shards(outs["local"])
    assert folder_digest(family["base"]) == before

    base = {k: v.double() for k, v in load_state(family["base"]).items()}
    models = [{k: v.double() for k, v in load_state(family[n]).items()}
              for n in ("ft1", "ft2", "ft3")]
    want = _naive(models, base, alpha=0.5)
    got = load_state(str(outs["w2"]))
    for name, tensor in want.items():
        torch.testing.assert_close(got[name].double(), tensor, rtol=1e-4, atol=1e-6)

    def norm(m):
        return math.sqrt(sum(float((m[k].double() - base[k]).square().sum()) for k in base))

    assert norm(got) == pytest.approx(sum(norm(m) for m in models) / 3, rel=1e-5)
    state = json.loads((outs["w2"] / "raymerge-manifest.json").read_text())["method_state"]
    assert state["merged"] == 3
    assert state["norm_sum"] == pytest.approx(sum(norm(m) for m in models), rel=1e-5)


def write_schedule(tmp_path, job_doc, output, name="soup", **extra):
    job = tmp_path / f"{name}.job.yaml"
    job.write_text(yaml.safe_dump(job_doc))
    path = tmp_path / "schedules.yaml"
    path.write_text(yaml.safe_dump({"lock_ttl": extra.pop("lock_ttl", "1h"), "schedules": [
        {"name": name, "job": job.name, "output": str(output), "on_change": True, **extra}]}))
    return str(path), job


def tick_once(path, clock=time.time):
    file = schedule.load_schedules(path)
    return schedule.tick(file.schedules[0], file.lock_ttl, clock=clock)


def test_s3_schedule_skips_updates_continually_and_remerges_on_change(family, s3, ray_session,
                                                                      tmp_path, capsys):
    """On S3: first tick = full OPCM over two models (v1); unchanged -> skipped; ft3 appended
    -> one continual step (v2) bit-identical to a full three-model OPCM run; ft2's object
    replaced (new ETag) -> full re-merge (v3). ``latest`` follows, history lists every run."""
    s3.create_bucket(Bucket="zoo")
    s3.create_bucket(Bucket="merged")
    uris = {n: upload(s3, "zoo", family[n], n) for n in ("base", "ft1", "ft2", "ft3")}
    # forwarded: the session's Ray started before the S3 credentials were set
    doc = opcm_job(uris, ["ft1", "ft2"], "unused", num_workers=2, forward_credentials=True)
    out = "s3://merged/opcm"
    path, job = write_schedule(tmp_path, doc, out)

    first = tick_once(path)
    assert (first.action, first.version) == ("full", 1)
    assert tick_once(path).action == "skipped"
    assert main(["schedule", path, "--once", "--quiet"]) == 0
    assert "soup: skipped v1 (no source changed)" in capsys.readouterr().out

    doc["sources"].append({"name": "ft3", "uri": uris["ft3"]})
    job.write_text(yaml.safe_dump(doc))
    second = tick_once(path)
    assert (second.action, second.version, second.reason) == ("continual", 2, "added ft3")
    store = open_store(out)
    latest = json.loads(store.read_bytes("latest"))
    assert latest["version"] == 2
    run = json.loads(store.read_bytes(latest["run"]))
    assert run["status"] == "done" and run["method_state"]["merged"] == 3
    step = json.loads(store.read_bytes("v2/raymerge-manifest.json"))
    assert [s["uri"] for s in step["sources"]] == [f"{out}/v1", uris["ft3"], uris["base"]]

    full = run_job(opcm_job(uris, ["ft1", "ft2", "ft3"], str(tmp_path / "full"),
                            num_workers=2, forward_credentials=True))
    assert {s["file"]: s["sha256"] for s in step["shards"]} == shards(full.output)

    upload(s3, "zoo", family["ft2b"], "ft2")  # a new revision of ft2, same key
    third = tick_once(path)
    assert (third.action, third.version, third.reason) == ("full", 3, "changed ft2")
    assert main(["verify", f"{out}/v3"]) == 0
    assert main(["history", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if " done " in line]
    assert len(rows) == 3 and rows[-1].startswith("* v3") and "continual" in rows[1]


def test_methods_without_continual_update_remerge_and_linear_keeps_a_running_mean(
        family, tmp_path):
    """ties: an appended model triggers a full re-merge (equal to a fresh run); uniform linear
    adds it to the running mean (close to the full soup)."""
    base_doc = {"base": {"name": "base", "uri": family["base"]},
                "sources": [{"name": n, "uri": family[n]} for n in ("ft1", "ft2")],
                "output": {"uri": "unused", "shard_size": "12KB"},
                "runtime": {"executor": "local"}}
    for method, params in (("ties", {"density": 0.4}), ("linear", {})):
        doc = {**base_doc, "merge": {"method": method, "params": params},
               "sources": list(base_doc["sources"])}
        out = tmp_path / method
        path, job = write_schedule(tmp_path, doc, out, name=method)
        assert tick_once(path).action == "full"
        doc["sources"].append({"name": "ft3", "uri": family["ft3"]})
        job.write_text(yaml.safe_dump(doc))
        result = tick_once(path)
        fresh = run_job({**doc, "output": {"uri": str(tmp_path / f"{method}-fresh"),
                                           "shard_size": "12KB"}})
        if method == "ties":
            assert result.action == "full" and "cannot add a model" in result.reason
            assert shards(out / "v2") == shards(fresh.output)
        else:
            assert result.action == "continual"
            got, want = load_state(str(out / "v2")), load_state(fresh.output)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_two_schedulers_never_merge_into_one_output_at_once(family, tmp_path, monkeypatch):
    """While one tick merges, another tick of the same output finds the lock and does nothing;
    after it, the second tick sees the published version and skips."""
    doc = opcm_job(family, ["ft1", "ft2"], "unused", executor="local")
    path, _ = write_schedule(tmp_path, doc, tmp_path / "out")
    file = schedule.load_schedules(path)
    inside, go_on = threading.Event(), threading.Event()
    results = {}
    merge = schedule._run

    def held_merge(*args):
        inside.set()
        go_on.wait(60)
        return merge(*args)

    monkeypatch.setattr(schedule, "_run", held_merge)

    def first():
        results["a"] = schedule.tick(file.schedules[0], file.lock_ttl)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(60)
    busy = schedule.tick(file.schedules[0], file.lock_ttl)
    assert busy.action == "busy" and "until" in busy.reason
    go_on.set()
    monkeypatch.setattr(schedule, "_run", merge)
    thread.join(120)
    assert results["a"].action == "full" and results["a"].version == 1
    assert schedule.tick(file.schedules[0], file.lock_ttl).action == "skipped"
    assert not os.path.exists(tmp_path / "out" / "v2")


def test_lock_compare_and_swap_on_s3(s3):
    """Of two contenders exactly one creates the lock, and of two taking over an expired lock
    exactly one wins (S3 conditional writes on the moto endpoint)."""
    s3.create_bucket(Bucket="locks")
    store = open_store("s3://locks/out")
    now = [time.time()]
    a, b = Lock(store, ttl=0.5, clock=lambda: now[0]), schedule.Lock(store, ttl=0.5)
    assert a.acquire() is None
    assert "until" in b.acquire()
    now[0] += 0.6  # a's lock expires without renewal
    held, token = store.read_versioned("lock")
    c = Lock(store, ttl=30)
    assert store.replace_if("lock", b"taken by someone else", token) is not None
    assert c.acquire() is None  # the unreadable lock counts as expired
    assert store.replace_if("lock", b"late", token) is None  # the old version is gone
    assert not a.renew() and a.lost.is_set()
    assert "until" in b.acquire()
    c.release()
    assert b.acquire() is None


KILL_AFTER_TWO_SHARDS = """
import os, sys
import orchestrator.engine.job as job
from orchestrator.ops import schedule
write = job.write_progress
def write_then_die(out, plan, records):
    write(out, plan, records)
    if len(records) >= 2:
        os._exit(9)  # dies mid-merge: no failed record, the lock left held
job.write_progress = write_then_die
file = schedule.load_schedules(sys.argv[1])
schedule.tick(file.schedules[0], file.lock_ttl)
"""


def test_a_tick_killed_mid_merge_is_resumed_by_the_next_after_the_lock_expires(
        family, tmp_path, capsys):
    doc = {"base": {"name": "base", "uri": family["base"]},
           "sources": [{"name": n, "uri": family[n]} for n in ("ft1", "ft2", "ft3")],
           "merge": {"method": "ties", "params": {"density": 0.3}},
           "output": {"uri": "unused", "shard_size": "12KB"}, "runtime": {"executor": "local"}}
    out = tmp_path / "out"
    path, _ = write_schedule(tmp_path, doc, out, lock_ttl="3s")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_SHARDS, path],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not (out / "latest").exists() and not (out / "v1" / "raymerge-manifest.json").exists()
    assert tick_once(path).action == "busy"  # its lock still holds
    later = lambda: time.time() + 3.5  # noqa: E731  (past the dead tick's 3 s lock)
    assert "interrupted" in "\n".join(schedule.history(str(out), clock=later))
    result = tick_once(path, clock=later)
    assert (result.action, result.version) == ("full", 1)
    assert "kept 2 intact shards of an interrupted tick" in capsys.readouterr().err
    fresh = run_job({**doc, "output": {"uri": str(tmp_path / "fresh"), "shard_size": "12KB"}})
    assert shards(out / "v1") == shards(fresh.output)
    assert json.loads((out / "latest").read_text())["version"] == 1


HOLD_RAY_LOOP = """
import json, sys, time, types
import ray
from orchestrator.ops import schedule
inits, start = [], ray.init
def counted(*args, **kwargs):
    inits.append(kwargs.get("num_cpus"))
    return start(*args, **kwargs)
ray.init = counted
schedule.due = lambda *args: True
def stop(seconds):  # the loop's wait for the next minute ends the first pass
    raise KeyboardInterrupt
schedule.time = types.SimpleNamespace(sleep=stop, time=time.time, monotonic=time.monotonic)
try:
    schedule.run_schedules(schedule.load_schedules(sys.argv[1]))
except KeyboardInterrupt:
    print(json.dumps({"inits": inits, "up": ray.is_initialized()}))
"""


def test_the_scheduler_keeps_one_ray_across_ticks_and_a_new_one_after_a_failure(
        family, tmp_path):
    """One pass of the schedule loop over five schedules: ``a`` starts Ray, ``b`` (same runtime)
    runs on it, ``bad`` fails inside its merge (a model of another shape) and Ray is let go,
    ``c`` starts a fresh one, ``d`` asks for two workers and gets its own. Each output is a
    published v1 equal to the in-process merge; the loop's exit shuts Ray down."""
    odd = tiny_llama(str(tmp_path / "odd"), seed=5, base=None, intermediate_size=48)
    jobs = {name: {"sources": [{"name": "ft1", "uri": family["ft1"]},
                               {"name": "other", "uri": odd if name == "bad" else family["ft2"]}],
                   "merge": {"method": "linear"},
                   "output": {"uri": "unused", "shard_size": "12KB"},
                   "runtime": {"num_workers": 2 if name == "d" else 1}}
            for name in ("a", "b", "bad", "c", "d")}
    for name, doc in jobs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    path = tmp_path / "schedules.yaml"
    path.write_text(yaml.safe_dump({"schedules": [
        {"name": name, "job": f"{name}.yaml", "output": str(tmp_path / "out" / name),
         "on_change": True} for name in jobs]}))
    proc = subprocess.run([sys.executable, "-c", HOLD_RAY_LOOP, str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen == {"inits": [1, 1, 2], "up": False}, proc.stderr[-3000:]
    assert "[bad] tick failed" in proc.stderr
    fresh = run_job({**jobs["a"], "output": {"uri": str(tmp_path / "fresh"), "shard_size": "12KB"},
                     "runtime": {"executor": "local"}})
    for name in ("a", "b", "c", "d"):
        out = tmp_path / "out" / name
        assert json.loads((out / "latest").read_text())["version"] == 1
        assert shards(out / "v1") == shards(fresh.output)
    assert not (tmp_path / "out" / "bad" / "latest").exists()


def test_hub_revision_change_between_ticks_remerges(family, tmp_path):
    """A hub source pinned by commit: moving refs/main to a new commit is a change."""
    cache = str(tmp_path / "cache")
    for i, key in enumerate(("base", "ft1", "ft2")):
        add_to_cache(cache, f"org/{key}", family[key], sha(i))
    doc = {"base": {"name": "base", "uri": "hf://org/base"},
           "sources": [{"name": "ft1", "uri": "hf://org/ft1"}, {"name": "ft2", "uri": "hf://org/ft2"}],
           "merge": {"method": "task_arithmetic", "params": {"scale": 0.5}},
           "output": {"uri": "unused", "shard_size": "12KB"}, "runtime": {"executor": "local"},
           "hub": {"cache_dir": cache, "offline": True}}
    path, _ = write_schedule(tmp_path, doc, tmp_path / "out")
    assert tick_once(path).version == 1
    assert tick_once(path).action == "skipped"
    add_to_cache(cache, "org/ft2", family["ft3"], sha(42))  # refs/main -> the new commit
    result = tick_once(path)
    assert (result.action, result.version, result.reason) == ("full", 2, "changed ft2")
    run = json.loads((tmp_path / "out" / "runs" / "000002.json").read_text())
    assert sha(42) in next(s["pin"] for s in run["sources"] if s["name"] == "ft2")
