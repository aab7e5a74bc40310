"""Input-dependent merges as runtimes (pure torch: no Ray): the model's weights are synthesised
per input from a base, the models' task vectors and a router or gate.

* WEMoE (Tang et al., ICML 2024, arXiv:2402.00433): every transformer block's MLP becomes a
  weight-ensembling MLP, ``W(x) = θ0 + Σ_k λ_k(x) τ_k``, with ``λ(x)`` a router
  (``W2 ReLU(W1 h + b1) + b2``) on the MLP's input tokens averaged over tokens; everything else
  is task arithmetic with the router's initial λ. The router starts with ``W2 = 0`` and
  ``b2 = λ0``: the runtime starts exactly at task arithmetic.
* Gating (our reconstruction of Ye et al., 2023, arXiv:2312.16240; the paper's weight-similarity
  metric and control rule are not public, see METHODS.md C1): a gate on the input predicts task
  probabilities ``p(x)``; every *gated* tensor is ``θ0 + Σ_k p_k(x) τ_k`` and the classifier is
  the most probable task's. Layers whose task vectors agree (mean pairwise cosine at or above
  ``threshold``) are *static* (the models' average), the rest gated.

Per-sample weights are applied by ``torch.func.functional_call`` one sample at a time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from workers.threads import torch_threads

KINDS = ("wemoe", "gating")
OBJECTIVES = ("entropy", "distill")


class Router(nn.Module):
    """WEMoE's router: K free coefficients per sample from the MLP's input tokens."""

    def __init__(self, width: int, k: int, init_lambda: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, k)
        nn.init.normal_(self.fc1.weight, std=0.01)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)  # λ(x) = λ0 for every input: task arithmetic
        nn.init.constant_(self.fc2.bias, init_lambda)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.relu(self.fc1(h)))
        return out.reshape(len(h), -1, out.shape[-1]).mean(dim=1)


class Gate(nn.Module):
    """The gating merge's task classifier on the flattened input: logits over the K tasks."""

    def __init__(self, features: int, k: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(len(x), -1).float())


class RoutedMLP(nn.Module):
    """A transformer MLP whose weights are ``base + Σ_k λ_k(x) τ_k`` per sample."""

    def __init__(self, mlp: nn.Module, base: Mapping[str, torch.Tensor],
                 taus: Mapping[str, torch.Tensor], router: Router):
        super().__init__()
        self.mlp, self.router = mlp, router
        self.names = sorted(base)
        for i, n in enumerate(self.names):
            self.register_buffer(f"base_{i}", base[n])
            self.register_buffer(f"tau_{i}", taus[n])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lam = self.router(h)
        out = []
        for b in range(len(h)):
            params = {n: getattr(self, f"base_{i}")
                      + torch.tensordot(lam[b], getattr(self, f"tau_{i}"), dims=1)
                      for i, n in enumerate(self.names)}
            out.append(functional_call(self.mlp, params, (h[b:b + 1],)))
        return torch.cat(out)


def mlp_sites(model: nn.Module) -> list[str]:
    """The module names of the transformer blocks' MLPs (``<stack>.<i>.mlp``)."""
    import re

    sites = [n for n, _ in model.named_modules() if re.search(r"\.\d+\.mlp$", n)]
    if not sites:
        raise ValueError(f"{type(model).__name__}: no transformer block MLP modules "
                         "(<layers>.<i>.mlp) to turn into weight-ensembling MLPs")
    return sites


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


class DynamicModel(nn.Module):
    """The runtime: ``forward(inputs, task)`` -> logits [B, classes] with ``task``'s head
    (WEMoE: a task is required; gating: None picks the head of the most probable task).

    ``model``: the transformers model holding the static weights; ``experts``: module
    parameter name -> (θ0, τ stacked [K, ...]) of the gated tensors; ``heads``: per task, its
    classifier tensors (module names); ``router_state``: trained router/gate weights."""

    def __init__(self, kind: str, model: nn.Module, tasks: Sequence[str],
                 experts: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 heads: Mapping[str, Mapping[str, torch.Tensor]], input_name: str,
                 init_lambda: float = 0.3, input_features: int | None = None, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():  # router / gate initial weights: keyed by the seed only
            torch.manual_seed(seed)
            self._setup(kind, model, tasks, experts, heads, input_name, init_lambda,
                        input_features)

    @property
    def needs_task(self) -> bool:
        """Whether a forward pass must be told the task whose head to use (WEMoE routes
        weights, not heads; gating picks the head itself)."""
        return self.kind == "wemoe"

    def _setup(self, kind, model, tasks, experts, heads, input_name, init_lambda,
               input_features) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown dynamic merge {kind!r}; expected one of {KINDS}")
        self.kind, self.model, self.tasks = kind, model.eval(), list(tasks)
        self.heads, self.input_name = heads, input_name
        for p in self.model.parameters():
            p.requires_grad_(False)
        k = len(self.tasks)
        if kind == "wemoe":
            self.routers = nn.ModuleList()
            for site in mlp_sites(model):
                mlp = model.get_submodule(site)
                local = {n[len(site) + 1:]: v for n, v in experts.items()
                         if n.startswith(site + ".")}
                width = next(m for m in mlp.modules() if isinstance(m, nn.Linear)).in_features
                router = Router(width, k, init_lambda)
                self.routers.append(router)
                parent, _, child = site.rpartition(".")
                setattr(model.get_submodule(parent), child,
                        RoutedMLP(mlp, {n: b for n, (b, _) in local.items()},
                                  {n: t for n, (_, t) in local.items()}, router))
        else:
            self.gate = Gate(input_features, k)
            self.gated = sorted(experts)
            for i, n in enumerate(self.gated):
                self.register_buffer(f"base_{i}", experts[n][0])
                self.register_buffer(f"tau_{i}", experts[n][1])

    def trainable(self) -> list[nn.Parameter]:
        return list((self.routers if self.kind == "wemoe" else self.gate).parameters())

    def router_state(self) -> dict[str, torch.Tensor]:
        module = self.routers if self.kind == "wemoe" else self.gate
        return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}

    def load_router(self, state: Mapping[str, torch.Tensor]) -> None:
        (self.routers if self.kind == "wemoe" else self.gate).load_state_dict(state)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Gating: the gate's task probabilities [B, K]."""
        return torch.softmax(self.gate(x), dim=-1)

    def forward(self, x: torch.Tensor, task: str | None = None,
                probabilities: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "wemoe":
            if task is None:
                raise ValueError(f"WEMoE needs the task whose head to use: one of {self.tasks}")
            return _logits(functional_call(self.model, self.heads[task], (),
                                           {self.input_name: x}))
        p = self.probabilities(x) if probabilities is None else probabilities
        out = []
        for b in range(len(x)):
            params = {n: getattr(self, f"base_{i}")
                      + torch.tensordot(p[b], getattr(self, f"tau_{i}"), dims=1)
                      for i, n in enumerate(self.gated)}
            head = task if task is not None else self.tasks[int(p[b].argmax())]
            params.update(self.heads[head])
            out.append(_logits(functional_call(self.model, params, (),
                                               {self.input_name: x[b:b + 1]})))
        return torch.cat(out)


def layer_similarity(taus: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, float]:
    """Per layer (``<stack>.<i>``, or "other" for tensors outside the layers): the mean
    pairwise cosine of the models' task vectors, all of the layer's tensors concatenated."""
    import re

    layers: dict[str, list[str]] = {}
    for name in taus:
        m = re.match(r"^(.*?\.\d+)\.", name)
        layers.setdefault(m[1] if m else "other", []).append(name)
    out = {}
    for layer, names in layers.items():
        vecs = [torch.cat([taus[n][k].double().reshape(-1) for n in sorted(names)])
                for k in range(len(next(iter(taus.values()))))]
        pairs = [(i, j) for i in range(len(vecs)) for j in range(i + 1, len(vecs))]
        cos = [float(torch.nn.functional.cosine_similarity(vecs[i], vecs[j], dim=0))
               for i, j in pairs]
        out[layer] = sum(cos) / len(cos) if cos else 1.0
    return out


def layer_of_tensor(name: str) -> str:
    import re

    m = re.match(r"^(.*?\.\d+)\.", name)
    return m[1] if m else "other"


def _generator(seed: int, step: int, task: int) -> torch.Generator:
    key = hashlib.sha256(f"{seed}\x00{step}\x00{task}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))


def task_loss(dyn: DynamicModel, k: int, x: torch.Tensor, step: int, *, batch_size: int,
              seed: int, objective: str, teacher: nn.Module | None = None) -> torch.Tensor:
    """Task k's share (1/K) of the training loss at ``step``, on a batch of its inputs drawn
    with a generator keyed by (seed, step, task): the router (WEMoE: ``entropy`` of the
    task's predictions, or ``distill``: KL from the task's own model) or the gate (gating:
    cross-entropy of the task the inputs came from)."""
    gen = _generator(seed, step, k)
    xb = x[torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)]
    if dyn.kind == "gating":
        target = torch.full((len(xb),), k, dtype=torch.long)
        return nn.functional.cross_entropy(dyn.gate(xb), target) / len(dyn.tasks)
    logp = torch.log_softmax(dyn(xb, dyn.tasks[k]), dim=-1)
    if objective == "entropy":
        return -(logp.exp() * logp).sum(-1).mean() / len(dyn.tasks)
    with torch.no_grad():
        target = torch.softmax(_logits(teacher(**{dyn.input_name: xb})), -1)
    return nn.functional.kl_div(logp, target, reduction="batchmean") / len(dyn.tasks)


Gradients = dict[int, tuple[list[torch.Tensor], float]]  # task -> (gradient per parameter,
# its loss share)


def task_gradients(dyn: DynamicModel, tasks: Sequence[int], data: Sequence[torch.Tensor],
                   values: Sequence[torch.Tensor], step: int, **loss_args: Any) -> Gradients:
    """Each of ``tasks``' loss gradients at the trainable parameters ``values``, separately
    (so that any split of the tasks over workers adds up to the same sum)."""
    params = dyn.trainable()
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    out = {}
    teachers = loss_args.pop("teachers", None)
    for k in tasks:
        for p in params:
            p.grad = None
        loss = task_loss(dyn, k, data[k], step,
                         teacher=teachers[k] if teachers else None, **loss_args)
        loss.backward()
        out[k] = ([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                   for p in params], float(loss.detach()))
    return out


def fit(initial: Sequence[torch.Tensor], gradients, *, tasks: int, steps: int, lr: float,
        progress: Any = None) -> tuple[list[torch.Tensor], list[float]]:
    """Adam on the trainable parameters: each step, ``gradients(values, step)`` gives every
    task's gradients (from one or several workers), added in task order. Returns the final
    values and the loss per step."""
    params = [v.detach().clone().requires_grad_(True) for v in initial]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        parts = gradients([p.detach() for p in params], step)
        for j, p in enumerate(params):
            total = parts[0][0][j]
            for k in range(1, tasks):
                total = total + parts[k][0][j]
            p.grad = total
        opt.step()
        losses.append(sum(parts[k][1] for k in range(tasks)))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    return [p.detach().clone() for p in params], losses


# ----------------------------------------------------------------------------- assembly

def assemble(kind: str, states: Sequence[Mapping[str, torch.Tensor]],
             base: Mapping[str, torch.Tensor], heads: Sequence[str], *, init_lambda: float,
             threshold: float) -> tuple[dict, dict, dict, dict]:
    """From the models' and the base's checkpoint tensors: (static tensors, θ0 and stacked τ
    of every candidate for gating, each task's head tensors, per-layer similarity). Static:
    task arithmetic with λ0 (WEMoE), the models' average (gating). Gating's candidates are the
    tensors of layers whose mean pairwise task-vector cosine is below ``threshold``; WEMoE's
    are all tensors (its runtime keeps those of the MLPs)."""
    floats = [n for n, v in base.items() if v.is_floating_point() and n not in heads]
    taus = {n: torch.stack([s[n].float() - base[n].float() for s in states]) for n in floats}
    similarity = layer_similarity({n: list(t) for n, t in taus.items()}) if taus else {}
    static = {}
    for n, v in base.items():
        if n not in taus:
            static[n] = states[0][n]
        elif kind == "wemoe":
            static[n] = (base[n].float() + taus[n].sum(0) * init_lambda).to(v.dtype)
        else:
            static[n] = (base[n].float() + taus[n].mean(0)).to(v.dtype)
    if kind == "gating":
        taus = {n: t for n, t in taus.items() if similarity[layer_of_tensor(n)] < threshold}
    experts = {n: (base[n].float(), t) for n, t in taus.items()}
    head_tensors = {k: {n: s[n] for n in heads} for k, s in enumerate(states)}
    return static, experts, head_tensors, similarity


def build(kind: str, config: dict, static: Mapping[str, torch.Tensor],
          experts: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
          heads: Mapping[str, Mapping[str, torch.Tensor]], tasks: Sequence[str],
          input_name: str, init_lambda: float, input_features: int | None,
          seed: int = 0) -> tuple[DynamicModel, list[str]]:
    """The runtime over a transformers model of ``config`` holding ``static`` (checkpoint
    names; no remote code), and the checkpoint names of the experts it uses (WEMoE: those of
    its MLP sites only)."""
    import transformers

    from workers.models import checkpoint_names

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None or not hasattr(cls, "config_class"):
        raise ValueError(f"config.json names no transformers architecture ({arch!r}); dynamic "
                         "merges need one")
    transformers.utils.logging.disable_progress_bar()
    model = cls.from_pretrained(None, config=cls.config_class.from_dict(config),
                                state_dict=dict(static)).eval()
    module_of = {c: m for m, c in checkpoint_names(model).items()}
    missing = sorted(n for n in [*experts, *next(iter(heads.values()))] if n not in module_of)
    if missing:
        raise ValueError(f"tensors without a module parameter: {missing[:3]}")
    used = sorted(experts)
    if kind == "wemoe":
        sites = mlp_sites(model)
        used = [n for n in used if any(module_of[n].startswith(s + ".") for s in sites)]
    dyn = DynamicModel(kind, model, tasks, {module_of[n]: experts[n] for n in used},
                       {t: {module_of[n]: v for n, v in h.items()} for t, h in heads.items()},
                       input_name, init_lambda, input_features, seed)
    return dyn, used



# ----------------------------------------------------------------------------- training task

@dataclass(frozen=True)
class DynamicContext:
    kind: str
    models: tuple[Any, ...]  # workers.models.ModelRef per task
    base: Any  # ModelRef of the base
    tasks: tuple[str, ...]
    heads: tuple[str, ...]  # checkpoint names of the classifier tensors each task keeps
    data: tuple[tuple, ...]  # per task: (store, file, info, samples, input name)
    params: Any  # the method's params (init_lambda, threshold, objective, steps, lr, ...)
    seed: int
    threads: int


class Trainer:
    """One training worker: the runtime assembled from the models, and the gradients of its
    share of the tasks; the first also writes the runtime's files."""

    def __init__(self, ctx: DynamicContext, tasks: Sequence[int]):
        from workers.models import build_model, read_batch, read_state

        self.ctx, self.tasks, p = ctx, list(tasks), ctx.params
        with torch_threads(ctx.threads):
            states = [read_state(r) for r in ctx.models]
            static, self.experts, heads, self.similarity = assemble(
                ctx.kind, states, read_state(ctx.base), ctx.heads,
                init_lambda=getattr(p, "init_lambda", 0.0),
                threshold=getattr(p, "threshold", 0.0))
            self.data = [read_batch(store, file, info, 0, samples, samples)
                         for store, file, info, samples, _ in ctx.data]
            self.input_name = ctx.data[0][4]
            self.features = int(self.data[0][0].numel())
            self.heads = {t: heads[k] for k, t in enumerate(ctx.tasks)}
            self.dyn, self.used = build(ctx.kind, ctx.models[0].config, static, self.experts,
                                        self.heads, ctx.tasks, self.input_name,
                                        getattr(p, "init_lambda", 0.0), self.features,
                                        ctx.seed)
            self.objective = getattr(p, "objective", "gate")
            self.teachers = ([build_model(r) for r in ctx.models]
                             if self.objective == "distill" else None)

    def initial(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.dyn.trainable()]

    def gradients(self, values: Sequence[torch.Tensor], step: int) -> Gradients:

        p = self.ctx.params
        with torch_threads(self.ctx.threads):
            return task_gradients(self.dyn, self.tasks, self.data, values, step,
                                  batch_size=p.batch_size, seed=self.ctx.seed,
                                  objective=self.objective, teachers=self.teachers)

    def files(self, values: Sequence[torch.Tensor], losses: Sequence[float]) -> dict[str, bytes]:
        """The runtime's files, relative to the output: ``runtime/runtime.json``,
        ``router.safetensors``, ``experts.safetensors`` (θ0 and τ of each expert tensor),
        ``heads.safetensors``."""
        import json

        from safetensors.torch import save

        ctx, p = self.ctx, self.ctx.params
        with torch.no_grad():
            for param, v in zip(self.dyn.trainable(), values):
                param.copy_(v)
            gate_accuracy = None
            if ctx.kind == "gating":
                hits = sum(int((self.dyn.probabilities(x).argmax(1) == k).sum())
                           for k, x in enumerate(self.data))
                gate_accuracy = hits / sum(len(x) for x in self.data)
        description = {
            "format": "raymerge-dynamic/1", "kind": ctx.kind, "tasks": list(ctx.tasks),
            "input_name": self.input_name, "input_features": self.features,
            "heads": list(ctx.heads), "experts": self.used,
            "init_lambda": getattr(p, "init_lambda", 0.0), "objective": self.objective,
            "steps": p.steps, "lr": p.lr, "batch_size": p.batch_size,
            "losses": {"first": losses[0] if losses else None,
                       "last": losses[-1] if losses else None},
            "layer_similarity": self.similarity, "threshold": getattr(p, "threshold", None),
            "gate_training_accuracy": gate_accuracy}
        experts = {}
        for n in self.used:
            experts[f"{n}/base"], experts[f"{n}/tau"] = self.experts[n]
        meta = {"format": "pt"}
        return {
            "runtime/runtime.json": json.dumps(description, indent=1, sort_keys=True).encode(),
            "runtime/router.safetensors": save(self.dyn.router_state(), metadata=meta),
            "runtime/experts.safetensors": save({k: v.contiguous() for k, v in experts.items()},
                                                metadata=meta),
            "runtime/heads.safetensors": save({f"{t}/{n}": v.contiguous()
                                               for t, h in self.heads.items()
                                               for n, v in h.items()}, metadata=meta)}


def load_runtime(config: dict, static: Mapping[str, torch.Tensor], description: dict,
                 router: Mapping[str, torch.Tensor], experts: Mapping[str, torch.Tensor],
                 heads: Mapping[str, torch.Tensor]) -> DynamicModel:
    """The runtime from the files ``Trainer.files`` wrote and the output's static weights."""
    tasks = description["tasks"]
    pairs = {n: (experts[f"{n}/base"], experts[f"{n}/tau"]) for n in description["experts"]}
    by_task = {t: {k[len(t) + 1:]: v for k, v in heads.items() if k.startswith(t + "/")}
               for t in tasks}
    dyn, _ = build(description["kind"], config, static, pairs, by_task, tasks,
                   description["input_name"], description["init_lambda"],
                   description["input_features"])
    dyn.load_router(router)
    return dyn.eval()

