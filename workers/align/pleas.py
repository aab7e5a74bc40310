"""PLeaS: permutations, then layer-by-layer least squares (Nasery et al., 2024,
arXiv:2407.02447), for sequential MLPs of two models from different inits.

Step 1 (partial matching): in each hidden space the two models' units are paired by activation
correlation (a linear assignment); only the ``2n − n'`` most correlated pairs are merged, the
other units stay separate, so the merged width n' is a budget between n and 2n. Step 2 (least
squares): layer by layer, the merged layer's weights are fitted so that, fed the *merged
prefix's* activations, it reproduces the original models' pre-activations (a merged unit: the
mean of its pair; a separate unit: its own model's), ridge-regularised; each model's head is
then fitted to that model's own logits on the merged features: a multi-head model. At budget 2n
nothing is merged and the fit reproduces both models' features, i.e. the ensemble.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from workers.align.match import max_assignment
from workers.threads import torch_threads


def partial_matching(corr: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's unit -> its merged unit, for a merged width ``width`` in [n, 2n]: the
    ``2n − width`` best-correlated pairs of the optimal assignment share a unit (first, in A's
    order), then A's other units, then B's."""
    n = corr.shape[0]
    if not n <= width <= 2 * n:
        raise ValueError(f"PLeaS width {width} outside [{n}, {2 * n}]")
    cols = torch.from_numpy(max_assignment(corr.double().numpy()))
    score = corr.double()[torch.arange(n), cols]
    merged = sorted(torch.argsort(score, descending=True, stable=True)[:2 * n - width].tolist())
    a_to, b_to = torch.full((n,), -1), torch.full((n,), -1)
    for slot, i in enumerate(merged):
        a_to[i], b_to[cols[i]] = slot, slot
    slot = len(merged)
    for units in (a_to, b_to):
        for i in range(n):
            if units[i] < 0:
                units[i] = slot
                slot += 1
    return a_to, b_to


def _targets(ya: torch.Tensor, yb: torch.Tensor, a_to: torch.Tensor, b_to: torch.Tensor,
             width: int) -> torch.Tensor:
    """[samples, width]: each merged unit's target, the mean of the model units it holds."""
    out = torch.zeros(len(ya), width, dtype=torch.float64)
    count = torch.zeros(width, dtype=torch.float64)
    out.index_add_(1, a_to, ya.double())
    out.index_add_(1, b_to, yb.double())
    count.index_add_(0, a_to, torch.ones(len(a_to), dtype=torch.float64))
    count.index_add_(0, b_to, torch.ones(len(b_to), dtype=torch.float64))
    return out / count


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """[x 1] in float64, rows flattened: every leading dim (batch, tokens) is a sample."""
    x = x.double().reshape(-1, x.shape[-1])
    return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)


def solve_gram(gram: torch.Tensor, cross: torch.Tensor, ridge: float,
               bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge least squares from sums: ``gram`` = [x 1]ᵀ[x 1], ``cross`` = [x 1]ᵀ y over all
    samples; (W [out, in], b [out]) minimising ‖[x 1] [W b]ᵀ − y‖² + ridge · mean(diag)
    ‖[W b]‖², float64; without ``bias`` the ones column is left out (b None)."""
    if not bias:
        gram, cross = gram[:-1, :-1], cross[:-1]
    gram = gram + torch.eye(len(gram), dtype=torch.float64) * ridge * float(
        gram.diagonal().mean())
    wb = torch.linalg.solve(gram, cross).T
    return (wb[:, :-1], wb[:, -1]) if bias else (wb, None)


def _solve(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    xa = with_ones(x)
    return solve_gram(xa.T @ xa, xa.T @ y.double(), ridge)


def pleas(layers_a: Sequence[torch.nn.Linear], layers_b: Sequence[torch.nn.Linear],
          corrs: Sequence[torch.Tensor], widths: Sequence[int], x: torch.Tensor, *,
          activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
          ridge: float = 1e-6) -> tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                        list[tuple[torch.Tensor, torch.Tensor]]]:
    """Merge two MLPs ``Linear -> act -> ... -> Linear -> act -> head`` (their Linear layers,
    the last being each model's head) on inputs ``x``: ``corrs`` the A x B activation
    correlation of each hidden space, ``widths`` its merged width. Returns the merged hidden
    layers' (W, b) and each model's refitted head (W, b)."""
    with torch.no_grad():
        merged_in, inputs_a, inputs_b = x.double(), x, x
        hidden = []
        for la, lb, corr, width in zip(layers_a[:-1], layers_b[:-1], corrs, widths):
            ya, yb = la(inputs_a), lb(inputs_b)  # the original models' pre-activations
            a_to, b_to = partial_matching(corr, width)
            w, b = _solve(merged_in, _targets(ya, yb, a_to, b_to, width), ridge)
            hidden.append((w.float(), b.float()))
            merged_in = activation(merged_in @ w.T + b)
            inputs_a, inputs_b = activation(ya), activation(yb)
        heads = [_solve(merged_in, head(inputs), ridge)
                 for head, inputs in ((layers_a[-1], inputs_a), (layers_b[-1], inputs_b))]
    return hidden, [(w.float(), b.float()) for w, b in heads]


# ----------------------------------------------------------------------------- transformers

class _Stop(Exception):
    pass


def _run(model: torch.nn.Module, inputs: dict, wants: dict[str, str], stop: str) -> dict:
    """Forward ``model`` until module ``stop`` has run; the input or output (``wants``:
    module -> "input" / "output") of the named modules."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, side in wants.items():
        def hook(_m, args, output, name=name, side=side):
            seen[name] = (args[0] if side == "input" else output).detach()
        handles.append(modules[name].register_forward_hook(hook))

    def halt(*_):
        raise _Stop

    handles.append(modules[stop].register_forward_hook(halt))
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def mlp_modules(model: torch.nn.Module, config: dict, block: int) -> tuple[list[str], str]:
    """The loaded model's MLP modules of ``block``: those producing its hidden units (up,
    then gate where there is one) and the one reading them (down)."""
    from workers.align.spec import build

    spec = build({k: tuple(v.shape) for k, v in model.state_dict().items()
                  if v.is_floating_point()}, config)
    group = spec.group(f"mlp.{block}")
    up = [m.tensor[:-len(".weight")] for m in group.members
          if not m.consumes and m.tensor.endswith(".weight")]
    down = next(m.tensor[:-len(".weight")] for m in group.members if m.consumes)
    return up, down


@dataclass(frozen=True)
class PleasContext:
    models: tuple  # (ModelRef, ModelRef)
    config: dict  # the merged model's config.json (its MLP width)
    data: tuple  # (store, file, TensorInfo, samples, input name)
    batch_size: int
    block: int
    stage: str  # "up": fit the layers producing the MLP units; "down": the one reading them;
    # "head": refit the heads (module ``head``) to each model's own outputs
    a_to: torch.Tensor  # each model's MLP units -> merged units (partial matching)
    b_to: torch.Tensor
    residual: torch.Tensor  # B's residual-stream permutation onto A's
    width: int  # merged MLP width
    threads: int
    round_key: str  # identifies this round's merged state (job and round)
    head: str = ""  # the head module (checkpoint name), for the "head" stage


_MERGED: dict = {}


def pleas_task(batch: int, ctx: PleasContext, state: dict) -> list[torch.Tensor]:
    """One data batch of a PLeaS round: the merged model so far (``state``, checkpoint names)
    gives the fitted layer's inputs, the two original models the targets; returns the sums
    [x 1]ᵀ[x 1] and [x 1]ᵀ y for each layer of the stage (up, gate; the head: y of each
    model), float64."""
    from workers.models import build_models, checkpoint_names, model_from_state, read_batch

    with torch_threads(ctx.threads):
        if _MERGED.get("key") != ctx.round_key:  # one merged model per round and process
            _MERGED.update(key=ctx.round_key, model=model_from_state(ctx.config, state))
        merged = _MERGED["model"]
        a, b = build_models(ctx.models)
        store, file, info, samples, input_name = ctx.data
        inputs = {input_name: read_batch(store, file, info, batch, ctx.batch_size, samples)}
        ups, down = mlp_modules(a, ctx.models[0].config, ctx.block)
        with torch.no_grad():
            if ctx.stage == "head":  # the merged features in, each model's own outputs out
                loaded = {c: n for n, c in checkpoint_names(a).items()}
                head = loaded.get(f"{ctx.head}.weight", f"{ctx.head}.weight")[:-len(".weight")]
                x = _run(merged, inputs, {head: "input"}, head)[head]
                outs = [_run(m, inputs, {head: "output"}, head)[head] for m in (a, b)]
                ys = [y.reshape(-1, y.shape[-1]).double() for y in outs]
            elif ctx.stage == "up":
                x = _run(merged, inputs, {ups[0]: "input"}, down)[ups[0]]
                seen_a = _run(a, inputs, {u: "output" for u in ups}, down)
                seen_b = _run(b, inputs, {u: "output" for u in ups}, down)
                ys = [_targets(seen_a[u].reshape(-1, seen_a[u].shape[-1]),
                               seen_b[u].reshape(-1, seen_b[u].shape[-1]), ctx.a_to, ctx.b_to,
                               ctx.width) for u in ups]
            else:
                x = _run(merged, inputs, {down: "input"}, down)[down]
                ya = _run(a, inputs, {down: "output"}, down)[down]
                yb = _run(b, inputs, {down: "output"}, down)[down].index_select(
                    -1, ctx.residual)
                ys = [((ya.double() + yb.double()) / 2).reshape(-1, ya.shape[-1])]
        xa = with_ones(x)
        return [xa.T @ xa] + [xa.T @ y for y in ys]
