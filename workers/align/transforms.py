"""The solved alignment of a job as one safetensors file, and what workers do with it.

The driver solves the groups' transforms (permutations, zip matrices) and writes them with the
spec's member lists to the output store; each merge task reads that file once per process and
computes its tensors from both models' values (``merged``). ``stats_task`` is the statistics
pass of one data batch: both original models' forward passes with the spec's probes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from workers.align import spec as specs
from workers.align.match import _members_of, _step, objective
from workers.align.ot import fuse
from workers.align.spec import Group, Member, Spec
from workers.align.zip import Zip, _term, merge_tensor
from workers.models import ModelRef, build_models, read_batch, read_state
from workers.threads import torch_threads


def dump(spec: Spec, zips: Mapping[str, Zip], perms: list[Mapping[str, torch.Tensor]],
         heads: list[str], plans: list[Mapping[str, torch.Tensor]] = ()) -> bytes:
    """``perms``: for each model after the first, its groups' permutations (zips: 2 models);
    ``plans``: likewise its free groups' transport plans (OT fusion)."""
    tensors = {f"{g}/perm": torch.stack([p[g] for p in perms]).contiguous()
               for g in (perms[0] if perms else {})}
    tensors.update({f"{g}/plan": torch.stack([p[g] for p in plans]).contiguous()
                    for g in (plans[0] if plans else {})})
    for g, (m, u) in zips.items():
        tensors[f"{g}/merge"], tensors[f"{g}/unmerge"] = m.contiguous(), u.contiguous()
    meta = {"family": spec.family, "heads": heads, "groups": {
        g.name: {"size": g.size, "head_dim": g.head_dim, "within": g.within,
                 "members": [[m.tensor, m.dim, m.repeat, m.consumes] for m in g.members]}
        for g in spec.groups}}
    return save_safetensors(tensors, metadata={"raymerge_alignment": json.dumps(meta)})


@dataclass(frozen=True)
class Alignment:
    touching: dict[str, list[tuple[Group, Member]]]
    zips: dict[str, Zip]
    perms: list[dict[str, torch.Tensor]]  # per model after the first
    heads: frozenset[str]
    plans: list[dict[str, torch.Tensor]]  # per model after the first (OT fusion; else empty)


def load(data: bytes) -> Alignment:
    tensors = load_safetensors(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["raymerge_alignment"])
    touching: dict[str, list[tuple[Group, Member]]] = {}
    for name, g in meta["groups"].items():
        members = tuple(Member(t, d, r, c) for t, d, r, c in g["members"])
        group = Group(name, g["size"], members, g["head_dim"], g["within"])
        for m in members:
            touching.setdefault(m.tensor, []).append((group, m))
    zips = {k[:-len("/merge")]: (v, tensors[k[:-len("/merge")] + "/unmerge"])
            for k, v in tensors.items() if k.endswith("/merge")}
    stacked = {k[:-len("/perm")]: v for k, v in tensors.items() if k.endswith("/perm")}
    planned = {k[:-len("/plan")]: v for k, v in tensors.items() if k.endswith("/plan")}
    models = len(next(iter({**stacked, **planned}.values()))) if stacked or planned else 1
    perms = [{g: v[i] for g, v in stacked.items()} for i in range(models)]
    plans = [{g: v[i] for g, v in planned.items()} for i in range(models)] if planned else []
    return Alignment(touching, zips, perms, frozenset(meta["heads"]), plans)


def _read(location: str) -> bytes:
    """``location`` is ``URI#sha256`` of a file the driver wrote (the sha is checked)."""
    import hashlib
    import os

    from workers.io.storage import open_store

    uri, _, sha = location.rpartition("#")
    folder, name = os.path.split(uri.rstrip("/"))
    data = open_store(folder).read_bytes(name)
    if hashlib.sha256(data).hexdigest() != sha:
        raise ValueError(f"{uri} changed after the alignment was solved (sha256 differs)")
    return data


@functools.lru_cache(maxsize=2)
def _cached(location: str) -> Alignment:
    return load(_read(location))


@functools.lru_cache(maxsize=1)
def _tensors(location: str) -> dict[str, torch.Tensor]:
    return load_safetensors(_read(location))


def stored(location: str, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file the driver wrote (e.g. a fine-tuned model)."""
    return _tensors(location)[name]


def merged(tensors: list[torch.Tensor], location: str, name: str) -> torch.Tensor:
    """The output tensor ``name`` from the models' values: merged (zipped, or the mean of the
    first model and the others permuted to it), or the first model's own head."""
    return merge_with(_cached(location), tensors, name)


def merge_with(a: Alignment, tensors: list[torch.Tensor], name: str) -> torch.Tensor:
    """``merged`` with the alignment at hand."""
    touching = a.touching.get(name, [])
    if name in a.heads:
        out = _term(tensors[0], 0, touching, a.zips, a.perms[0])[0]
    elif a.zips:
        out = merge_tensor(list(tensors), touching, a.zips, a.perms)
    elif a.plans:
        out = fuse(touching, list(tensors), a.plans, a.perms)
    else:
        out = tensors[0].double()
        for t, perms in zip(tensors[1:], a.perms):
            out = out + _term(t, 1, touching, {}, perms)[0]
        out = out / len(tensors)
    return out.to(tensors[0].dtype)


# ----------------------------------------------------------------------------- statistics

@dataclass(frozen=True)
class StatsContext:
    models: tuple[ModelRef, ...]
    spec: Spec
    data_store: Any
    data_file: str
    data_info: Any  # TensorInfo of the inputs tensor
    input_name: str
    batch_size: int
    samples: int
    threads: int
    joint: bool = False  # all models' statistics together (similarity), else pairs with model 0


def stats_task(batch: int, ctx: StatsContext) -> Any:
    """Statistics of every group for samples [batch * batch_size, ...) of the data: for each
    pair (first model, model i), or (``ctx.joint``) of all models together."""
    from workers.align.features import joint_stats, pairwise_stats

    with torch_threads(ctx.threads):
        x = read_batch(ctx.data_store, ctx.data_file, ctx.data_info, batch, ctx.batch_size,
                       ctx.samples)
        models = build_models(ctx.models)
        # probes name the modules of the loaded model, which may differ from the checkpoint's;
        # each model has its own spec (OT fusion takes wider models)
        loaded = [specs.build({k: tuple(v.shape) for k, v in model.state_dict().items()
                               if v.is_floating_point()}, ref.config)
                  for model, ref in zip(models, ctx.models)]
        if [(g.name, g.size) for g in loaded[0].groups] != [(g.name, g.size)
                                                           for g in ctx.spec.groups]:
            raise ValueError("the loaded model's alignment groups differ from the checkpoint's")

        def forward(model, inputs):
            return model(**{ctx.input_name: inputs})

        if ctx.joint:
            return joint_stats(loaded[0], models, [x], forward)
        return pairwise_stats(loaded[0], models, [x], forward, loaded)


@dataclass(frozen=True)
class SolveContext:
    spec: Spec
    stats: tuple[dict[str, Any], ...]  # per model after the first: its groups' statistics
    # paired with the first's; or (``joint``) one dict, of all models together
    free: str  # what a free group gets: "perm" (activation matching), "zip" (ZipIt!) or
    # "plan" (OT fusion); head groups are always assigned
    alpha: float
    beta: float
    threads: int
    solver: str = "emd"  # OT fusion's transport solver
    reg: float = 0.05  # and Sinkhorn's regularisation
    permuted: frozenset[str] = frozenset()  # groups only permuted (partial zipping's residual)
    joint: bool = False  # K-model zip: free groups zipped once over all models


def solve_task(item: tuple[int, str], ctx: SolveContext) -> tuple[str, Any]:
    """One independent solve of activation statistics: (model i after the first, group) ->
    ("zip", (merge, unmerge)) or ("plan", transport) for a free group when zipping or
    transporting (and for a head group whose dims may move, when transporting), else ("perm",
    permutation). With ``ctx.joint`` a free group is zipped once (i = 0) over every model's
    units, and model i + 1 is assigned to the first on its block of the joint correlation."""
    from workers.align.match import assign
    from workers.align.ot import activation_plan, soft_heads
    from workers.align.zip import zip_features

    i, name = item
    group = ctx.spec.group(name)
    stats = ctx.stats[0 if ctx.joint else i][name]
    with torch_threads(ctx.threads):
        if group.head_dim is None and ctx.free == "zip" and name not in ctx.permuted:
            return "zip", zip_features(stats.joint_correlation(), group.size, alpha=ctx.alpha,
                                       beta=ctx.beta, models=len(stats.sum) // group.size)
        if ctx.free == "plan" and (group.head_dim is None or soft_heads(group)):
            return "plan", activation_plan(group, stats, ctx.solver, ctx.reg)
        return "perm", assign(group, stats.correlation(i + 1 if ctx.joint else 1))


class MatchWorker:
    """Weight matching's coordinate steps on a worker (``colored_descent``): both models'
    tensors read once from their stores, then worker ``index`` of ``count`` steps its share
    of each class's groups from the driver's permutations."""

    def __init__(self, spec: Spec, a: ModelRef, b: ModelRef, threads: int, index: int,
                 count: int):

        self.spec, self.threads, self.index, self.count = spec, threads, index, count
        self.touching = _members_of(spec)
        with torch_threads(threads):
            self.a, self.b = read_state(a), read_state(b)

    def steps(self, names: list[str], perms: dict) -> dict:

        # largest first, dealt round-robin: workers get similar work (a step costs ~ size³)
        dealt = sorted(names, key=lambda n: -self.spec.group(n).size)[self.index::self.count]
        with torch_threads(self.threads):
            return {n: _step(self.spec.group(n), self.a, self.b, perms, self.touching)
                    for n in dealt}

    def objective(self, perms: dict) -> float:

        with torch_threads(self.threads):
            return objective(self.spec, self.a, self.b, perms)
