"""Permutation solvers: weight matching (Git Re-Basin, Ainsworth et al., 2023,
arXiv:2209.04836) and activation matching (correlation of unit activations, as in Li et al.,
2016 and ZipIt!'s permute baseline), and the average of a model with an aligned other.

Every solver returns ``{group name: perm}`` that aligns model B to model A: applying the perms
to B (``spec.apply``) leaves B's function unchanged and puts its units in A's order.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch

from workers.align.spec import Group, Member, Spec, member_index


def max_assignment(profit: np.ndarray) -> np.ndarray:
    """Each row's column in the assignment of greatest total profit (scipy's solver, imported
    on first use: merges without alignment never need it, and it costs 0.3 s per process)."""
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(profit, maximize=True)[1]


def assign(group: Group, profit: torch.Tensor) -> torch.Tensor:
    """The valid permutation maximising Σ_u profit[u, perm[u]] (rows: A's units, columns: B's).

    Head groups are solved in two levels (MuDSC's group matching): each pair of heads scores
    the best matching of their dimensions (or the identity when dimensions may not move),
    then heads are assigned to heads by those scores."""
    p = profit.double().numpy()
    if group.head_dim is None:
        return torch.from_numpy(max_assignment(p)).long()
    hd = group.head_dim
    heads = group.size // hd
    blocks = p.reshape(heads, hd, heads, hd).transpose(0, 2, 1, 3)
    score = np.empty((heads, heads))
    inner = np.empty((heads, heads, hd), dtype=np.int64)
    for j in range(heads):
        for k in range(heads):
            if group.within:
                cols = max_assignment(blocks[j, k])
            else:
                cols = np.arange(hd)
            inner[j, k] = cols
            score[j, k] = blocks[j, k][np.arange(hd), cols].sum()
    match = max_assignment(score)
    return torch.from_numpy(np.concatenate([match[j] * hd + inner[j, match[j]]
                                            for j in range(heads)])).long()


def _unfold(group: Group, member: Member, t: torch.Tensor) -> torch.Tensor:
    """``t`` as [group units, everything else] (query-head copies folded into the rest)."""
    x = t.movedim(member.dim, 0).double()
    if member.repeat == 1:
        return x.reshape(group.size, -1)
    hd, r = group.head_dim, member.repeat
    x = x.reshape(group.size // hd, r, hd, -1).transpose(1, 2)
    return x.reshape(group.size, -1)


def _members_of(spec: Spec) -> dict[str, list[tuple[Group, Member]]]:
    touching: dict[str, list[tuple[Group, Member]]] = {}
    for g in spec.groups:
        for m in g.members:
            touching.setdefault(m.tensor, []).append((g, m))
    return touching


def _permuted(t: torch.Tensor, touching: list[tuple[Group, Member]],
              perms: Mapping[str, torch.Tensor], skip: str | None = None) -> torch.Tensor:
    for g, m in touching:
        if g.name != skip:
            t = t.index_select(m.dim, member_index(g, m, perms[g.name]))
    return t


def _step(g: Group, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
          perms: Mapping[str, torch.Tensor], touching: dict) -> torch.Tensor | None:
    """One coordinate step: group ``g``'s best permutation with the others fixed (its profit
    summed over every tensor it touches), or None where it does not improve on the current."""
    profit = torch.zeros(g.size, g.size, dtype=torch.float64)
    for m in g.members:
        other = _permuted(b[m.tensor], touching[m.tensor], perms, skip=g.name)
        profit += _unfold(g, m, a[m.tensor]) @ _unfold(g, m, other).T
    new = assign(g, profit)
    old_value = profit[torch.arange(g.size), perms[g.name]].sum()
    better = profit[torch.arange(g.size), new].sum() > old_value + 1e-12 * abs(old_value)
    return new if better else None


def colors(spec: Spec) -> list[list[str]]:
    """The groups in classes no two of which share a tensor (greedy colouring in spec order):
    within a class, coordinate steps do not see each other's permutations. A transformer
    gives two: the residual stream, then every block's MLP-hidden and attention groups."""
    tensors = {g.name: {m.tensor for m in g.members} for g in spec.groups}
    classes: list[list[str]] = []
    for g in spec.groups:
        free = next((c for c in classes if not any(tensors[g.name] & tensors[o] for o in c)),
                    None)
        if free is None:
            classes.append([g.name])
        else:
            free.append(g.name)
    return classes


def weight_matching(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                    *, max_sweeps: int = 100, seed: int = 0,
                    schedule: str = "sequential") -> tuple[dict[str, torch.Tensor],
                                                            list[float]]:
    """Coordinate descent on Σ_tensors ⟨A, π(B)⟩: one group at a time (random order per sweep),
    the others fixed, its permutation is a linear assignment on the summed profit of every
    tensor it touches. Stops when a sweep changes nothing. Returns the perms and the objective
    after each sweep (never decreasing). ``schedule: colors`` is ``colored_descent`` here."""
    touching = _members_of(spec)
    if schedule == "colors":
        def steps(names, perms):
            return {n: _step(spec.group(n), a, b, perms, touching) for n in names}

        return colored_descent(spec, steps, lambda perms: objective(spec, a, b, perms),
                               max_sweeps=max_sweeps, seed=seed)
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(max_sweeps):
        changed = False
        for gi in rng.permutation(len(spec.groups)):
            g = spec.groups[gi]
            new = _step(g, a, b, perms, touching)
            if new is not None:
                perms[g.name] = new
                changed = True
        history.append(objective(spec, a, b, perms))
        if not changed:
            break
    return perms, history


def colored_descent(spec: Spec, steps: Callable[[list[str], dict], dict],
                    score: Callable[[dict], float], *, max_sweeps: int = 100,
                    seed: int = 0) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Weight matching, Jacobi-style: per sweep the ``colors`` classes in random order, every
    group of a class stepped at once from the same permutations (``steps(names, perms) ->
    {name: new perm or None}``, e.g. spread over workers: the result does not depend on how).
    A variant of the sequential descent: the order differs, so the fixed point may too; the
    objective still never decreases (steps in one class touch disjoint tensors)."""
    perms = {g.name: torch.arange(g.size) for g in spec.groups}
    classes = colors(spec)
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(max_sweeps):
        changed = False
        for ci in rng.permutation(len(classes)):
            found = steps(classes[ci], dict(perms))
            for name in classes[ci]:
                if found[name] is not None:
                    perms[name] = found[name]
                    changed = True
        history.append(score(perms))
        if not changed:
            break
    return perms, history


def objective(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
              perms: Mapping[str, torch.Tensor]) -> float:
    """Σ over the spec's tensors of ⟨A, π(B)⟩."""
    touching = _members_of(spec)
    return float(sum((a[t].double() * _permuted(b[t], touching[t], perms).double()).sum()
                     for t in touching))


class ActivationStats:
    """Running sums of one group's unit activations of ``models`` models on the same inputs,
    in float64 and shifted by the first batch's mean (so large means do not cancel the variance
    away): enough for correlations and CKA. Partial statistics add up exactly as sums do."""

    def __init__(self, size: int, models: int = 2, other: int | None = None):
        """``size`` units per model; two models of different widths: ``other`` units for the
        second (``size`` stays the first's)."""
        self.size, self.n = size, 0
        self.widths = [size] * models if other is None else [size, other]
        total = sum(self.widths)
        self.shift = torch.zeros(total, dtype=torch.float64)
        self.sum = torch.zeros(total, dtype=torch.float64)
        self.outer = torch.zeros(total, total, dtype=torch.float64)

    def update(self, *features: torch.Tensor) -> None:
        """One batch: each model's [samples, size] activations, in model order."""
        f = torch.cat(features, dim=1).double()
        if self.n == 0:
            self.shift = f.mean(0)
        f = f - self.shift
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def add(self, other: "ActivationStats") -> None:
        """Fold in statistics of other samples (re-shifted to this shift)."""
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.shift = other.n, other.shift.clone()
            self.sum, self.outer = other.sum.clone(), other.outer.clone()
            return
        delta = other.shift - self.shift  # f − shift = (f − other.shift) + delta
        self.sum += other.sum + other.n * delta
        self.outer += (other.outer + torch.outer(other.sum, delta) + torch.outer(delta, other.sum)
                       + other.n * torch.outer(delta, delta))
        self.n += other.n

    def covariance(self) -> torch.Tensor:
        mean = self.sum / self.n
        return self.outer / self.n - torch.outer(mean, mean)

    def joint_correlation(self) -> torch.Tensor:
        """Pearson correlation of all units (model 0's, then model 1's, ...) with each other."""
        cov = self.covariance()
        std = cov.diagonal().clamp(min=0).sqrt().clamp(min=1e-12)
        return cov / torch.outer(std, std)

    def correlation(self, model: int = 1) -> torch.Tensor:
        """Pearson correlation between model 0's units (rows) and ``model``'s (columns)."""
        start = sum(self.widths[:model])
        return self.joint_correlation()[:self.size, start:start + self.widths[model]]

    def cka(self) -> torch.Tensor:
        """Linear CKA between every two models' activations (models x models)."""
        cov = self.covariance()
        k = len(self.sum) // self.size
        blocks = [[cov[i * self.size:(i + 1) * self.size, j * self.size:(j + 1) * self.size]
                   for j in range(k)] for i in range(k)]
        own = torch.tensor([float(blocks[i][i].square().sum().sqrt()) for i in range(k)],
                           dtype=torch.float64)
        cross = torch.tensor([[float(blocks[i][j].square().sum()) for j in range(k)]
                              for i in range(k)], dtype=torch.float64)
        return cross / torch.outer(own, own).clamp(min=1e-300)


def activation_matching(spec: Spec, stats: Mapping[str, ActivationStats]) -> dict[str,
                                                                                torch.Tensor]:
    """Each group on its own: the assignment maximising the summed correlation of matched
    units (statistics come from the original models, so groups do not interact)."""
    return {g.name: assign(g, stats[g.name].correlation()) for g in spec.groups}


def average(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
            perms: Mapping[str, torch.Tensor], weight: float = 0.5) -> dict[str, torch.Tensor]:
    """(1 − weight) A + weight π(B) for float tensors; other tensors from A."""
    from workers.align.spec import apply

    aligned = apply(spec, perms, b)
    return {k: (v * (1 - weight) + aligned[k] * weight).to(v.dtype)
            if v.is_floating_point() else v for k, v in a.items()}
