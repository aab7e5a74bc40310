"""Run a Plan: the only module that touches Ray.

Each work unit becomes one Ray task running ``workers.tasks.merge_unit``; the shared context is
``ray.put`` once; tasks in flight are capped at the number of workers with ``ray.wait``, so
memory is bounded by workers x unit size whatever the number or size of models. R-stage methods
first run their statistics passes (``collect_unit`` on every unit, summed on the driver, then
``reduce``). The ``local`` executor runs the same task bodies in this process, without Ray: the
reference that Ray results are compared with.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from orchestrator.config.schema import RuntimeConfig
from orchestrator.errors import ClusterError, PlanError, WorkerError
from orchestrator.planning.plan import PROCESS_BYTES, Plan, WorkUnit, format_bytes
from workers.io.s3 import storage_env, storage_secrets
from workers.merge import get_method
from workers.tasks import ShardRecord, TaskContext, collect_unit, merge_unit

log = logging.getLogger(__name__)


def run_plan(plan: Plan, ctx: TaskContext, runtime: RuntimeConfig, *,
             done: frozenset[str] = frozenset(),
             on_record: Callable[[ShardRecord], None] | None = None
             ) -> tuple[list[ShardRecord], dict[str, float], dict | None]:
    """Run the statistics passes (if any), then every unit whose shard is not in ``done``.

    ``on_record`` sees each shard record as soon as its unit finishes (the job keeps resume
    state with it). Returns the new records, in unit order, the seconds spent starting Ray,
    in statistics passes and in the merge itself, and the method's ``report`` of its reduced
    statistics (None for methods without one). Statistics partials are summed as they
    arrive, so the driver holds one running total per group, not one partial per unit.
    """
    todo = [u for u in plan.units if u.shard not in done]
    executor = _RayExecutor(runtime) if runtime.executor == "ray" else _LocalExecutor()
    timings = {}
    start = time.monotonic()
    with executor:
        timings["ray_start"] = time.monotonic() - start
        if isinstance(executor, _RayExecutor):
            check_fits(plan.units, executor.node_memory(), runtime)
        start = time.monotonic()
        states: dict[int, Any] = {}
        spec = get_method(plan.method)
        reports = hasattr(spec.stats, "report")
        if plan.stats_groups and (todo or reports):
            stat_units = [u for u in plan.units if any(i.stats_group >= 0 for i in u.items)]
            for p in range(spec.stats.passes):
                label = f"statistics {p + 1}/{spec.stats.passes}"
                totals: dict[int, Any] = {}
                per_tensor: dict[int, dict[int, Any]] = {}
                for _, part in executor.imap(collect_unit, stat_units, (ctx, p, states),
                                             _Progress(label, stat_units)):
                    for (g, slot), value in part.items():  # integer counts: any order is exact
                        if slot >= 0:
                            per_tensor.setdefault(g, {})[slot] = value
                        else:
                            totals[g] = value if g not in totals else totals[g] + value
                for g, parts in per_tensor.items():  # one partial per tensor, in plan order
                    totals[g] = [parts[s] for s in range(plan.stats_groups[g].n_tensors)]
                states = {g: spec.stats.reduce(p, totals[g], plan.stats_groups[g].params,
                                               states.get(g))
                          for g in totals}
        timings["statistics"] = time.monotonic() - start
        start = time.monotonic()
        finished = []
        for unit, record in executor.imap(merge_unit, todo, (ctx, states),
                                          _Progress("merge", todo)):
            if on_record is not None:
                on_record(record)
            finished.append((unit.index, record))
        records = [record for _, record in sorted(finished, key=lambda ir: ir[0])]
        timings["merge"] = time.monotonic() - start
    report = spec.stats.report(states[0]) if reports and states else None
    return records, timings, report


_SESSIONS: list[list] = []  # open ray_sessions, innermost last: the executor that started Ray


@contextmanager
def ray_session(runtime: RuntimeConfig) -> Iterator[None]:
    """One Ray for several phases of a job, started by the first phase that uses it (so the
    driver's checks before it fail without starting Ray) and shut down when the session
    ends; the executors inside find it running and leave it up. Nothing for the local
    executor."""
    if runtime.executor != "ray":
        yield
        return
    started: list = []
    _SESSIONS.append(started)
    try:
        yield
    finally:
        _SESSIONS.remove(started)
        for executor in started:
            executor.shut_down()


class HeldRay:
    """One Ray kept up across the jobs of a long-running process (``raymerge schedule``).

    A job finds it running and leaves it up, so from the second job on neither Ray nor its
    workers start again: the workers of earlier jobs serve, torch, numba and the compiled
    loops already loaded (about 4 s of a job on two cores, more than the merge itself for
    small models). A job whose runtime asks for another Ray (address, number of workers) gets
    a new one; ``release`` shuts the held one down (after a failure: the next job starts
    afresh)."""

    def __init__(self):
        self._key: tuple | None = None
        self._executor: _RayExecutor | None = None

    def hold(self, runtime: RuntimeConfig) -> None:
        """Make sure the Ray ``runtime`` asks for is up (nothing for the local executor)."""
        if runtime.executor != "ray":
            return
        key = (runtime.address, runtime.num_workers)
        if key == self._key:
            return
        self.release()
        executor = _RayExecutor(runtime).__enter__()
        self._executor, self._key = executor, key

    def release(self) -> None:
        executor, self._executor, self._key = self._executor, None, None
        if executor is not None:
            executor.__exit__(None, None, None)

    def __enter__(self) -> HeldRay:
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def run_tasks(fn: Callable, items: Sequence[Any], args: tuple, runtime: RuntimeConfig, *,
              label: str) -> list[Any]:
    """``fn(item, *args)`` for every item, as Ray tasks (or in-process with the local
    executor); results in item order. For work other than merge units (alignment statistics)."""
    return fold_tasks(fn, items, args, runtime, lambda done, _, result: done + [result], [],
                      label=label)


def fold_tasks(fn: Callable, items: Sequence[Any], args: tuple, runtime: RuntimeConfig,
               fold: Callable[[Any, Any, Any], Any], state: Any, *, label: str) -> Any:
    """``fn(item, *args)`` for every item, each result folded into ``state`` as
    ``state = fold(state, item, result)`` in item order (whatever order tasks finish in), as
    soon as the results before it are folded: the driver keeps only results waiting for a
    slower predecessor, not all of them."""
    executor = _RayExecutor(runtime) if runtime.executor == "ray" else _LocalExecutor()
    position = {item: i for i, item in enumerate(items)}  # items are distinct and hashable
    waiting: dict[int, Any] = {}
    folded = 0
    with executor:
        for item, result in executor.imap(fn, items, args, _Progress(label, items)):
            waiting[position[item]] = result
            while folded in waiting:
                state = fold(state, items[folded], waiting.pop(folded))
                folded += 1
    return state


class _LocalPool:
    def __init__(self, objects: list[Any]):
        self.objects = objects

    def call(self, i: int, method: str, *args: Any) -> Any:
        return getattr(self.objects[i], method)(*args)

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(o, method)(*args) for o in self.objects]


class _RayPool:
    def __init__(self, actors: list[Any]):
        self.actors = actors

    def call(self, i: int, method: str, *args: Any) -> Any:
        import ray

        return ray.get(getattr(self.actors[i], method).remote(*args))

    def call_all(self, method: str, *args: Any) -> list[Any]:
        import ray

        refs = [ray.put(a) for a in args]
        return ray.get([getattr(a, method).remote(*refs) for a in self.actors])


@contextmanager
def actor_pool(cls: type, init_args: Sequence[tuple], runtime: RuntimeConfig) -> Iterator[Any]:
    """One stateful worker per ``init_args`` entry (Ray actors, one CPU each; in-process
    objects with the local executor): ``pool.call(i, method, *args)`` on one,
    ``pool.call_all(method, *args)`` on all, results in worker order (e.g. a data-parallel
    training loop driven from here)."""
    if runtime.executor != "ray":
        yield _LocalPool([cls(*a) for a in init_args])
        return
    import ray
    from ray.exceptions import RayError

    with _RayExecutor(runtime):
        secrets = _secrets_ref(runtime)
        if secrets is not None:
            cls, init_args = _with_secrets_class(cls), [(secrets, *a) for a in init_args]
        remote = ray.remote(num_cpus=runtime.threads_per_worker, **_task_env())(cls)
        actors = [remote.remote(*a) for a in init_args]
        try:
            yield _RayPool(actors)
        except RayError as e:
            raise WorkerError(f"a worker of {cls.__name__} failed: {e}") from None
        finally:
            for actor in actors:
                ray.kill(actor)


def pool_size(runtime: RuntimeConfig, wanted: int) -> int:
    """How many workers a pool of at most ``wanted`` gets: 1 in-process, else one per worker,
    no more than the running cluster has CPUs for, ``threads_per_worker`` each (an actor
    waiting for CPUs would wait forever)."""
    if runtime.executor != "ray":
        return 1
    import ray

    slots = (_slots(runtime) if ray.is_initialized()
             else (os.cpu_count() or 1) // runtime.threads_per_worker)
    return max(1, min(wanted, runtime.num_workers or slots, slots))


def _slots(runtime: RuntimeConfig) -> int:
    """Tasks of ``threads_per_worker`` CPUs each that the running cluster's live nodes hold
    at once, node by node (a task cannot span nodes)."""
    import ray

    per_node = [int(n["Resources"].get("CPU", 0)) // runtime.threads_per_worker
                for n in ray.nodes() if n.get("Alive")]
    return max(1, sum(per_node))


def memory_request(unit: WorkUnit) -> int:
    """The ``memory`` a unit's task asks Ray for: the plan's working-set estimate and what the
    worker process holds besides."""
    return unit.peak_bytes + PROCESS_BYTES


def check_fits(units: Sequence[WorkUnit], node_memory: Sequence[float],
               runtime: RuntimeConfig) -> None:
    """Refuse, before any task runs, a unit whose memory estimate no node offers: Ray would
    keep such a task waiting forever."""
    largest = max(node_memory, default=0)
    big = max(units, key=lambda u: u.peak_bytes, default=None)
    if big is not None and largest and memory_request(big) > largest:
        raise PlanError(
            f"work unit {big.index} (output shard {big.shard}) needs about "
            f"{format_bytes(memory_request(big))} of memory ({format_bytes(big.peak_bytes)} "
            f"working set and a worker process), more than any node of the cluster "
            f"offers (the largest: {format_bytes(largest)}); lower runtime.worker_memory (now "
            f"{runtime.worker_memory}) so that units read less at once, or add a node with "
            "more memory")


class _Progress:
    """Units done, bytes read, rate and ETA, logged at most about once a second."""

    def __init__(self, label: str, units: Sequence[WorkUnit]):
        self.label = label
        self.total_units = len(units)
        self.total_bytes = sum(getattr(u, "input_bytes", 0) for u in units)
        self.done_units = self.done_bytes = 0
        self.start = self.last = time.monotonic()

    def update(self, unit: WorkUnit) -> None:
        self.done_units += 1
        self.done_bytes += getattr(unit, "input_bytes", 0)
        now = time.monotonic()
        quiet = not log.isEnabledFor(logging.INFO)
        if quiet or (now - self.last < 1 and self.done_units < self.total_units):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        if not self.total_bytes:  # tasks that read no checkpoint bytes (alignment solves)
            eta = elapsed / self.done_units * (self.total_units - self.done_units)
            log.info(f"[{self.label}] {self.done_units}/{self.total_units} tasks  "
                     f"elapsed {elapsed:.1f}s  ETA {eta:.0f}s")
            return
        rate = self.done_bytes / elapsed
        eta = (self.total_bytes - self.done_bytes) / rate if rate > 0 else 0
        log.info(f"[{self.label}] {self.done_units}/{self.total_units} units  "
                 f"{format_bytes(self.done_bytes)}/{format_bytes(self.total_bytes)}  "
                 f"{format_bytes(rate)}/s  elapsed {elapsed:.1f}s  ETA {eta:.0f}s")


def _unit_failed(unit: Any, cause: object) -> WorkerError:
    if isinstance(cause, BaseException) and not isinstance(cause, RuntimeError):
        cause = f"{type(cause).__name__}: {cause}"  # RuntimeErrors of tasks name the tensor
    if not isinstance(unit, WorkUnit):
        return WorkerError(f"task {unit!r} failed: {cause}")
    return WorkerError(f"work unit {unit.index} (output shard {unit.shard}) failed: {cause}")


class _LocalExecutor:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn: Callable, units: Sequence[WorkUnit], args: tuple,
             progress: _Progress) -> Iterator[tuple[WorkUnit, Any]]:
        for unit in units:
            try:
                result = fn(unit, *args)
            except Exception as e:
                raise _unit_failed(unit, e) from e
            progress.update(unit)
            yield unit, result


def _cancel(refs: list) -> None:
    """Cancel the tasks still running (a failure elsewhere, Ctrl-C): only those not finished
    (a force-cancel racing a task's completion or retry can abort Ray's core worker), each on
    its own so one refusal does not keep the others running."""
    import ray

    if not refs:
        return
    try:
        _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
    except Exception:  # Ray is going down already: nothing left to cancel
        return
    for ref in running:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # finished meanwhile, or its worker is already gone
            pass


@contextmanager
def _lean_head() -> Iterator[None]:
    """A head node started meanwhile runs neither Ray's API server nor its autoscaler monitor.
    The head starts an API server even with ``include_dashboard=False`` (a dashboard process
    loading only the usage-stats module) and ``ray.init`` waits until it is up (0.7 s); the
    monitor ignores SIGTERM long enough that ``ray.shutdown`` waits 1 s before killing it. The
    embedded cluster is one fixed node serving this process alone, which uses no dashboard, job
    submission or autoscaling. A Ray without these hooks (``Node.start_api_server``,
    ``Node.start_monitor``: Ray 2.40-2.60) starts as usual."""
    try:
        from ray._private.node import Node
    except ImportError:
        Node = None
    saved = {name: getattr(Node, name) for name in ("start_api_server", "start_monitor")
             if hasattr(Node, name)}
    for name in saved:
        setattr(Node, name, lambda self, **kwargs: None)
    try:
        yield
    finally:
        for name, start in saved.items():
            setattr(Node, name, start)


_INHERITED: list[dict[str, str] | None] = [None]  # storage_env() when this process started Ray


def _task_env() -> dict[str, Any]:
    """``ray.remote`` options that bring this process's storage settings to the workers: none
    when they run on the embedded cluster this process started with the same settings (its
    workers inherit them, and the prestarted ones serve; a runtime_env would start new ones,
    about 1 s), else a runtime_env, which reaches the workers of any cluster."""
    env = storage_env()
    return {} if env == _INHERITED[0] else {"runtime_env": {"env_vars": env}}


def _secrets_ref(runtime: RuntimeConfig) -> Any:
    """With ``runtime.forward_credentials``, this process's credentials (``storage_secrets``)
    as one object in Ray's object store, for tasks and actors to set before they start: Ray
    logs runtime_envs and task specs, not object values. None when not asked for, or on the
    embedded cluster this process started (its workers inherit the environment)."""
    if not runtime.forward_credentials or _INHERITED[0] is not None:
        return None
    import ray

    return ray.put(storage_secrets())


def _with_secrets(unit: Any, fn: Callable, secrets: dict[str, str], *args: Any) -> Any:
    os.environ.update(secrets)
    return fn(unit, *args)


def _with_secrets_class(cls: type) -> type:
    class WithSecrets(cls):
        def __init__(self, secrets: dict[str, str], *args: Any):
            os.environ.update(secrets)
            super().__init__(*args)

    WithSecrets.__name__ = WithSecrets.__qualname__ = cls.__name__
    return WithSecrets


def _ray_level() -> int:
    """Ray's own driver log level: its start-up lines only with ``-v``."""
    return logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING


class _TokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


@contextmanager
def _quiet_start() -> Iterator[None]:
    """Drop Ray's notice that token authentication is on, when it starts the embedded cluster:
    that cluster listens on 127.0.0.1 only, and the notice would show on every run. Token
    authentication itself stays as Ray sets it."""
    notices = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _TokenNotice()
    notices.addFilter(notice)
    try:
        yield
    finally:
        notices.removeFilter(notice)


def shipped_packages() -> dict[str, Any]:
    """The runtime_env that brings raymerge's own packages (``orchestrator``, ``workers``;
    no tests or benchmarks) to a cluster, so that its nodes need only Ray and raymerge's
    dependencies; empty when this process runs from such a shipped copy already (a submitted
    job), whose tasks inherit it."""
    import workers.tasks

    # this file is orchestrator/engine/executor.py; the task bodies are workers/tasks.py
    folders = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               os.path.dirname(os.path.abspath(workers.tasks.__file__))]
    if any("runtime_resources" in f.split(os.sep) for f in folders):
        return {}
    return {"py_modules": folders, "excludes": ["__pycache__"]}


def _requirements() -> dict[str, tuple[str, str]]:
    """raymerge's own dependencies (no extras): distribution -> (its requirement, the module
    it provides), from this installation's metadata; empty when raymerge is not installed."""
    import importlib.metadata as metadata
    import re

    from packaging.requirements import Requirement

    try:
        wanted = [Requirement(r) for r in metadata.requires("raymerge") or []]
    except metadata.PackageNotFoundError:
        return {}
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    modules: dict[str, str] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:  # the module named like its distribution, else its first public one
            if norm(module) == norm(dist) or (norm(dist) not in modules
                                              and not module.startswith("_")):
                modules[norm(dist)] = module
    found = {}
    for r in wanted:
        module = modules.get(norm(r.name))
        if r.marker is None and module is not None:
            found[r.name] = (str(r), module)
    return found


def _check_nodes() -> None:
    """One probe per live node with CPUs: every dependency of raymerge imports there, in a
    version raymerge accepts; else one error naming the node, the package and the versions."""
    import ray
    from packaging.requirements import Requirement
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from workers.probe import installed

    wanted = _requirements()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not wanted or not nodes:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(installed)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote({d: m for d, (_, m) in wanted.items()}) for n in nodes]
    problems = []
    for node, found in zip(nodes, ray.get(refs)):
        where = f"node {node['NodeManagerAddress']} ({found['host']})"
        for dist, version in found["versions"].items():
            requirement = Requirement(wanted[dist][0])
            if version is None:
                problems.append(f"{where}: {dist} is not installed (raymerge needs "
                                f"{requirement})")
            elif version != "?" and not requirement.specifier.contains(version,
                                                                       prereleases=True):
                problems.append(f"{where}: {dist} {version} is installed, raymerge needs "
                                f"{requirement}")
    if problems:
        raise ClusterError("the cluster cannot run raymerge's tasks:\n  " + "\n  ".join(problems)
                           + "\ninstall these in the nodes' Python environment (the image "
                           "infra/Dockerfile builds has them all)")


class _RayExecutor:
    """Ray tasks, each asking for ``threads_per_worker`` CPUs and (merge and statistics units)
    the plan's memory estimate, so that Ray packs them per node; as many in flight as the
    cluster's nodes hold (at most ``num_workers``). Starts an embedded cluster if needed."""

    def __init__(self, runtime: RuntimeConfig):
        self.runtime = runtime
        self.started = False

    def __enter__(self):
        if not self.runtime.address:
            # An embedded cluster binds every service to 127.0.0.1 only in Ray's local-only mode
            # (its default on macOS and Windows); Ray reads the switch when it is first imported.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        if not ray.is_initialized():
            if self.runtime.address:
                ray.init(address=self.runtime.address, log_to_driver=True,
                         runtime_env=shipped_packages() or None)
                _check_nodes()
            else:
                # embedded: this machine only, bound to loopback, no dashboard
                # num_workers tasks of threads_per_worker CPUs each; by default the machine's
                cpus = (self.runtime.num_workers * self.runtime.threads_per_worker
                        if self.runtime.num_workers else os.cpu_count())
                with _lean_head(), _quiet_start():
                    ray.init(num_cpus=cpus,
                             include_dashboard=False, _node_ip_address="127.0.0.1",
                             log_to_driver=True, logging_level=_ray_level())
                _INHERITED[0] = storage_env()
            self.started = True
        slots = _slots(self.runtime)
        self.in_flight = min(self.runtime.num_workers, slots) if self.runtime.num_workers \
            else slots
        return self

    def node_memory(self) -> list[float]:
        """The ``memory`` resource of every live node (what tasks' requests are packed into)."""
        import ray

        return [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]

    def __exit__(self, *exc):
        if self.started and _SESSIONS:  # the job's session keeps it for its next phase
            _SESSIONS[-1].append(self)
        elif self.started:
            self.shut_down()
        return False

    def shut_down(self) -> None:
        import ray

        self.started = False
        ray.shutdown()
        _INHERITED[0] = None

    def imap(self, fn: Callable, units: Sequence[WorkUnit], args: tuple,
             progress: _Progress) -> Iterator[tuple[WorkUnit, Any]]:
        """(unit, result) in completion order, the largest units started first; on failure the
        remaining tasks are cancelled."""
        import ray
        from ray.exceptions import RayError, RayTaskError

        arg_refs = [ray.put(a) for a in args]
        secrets = _secrets_ref(self.runtime)
        if secrets is not None:  # the body runs after the credentials are set in the worker
            fn, arg_refs = _with_secrets, [ray.put(fn), secrets, *arg_refs]
        remote = ray.remote(num_cpus=self.runtime.threads_per_worker,
                            max_retries=self.runtime.max_retries, retry_exceptions=False,
                            **_task_env())(fn)
        # largest first (merge units by input bytes; others keep their order): a large unit
        # started last would run alone while the other workers idle
        order = sorted(range(len(units)), key=lambda i: -getattr(units[i], "input_bytes", 0))
        pending: dict = {}
        try:
            while order or pending:
                while order and len(pending) < self.in_flight:
                    i = order.pop(0)
                    sized = hasattr(units[i], "peak_bytes")  # merge and statistics units
                    task = remote.options(memory=memory_request(units[i])) if sized else remote
                    pending[task.remote(units[i], *arg_refs)] = i
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except RayTaskError as e:
                        raise _unit_failed(units[i], getattr(e, "cause", None) or e) from None
                    except RayError as e:
                        raise _unit_failed(units[i], f"{type(e).__name__}: {e}") from None
                    progress.update(units[i])
                    yield units[i], result
        finally:
            _cancel(list(pending))
