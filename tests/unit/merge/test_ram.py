import torch

from tests.unit.merge.helpers import params
from workers.merge.ram import RamParams, ram
from workers.merge.ramplus_tl import RamPlusParams, ramplus_tl


def test_unique_changes_whole_shared_changes_averaged():
    base = torch.zeros(5)
    a = torch.tensor([1.0, 0.0, 2.0, 1e-7, 0.0])
    b = torch.tensor([0.0, 3.0, 4.0, 0.0, 0.0])
    c = torch.tensor([0.0, 0.0, 6.0, 0.0, 0.0])
    got = ram([a, b, c], params(RamParams, 3), base=base)
    # a alone, b alone, mean of three, below epsilon, untouched
    assert torch.equal(got, torch.tensor([1.0, 3.0, 4.0, 0.0, 0.0]))


def test_ram_plus_amplifies_unique_changes_by_the_shared_ratio():
    """Model a changes 2 entries alone and 1 with b: ρ_a = 1/2, capped at α = 0.3, so its unique
    changes are scaled by 1 + r · 0.3; b changes 1 alone and 1 shared: ρ_b = 1 → capped too."""
    base = torch.zeros(5)
    a = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0])
    b = torch.tensor([0.0, 0.0, 2.0, 5.0, 0.0])
    p = params(RamPlusParams, 2, r=0.5, alpha=0.3)
    got = ramplus_tl([a, b], p, base=base)
    lam = 1 + 0.5 * 0.3
    torch.testing.assert_close(got, torch.tensor([lam * 1.0, lam * 2.0, 3.0, lam * 5.0, 0.0]))
    plain = ramplus_tl([a, b], params(RamPlusParams, 2, r=0.0), base=base)
    assert torch.equal(plain, ram([a, b], params(RamParams, 2), base=base))  # r = 0 is RAM


def test_identical_models_return_the_model():
    base = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    x = base + 0.1
    torch.testing.assert_close(ram([x, x, x], params(RamParams, 3), base=base), x)
    torch.testing.assert_close(ramplus_tl([x, x], params(RamPlusParams, 2), base=base), x)
