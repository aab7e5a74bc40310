"""The scheduler's pure parts: cron, schedules files, due ticks, decisions, the local lock."""

import datetime
import json
import multiprocessing
import time

import pytest
import yaml

from orchestrator.engine.lock import Lock
from orchestrator.errors import ConfigError
from orchestrator.ops import cron, schedule
from workers.io.storage import open_store

UTC = datetime.timezone.utc


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_cron_fields_steps_ranges_and_day_rules():
    nightly = cron.parse("0 3 * * *")
    assert nightly.matches(at("2026-11-23T03:00")) and not nightly.matches(at("2026-11-23T03:01"))
    every = cron.parse("*/15 8-17 * * 1-5")
    assert every.matches(at("2026-11-23T08:45"))  # a Monday
    assert not every.matches(at("2026-11-22T08:45"))  # Sunday
    assert not every.matches(at("2026-11-23T08:50"))
    sundays = cron.parse("0 0 * * 7")
    assert sundays.matches(at("2026-11-22T00:00"))
    either = cron.parse("0 0 1 * 1")  # the 1st of the month OR a Monday (Vixie cron)
    assert either.matches(at("2026-12-01T00:00")) and either.matches(at("2026-11-23T00:00"))
    assert not either.matches(at("2026-11-24T00:00"))
    assert cron.parse("5,10 * * * *").minutes == {5, 10}


def test_cron_names_macros_and_next_fire_time():
    """Names and macros as Kubernetes CronJobs take them; the loop sleeps until the next fire
    time instead of waking every minute."""
    weekdays = cron.parse("30 6 * * MON-FRI")
    assert weekdays.matches(at("2026-11-23T06:30")) and not weekdays.matches(at("2026-11-22T06:30"))
    assert cron.parse("0 0 1 JAN *").matches(at("2027-01-01T00:00"))
    daily = cron.parse("@daily")
    assert daily.matches(at("2026-11-23T00:00")) and not daily.matches(at("2026-11-23T03:00"))
    assert daily.next_after(at("2026-11-23T03:10")) == at("2026-11-24T00:00")
    assert cron.parse("*/15 * * * *").next_after(at("2026-11-23T08:46")) == at("2026-11-23T09:00")
    assert daily.fields == "0 0 * * *" and weekdays.fields == "30 6 * * MON-FRI"  # manifests


@pytest.mark.parametrize("text, message", [
    ("0 3 * *", "expected 5 fields"), ("61 * * * *", "values must lie in 0-59"),
    ("0 3 * * FOO", "not a cron expression"), ("*/0 * * * *", "steps >= 1"),
    ("0 0 3 * * *", "5 fields"), ("@sometimes", "not a cron expression"),
    ("0 0 L * *", r"\(L\)"), ("0 0 * * 1#2", "1#2")])  # croniter's, not Kubernetes'
def test_cron_errors_name_the_field(text, message):
    with pytest.raises(ConfigError, match=message):
        cron.parse(text, "schedules[0].cron")


def write(tmp_path, doc, job=True):
    if job:
        (tmp_path / "job.yaml").write_text("merge: {method: linear}\n")
    path = tmp_path / "schedules.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_schedules_file_loads_with_defaults(tmp_path):
    path = write(tmp_path, {"schedules": [
        {"name": "a", "job": "job.yaml", "output": "s3://b/a/", "cron": "0 3 * * *"},
        {"name": "b-2", "job": "job.yaml", "output": "out", "on_change": True,
         "continual": False}], "lock_ttl": "30m", "poll_interval": 90})
    file = schedule.load_schedules(path)
    assert file.lock_ttl == 1800 and file.poll_interval == 90
    a, b = file.schedules
    assert a.output == "s3://b/a" and a.cron.text == "0 3 * * *" and a.continual
    assert b.cron is None and b.on_change and not b.continual
    assert a.job == str(tmp_path / "job.yaml")


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "job": "job.yaml", "output": "o"}, "cron expression, on_change"),
    ({"name": "A_b", "job": "job.yaml", "output": "o", "cron": "* * * * *"}, "lowercase"),
    ({"name": "a", "job": "nope.yaml", "output": "o", "cron": "* * * * *"}, "does not exist"),
    ({"name": "a", "job": "job.yaml", "cron": "* * * * *"}, r"schedules\[0\]\.output: required"),
    ({"name": "a", "job": "job.yaml", "output": "o", "on_change": "yes"}, "true or false"),
    ({"name": "a", "job": "job.yaml", "output": "o", "cron": "* * * * *", "every": 3},
     "unknown keys"),
])
def test_schedules_file_errors_name_the_key(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        schedule.load_schedules(write(tmp_path, {"schedules": [entry]}))


def test_schedules_file_top_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="non-empty 'schedules' list"):
        schedule.load_schedules(write(tmp_path, {"schedules": []}))
    entry = {"name": "a", "job": "job.yaml", "output": "o", "on_change": True}
    with pytest.raises(ConfigError, match="lock_ttl: 'soon' is not a duration"):
        schedule.load_schedules(write(tmp_path, {"schedules": [entry], "lock_ttl": "soon"}))
    with pytest.raises(ConfigError, match="must be unique"):
        schedule.load_schedules(write(tmp_path, {"schedules": [entry, entry]}))


def test_due_fires_cron_once_per_minute_and_polls_on_change(tmp_path):
    path = write(tmp_path, {"schedules": [
        {"name": "c", "job": "job.yaml", "output": "o", "cron": "0 3 * * *"},
        {"name": "p", "job": "job.yaml", "output": "o", "on_change": True}]})
    c, p = schedule.load_schedules(path).schedules
    fired = {}
    assert schedule.due(c, at("2026-11-23T03:00"), fired, 300, 0)
    assert not schedule.due(c, at("2026-11-23T03:00"), fired, 300, 10)  # same minute
    assert not schedule.due(c, at("2026-11-23T03:01"), fired, 300, 70)
    assert schedule.due(p, at("2026-11-23T03:00"), fired, 300, 0)
    assert not schedule.due(p, at("2026-11-23T03:04"), fired, 300, 299)
    assert schedule.due(p, at("2026-11-23T03:05"), fired, 300, 300)


def test_the_loop_sleeps_until_the_next_due_schedule(tmp_path):
    path = write(tmp_path, {"poll_interval": "10m", "schedules": [
        {"name": "c", "job": "job.yaml", "output": "o", "cron": "0 3 * * *"},
        {"name": "p", "job": "job.yaml", "output": "o", "on_change": True}]})
    c, p = schedule.load_schedules(path).schedules
    now = at("2026-11-23T02:58")
    assert schedule.until_due([c], now, {}, 600, 0) == 120
    assert schedule.until_due([c, p], now, {("poll", "p"): 0}, 600, 590) == 10
    assert schedule.until_due([c], at("2026-11-23T03:00"), {}, 600, 0) == 24 * 3600


def pinned(sources, method="opcm", key="k", base="b", **merge):
    doc = {"merge": {"method": method, "params": merge},
           "sources": [{"name": n, "params": {}} for n, _ in sources]}
    return schedule._Pinned(key, base, [{"name": n, "pin": p, "params": {}} for n, p in sources],
                           doc)


def test_decide_skips_updates_continually_or_remerges():
    last = {"config_key": "k", "base": "b",
            "sources": [{"name": "a", "pin": "1", "params": {}},
                        {"name": "b", "pin": "2", "params": {}}]}
    assert schedule.decide(pinned([("a", "1"), ("b", "2")]), None, True)[0] == "full"
    assert schedule.decide(pinned([("a", "1"), ("b", "2")]), last, True) == (
        "skipped", "no source changed")
    assert schedule.decide(pinned([("a", "1"), ("b", "2"), ("c", "3")]), last, True) == (
        "continual", "added c")
    action, why = schedule.decide(pinned([("a", "1"), ("b", "2"), ("c", "3")]), last, False)
    assert action == "full" and "continual is off" in why
    assert schedule.decide(pinned([("a", "1"), ("b", "9")]), last, True) == ("full", "changed b")
    assert schedule.decide(pinned([("b", "2"), ("a", "1"), ("c", "3")]), last, True)[0] == "full"
    assert schedule.decide(pinned([("a", "1")]), last, True) == ("full", "removed b")
    assert schedule.decide(pinned([("a", "1"), ("b", "2")], key="k2"), last, True) == (
        "full", "the merge settings changed")
    assert schedule.decide(pinned([("a", "1"), ("b", "2")], base="b2"), last, True) == (
        "full", "the base changed")
    action, why = schedule.decide(pinned([("a", "1"), ("b", "2"), ("c", "3")], method="ties"),
                                 last, True)
    assert action == "full" and "cannot add a model" in why
    tied = pinned([("a", "1"), ("b", "2"), ("c", "3")], method="task_arithmetic", scale=[0, 1])
    assert "gradients" in schedule.decide(tied, last, True)[1]


def _contend(root: str, ttl: float, results) -> None:
    results.put(Lock(open_store(root), ttl).acquire() is None)


def test_local_lock_one_winner_among_processes_and_expiry(tmp_path):
    """Four processes race for a fresh lock: exactly one gets it. An expired lock is taken
    over; a released one too; renewing a lock someone else took fails."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), 60, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(results.get(timeout=5) for _ in procs) == [False, False, False, True]
    store = open_store(str(tmp_path / "other"))
    now = [time.time()]
    a, b = Lock(store, 0.3, clock=lambda: now[0]), schedule.Lock(store, 60, clock=lambda: now[0])
    assert a.acquire() is None and "until" in b.acquire()
    now[0] += 0.4
    assert b.acquire() is None
    assert not a.renew() and json.loads(store.read_bytes("lock"))["owner"] == b.owner
    b.release()
    assert Lock(store, 60).acquire() is None
