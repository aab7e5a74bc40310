"""Optimal-transport fusion (Singh & Jaggi, 2020, arXiv:1910.05653; for transformers Imfeld
et al., ICLR 2024, arXiv:2310.05719): soft alignment of each free group's units by a transport
map between the models' activations, then averaging.

Per free group, the cost of moving model B's unit k onto model A's unit j is the mean squared
difference of their activations, E[(a_j − b_k)²], from the same statistics pass as activation
matching; the transport T (uniform marginals) is exact (EMD) or entropic (Sinkhorn), via POT.
B's tensors are moved into A's units by contracting every axis of the group with the plan
(``moved``). With EMD on equal widths the plan is a permutation (a permuted copy comes back
exactly); with T = I / n the fusion is plain averaging. B may be wider than A (its free groups
larger; heads equal): the output has A's shapes. Head groups (attention) have their heads
matched whole by activation matching, then the dims inside each matched pair transported
(``head_plan``: soft alignment through attention, applied alike to q, k, v rows and the output
projection's columns, an approximation for q·k as in the paper); under rotary embeddings or
grouped-query attention dims stay in place and heads are permuted only.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from workers.align.match import ActivationStats, _members_of, _unfold, assign
from workers.align.spec import Group, Member, Spec, member_index

SOLVERS = ("emd", "sinkhorn")


def transport_cost(stats: ActivationStats) -> torch.Tensor:
    """E[(a_j − b_k)²] for A's units j (rows) and B's units k (columns; B may be wider),
    float64."""
    n = stats.size
    mean = stats.sum / stats.n
    second = stats.outer / stats.n - torch.outer(mean, mean)  # covariance of the shifted values
    raw_mean = mean + stats.shift
    second = second + torch.outer(raw_mean, raw_mean)  # E[x y] of the original values
    diag = second.diagonal()
    cost = diag[:n, None] + diag[None, n:] - 2 * second[:n, n:]
    return cost.clamp(min=0)


def transport(cost: torch.Tensor, solver: str = "emd", reg: float = 0.05) -> torch.Tensor:
    """The transport plan between uniform marginals (rows: A's units, columns: B's), float64;
    ``reg`` is Sinkhorn's entropic regularisation relative to the largest cost."""
    import ot

    c = cost.double().numpy()
    scale = c.max() if c.max() > 0 else 1.0
    a = np.full(c.shape[0], 1 / c.shape[0])
    b = np.full(c.shape[1], 1 / c.shape[1])
    if solver == "emd":
        plan = ot.emd(a, b, c / scale, numItermax=1_000_000)
    elif solver == "sinkhorn":
        plan = ot.sinkhorn(a, b, c / scale, reg, numItermax=10_000, stopThr=1e-12)
    else:
        raise ValueError(f"unknown OT solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    return torch.from_numpy(np.ascontiguousarray(plan))


def soft_heads(group: Group) -> bool:
    """Whether a head group's dims may be transported inside each head: dims may move (no
    rotary embeddings) and no member repeats heads (grouped-query attention)."""
    return group.within and all(m.repeat == 1 for m in group.members)


def head_plan(group: Group, profit: torch.Tensor, cost: torch.Tensor, solver: str = "emd",
              reg: float = 0.05) -> torch.Tensor:
    """Soft alignment through attention: heads are matched whole (the assignment maximising
    ``profit``), then inside each matched pair of heads B's dims are transported onto A's
    (``cost``, as for free groups). The [n, n] plan is block-structured (A head h x its B
    head) with uniform marginals; with EMD it is a permutation, and a permuted copy comes back
    exactly."""
    hd = group.head_dim
    perm = assign(group, profit)
    plan = torch.zeros(group.size, group.size, dtype=torch.float64)
    heads = group.size // hd
    for h in range(heads):
        a, b = slice(h * hd, (h + 1) * hd), int(perm[h * hd]) // hd
        other = slice(b * hd, (b + 1) * hd)
        plan[a, other] = transport(cost[a, other], solver, reg) / heads
    return plan


def activation_plan(group: Group, stats: ActivationStats, solver: str,
                    reg: float) -> torch.Tensor:
    """The plan of one group from activations: a free group's transport, or (dims free to
    move) a head group's ``head_plan`` on correlation and cost."""
    cost = transport_cost(stats)
    if group.head_dim is None:
        return transport(cost, solver, reg)
    return head_plan(group, stats.correlation(), cost, solver, reg)


def weight_plans(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                 solver: str = "emd", reg: float = 0.05, spec_b: Spec | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Transport from weights (no data), group by group in spec order: a group's cost is the
    squared distance between A's and B's unit signatures, the rows of its producing tensors
    whose other axes are already aligned (raw inputs, or groups solved before it), B's moved
    into A's units along those axes. A transformer's residual stream is thus solved from the
    embeddings and norms, then each block's groups from their rows that read the residual;
    a sequential MLP layer by layer. ``spec_b``: B's spec where B is wider."""
    spec_b = spec_b or spec
    touching = _members_of(spec)
    plans: dict[str, torch.Tensor] = {}
    perms: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        rows_a, rows_b = [], []
        for m, mb in zip(g.members, spec_b.group(g.name).members):
            others = [(h, o) for h, o in touching[m.tensor] if h.name != g.name]
            if m.consumes or any(h.name not in plans and h.name not in perms
                                 for h, _ in others):
                continue
            rows_a.append(_unfold(g, m, a[m.tensor]))
            rows_b.append(_unfold(spec_b.group(g.name), mb, moved(b[m.tensor], others, plans,
                                                                  perms)))
        if not rows_a:
            raise ValueError(f"{g.name}: no tensor produces its units from inputs aligned "
                             "before it; a weights cost cannot be built for this spec")
        ra, rb = torch.cat(rows_a, 1), torch.cat(rows_b, 1)
        cost = (ra.square().sum(1)[:, None] + rb.square().sum(1)[None, :]
                - 2 * ra @ rb.T).clamp(min=0)
        if g.head_dim is None:
            plans[g.name] = transport(cost, solver, reg)
        elif soft_heads(g):
            plans[g.name] = head_plan(g, -cost, cost, solver, reg)
        else:
            perms[g.name] = assign(g, -cost)
    return plans, perms


def ot_fusion(spec: Spec, stats: Mapping[str, ActivationStats], *, solver: str = "emd",
              reg: float = 0.05) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(transport plans of the free groups and, where dims may move, of the head groups;
    permutations of the other head groups) aligning B to A."""
    plans, perms = {}, {}
    for g in spec.groups:
        if g.head_dim is None or soft_heads(g):
            plans[g.name] = activation_plan(g, stats[g.name], solver, reg)
        else:
            perms[g.name] = assign(g, stats[g.name].correlation())
    return plans, perms


def moved(t: torch.Tensor, touching: list, plans: Mapping[str, torch.Tensor],
          perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Model B's tensor ``t`` in A's units (float64), head groups permuted and each free-group
    axis contracted with the plan T [n, m]: a producing axis with n T (rows sum to 1: A's
    unit j gets the mean of the B units sent to it), a consuming axis with m T (columns sum
    to 1: every B unit's input weight goes, whole, to the A units it was sent to). For equal
    widths both are n T; a function-preserving widened copy (units duplicated, outgoing
    weights split) fuses back into the original exactly."""
    t = t.double()
    for g, m in touching:
        if g.name in plans:
            plan = plans[g.name]
            t = _contract(t, m, plan * plan.shape[1 if m.consumes else 0])
        elif g.name in perms:
            t = t.index_select(m.dim, member_index(g, m, perms[g.name]))
    return t


def _contract(t: torch.Tensor, m: Member, plan: torch.Tensor) -> torch.Tensor:
    return torch.movedim(torch.tensordot(plan, torch.movedim(t, m.dim, 0), dims=1), 0, m.dim)


def fuse(touching: list, tensors: list[torch.Tensor], plans: list[Mapping[str, torch.Tensor]],
         perms: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """The mean of the first model's tensor and the others moved into its units (float64)."""
    total = tensors[0].double()
    for t, p, q in zip(tensors[1:], plans, perms):
        total = total + moved(t, touching, p, q)
    return total / len(tensors)
