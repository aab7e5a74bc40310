import torch

from tests.unit.merge.helpers import params, tensors
from workers.merge.tall import TallParams, tall, tall_masks
from workers.merge.task_arithmetic import TaskArithmeticParams, task_arithmetic


def test_output_is_the_unscaled_multi_task_vector():
    *xs, base = tensors(4)
    got = tall(xs, params(TallParams, 3, weight=[1, 0.5, 2]), base=base)
    want = task_arithmetic(xs, params(TaskArithmeticParams, 3, weight=[1, 0.5, 2]), base=base)
    torch.testing.assert_close(got, want)


def test_one_task_mask_restores_the_model():
    x, base = tensors(2)
    p = params(TallParams, 1)
    mask = tall_masks([x], p, base=base)[0]
    assert mask.all()
    torch.testing.assert_close(base + mask * (tall([x], p, base=base) - base), x,
                               rtol=1e-6, atol=1e-6)


def test_mask_is_where_a_task_outweighs_the_others():
    *xs, base = tensors(3, shape=(6, 6))
    masks = tall_masks(xs, params(TallParams, 2, mask_lambda=[0.5, 1.0]), base=base)
    t1, t2 = xs[0] - base, xs[1] - base
    assert torch.equal(masks[0], t1.abs() > 0.5 * t2.abs())
    assert torch.equal(masks[1], t2.abs() > t1.abs())
