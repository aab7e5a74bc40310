"""ZipIt! (Stoica et al., ICLR 2024, arXiv:2305.03053): merge two models' units by feature
correlation, fusing redundant units within a model too.

For each free group (no heads) the joint correlation of both models' units is zipped greedily:
the most correlated pair of current features is fused until ``n`` remain; a fused feature's
similarity to the others is the minimum over its members times ``alpha`` (``alpha`` <= 0: never
fused again), and each model may fuse its own units at most ``beta`` x fusions / 2 times. The
result is a merge matrix M (n x 2n, averaging each feature's members) and an unmerge U (2n x n,
membership). Head groups (attention) are aligned by activation matching and averaged. Merged
tensor: W* = Σ_i M_out^(i) W^(i) U_in^(i); a tensor without a zipped output side is averaged.
Through LayerNorm (transformers' residual stream) zipping is an approximation, as in the paper.
Partial zipping (``spec.partial``) merges the first layers only; each model keeps the layers
after them, reading the zipped features through its unmerge (``head``). A transformer's
residual stream runs through the kept layers too, so there it is permuted, not zipped.
"""

from __future__ import annotations

from typing import Mapping

import torch

from workers.align.match import ActivationStats, _members_of, assign
from workers.align.spec import Spec, member_index

Zip = tuple[torch.Tensor, torch.Tensor]  # (merge M [n, 2n], unmerge U [2n, n])


def zip_features(corr: torch.Tensor, n_out: int, *, alpha: float = 0.3,
                 beta: float = 0.125, models: int = 2) -> Zip:
    """Greedy zip of the Kn x Kn joint correlation (model 0's units, then model 1's, ...)
    down to ``n_out``; each model may fuse its own units ``beta`` x fusions / K times."""
    size = corr.shape[0]
    n = size // models
    sims = corr.double().clone()
    sims.fill_diagonal_(float("-inf"))
    members = [[i] for i in range(size)]
    origin = [{i // n} for i in range(size)]
    alive = set(range(size))
    cap = beta * (size - n_out) / models
    used = [0] * models

    def forbid_within(model: int) -> None:
        own = [x for x in alive if origin[x] == {model}]
        sims[torch.tensor(own)[:, None], torch.tensor(own)[None, :]] = float("-inf")

    for model in range(models):
        if cap < 1:
            forbid_within(model)
    while len(alive) > n_out:
        best = int(sims.argmax())
        p, q = sorted(divmod(best, size))
        if sims[p, q] == float("-inf"):
            raise ValueError("zip: no allowed fusion left (raise alpha or beta)")
        within = origin[p] == origin[q] and len(origin[p]) == 1
        members[p] += members[q]
        origin[p] |= origin[q]
        row = torch.minimum(sims[p], sims[q])
        row = row * alpha if alpha > 0 else torch.full_like(row, float("-inf"))
        sims[p, :], sims[:, p] = row, row
        sims[q, :], sims[:, q] = float("-inf"), float("-inf")
        sims[p, p] = float("-inf")
        alive.remove(q)
        if within:
            model = next(iter(origin[p]))
            used[model] += 1
            if used[model] >= cap:
                forbid_within(model)
    order = sorted(alive, key=lambda c: min(members[c]))
    merge = torch.zeros(n_out, size, dtype=torch.float64)
    unmerge = torch.zeros(size, n_out, dtype=torch.float64)
    for c, cluster in enumerate(order):
        merge[c, members[cluster]] = 1 / len(members[cluster])
        unmerge[members[cluster], c] = 1
    return merge, unmerge


def zipit(spec: Spec, stats: Mapping[str, ActivationStats], *, alpha: float = 0.3,
          beta: float = 0.125, solved: Mapping[str, str] | None = None
          ) -> tuple[dict[str, Zip], dict[str, torch.Tensor]]:
    """Zips of the free groups and activation-matching permutations of the head groups;
    with ``solved`` (``spec.partial``: partial zipping), only those groups, the "perm" ones
    permuted."""
    zips, perms = {}, {}
    for g in spec.groups:
        kind = "free" if solved is None else solved.get(g.name)
        if kind is None:
            continue
        if g.head_dim is None and kind == "free":
            zips[g.name] = zip_features(stats[g.name].joint_correlation(), g.size,
                                        alpha=alpha, beta=beta)
        else:
            perms[g.name] = assign(g, stats[g.name].correlation())
    return zips, perms


def _term(t: torch.Tensor, i: int, touching: list, zips: Mapping[str, Zip],
          perms: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Model ``i``'s tensor ``t`` in the merged unit spaces (``touching``: its (group, member)
    pairs), and whether a merge matrix (which averages) was applied to it."""
    t = t.double()
    averaged = False
    for g, m in touching:
        if g.name in zips:  # gathers in index order, not BLAS: the same bits on every worker
            merge_m, unmerge_m = zips[g.name]
            rows = slice(i * g.size, (i + 1) * g.size)
            cluster = unmerge_m[rows].argmax(1)  # each unit belongs to exactly one feature
            if not m.consumes:  # M: the mean over the feature's members (of both models)
                shape = [1] * t.dim()
                shape[m.dim] = g.size
                t = t * merge_m[cluster, torch.arange(i * g.size, (i + 1) * g.size)].view(shape)
                averaged = True
            size = list(t.shape)
            size[m.dim] = unmerge_m.shape[1]
            t = torch.zeros(size, dtype=t.dtype).index_add_(m.dim, cluster, t)
        elif i > 0 and g.name in perms:  # groups in neither stay as they are (partial zip)
            t = t.index_select(m.dim, member_index(g, m, perms[g.name]))
    return t, averaged


def merge_tensor(tensors: list[torch.Tensor], touching: list, zips: Mapping[str, Zip],
                 perms: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """One merged tensor (float64) of K models: Σ_i M_out^(i) W^(i) U_in^(i), or the average
    of the first and the others permuted (``perms``: per model after the first) where no zip
    produces its output side."""
    total = None
    for i, t in enumerate(tensors):
        t, averaged = _term(t, i, touching, zips, perms[i - 1] if i else {})
        t = t if averaged else t / len(tensors)
        total = t if total is None else total + t
    return total


def merge(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
          zips: Mapping[str, Zip], perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged state of two models (``merge_tensor`` of every float tensor; others from
    A). With no zips, this is the average of A and the permuted B."""
    touching = _members_of(spec)
    return {name: merge_tensor([value, b[name]], touching.get(name, []), zips, [perms]).to(
        value.dtype) if value.is_floating_point() else value for name, value in a.items()}


def head(spec: Spec, state: Mapping[str, torch.Tensor], i: int, names: list[str],
         zips: Mapping[str, Zip], perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model ``i``'s own tensors ``names`` (its classifier) moved into the merged unit spaces,
    not averaged with the other models': each task keeps its head (``perms``: model i's)."""
    touching = _members_of(spec)
    return {n: _term(state[n], i, touching.get(n, []), zips, perms)[0].to(state[n].dtype)
            for n in names}
