"""The optional short fine-tune of a fused model by distillation from its parents (OT fusion's
``finetune_steps``; Imfeld et al. fine-tune fused transformers briefly after fusion).

The fused body is trained on the job's unlabelled inputs so that, with each source's head
(moved into the fused units), it reproduces that source's logits: the loss is the sum over
sources of KL(parent ‖ fused) of the softmax distributions. Without per-source heads (one
shared head) the target is the mean of the parents' distributions. Heads stay as they are;
every other float parameter trains (Adam, no weight decay). Batches are drawn with a generator
keyed by the seed and the model runs in eval mode (no dropout), so the result is the same bits
wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from workers.models import (
    ModelRef,
    build_models,
    checkpoint_names,
    model_from_state,
    read_batch,
    read_state,
)
from workers.threads import torch_threads


def _kl(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ softmax(student)) over the last dim, mean over the rest; ``target`` holds
    probabilities."""
    log_p = F.log_softmax(student.double(), dim=-1)
    return (target * (target.clamp(min=1e-30).log() - log_p)).sum(-1).mean()


def distill(student: torch.nn.Module, teachers: list[torch.Tensor],
            heads: list[dict[str, torch.Tensor]], x: torch.Tensor, input_name: str, *,
            steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """Train ``student`` in place: ``teachers`` are each parent's logits on all of ``x``,
    ``heads`` each source's head parameters (by the student's names; empty: one shared head).
    Returns the loss of every step."""
    from torch.func import functional_call

    frozen = set().union(*heads) if heads else set()
    params = [p for n, p in student.named_parameters() if n not in frozen]
    for n, p in student.named_parameters():
        p.requires_grad_(n not in frozen)
    probs = [F.softmax(t.double(), dim=-1) for t in teachers]
    mean = sum(probs) / len(probs)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=g)
        inputs = {input_name: x[idx]}
        if heads:
            loss = sum(_kl(functional_call(student, h, args=(), kwargs=inputs).logits,
                           prob[idx]) for h, prob in zip(heads, probs))
        else:
            loss = _kl(student(**inputs).logits, mean[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@dataclass(frozen=True)
class FinetuneContext:
    models: tuple[ModelRef, ...]
    fused: Any  # the solved alignment (workers.align.transforms.Alignment)
    heads: tuple[dict[str, torch.Tensor], ...]  # each source's head (checkpoint names), or ()
    data: tuple  # (store, file, TensorInfo, samples, input name)
    steps: int
    lr: float
    batch_size: int
    seed: int
    threads: int


def finetune_task(_item: int, ctx: FinetuneContext) -> tuple[dict[str, torch.Tensor],
                                                             list[float]]:
    """The fused model (from the models' tensors and the alignment), distilled: its float
    tensors by checkpoint name, in the first model's dtypes, and the loss of every step."""
    from workers.align.transforms import merge_with

    with torch_threads(ctx.threads):
        states = [read_state(r) for r in ctx.models]
        fused = {n: merge_with(ctx.fused, [s[n] for s in states], n) if v.is_floating_point()
                 else v for n, v in states[0].items()}
        student = model_from_state(ctx.models[0].config,
                                   {n: v.to(states[0][n].dtype) for n, v in fused.items()})
        student.float()  # trained in float32 whatever the checkpoint's dtype
        store, file, info, samples, input_name = ctx.data
        x = read_batch(store, file, info, 0, samples, samples)
        with torch.no_grad():  # in batches: peak memory of one batch's activations
            teachers = [torch.cat([m(**{input_name: part}).logits
                                   for part in x.split(ctx.batch_size)])
                        for m in build_models(ctx.models)]
        to_ckpt = checkpoint_names(student)
        loaded_as = {c: n for n, c in to_ckpt.items()}
        heads = [{loaded_as.get(k, k): v.float() for k, v in h.items()} for h in ctx.heads]
        losses = distill(student, teachers, heads, x, input_name, steps=ctx.steps, lr=ctx.lr,
                         batch_size=ctx.batch_size, seed=ctx.seed)
        out = {to_ckpt[n]: v.detach().to(states[0][to_ckpt[n]].dtype)
               for n, v in student.state_dict().items()
               if n in to_ckpt and states[0].get(to_ckpt[n]) is not None
               and states[0][to_ckpt[n]].is_floating_point()}
    return out, losses
