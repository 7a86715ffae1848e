import math

import torch

from bidsharmony.flow.scaling import LEVELS, bits_per_dim, from_flow, quantise, to_flow


def test_round_trip_is_exact_on_the_12_bit_grid():
    codes = torch.arange(LEVELS, dtype=torch.float32)
    x = codes / (LEVELS - 1)
    noise = torch.rand(LEVELS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(quantise(x), codes)
    assert torch.equal(from_flow(to_flow(x, noise)), x)
    assert torch.equal(from_flow(to_flow(x)), x)


def test_flow_scale_is_centred():
    y = to_flow(torch.tensor([0.0, 1.0]))
    assert -0.5 < y[0] < -0.49 and 0.49 < y[1] < 0.5


def test_out_of_range_is_clipped():
    assert torch.equal(from_flow(torch.tensor([-3.0, 3.0])), torch.tensor([0.0, 1.0]))


def test_uniform_density_is_twelve_bits():
    # A uniform density on [-0.5, 0.5]^D (log p = 0) spends exactly 12 bits per dimension.
    assert math.isclose(bits_per_dim(torch.tensor(0.0), 100).item(), 12.0, rel_tol=1e-6)
