import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.consensus import ConsensusParams, consensus
from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic
from workers.merge.task_vectors import task_masks


def naive(xs, base, lambdas, k, scale):
    out = base.clone().reshape(-1)
    flat = [x.reshape(-1) - base.reshape(-1) for x in xs]
    for p in range(out.numel()):
        total = sum(float(t[p]) for t in flat)
        votes = sum(abs(float(t[p])) > lam * abs(total - float(t[p]))
                    for t, lam in zip(flat, lambdas))
        if votes >= k:
            out[p] = float(base.reshape(-1)[p]) + scale * total
    return out.reshape(base.shape)


def test_matches_naive_reference():
    *xs, base = tensors(5, shape=(8, 16))
    p = params(ConsensusParams, 4, mask_lambda=[0.2, 0.4, 0.6, 0.5], k=2, scale=0.6)
    got = consensus(xs, p, base=base)
    torch.testing.assert_close(got, naive(xs, base, [0.2, 0.4, 0.6, 0.5], 2, 0.6))
    kept = got != base
    assert 0 < kept.float().mean() < 1  # some entries dropped, some kept


def test_k_zero_is_task_arithmetic():
    *xs, base = tensors(4)
    got = consensus(xs, params(ConsensusParams, 3, k=0, scale=0.3), base=base)
    torch.testing.assert_close(got, task_arithmetic(xs, params(TaskArithmeticParams, 3,
                                                               scale=0.3), base=base))


def test_k_one_drops_only_catastrophic_entries():
    """k = 1 is τ_MTL restricted to entries some task's mask holds."""
    *xs, base = tensors(4)
    deltas = torch.stack([x - base for x in xs])
    masks = task_masks(deltas, deltas.sum(0), [0.6] * 3)
    want = base + deltas.sum(0) * masks.any(0)
    torch.testing.assert_close(consensus(xs, params(ConsensusParams, 3, k=1), base=base), want)


def test_masks_shrink_as_lambda_grows():
    *xs, base = tensors(4, shape=(32, 32))
    deltas = torch.stack([x - base for x in xs])
    sizes = [int(task_masks(deltas, deltas.sum(0), [lam] * 3).sum())
             for lam in (0.2, 0.4, 0.6, 1.0)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_single_task_mask_holds_every_changed_entry():
    x, base = tensors(2)
    deltas = torch.stack([x - base])
    assert task_masks(deltas, deltas.sum(0), [0.6]).all()
