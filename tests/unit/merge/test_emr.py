import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.emr import EmrParams, Rescalers, elect, emr, emr_masks
from workers.tasks import pack_masks, unpack_masks


def task_model(xs, base, t):
    """θ0 + s_t M_t ⊙ τ_uni for a single tensor (its own rescaler)."""
    p = params(EmrParams, len(xs))
    state = Rescalers().reduce(0, [Rescalers().collect(0, xs, p, base=base, state=None)], p,
                               None)
    uni = emr(xs, p, base=base) - base
    return base + state["rescalers"][t] * emr_masks(xs, p, base=base)[t] * uni


def test_matches_naive_election():
    *xs, base = tensors(4, shape=(5, 7))
    flat = [x.reshape(-1) - base.reshape(-1) for x in xs]
    got = (emr(xs, params(EmrParams, 3), base=base) - base).reshape(-1)
    for p in range(len(got)):
        vals = [float(t[p]) for t in flat]
        gamma = 1.0 if sum(vals) > 0 else -1.0
        want = gamma * max((abs(v) for v in vals if v * gamma > 0), default=0.0)
        assert abs(float(got[p]) - want) < 1e-6


def test_one_task_comes_back():
    x, base = tensors(2)
    torch.testing.assert_close(task_model([x], base, 0), x, rtol=1e-6, atol=1e-6)


def test_identical_models_give_each_model():
    x, base = tensors(2)
    for t in range(3):
        torch.testing.assert_close(task_model([x, x, x], base, t), x, rtol=1e-6, atol=1e-6)


def test_agreeing_signs_give_larger_unified_vector_and_rescalers_at_most_one():
    base = torch.zeros(6, 6)
    xs = [torch.rand(6, 6) + 0.01 for _ in range(3)]  # all positive: every sign agrees
    _, _, uni = elect(xs, base)
    assert all((uni >= x).all() for x in xs)
    p = params(EmrParams, 3)
    scales = Rescalers().reduce(0, [Rescalers().collect(0, xs, p, base=base, state=None)],
                                p, None)["rescalers"]
    assert all(0 < s <= 1 for s in scales)


def test_task_model_has_its_own_signs_on_its_mask():
    *xs, base = tensors(4, shape=(8, 8))
    masks = emr_masks(xs, params(EmrParams, 3), base=base)
    for t in range(3):
        tau = (task_model(xs, base, t) - base)[masks[t]]
        assert (torch.sign(tau) == torch.sign((xs[t] - base)[masks[t]])).all()


def test_masks_pack_and_unpack():
    masks = torch.rand(3, 37) > 0.5
    packed = pack_masks(masks)
    assert packed.shape == (5, 3) and packed.dtype == torch.uint8
    for t in range(3):
        assert torch.equal(unpack_masks(packed, t, 37), masks[t])
