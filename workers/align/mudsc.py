"""MuDSC: merging under dual-space constraints (Xu et al., CVPR 2024, arXiv:2403.17441).

Units are matched on a convex combination of two similarities, ``f * S_weight + (1 - f) *
S_act``: ``S_act`` is the activation correlation (as activation matching / ZipIt!), ``S_weight``
the Pearson correlation of the units' weight signatures (everything attached to a unit: its
rows, bias and norm entries, and its input columns downstream), with the other groups' dims
mapped through their current permutations. Because ``S_weight`` depends on those, the
permutation variant runs coordinate descent over the groups (random order) until a sweep
changes nothing. The zip variant zips each free group on the combined 2n x 2n similarity, with
weight signatures taken under the permutation variant's solution (a simplification: the paper
updates zips in the descent too); head groups keep the permutation variant's assignment.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from workers.align.match import ActivationStats, _members_of, _permuted, _unfold, assign
from workers.align.spec import Group, Spec
from workers.align.zip import Zip, zip_features


def _signatures(group: Group, state: Mapping[str, torch.Tensor], touching: dict,
                perms: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """[units, features]: every member's slice of each unit, other groups' perms applied."""
    parts = []
    for m in group.members:
        t = state[m.tensor]
        if perms is not None:
            t = _permuted(t, touching[m.tensor], perms, skip=group.name)
        parts.append(_unfold(group, m, t))
    return torch.cat(parts, dim=1)


def _row_corr(z: torch.Tensor) -> torch.Tensor:
    z = z - z.mean(1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return z @ z.T


def weight_similarity(group: Group, a: Mapping[str, torch.Tensor],
                      b: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor],
                      touching: dict) -> torch.Tensor:
    """2n x 2n correlation of A's and B's unit signatures (B's neighbours permuted)."""
    identity = {k: torch.arange(len(v)) for k, v in perms.items()}
    za = _signatures(group, a, touching, identity)
    zb = _signatures(group, b, touching, perms)
    return _row_corr(torch.cat([za, zb]))


def mudsc_perm(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
               stats: Mapping[str, ActivationStats], *, f: float = 0.5, max_sweeps: int = 100,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Permutations on f * S_weight + (1 - f) * S_act, by coordinate descent over groups."""
    touching = _members_of(spec)
    act = {g.name: stats[g.name].correlation() for g in spec.groups}
    perms = {g.name: assign(g, act[g.name]) for g in spec.groups}  # start from f = 0
    if f == 0:
        return perms
    rng = np.random.default_rng(seed)
    for _ in range(max_sweeps):
        changed = False
        for gi in rng.permutation(len(spec.groups)):
            g = spec.groups[gi]
            sim = weight_similarity(g, a, b, perms, touching)[:g.size, g.size:]
            new = assign(g, f * sim + (1 - f) * act[g.name])
            if not torch.equal(new, perms[g.name]):
                perms[g.name], changed = new, True
        if not changed:
            break
    return perms


def mudsc_zip(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
              stats: Mapping[str, ActivationStats], *, f: float = 0.5, alpha: float = 0.5,
              beta: float = 1.0, max_sweeps: int = 100, seed: int = 0,
              solved: Mapping[str, str] | None = None
              ) -> tuple[dict[str, Zip], dict[str, torch.Tensor]]:
    """Zips of the free groups on the combined 2n x 2n similarity; heads permuted. With
    ``solved`` (``spec.partial``), only those groups, the "perm" ones permuted."""
    touching = _members_of(spec)
    perms = mudsc_perm(spec, a, b, stats, f=f, max_sweeps=max_sweeps, seed=seed)
    if solved is not None:
        perms = {k: v for k, v in perms.items() if k in solved}
    zips = {}
    for g in spec.groups:
        if g.head_dim is not None or g.name not in perms or (
                solved is not None and solved[g.name] != "free"):
            continue
        sim = stats[g.name].joint_correlation()
        if f > 0:
            sim = f * weight_similarity(g, a, b, perms, touching) + (1 - f) * sim
        zips[g.name] = zip_features(sim, g.size, alpha=alpha, beta=beta)
    return zips, {k: v for k, v in perms.items() if k not in zips}
