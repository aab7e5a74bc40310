"""One merge job from config to committed output: ``run_job`` is what ``raymerge run`` calls."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import logging
import os
import shutil
import time
from dataclasses import dataclass

from orchestrator.config.schema import JobConfig, apply_overrides, config_from_dict, load_config
from orchestrator.engine.commit import (
    MANIFEST,
    commit,
    damaged_files,
    output_metadata,
    read_manifest,
    read_progress,
    write_progress,
)
from orchestrator.engine.executor import ray_session, run_plan
from orchestrator.engine.guard import STEPS_SUFFIX, check_locations, check_output_folder
from orchestrator.engine.lock import output_lock
from orchestrator.errors import MergeError
from orchestrator.phases.task_aware import MASKS
from orchestrator.planning.plan import Plan, make_plan, reference_member
from orchestrator.planning.vocab import build as build_vocabulary
from workers.io import hub
from workers.io.hub import is_hub_uri
from workers.io.index import CheckpointIndex, index_checkpoint
from workers.io.storage import LocalStore, Store, open_store
from workers.merge import get_method
from workers.tasks import ShardRecord, TaskContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    output: str
    manifest: dict
    plan: Plan
    skipped: bool  # the output already held this exact merge
    seconds: float
    timings: dict[str, float]  # seconds per phase: (align or data_stats,) plan, ray_start,
    # statistics, merge, commit
    kept_shards: int = 0  # shards of an interrupted run that were intact and reused


def resolve_config(config: JobConfig | dict | str, overrides: list[str] = (),
                   output: str | None = None, *, output_required: bool = True) -> JobConfig:
    """A typed config from a YAML path (native or mergekit), a plain dict, or a JobConfig."""
    if isinstance(config, str):
        return load_config(config, list(overrides), output, output_required=output_required)
    if isinstance(config, JobConfig):
        if not overrides and output is None:
            return config
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.structured(config))
    doc = apply_overrides(config, list(overrides))
    if output is not None:
        doc.setdefault("output", {})["uri"] = output
    return config_from_dict(doc)


def plan_job(cfg: JobConfig,
             masks: bool = False) -> tuple[Plan, list[CheckpointIndex], list[Store], dict]:
    """Index every source (headers only), build the output tokenizer if one is asked for, and
    make the plan. Models first, then the base. Also returns the output's tokenizer files
    (empty: the reference's are copied)."""
    specs = list(cfg.sources) + ([cfg.base] if cfg.base is not None else [])
    stores, indexes = [], []
    for spec in specs:
        revision = None
        if is_hub_uri(spec.uri):
            store, revision = hub.resolve(spec.uri, cfg.hub.cache_dir, cfg.hub.offline)
        else:
            store = open_store(spec.uri)
        idx = index_checkpoint(spec.name, store, pin_content=cfg.pin_content)
        indexes.append(dataclasses.replace(idx, uri=spec.uri, revision=revision))
        stores.append(dataclasses.replace(store, pins=idx.pins))
    models = indexes[:len(cfg.sources)]
    base = indexes[len(cfg.sources)] if cfg.base is not None else None
    vocab = build_vocabulary(cfg, indexes, stores, reference_member(cfg))
    return (make_plan(cfg, models, base, vocab, masks), indexes, stores,
            vocab.files if vocab is not None else {})


def run_job(config: JobConfig | dict | str, overrides: list[str] = (), *,
            output: str | None = None, force: bool = False,
            wait_lock: bool = False, repair: bool = False, strict: bool = False) -> JobResult:
    """Merge as configured and commit the output; the Python twin of ``raymerge run``.

    Before anything is read: the output must not overlap any input, must be new, empty or a
    raymerge output (else ``force``), and is locked for the whole job (``wait_lock``: wait
    for a run that holds it). A finished output of the same plan is left as it is
    (``skipped``) once every listed file has its recorded size; a damaged one is an error, or
    (``repair``) its damaged shards are redone. A finished output of a different plan is
    refused unless ``force``; then its manifest is removed first, so an interrupted re-run can
    never pass for finished. Output tensors holding NaN or Inf are reported (with the inputs
    they came from) and recorded in the manifest; ``strict`` fails the job instead.
    """
    start = time.monotonic()
    cfg = resolve_config(config, overrides, output)
    check_locations(cfg)
    out = open_store(cfg.output.uri)
    check_output_folder(out, force or repair)
    job = job_document(cfg)
    with output_lock(out, wait=wait_lock):
        existing = read_manifest(out)
        if existing is not None and not force:
            _check_same_job(out, existing, job, repair)
        return _dispatch(cfg, _Options(force, repair, job, strict, _mergekit_file(config)),
                         start)


@dataclass(frozen=True)
class _Options:
    force: bool
    repair: bool
    job: dict  # the job as given (``job_document``), recorded in the manifest
    strict: bool = False  # NaN/Inf in the output fails the job
    files: dict = dataclasses.field(default_factory=dict)  # written next to the output, e.g.
    # the mergekit_config.yml an imported mergekit job keeps (the hub's convention)


MERGEKIT_CONFIG = "mergekit_config.yml"


def _mergekit_file(config: JobConfig | dict | str) -> dict[str, bytes]:
    """An imported mergekit config, as given, for ``mergekit_config.yml`` in the output."""
    import yaml

    from orchestrator.config.mergekit import is_mergekit

    if isinstance(config, str):
        with open(config, "rb") as f:
            text = f.read()
        doc = yaml.safe_load(text)
    elif isinstance(config, dict):
        doc = config
        text = yaml.safe_dump(config, sort_keys=False).encode()
    else:
        return {}
    return {MERGEKIT_CONFIG: text} if isinstance(doc, dict) and is_mergekit(doc) else {}


def job_document(cfg: JobConfig) -> dict:
    """The job as given, without what does not change the output's bytes (runtime) or names
    where it goes (output.uri): what a finished output's manifest is compared with."""
    from omegaconf import OmegaConf

    doc = OmegaConf.to_container(OmegaConf.structured(cfg))
    doc.pop("runtime", None)
    doc["output"].pop("uri", None)
    return doc


def _check_same_job(out: Store, existing: dict, job: dict, repair: bool) -> None:
    """Refuse, before any solve, training or read, an output finished by a different job."""
    recorded = existing.get("job")
    if recorded is None:
        return
    keys = sorted(_differing(_comparable(recorded), _comparable(job)))
    if not keys:
        return
    shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
    what = "cannot be repaired by" if repair else "was made by another job than"
    raise MergeError(f"{out.uri} holds a finished merge that {what} this one (they differ in "
                     f"{shown}); choose another output, or pass --force to replace it")


def _comparable(job: dict) -> dict:
    """The job without where its sources are found (their URIs, the hub settings): one source
    may be reached several ways (a hub branch or its commit, a cache or the hub itself); the
    pinned plan tells them apart later, by content."""
    job = copy.deepcopy(job)
    job.pop("hub", None)
    for src in job.get("sources") or []:
        src.pop("uri", None)
    if isinstance(job.get("base"), dict):
        job["base"].pop("uri", None)
    return job


def _differing(a: object, b: object, at: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b), key=str)
                for k in _differing(a.get(key), b.get(key), f"{at}.{key}" if at else str(key))]
    return [] if a == b else [at or "(the whole job)"]


def _dispatch(cfg: JobConfig, opts: _Options, start: float) -> JobResult:
    spec = get_method(cfg.merge.method)
    if spec.sequential(dict(cfg.merge.params), len(cfg.sources)):
        return _run_sequence(cfg, opts)
    if spec.phase == "task_masks":
        return _run_task_aware(cfg, opts, start)
    if spec.phase is None:
        return _run(cfg, {}, opts, start, {})
    module, timing = _PHASES[spec.phase]
    prepare = importlib.import_module(module).prepare
    with ray_session(cfg.runtime):  # statistics, solves and merge share one Ray
        cfg, extra_files = prepare(cfg, open_store(cfg.output.uri))
        return _run(cfg, extra_files, opts, start, {timing: time.monotonic() - start})


# a method's preparation phase (MethodSpec.phase): the module whose ``prepare(cfg, out)``
# returns the config the merge runs with and the files it writes (imported on use: alignment
# pulls in scipy and POT), and the name of its timing
_PHASES = {
    "align": ("orchestrator.phases.align", "align"),
    "statistics": ("orchestrator.phases.statistics", "data_stats"),
    "training": ("orchestrator.phases.dynamic", "training"),
}


def _run_task_aware(cfg: JobConfig, opts: _Options, start: float) -> JobResult:
    """A task-aware method (tall, emr): its per-task masks first, as a checkpoint of packed
    masks in ``OUTPUT/masks/`` (committed by its own manifest), then the unified model, whose
    manifest lists the masks' manifest: the output is finished only when both are."""
    masks_out = f"{cfg.output.uri.rstrip('/')}/{MASKS}"
    masks_cfg = dataclasses.replace(cfg, output=dataclasses.replace(
        cfg.output, uri=masks_out, dtype=None, push_to_hub=None))
    with ray_session(cfg.runtime):
        masks = _run(masks_cfg, {}, opts, start, {}, masks=True)
        manifest = open_store(masks_out).read_bytes(MANIFEST)
        return _run(cfg, {f"{MASKS}/{MANIFEST}": manifest}, opts, start,
                    {"masks": masks.seconds})


def _run(cfg: JobConfig, extra_files: dict[str, bytes], opts: _Options,
         start: float, timings: dict[str, float], masks: bool = False) -> JobResult:
    """Plan, merge and commit (``timings``: what ran before, e.g. the alignment solve);
    with ``masks``, a task-aware method's masks instead of the merge."""
    planning = time.monotonic()
    extra_files = {**opts.files, **extra_files}
    plan, indexes, stores, tokenizer_files = plan_job(cfg, masks)
    timings = {**timings, "plan": time.monotonic() - planning}
    metadata = output_metadata(plan, cfg, stores, tokenizer_files, extra_files)
    out = open_store(cfg.output.uri)
    existing = read_manifest(out)
    if existing is not None:
        if existing.get("plan_digest") == plan.digest():
            damaged = damaged_files(out, existing, full=opts.repair)
            if not damaged:
                return JobResult(out.uri, existing, plan, True, time.monotonic() - start,
                                 timings)
            if not opts.repair:
                raise MergeError(
                    f"{out.uri} holds this merge but it is damaged ({_listed(damaged)}); "
                    f"redo only the damaged shards with: raymerge verify --repair {out.uri}")
            log.info(f"repairing {out.uri}: {_listed(damaged)}")
            listed = {f["file"] for f in existing["files"]} - set(damaged)
            if MERGEKIT_CONFIG in listed - set(extra_files):  # the job as first given
                extra_files[MERGEKIT_CONFIG] = out.read_bytes(MERGEKIT_CONFIG)
            write_progress(out, plan, [ShardRecord(s["file"], s["bytes"], s["sha256"],
                                                   s["tensors"], s.get("nonfinite", {}))
                                       for s in existing["shards"] if s["file"] not in damaged])
        elif opts.repair:
            raise MergeError(
                f"{out.uri}: its sources or settings changed since it was merged (plan "
                f"{str(existing.get('plan_digest'))[:12]}, now {plan.digest()[:12]}), so the "
                "recorded merge cannot be rebuilt; re-run the job with --force to replace it")
        elif not opts.force:
            raise MergeError(
                f"{out.uri} already holds a finished merge of a different plan "
                f"({existing.get('method')}, digest {str(existing.get('plan_digest'))[:12]}); "
                "choose another output or pass --force to replace it"
            )
        out.remove(MANIFEST)
    kept, changes = read_progress(out, plan)
    if changes:
        log.info("not resuming the interrupted run: its inputs changed since ("
                         + "; ".join(changes) + "); every shard is merged again")
    if kept:
        log.info(f"resuming: {len(kept)} of {len(plan.units)} shards of an "
                         "interrupted run are intact and kept")
    finished = list(kept.values())

    def record_progress(record: ShardRecord) -> None:
        finished.append(record)
        write_progress(out, plan, finished)

    for name, data in extra_files.items():  # what the merge tasks read, and the method's
        # other files (commit lists them)
        out.write_bytes(name, data)
    ctx = TaskContext(
        stores=tuple(stores), output=out, source_names=plan.source_names,
        compute_dtype=cfg.compute_dtype, seed=cfg.seed, threads=cfg.runtime.threads_per_worker,
    )
    new, run_timings, method_state = run_plan(plan, ctx, cfg.runtime, done=frozenset(kept),
                                              on_record=record_progress)
    timings.update(run_timings)
    committing = time.monotonic()
    order = {u.shard: u.index for u in plan.units}
    records = sorted([*kept.values(), *new], key=lambda r: order[r.shard])
    _report_nonfinite(out, records, opts)
    manifest = commit(plan, cfg, records, indexes, out, metadata, method_state, extra_files,
                      job=opts.job)
    timings["commit"] = time.monotonic() - committing
    if cfg.output.push_to_hub:
        pushing = time.monotonic()
        url = hub.push(out.uri, cfg.output.push_to_hub,
                       f"raymerge {plan.method} merge (plan {plan.digest()[:12]})")
        timings["push"] = time.monotonic() - pushing
        log.info(f"pushed to {url}")
    return JobResult(out.uri, manifest, plan, False, time.monotonic() - start, timings,
                     len(kept))


def _report_nonfinite(out: Store, records: list[ShardRecord], opts: _Options) -> None:
    """Say which output tensors hold NaN or Inf and which inputs they came from (the
    manifest records them too); with ``strict``, fail instead of committing."""
    found = {name: counts for r in records for name, counts in r.nonfinite.items()}
    if not found:
        return
    lines = [f"{name}: {c['output']} in the output; "
             + (", ".join(f"{src} {n}" for src, n in c["inputs"].items()) or "none in any input")
             for name, c in found.items()]
    shown = "\n  ".join(lines[:20]) + (f"\n  and {len(lines) - 20} more" if len(lines) > 20
                                       else "")
    if opts.strict:
        raise MergeError(f"{len(found)} output tensors hold NaN/Inf entries (--strict):\n  "
                         f"{shown}\nno manifest was written; fix or leave out the inputs named")
    log.warning(f"{len(found)} tensors of {out.uri} hold NaN/Inf entries (listed in the "
                f"manifest; --strict makes this an error):\n  {shown}")


def _listed(damaged: dict[str, str]) -> str:
    items = [f"{name}: {why}" for name, why in damaged.items()]
    return "; ".join(items[:5]) + (f"; and {len(items) - 5} more" if len(items) > 5 else "")


def _run_sequence(cfg: JobConfig, opts: _Options) -> JobResult:
    """A continual method (OPCM) over K models: K steps in source order, each merging one
    model into the previous step's output (kept in OUTPUT.steps/ until the last step is done)."""
    from omegaconf import OmegaConf

    if opts.repair:
        raise MergeError(f"{cfg.output.uri}: a continual merge over {len(cfg.sources)} models "
                         "is rebuilt step by step, not shard by shard; re-run the job with "
                         "--force to redo it")
    start = time.monotonic()
    doc = OmegaConf.to_container(OmegaConf.structured(cfg))
    final = cfg.output.uri.rstrip("/")
    previous, state, steps = None, {}, []
    for i, src in enumerate(doc["sources"]):
        last = i == len(doc["sources"]) - 1
        step = copy.deepcopy(doc)
        step["sources"] = [src] if previous is None else [
            {"name": f"step-{i}", "uri": previous, "params": {}}, src]
        step["merge"]["params"] = {**doc["merge"]["params"], **state}
        step["output"]["uri"] = final if last else f"{final}{STEPS_SUFFIX}/step-{i + 1}"
        log.info(f"[opcm] step {i + 1}/{len(doc['sources'])}: {src['name']}")
        # the steps are written under the final output's lock
        step_opts = dataclasses.replace(opts, force=opts.force or not last)
        result = _dispatch(resolve_config(step), step_opts, time.monotonic())
        state = result.manifest["method_state"]
        previous = step["output"]["uri"]
        steps.append(previous)
    for uri in steps[:-1]:
        _clear(uri)
    return dataclasses.replace(result, seconds=time.monotonic() - start)


def _clear(uri: str) -> None:
    store = open_store(uri)
    if isinstance(store, LocalStore):
        shutil.rmtree(store.root, ignore_errors=True)
        with contextlib.suppress(OSError):  # the .steps folder, once empty
            os.rmdir(os.path.dirname(store.root))
        return
    for name in store.list_files():
        store.remove(name)
