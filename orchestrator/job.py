"""One merge job from config to committed output: ``run_job`` is what ``raymerge run`` calls."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass

from orchestrator import hub
from orchestrator.commit import MANIFEST, commit, read_manifest, read_progress, write_progress
from orchestrator.config import JobConfig, apply_overrides, config_from_dict, load_config
from orchestrator.errors import ConfigError, MergeError
from orchestrator.hub import is_hub_uri
from orchestrator.index import CheckpointIndex, index_checkpoint
from orchestrator.plan import Plan, make_plan, reference_member
from orchestrator.schedule import ray_session, run_plan
from orchestrator.storage import LocalStore, Store, open_store
from orchestrator.taskaware import MASKS
from orchestrator.vocab import build as build_vocabulary
from workers.merge import get_method
from workers.tasks import ShardRecord, TaskContext


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
                   output: str | None = None) -> JobConfig:
    """A typed config from a YAML path (native or mergekit), a plain dict, or a JobConfig."""
    if isinstance(config, str):
        return load_config(config, list(overrides), output)
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
            output: str | None = None, force: bool = False, quiet: bool = False) -> JobResult:
    """Merge as configured and commit the output; the Python twin of ``raymerge run``.

    A finished output of the same plan is left as it is (``skipped``). A finished output of a
    different plan is refused unless ``force``; then its manifest is removed first, so an
    interrupted re-run can never pass for finished.
    """
    start = time.monotonic()
    cfg = resolve_config(config, overrides, output)
    spec = get_method(cfg.merge.method)
    if spec.models_for is not None and spec.models_for(dict(cfg.merge.params)) is None \
            and len(cfg.sources) > 1:
        return _run_sequence(cfg, force, quiet)
    if spec.alignment:
        from orchestrator.align import prepare
        phase = "align"
    elif spec.statistics:
        from orchestrator.datastats import prepare
        phase = "data_stats"
    elif spec.dynamic:
        from orchestrator.dynamic import prepare
        phase = "training"
    elif spec.masks is not None:
        return _run_task_aware(cfg, force, quiet, start)
    else:
        return _run(cfg, {}, force, quiet, start, {})
    with ray_session(cfg.runtime):  # statistics, solves and merge share one Ray
        cfg, extra_files = prepare(cfg, open_store(cfg.output.uri), quiet)
        return _run(cfg, extra_files, force, quiet, start, {phase: time.monotonic() - start})


def _run_task_aware(cfg: JobConfig, force: bool, quiet: bool, start: float) -> JobResult:
    """A task-aware method (tall, emr): its per-task masks first, as a checkpoint of packed
    masks in ``OUTPUT/masks/`` (committed by its own manifest), then the unified model, whose
    manifest lists the masks' manifest: the output is finished only when both are."""
    masks_out = f"{cfg.output.uri.rstrip('/')}/{MASKS}"
    masks_cfg = dataclasses.replace(cfg, output=dataclasses.replace(
        cfg.output, uri=masks_out, dtype=None, push_to_hub=None))
    with ray_session(cfg.runtime):
        masks = _run(masks_cfg, {}, force, quiet, start, {}, masks=True)
        manifest = open_store(masks_out).read_bytes(MANIFEST)
        return _run(cfg, {f"{MASKS}/{MANIFEST}": manifest}, force, quiet, start,
                    {"masks": masks.seconds})


def _run(cfg: JobConfig, extra_files: dict[str, bytes], force: bool, quiet: bool,
         start: float, timings: dict[str, float], masks: bool = False) -> JobResult:
    """Plan, merge and commit (``timings``: what ran before, e.g. the alignment solve);
    with ``masks``, a task-aware method's masks instead of the merge."""
    planning = time.monotonic()
    plan, indexes, stores, tokenizer_files = plan_job(cfg, masks)
    timings = {**timings, "plan": time.monotonic() - planning}
    out = open_store(cfg.output.uri)
    for src in plan.sources:
        if _overlaps(src.uri, out.uri):
            raise ConfigError(f"output.uri: {out.uri} overlaps source {src.name!r} "
                              f"({src.uri}); refusing to write where inputs are read")
    out.check_writable()
    existing = read_manifest(out)
    if existing is not None:
        if existing.get("plan_digest") == plan.digest():
            return JobResult(out.uri, existing, plan, True, time.monotonic() - start, timings)
        if not force:
            raise MergeError(
                f"{out.uri} already holds a finished merge of a different plan "
                f"({existing.get('method')}, digest {str(existing.get('plan_digest'))[:12]}); "
                "choose another output or pass --force to replace it"
            )
        out.remove(MANIFEST)
    kept = read_progress(out, plan)
    if kept and not quiet:
        print(f"resuming: {len(kept)} of {len(plan.units)} shards of an interrupted run are "
              "intact and kept", file=sys.stderr)
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
                                on_record=record_progress, quiet=quiet)
    timings.update(run_timings)
    committing = time.monotonic()
    order = {u.shard: u.index for u in plan.units}
    records = sorted([*kept.values(), *new], key=lambda r: order[r.shard])
    manifest = commit(plan, cfg, records, indexes, stores, out, tokenizer_files, method_state,
                      extra_files)
    timings["commit"] = time.monotonic() - committing
    if cfg.output.push_to_hub:
        pushing = time.monotonic()
        url = hub.push(out.uri, cfg.output.push_to_hub,
                       f"raymerge {plan.method} merge (plan {plan.digest()[:12]})")
        timings["push"] = time.monotonic() - pushing
        if not quiet:
            print(f"pushed to {url}", file=sys.stderr)
    return JobResult(out.uri, manifest, plan, False, time.monotonic() - start, timings,
                     len(kept))


def _run_sequence(cfg: JobConfig, force: bool, quiet: bool) -> JobResult:
    """A continual method (OPCM) over K models: K steps in source order, each merging one
    model into the previous step's output (kept in OUTPUT.steps/ until the last step is done)."""
    from omegaconf import OmegaConf

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
        step["output"]["uri"] = final if last else f"{final}.steps/step-{i + 1}"
        if not quiet:
            print(f"[opcm] step {i + 1}/{len(doc['sources'])}: {src['name']}", file=sys.stderr)
        result = run_job(step, force=force or not last, quiet=quiet)
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


def _overlaps(a: str, b: str) -> bool:
    """Whether one location contains the other (same folder, or one below the other)."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)
