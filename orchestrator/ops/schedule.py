"""Periodic re-merges: ``raymerge schedule`` and ``raymerge history``.

A schedule names a job file and an output. Each tick pins the job's sources again (hub commit,
S3 ETag, local size and mtime) and compares them with the run behind the output's ``latest``
pointer: unchanged -> skipped; exactly one model appended -> a continual update where the method
allows it (OPCM; a uniform ``linear`` soup; ``task_arithmetic`` without per-model weights), which
reads only the base, the previous version and the new model; anything else -> a full re-merge.

Layout below the output::

    v1/, v2/, ...        one finished merge each (manifest written last, as every raymerge output)
    runs/000002.json     the record of each run: what, why, pins, state (written first as
                         "running", then "done" or "failed")
    latest               {"version": N, ...}: written last, only after v{N} and its record
    lock                 who merges here now, until when (conditional writes; renewed while busy)
    v3.steps/            intermediate steps of a full OPCM re-merge, removed when it ends

A tick that dies leaves ``latest`` on the previous version; the next tick (after the lock
expires) re-runs into the same unpublished version and keeps its intact shards.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import yaml

from orchestrator.engine.executor import HeldRay
from orchestrator.engine.lock import Lock
from orchestrator.engine.lock import json_bytes as _json
from orchestrator.engine.lock import log_timestamped as _log
from orchestrator.engine.lock import utc_now as _now
from orchestrator.errors import ConfigError, MergeError, StorageError
from orchestrator.ops import cron
from workers.io.storage import Store, open_store
from workers.merge import METHODS, get_method
from workers.merge.registry import ContinualStep

LOCK, LATEST = "lock", "latest"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")  # also a Kubernetes name part
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Schedule:
    name: str
    job: str  # absolute path of the job file (native or mergekit YAML)
    output: str  # versions live below it
    cron: cron.Cron | None
    on_change: bool  # re-pin every poll_interval and merge when something changed
    continual: bool  # allow continual updates (else every change re-merges in full)


@dataclass(frozen=True)
class ScheduleFile:
    path: str
    schedules: tuple[Schedule, ...]
    lock_ttl: float  # seconds a lock holds without renewal
    poll_interval: float  # seconds between on_change checks


@dataclass(frozen=True)
class TickResult:
    schedule: str
    action: str  # "skipped", "busy", "continual", "full"
    version: int | None
    reason: str


def parse_seconds(value: Any, where: str) -> float:
    m = _DURATION.match(str(value))
    if not m or float(m[1]) <= 0:
        raise ConfigError(f"{where}: {value!r} is not a duration; use seconds or 30s, 5m, 1h, 1d")
    return float(m[1]) * _UNITS[m[2]]


def load_schedules(path: str) -> ScheduleFile:
    """Read and check ``schedules.yaml``; every problem is named by its key."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("schedules"), list) \
            or not doc["schedules"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'schedules' list")
    unknown = set(doc) - {"schedules", "lock_ttl", "poll_interval"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; expected schedules, "
                          "lock_ttl, poll_interval")
    folder = os.path.dirname(os.path.abspath(path))
    schedules, seen = [], set()
    for i, entry in enumerate(doc["schedules"]):
        where = f"{path}: schedules[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping")
        unknown = set(entry) - {"name", "job", "output", "cron", "on_change", "continual"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; expected name, job, "
                              "output, cron, on_change, continual")
        for key in ("name", "job", "output"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ConfigError(f"{where}.{key}: required (a string)")
        name = entry["name"]
        if not _NAME.match(name) or name in seen:
            raise ConfigError(f"{where}.name: {name!r} must be unique, lowercase letters, digits "
                              "and '-' (it names Kubernetes objects)")
        seen.add(name)
        for key in ("on_change", "continual"):
            if not isinstance(entry.get(key, False), bool):
                raise ConfigError(f"{where}.{key}: expected true or false")
        when = cron.parse(entry["cron"], f"{where}.cron") if entry.get("cron") else None
        if when is None and not entry.get("on_change"):
            raise ConfigError(f"{where}: give a cron expression, on_change: true, or both")
        job = os.path.join(folder, entry["job"])
        if not os.path.isfile(job):
            raise ConfigError(f"{where}.job: {job} does not exist")
        schedules.append(Schedule(name, job, entry["output"].rstrip("/"), when,
                                  entry.get("on_change", False), entry.get("continual", True)))
    return ScheduleFile(os.path.abspath(path), tuple(schedules),
                        parse_seconds(doc.get("lock_ttl", "1h"), f"{path}: lock_ttl"),
                        parse_seconds(doc.get("poll_interval", "5m"), f"{path}: poll_interval"))


# ----------------------------------------------------------------------------- versions, runs

def _run_name(version: int) -> str:
    return f"runs/{version:06d}.json"


def read_latest(out: Store) -> dict | None:
    if not out.exists(LATEST):
        return None
    try:
        return json.loads(out.read_bytes(LATEST))
    except ValueError:
        raise StorageError(f"{out.path(LATEST)}: not valid JSON; fix or remove it") from None


def read_runs(out: Store) -> list[dict]:
    """Every run record below the output, oldest first."""
    names = [n for n in out.list_files() if re.fullmatch(r"runs/\d{6}\.json", n)]
    return [json.loads(out.read_bytes(n)) for n in sorted(names)]


# ----------------------------------------------------------------------------- deciding

@dataclass(frozen=True)
class _Pinned:
    config_key: str  # the job without sources, output and run-time settings
    base: dict | None
    sources: list[dict]  # [{name, uri, pin}] in job order
    doc: dict  # the whole job as a plain dict


def _pin(schedule: Schedule) -> _Pinned:
    """Load the job and pin every source now (headers only)."""
    from omegaconf import OmegaConf

    from orchestrator.engine.job import plan_job, resolve_config

    cfg = resolve_config(schedule.job, output=f"{schedule.output}/v0")
    plan = plan_job(cfg)[0]
    doc = OmegaConf.to_container(OmegaConf.structured(cfg))
    params = {s["name"]: s.get("params", {}) for s in doc["sources"]}
    refs = [{"name": s.name, "uri": s.uri, "pin": s.pin, "params": params.get(s.name, {})}
            for s in plan.sources]
    models = [r for r, s in zip(refs, plan.sources) if s.role == "model"]
    base = next((r for r, s in zip(refs, plan.sources) if s.role == "base"), None)
    key = {k: v for k, v in doc.items()
           if k not in ("sources", "base", "output", "runtime", "hub")}
    key["output"] = {k: v for k, v in doc["output"].items() if k != "uri"}
    return _Pinned(json.dumps(key, sort_keys=True), base, models, doc)


def continual_method(doc: dict) -> str | None:
    """Why this job cannot be updated one model at a time, or None when it can."""
    merge = doc["merge"]
    if doc.get("slices") or doc.get("tokenizer") or merge.get("overrides"):
        return "slices, tokenizer settings and overrides need a full re-merge"
    params = merge.get("params", {})
    if any(isinstance(v, (list, dict)) for v in params.values()):
        return "gradients and per-tensor conditions need a full re-merge"
    if _continual_step(doc, held=1, state={}) is not None:
        return None
    able = ", ".join(sorted(n for n, s in METHODS.items() if s.continual is not None))
    return (f"{merge['method']} with these params cannot add a model to its previous result; "
            f"continual updates exist for {able} (linear: uniform; task_arithmetic: not "
            "normalized; no per-model weights)")


def _continual_step(doc: dict, held: int, state: dict) -> ContinualStep | None:
    """The method's own update by the job's last source, or None where it has none."""
    spec = get_method(doc["merge"]["method"])
    if spec.continual is None:
        return None
    per_model = any(s.get("params") for s in doc["sources"])
    return spec.continual(dict(doc["merge"].get("params", {})), per_model, held, state)


def decide(now: _Pinned, last: dict | None, allow_continual: bool) -> tuple[str, str]:
    """(action, reason): "skipped", "continual" or "full"."""
    if last is None:
        return "full", "no earlier version"
    if last["config_key"] != now.config_key:
        return "full", "the merge settings changed"
    if last["base"] != now.base:
        return "full", "the base changed"
    before = [(s["name"], s["pin"], json.dumps(s["params"], sort_keys=True))
              for s in last["sources"]]
    after = [(s["name"], s["pin"], json.dumps(s["params"], sort_keys=True))
             for s in now.sources]
    if before == after:
        return "skipped", "no source changed"
    old, new = {n: rest for n, *rest in before}, {n: rest for n, *rest in after}
    changed = [n for n in new if n in old and old[n] != new[n]]
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    what = "; ".join(f"{label} {', '.join(names)}" for label, names in
                     (("changed", changed), ("added", added), ("removed", removed)) if names)
    if after[:-1] == before and len(added) == 1:
        why_not = continual_method(now.doc) if allow_continual else "continual is off"
        if why_not is None:
            return "continual", what
        return "full", f"{what} ({why_not})"
    return "full", what


# ----------------------------------------------------------------------------- merging

def _step_doc(doc: dict, sources: list[dict], method_params: dict, output: str) -> dict:
    step = json.loads(json.dumps(doc))
    step["sources"] = sources
    step["merge"]["params"] = method_params
    step["output"]["uri"] = output
    return step


def _run(doc: dict, session: HeldRay | None) -> Any:
    from orchestrator.engine.job import resolve_config, run_job

    cfg = resolve_config(doc)
    if session is not None:
        session.hold(cfg.runtime)
    # an unpublished version may hold a finished merge of another plan from a dead tick
    return run_job(cfg, force=True)


def _continual(doc: dict, out: Store, previous: dict, version: int,
               session: HeldRay | None) -> Any:
    """Merge the one new model (the job's last source) into the previous version."""
    step = _continual_step(doc, len(previous["sources"]), previous.get("method_state") or {})
    prev = {"name": f"merged-v{previous['version']}", "uri": f"{out.uri}/v{previous['version']}"}
    new = dict(doc["sources"][-1])
    if step.previous is not None:
        prev["params"] = step.previous
    if step.new is not None:
        new["params"] = step.new
    return _run(_step_doc(doc, [prev, new], step.params, f"{out.uri}/v{version}"), session)


def tick(schedule: Schedule, lock_ttl: float, *, session: HeldRay | None = None,
         clock: Callable[[], float] = time.time) -> TickResult:
    """One tick of one schedule: lock, compare, merge if needed, publish, unlock. With ``session``,
    the merge runs on the Ray it holds (started for it if needed), which outlives the tick.
    ``clock``: the time the lock's expiry is judged by."""
    out = open_store(schedule.output)
    out.check_writable()
    lock = Lock(out, lock_ttl, clock=clock)
    holder = lock.acquire()
    if holder is not None:
        _log(f"[{schedule.name}] busy: {out.uri} is locked by {holder}; skipping this tick")
        return TickResult(schedule.name, "busy", None, f"locked by {holder}")
    try:
        with lock.kept_alive():
            return _locked_tick(schedule, out, lock, session)
    finally:
        lock.release()


def _locked_tick(schedule: Schedule, out: Store, lock: Lock,
                 session: HeldRay | None) -> TickResult:
    latest = read_latest(out)
    last = json.loads(out.read_bytes(latest["run"])) if latest else None
    now = _pin(schedule)
    action, reason = decide(now, last, schedule.continual)
    if action == "skipped":
        _log(f"[{schedule.name}] unchanged since v{latest['version']} ({reason}); skipped")
        return TickResult(schedule.name, action, latest["version"], reason)
    version = (latest["version"] if latest else 0) + 1
    record = {"version": version, "action": action, "reason": reason, "status": "running",
              "started": _now(), "owner": lock.owner, "job": schedule.job,
              "method": now.doc["merge"]["method"], "config_key": now.config_key,
              "base": now.base, "sources": now.sources}
    out.write_bytes(_run_name(version), _json(record))
    _log(f"[{schedule.name}] v{version}: {action} merge ({reason})")
    start = time.monotonic()
    try:
        if action == "continual":
            result = _continual(now.doc, out, last, version, session)
        else:  # an OPCM job runs as one step per model, in source order
            result = _run(_step_doc(now.doc, now.doc["sources"], now.doc["merge"].get(
                "params", {}), f"{out.uri}/v{version}"), session)
        if result.kept_shards:
            _log(f"[{schedule.name}] v{version}: kept {result.kept_shards} intact shards of an "
                 "interrupted tick")
        if lock.lost.is_set():
            raise MergeError(f"{out.uri}: lost the lock during the merge (it expired; raise "
                             f"lock_ttl); v{version} is not published")
    except BaseException as e:
        record.update(status="failed", finished=_now(), error=f"{type(e).__name__}: {e}")
        out.write_bytes(_run_name(version), _json(record))
        raise
    manifest = result.manifest
    record.update(status="done", finished=_now(), seconds=round(time.monotonic() - start, 3),
                  plan_digest=manifest["plan_digest"], kept_shards=result.kept_shards)
    if "method_state" in manifest:
        record["method_state"] = manifest["method_state"]
    out.write_bytes(_run_name(version), _json(record))
    out.write_bytes(LATEST, _json({"version": version, "path": f"v{version}/",
                                   "run": _run_name(version), "published": _now()}))
    _log(f"[{schedule.name}] published v{version} in {record['seconds']:.1f}s")
    return TickResult(schedule.name, action, version, reason)


# ----------------------------------------------------------------------------- the loop

def due(schedule: Schedule, minute: datetime.datetime, last_fired: dict[str, Any],
        poll_interval: float, clock: float) -> bool:
    """Whether ``schedule`` ticks now: its cron matches this minute (once per minute), or it
    watches for changes and ``poll_interval`` seconds passed since its last check."""
    if schedule.cron is not None and schedule.cron.matches(minute) \
            and last_fired.get(("cron", schedule.name)) != minute:
        last_fired[("cron", schedule.name)] = minute
        return True
    if schedule.on_change and clock - last_fired.get(("poll", schedule.name), -1e18) \
            >= poll_interval:
        last_fired[("poll", schedule.name)] = clock
        return True
    return False


def run_schedules(file: ScheduleFile, *, once: bool = False,
                  only: str | None = None) -> list[TickResult]:
    """``--once``: one tick of every (or the ``only``) schedule now, results returned.
    Otherwise tick forever: cron schedules at their minutes (UTC), on_change ones every
    ``poll_interval``. A failed tick is logged and the loop goes on."""
    chosen = [s for s in file.schedules if only in (None, s.name)]
    if not chosen:
        raise ConfigError(f"{file.path}: no schedule named {only!r}; have "
                          f"{', '.join(s.name for s in file.schedules)}")
    with HeldRay() as session:  # one Ray for every tick: warm workers, no start-up per merge
        if once:
            return [tick(s, file.lock_ttl, session=session) for s in chosen]
        _log(f"scheduling {', '.join(s.name for s in chosen)} (Ctrl-C stops)")
        last_fired: dict[str, Any] = {}
        while True:
            now = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
            for s in chosen:
                if due(s, now, last_fired, file.poll_interval, time.monotonic()):
                    try:
                        tick(s, file.lock_ttl, session=session)
                    except Exception as e:  # noqa: BLE001 - a failed tick must not stop the rest
                        session.release()  # the next tick starts a fresh Ray, in case it was Ray's
                        _log(f"[{s.name}] tick failed: {type(e).__name__}: {e}",
                             logging.WARNING)
            time.sleep(until_due(chosen, datetime.datetime.now(datetime.timezone.utc),
                                 last_fired, file.poll_interval, time.monotonic()))


def until_due(schedules: list[Schedule], now: datetime.datetime, last_fired: dict[str, Any],
              poll_interval: float, clock: float) -> float:
    """Seconds until the next schedule is due: its next cron time, or its next poll (at least
    one second, so that a tick that ran into its own minute does not spin)."""
    waits = []
    for s in schedules:
        if s.cron is not None:
            waits.append((s.cron.next_after(now) - now).total_seconds())
        if s.on_change:
            waits.append(last_fired.get(("poll", s.name), clock) + poll_interval - clock)
    return max(1.0, min(waits))


def history(output: str, clock: Callable[[], float] = time.time) -> Iterator[str]:
    """Lines describing every run below ``output``, oldest first; the published one marked
    (a run whose lock expired by ``clock`` without finishing is "interrupted")."""
    out = open_store(output)
    latest = read_latest(out)
    runs = read_runs(out)
    if not runs:
        yield f"{out.uri}: no runs yet"
        return
    held = out.read_versioned(LOCK)
    lock = json.loads(held[0]) if held else {}
    for r in runs:
        status = r["status"]
        if status == "running" and not (lock.get("owner") == r.get("owner")
                                        and float(lock.get("expires", 0)) > clock()):
            status = "interrupted"
        mark = "*" if latest and latest["version"] == r["version"] else " "
        took = f"{r['seconds']:.1f}s" if "seconds" in r else "-"
        models = ", ".join(s["name"] for s in r["sources"])
        line = (f"{mark} v{r['version']:<4} {status:<11} {r['action']:<9} {r['method']:<15} "
                f"{r['started']}  {took:>8}  {len(r['sources'])} models ({models}): "
                f"{r['reason']}")
        if r.get("error"):
            line += f"\n      error: {r['error']}"
        yield line
