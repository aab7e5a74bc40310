import torch

from workers.merge import quantile


def test_radix_select_finds_kth_largest_with_duplicates_and_zeros():
    """Two 16-bit histogram passes give exactly the k-th largest |x|, ties and zeros included."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, generator=g), torch.zeros(100), torch.full((50,), 0.5),
                   -torch.full((50,), 0.5)])
    ordered = torch.sort(x.abs(), descending=True).values
    bits = quantile.magnitude_bits(x)
    for k in (1, 2, 37, 100, 150, 599, 700):
        high, rank = quantile.select(quantile.high_histogram(bits), k)
        low, _ = quantile.select(quantile.low_histogram(bits, high), rank)
        assert quantile.bits_to_float(high, low) == float(ordered[k - 1]), k
