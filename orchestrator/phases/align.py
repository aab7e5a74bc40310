"""Alignment merges (weight_matching, activation_matching, ot_fusion, zipit, mudsc, pleas):
solve, then merge.

Before the usual merge, the driver builds the alignment spec from the first model's tensors
and config.json, gathers what the method needs (both models' weights for weight matching; for
the activation methods, the statistics of every group over the job's ``data``, one Ray task per
batch, summed in batch order so the result does not depend on the number of workers), solves
the groups' transforms and writes them to ``OUTPUT/raymerge-align/transforms.safetensors``.
Statistics are kept in ``OUTPUT/raymerge-align/`` too, keyed by models, data and settings, so a
re-run (another method, other params) skips the pass.
The merge tasks then compute each tensor from both models' values and those transforms, and
each source's ``align.heads`` tensors, moved into the merged units, go to
``heads/<source>.safetensors``. OT fusion's optional fine-tune and PLeaS compute the merged
model here instead (Ray tasks) and the merge tasks copy its tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import uuid

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from orchestrator.config.schema import JobConfig
from orchestrator.engine.executor import actor_pool, fold_tasks, pool_size, run_tasks
from orchestrator.errors import ConfigError, PlanError
from orchestrator.phases.data import head_names, model_ref, open_data, read_config
from workers.align import spec as specs
from workers.align.match import (
    ActivationStats,
    _members_of,
    activation_matching,
    colored_descent,
    colors,
    weight_matching,
)
from workers.align.mudsc import mudsc_perm, mudsc_zip
from workers.align.ot import moved as ot_moved
from workers.align.ot import weight_plans
from workers.align.transforms import (
    MatchWorker,
    SolveContext,
    StatsContext,
    dump,
    merge_with,
    solve_task,
    stats_task,
)
from workers.align.transforms import load as load_alignment
from workers.align.zip import head
from workers.io.index import index_checkpoint
from workers.io.safetensors_io import read_tensor
from workers.io.storage import Store, open_store
from workers.merge import get_method
from workers.merge.registry import internal_fields
from workers.models import ModelRef, checkpoint_names, read_state
from workers.threads import torch_threads

log = logging.getLogger(__name__)

TRANSFORMS = "raymerge-align/transforms.safetensors"


def _save_stats(sets: list[dict[str, ActivationStats]]) -> bytes:
    tensors = {}
    for i, stats in enumerate(sets):
        for g, st in stats.items():
            tensors.update({f"{i}/{g}/shift": st.shift, f"{i}/{g}/sum": st.sum,
                            f"{i}/{g}/outer": st.outer,
                            f"{i}/{g}/n": torch.tensor([st.n, st.size], dtype=torch.int64)})
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()})


def _load_stats(data: bytes, joint: bool) -> list[dict[str, ActivationStats]]:
    """``joint``: each set holds all models (equal widths), else a pair (the second may be
    wider)."""
    tensors = load_safetensors(data)
    sets: dict[int, dict[str, ActivationStats]] = {}
    for key in tensors:
        if not key.endswith("/n"):
            continue
        i, g = key[:-2].split("/", 1)
        n, size = tensors[key].tolist()
        total = len(tensors[f"{i}/{g}/sum"])
        st = (ActivationStats(size, total // size) if joint
              else ActivationStats(size, other=total - size))
        st.n, st.shift = n, tensors[f"{i}/{g}/shift"]
        st.sum, st.outer = tensors[f"{i}/{g}/sum"], tensors[f"{i}/{g}/outer"]
        sets.setdefault(int(i), {})[g] = st
    return [sets[i] for i in sorted(sets)]


def statistics(cfg: JobConfig, spec: specs.Spec, refs: tuple[ModelRef, ...],
               joint: bool = False, cache: Store | None = None):
    """Per model after the first: the statistics of every group, paired with the first; or
    (``joint``) one set of all models' statistics per group. With ``cache`` (the output
    store), statistics of the same models, data, spec and settings are read back from
    ``raymerge-align/stats-<key>.safetensors`` instead of recomputed."""
    data = open_data(cfg.data)
    ctx = StatsContext(refs, spec, data.store, data.file, data.info, data.input_name,
                       cfg.data.batch_size, data.samples, cfg.runtime.threads_per_worker, joint)
    key = hashlib.sha256(json.dumps(
        [[r.key for r in refs], [(g.name, g.size, [dataclasses.astuple(p) for p in g.probes])
                                 for g in spec.groups],
         data.pin, cfg.data.batch_size, cfg.runtime.threads_per_worker, joint],
        sort_keys=True, default=str).encode())
    cached = f"raymerge-align/stats-{key.hexdigest()[:24]}.safetensors"
    if cache is not None and cache.exists(cached):
        log.info(f"activation statistics: reusing {cache.path(cached)}")
        sets = _load_stats(cache.read_bytes(cached), joint)
        return sets[0] if joint else sets
    batches = list(range(math.ceil(data.samples / cfg.data.batch_size)))

    def add(total, _batch, part):  # in batch order: the same sums whatever ran where
        part = [part] if joint else part
        if total is None:
            return part
        for pair, more in zip(total, part):
            for g, s in more.items():
                pair[g].add(s)
        return total

    total = fold_tasks(stats_task, batches, (ctx,), cfg.runtime, add, None,
                       label="activation statistics")
    if cache is not None:
        cache.check_writable()
        cache.write_bytes(cached, _save_stats(total))
    return total[0] if joint else total


def prepare(cfg: JobConfig, out: Store) -> tuple[JobConfig, dict[str, bytes]]:
    """Solve the alignment; return the config whose params point at the transforms file (to
    be written to ``out`` before the merge) and the output files it adds (the transforms and
    each source's heads). Torch's thread count is pinned as in the tasks, so the bits do not
    depend on the machine the driver runs on."""
    with torch_threads(cfg.runtime.threads_per_worker):
        return _prepare(cfg, out)


def _prepare(cfg: JobConfig, out: Store) -> tuple[JobConfig, dict[str, bytes]]:
    method = get_method(cfg.merge.method)
    stores = [open_store(s.uri) for s in cfg.sources]
    indexes = [index_checkpoint(s.name, st) for s, st in zip(cfg.sources, stores)]
    configs = [read_config(st, s.name) for s, st in zip(cfg.sources, stores)]
    shapes = [{n: loc.info.shape for n, loc in idx.tensors.items()
               if loc.info.dtype in ("F16", "BF16", "F32", "F64")} for idx in indexes]
    name = cfg.merge.method
    try:
        spec = specs.build(shapes[0], configs[0])
        for src, other, config in zip(cfg.sources[1:], shapes[1:], configs[1:]):
            if other == shapes[0]:
                continue
            if not method.any_widths or set(other) != set(shapes[0]):
                raise PlanError(f"{name}: {src.name} must have the tensors and shapes of "
                                f"{cfg.sources[0].name} (other widths: ot_fusion only)")
            _same_heads(spec, specs.build(other, config), src.name, cfg.sources[0].name)
    except specs.SpecError as e:
        raise PlanError(f"{name}: {e}") from None
    refs = tuple(model_ref(i, st, c) for i, st, c in zip(indexes, stores, configs))
    params = dict(cfg.merge.params)
    hidden = internal_fields(method.params)
    p = method.params(**{k: v for k, v in params.items() if k not in hidden})
    # (the params' demands on the models and inputs are checked with the config)
    how = method.alignment
    solver = how.solver_for(params)
    zipped = how.zips(dataclasses.asdict(p))
    joint = how.joint and len(refs) > 2  # one zip over every model's units
    stop = getattr(p, "stop", -1)
    try:
        solved, kept = specs.partial(spec, stop) if stop >= 0 else (None, [])
    except specs.SpecError as e:
        raise ConfigError(f"merge.params.stop: {e}") from None
    if cfg.align.heads:  # a pattern picking no tensor fails now, not after the solve
        head_names(cfg, sorted(shapes[0]))
    if cfg.data is not None:  # the inputs' file and tensor, before any statistics task
        open_data(cfg.data)
    colored = getattr(p, "schedule", "") == "colors"  # weight matching steps on workers
    reads = how.reads_for(params)
    states = ([read_state(r) for r in refs]
              if reads in ("weights", "dual") and not colored else [])
    stats = (statistics(cfg, spec, refs, joint, cache=out)
             if reads in ("activations", "dual") else [])
    stats = [stats] if joint else stats
    if solver == "transport_chain":  # one group after the other, on the driver
        plans = [weight_plans(spec, states[0], state, solver=p.solver, reg=p.reg,
                              spec_b=specs.build(other, config))
                 for state, other, config in zip(states[1:], shapes[1:], configs[1:])]
        done = _solved(cfg, spec, refs, shapes[0], out, {}, [q for _, q in plans],
                       [t for t, _ in plans])
        return _finetuned(cfg, refs, out, *done, p) if p.finetune_steps else done
    zips: dict = {}
    perms = []  # per model after the first: aligned to the first
    if solver == "refit":
        return _pleas(cfg, spec, refs, shapes[0], configs[0], stats[0], p, out)
    if solver == "groups":  # independent solves: one Ray task each
        done = _solved(cfg, spec, refs, shapes[0], out,
                       *_groups_on_ray(cfg, spec, stats, p, how.unit, solved,
                                       len(refs) if joint else 0), kept=kept)
        if getattr(p, "finetune_steps", 0):
            return _finetuned(cfg, refs, out, *done, p)
        return done
    for i in range(1, len(refs)):
        a, b = (states[0], states[i]) if states else (None, None)
        pair = stats[i - 1] if stats else None
        if solver == "coordinate_descent":
            found, history = (
                _colored_on_ray(cfg, spec, refs[0], refs[i], p.max_sweeps) if colored
                else weight_matching(spec, a, b, max_sweeps=p.max_sweeps, seed=cfg.seed))
            log.info(f"weight matching {cfg.sources[i].name}: {len(history)} sweeps, "
                     f"objective {history[-1]:.6g}")
        elif zipped:  # pairwise (MuDSC): a zip, or a permutation
            zips, found = mudsc_zip(spec, a, b, pair, f=p.f, alpha=p.alpha, beta=p.beta,
                                    max_sweeps=p.max_sweeps, seed=cfg.seed, solved=solved)
        else:
            found = mudsc_perm(spec, a, b, pair, f=p.f, max_sweeps=p.max_sweeps,
                               seed=cfg.seed)
        perms.append(found)
    return _solved(cfg, spec, refs, shapes[0], out, zips, perms, kept=kept)


FINETUNED = "raymerge-align/finetuned.safetensors"
FITTED = "raymerge-align/pleas.safetensors"


def _pleas(cfg: JobConfig, spec: specs.Spec, refs: tuple[ModelRef, ...], shapes: dict,
           config: dict, stats: dict, p, out: Store
           ) -> tuple[JobConfig, dict[str, bytes]]:
    """PLeaS for transformers: residual stream and heads matched by activations and averaged,
    each block's MLP partially matched to ``p.width`` x n units and refitted by least squares
    on the merged model's own activations, block by block (two rounds per block: the layers
    producing the MLP units, then the one reading them; each round one Ray task per data
    batch, sums added in batch order). With one Linear head in ``align.heads``, a last round
    refits it for each source to that source's own outputs on the merged features. Writes the
    fitted model (``FITTED``) and its config.json (the new intermediate_size)."""
    from workers.align.pleas import PleasContext, partial_matching, pleas_task, solve_gram

    if "intermediate_size" not in config:
        raise ConfigError(f"pleas: {cfg.sources[0].name}'s config.json has no "
                          "intermediate_size (the merged MLP width is written there)")
    mlps = [g for g in spec.groups if g.name.startswith("mlp.")]
    width = int(round(p.width * mlps[0].size))
    perms = activation_matching(spec, stats)
    solved, files = _solved(cfg, spec, refs, shapes, out, {}, [perms])
    alignment = load_alignment(files[TRANSFORMS])
    state_a, state_b = (read_state(r) for r in refs)
    resized: dict[str, tuple[int, ...]] = {}
    for g in mlps:  # the MLP tensors are fitted below; zeros of the merged width until then
        for m in g.members:
            shape = list(shapes[m.tensor])
            shape[m.dim] = width
            resized[m.tensor] = tuple(shape)
    state = {n: torch.zeros(resized[n], dtype=torch.float32) if n in resized
             else merge_with(alignment, [v, state_b[n]], n).float() if v.is_floating_point()
             else v for n, v in state_a.items()}
    new_config = {**config, "intermediate_size": width}
    data = open_data(cfg.data)
    batches = list(range(math.ceil(data.samples / cfg.data.batch_size)))

    def add(total, _batch, part):  # in batch order: the same sums on any number of workers
        return part if total is None else [t + s for t, s in zip(total, part)]

    run = uuid.uuid4().hex  # names this job's rounds (workers keep one merged model each)
    for g in mlps:
        block = int(g.name.split(".")[1])
        ups = [m.tensor for m in g.members if not m.consumes and m.tensor.endswith(".weight")]
        down = next(m.tensor for m in g.members if m.consumes)
        a_to, b_to = partial_matching(stats[g.name].correlation(), width)
        for stage, fitted in (("up", ups), ("down", [down])):
            ctx = PleasContext(refs, new_config, data.task_input, cfg.data.batch_size, block,
                               stage, a_to, b_to, perms["residual"], width,
                               cfg.runtime.threads_per_worker, f"{run}-{block}-{stage}")
            sums = fold_tasks(pleas_task, batches, (ctx, state), cfg.runtime, add, None,
                              label=f"pleas block {block} {stage}")
            for weight, cross in zip(fitted, sums[1:]):
                bias = weight[:-len("weight")] + "bias"
                w, b = solve_gram(sums[0], cross, p.ridge, bias=bias in state)
                state[weight] = w.float()
                if b is not None:
                    state[bias] = b.float()
    dtypes = {n: v.dtype for n, v in state_a.items()}
    heads = sorted({n.rsplit(".", 1)[0] for n in head_names(cfg, sorted(shapes))})
    if len(heads) == 1 and f"{heads[0]}.weight" in state:  # one Linear head: refitted to
        # each model's own outputs on the merged features (the last PLeaS round)
        ctx = PleasContext(refs, new_config, data.task_input, cfg.data.batch_size, 0, "head",
                           a_to, b_to, perms["residual"], width,
                           cfg.runtime.threads_per_worker, f"{run}-head", heads[0])
        sums = fold_tasks(pleas_task, batches, (ctx, state), cfg.runtime, add, None,
                          label="pleas heads")
        weight, bias = f"{heads[0]}.weight", f"{heads[0]}.bias"
        for i, (src, cross) in enumerate(zip(cfg.sources, sums[1:])):
            w, b = solve_gram(sums[0], cross, p.ridge, bias=bias in state)
            own = {weight: w} | ({bias: b} if b is not None else {})
            files[f"heads/{src.name}.safetensors"] = save_safetensors(
                {k: v.to(dtypes[k]).contiguous() for k, v in own.items()},
                metadata={"format": "pt"})
            if i == 0:  # the body holds the first source's head
                state.update({k: v.float() for k, v in own.items()})
    data_bytes = save_safetensors({n: v.to(dtypes[n]).contiguous() for n, v in
                                   sorted(state.items()) if v.is_floating_point()},
                                  metadata={"format": "pt"})
    changed = {n: list(s) for n, s in sorted(resized.items()) if s != tuple(shapes[n])}
    location = f"{out.uri}/{FITTED}#{hashlib.sha256(data_bytes).hexdigest()}"
    merge = dataclasses.replace(solved.merge, params={
        **solved.merge.params, "fitted": location, "shapes": json.dumps(changed)})
    files = {**files, FITTED: data_bytes,
             "config.json": (json.dumps(new_config, indent=2) + "\n").encode()}
    return dataclasses.replace(solved, merge=merge), files


def _finetuned(cfg: JobConfig, refs: tuple[ModelRef, ...], out: Store, solved: JobConfig,
               files: dict[str, bytes], p) -> tuple[JobConfig, dict[str, bytes]]:
    """OT fusion's distillation fine-tune: one Ray task builds the fused model from the
    models and the solved transforms, trains it on ``data`` against the parents' logits and
    returns its tensors, written to ``FINETUNED``; the merge then takes every float tensor
    from there."""
    from workers.align.finetune import FinetuneContext, finetune_task

    heads = tuple(load_safetensors(files[f"heads/{s.name}.safetensors"]) for s in cfg.sources
                  if f"heads/{s.name}.safetensors" in files)
    ctx = FinetuneContext(refs, load_alignment(files[TRANSFORMS]), heads,
                          open_data(cfg.data).task_input, p.finetune_steps, p.finetune_lr,
                          cfg.data.batch_size, cfg.seed, cfg.runtime.threads_per_worker)
    try:
        tensors, losses = run_tasks(finetune_task, [0], (ctx,), cfg.runtime,
                                    label="distillation fine-tune")[0]
    except ValueError as e:  # a model without logits, or no transformers architecture
        raise ConfigError(f"merge.params.finetune_steps: {e}") from None
    floats = {n for n, _, info in refs[0].tensors if info.dtype in ("F16", "BF16", "F32", "F64")}
    missing = sorted(floats - set(tensors))
    if missing:
        raise PlanError(f"fine-tune: the trained model has no tensor {missing[0]!r} (renamed "
                        f"by transformers in a way raymerge cannot map back)")
    log.info(f"distillation fine-tune: {len(losses)} steps, loss {losses[0]:.4g} -> "
             f"{losses[-1]:.4g}")
    data = save_safetensors({k: v.contiguous() for k, v in sorted(tensors.items())},
                            metadata={"format": "pt"})
    location = f"{out.uri}/{FINETUNED}#{hashlib.sha256(data).hexdigest()}"
    merge = dataclasses.replace(solved.merge, params={**solved.merge.params,
                                                      "finetuned": location})
    return dataclasses.replace(solved, merge=merge), {**files, FINETUNED: data}


def _same_heads(spec: specs.Spec, other: specs.Spec, name: str, first: str) -> None:
    """Models of other widths: the same groups, attention heads of the same sizes."""
    if [g.name for g in other.groups] != [g.name for g in spec.groups]:
        raise PlanError(f"{name}: its alignment groups differ from {first}'s")
    for g in spec.groups:
        if g.head_dim is not None and other.group(g.name).size != g.size:
            raise PlanError(f"{name}: attention group {g.name} has {other.group(g.name).size} "
                            f"dims, {first} {g.size}: only MLP and residual widths may differ")


def _colored_on_ray(cfg: JobConfig, spec: specs.Spec, a: ModelRef, b: ModelRef,
                    max_sweeps: int) -> tuple[dict, list[float]]:
    """Weight matching with ``schedule: colors``: each class's groups stepped at once, spread
    over workers that hold both models (the driver holds neither); the same permutations
    whatever the number of workers."""
    widest = max(len(c) for c in colors(spec))
    count = pool_size(cfg.runtime, widest)
    inits = [(spec, a, b, cfg.runtime.threads_per_worker, i, count) for i in range(count)]
    with actor_pool(MatchWorker, inits, cfg.runtime) as pool:
        def steps(names: list[str], perms: dict) -> dict:
            found: dict = {}
            for part in pool.call_all("steps", names, perms):
                found.update(part)
            return found

        return colored_descent(spec, steps, lambda perms: pool.call(0, "objective", perms),
                               max_sweeps=max_sweeps, seed=cfg.seed)


def _groups_on_ray(cfg: JobConfig, spec: specs.Spec, stats: list, p, free: str,
                   solved: dict[str, str] | None, joint: int = 0) -> tuple[dict, list, list]:
    """Activation matching / ZipIt! / OT fusion: every (model, group) solve is independent of
    the others (statistics come from the original models), so each is a Ray task. With
    ``solved`` (partial zipping), only those groups. ``joint``: K models' joint statistics
    (K-model zip): each zipped group is one task over all models, each permuted group one
    per model after the first."""
    groups = [g for g in spec.groups if solved is None or g.name in solved]
    permuted = frozenset(k for k, v in (solved or {}).items() if v == "perm")
    others = joint - 1 if joint else len(stats)
    items = [(i, g.name) for i in range(others) for g in groups
             if not (joint and i and g.head_dim is None and g.name not in permuted)]
    ctx = SolveContext(spec, tuple(stats), free, getattr(p, "alpha", 0.0),
                       getattr(p, "beta", 0.0), cfg.runtime.threads_per_worker,
                       getattr(p, "solver", "emd"), getattr(p, "reg", 0.05), permuted,
                       bool(joint))
    results = run_tasks(solve_task, items, (ctx,), cfg.runtime, label="alignment solve")
    zips: dict = {}
    perms: list[dict] = [{} for _ in range(others)]
    plans: list[dict] = [{} for _ in stats] if free == "plan" else []
    for (i, name), (kind, result) in zip(items, results):
        if kind == "zip":
            zips[name] = result
        elif kind == "plan":
            plans[i][name] = result
        else:
            perms[i][name] = result
    return zips, perms, plans


def _solved(cfg: JobConfig, spec: specs.Spec, refs: tuple[ModelRef, ...], shapes: dict,
            out: Store, zips: dict, perms: list, plans: list = (),
            kept: list[str] = ()) -> tuple[JobConfig, dict[str, bytes]]:
    """The transforms file, the heads (``align.heads`` and, partial zipping, the layers each
    model keeps), and the config pointing at them."""
    params = dict(cfg.merge.params)
    picked = set(head_names(cfg, sorted(shapes))) | set(kept)
    heads = [n for n in sorted(shapes) if n in picked]
    data = dump(spec, zips, perms, heads, plans)
    files = {TRANSFORMS: data}
    if heads:
        for i, (src, ref) in enumerate(zip(cfg.sources, refs)):
            state = {n: read_tensor(ref.store, f, info) for n, f, info in ref.tensors
                     if n in heads}
            if plans and i > 0:  # OT fusion: moved by the transport plans
                touching = _members_of(spec)
                moved = {n: ot_moved(state[n], touching.get(n, []), plans[i - 1],
                                     perms[i - 1]).to(state[n].dtype) for n in heads}
            else:
                moved = head(spec, state, i, heads, zips, perms[i - 1] if i else {})
            files[f"heads/{src.name}.safetensors"] = save_safetensors(
                {k: v.contiguous() for k, v in moved.items()},
                metadata={"format": "pt"})  # one key: safetensors orders keys by hash
    location = f"{out.uri}/{TRANSFORMS}#{hashlib.sha256(data).hexdigest()}"
    merge = dataclasses.replace(cfg.merge, params={**params, "transforms": location})
    return dataclasses.replace(cfg, merge=merge), files


class MultiHead(torch.nn.Module):
    """A merged body with every source's head: ``forward(**inputs)`` returns
    ``{source: logits}``. Each head is swapped in for one forward pass with
    ``torch.func.functional_call`` (the body runs once per head)."""

    def __init__(self, model: torch.nn.Module, heads: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, **inputs) -> dict[str, torch.Tensor]:
        from torch.func import functional_call

        return {name: functional_call(self.model, params, args=(), kwargs=inputs).logits
                for name, params in self.heads.items()}


def load_multihead(folder: str) -> MultiHead:
    """The output of an alignment merge with ``align.heads`` (or a partial zip) as a ready
    multi-head module: the body loaded with transformers (``config.json``'s architecture, no
    remote code), each source's head (and kept layers) from ``heads/<source>.safetensors``,
    in file-name order."""
    import transformers
    from safetensors.torch import load_file

    heads_dir = os.path.join(folder, "heads")
    if not os.path.isdir(heads_dir):
        raise ConfigError(f"{folder}: no heads/ folder (merge with align.heads set)")
    with open(os.path.join(folder, "config.json")) as f:
        arch = (json.load(f).get("architectures") or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise ConfigError(f"{folder}: config.json names no transformers architecture ({arch!r})")
    model = cls.from_pretrained(folder).eval()
    names = set(dict(model.named_parameters()))
    # heads are saved under checkpoint names, which transformers may rename on load
    loaded_as = {ckpt: name for name, ckpt in checkpoint_names(model).items()}
    heads = {}
    for file in sorted(os.listdir(heads_dir)):
        if file.endswith(".safetensors"):
            state = {loaded_as.get(k, k): v
                     for k, v in load_file(os.path.join(heads_dir, file)).items()}
            unknown = sorted(set(state) - names)
            if unknown:
                raise ConfigError(f"{heads_dir}/{file}: {unknown[:3]} are not parameters of "
                                  f"{arch}")
            heads[file[:-len(".safetensors")]] = state
    return MultiHead(model, heads)
