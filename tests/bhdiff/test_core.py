"""BlindHarmonyDiff's parts: edges, the velocity U-Net, the loss, the sampler and the refinement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidsharmony.bhdiff.edges import edge_agreement, edge_map, rank_transform
from bidsharmony.bhdiff.rectified import (
    coordinates,
    denormalise,
    flow_matching_loss,
    normalise,
    patchwise,
    pearson,
    refine,
    sample_midpoint,
)
from bidsharmony.bhdiff.unet import PRESETS, build_unet


def blob_volume(seed=0, shape=(40, 44, 36)):
    """A head-like volume: an ellipsoid with inner structures, smooth."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2)
    v = np.where(r < 0.85, 0.6, 0.0) + np.where(r < 0.5, 0.3, 0.0) + 0.2 * (np.abs(g[0]) < 0.1) * (r < 0.8)
    return ndimage.gaussian_filter(v + 0.01 * rng.standard_normal(shape), 1.0).astype(np.float32)


def test_rank_transform_is_invariant_to_monotone_maps():
    v = blob_volume()
    mask = v > 0.1
    np.testing.assert_allclose(rank_transform(v, mask), rank_transform(np.exp(3 * v.astype(np.float64)) * 500 + 7, mask), atol=1e-6)


def test_edges_of_a_monotone_transform_are_the_same_edges():
    v = blob_volume()
    e = edge_map(v)
    assert 0.005 < e.mean() < 0.3
    v64 = v.astype(np.float64)
    assert edge_agreement(edge_map(3.0 * v64 + 5.0), e, tolerance_vox=0) == pytest.approx(1.0, abs=1e-6)  # affine: exact
    assert edge_agreement(edge_map(np.exp(2 * v64) * 1000), e, tolerance_vox=1) > 0.9  # non-linear: the head's rim may move
    assert edge_agreement(e, np.zeros_like(e)) == 0.0


def test_unet_shapes_identity_start_and_paper_size():
    model = build_unet("tiny")
    x, cond = torch.randn(2, 1, 16, 16, 8), torch.randn(2, 4, 16, 16, 8)
    out = model(x, torch.rand(2), cond)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output: v = 0 before training
    n = sum(p.numel() for p in build_unet("paper").parameters())
    assert 95e6 < n < 100e6  # the reference: ≈ 98.5 M


def test_flow_matching_loss_falls_on_tiny_volumes():
    torch.manual_seed(0)
    model = build_unet("tiny")
    x = torch.from_numpy(normalise(blob_volume(), blob_volume() > 0.05)[0][:16, :16, :16])[None, None].repeat(4, 1, 1, 1, 1)
    cond = torch.cat([torch.from_numpy(edge_map(blob_volume())[:16, :16, :16])[None, None],
                      torch.from_numpy(coordinates((16, 16, 16)))[None]], dim=1).repeat(4, 1, 1, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = flow_matching_loss(model, x, cond, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])


def test_midpoint_sampler_integrates_a_known_velocity_exactly():
    """dx/dt = a + b·t from x0: x(1) = x0 + a + b/2, which the midpoint rule gets exactly."""
    a, b = torch.tensor(0.3), torch.tensor(-1.7)
    x0 = torch.randn(2, 1, 4, 4, 4)
    x1 = sample_midpoint(lambda x, t: (a + b * t).view(-1, 1, 1, 1, 1).expand_as(x), x0, steps=3)
    torch.testing.assert_close(x1, x0 + a + b / 2)
    # and a velocity that depends on x (dx/dt = −x): second-order accurate
    exact = x0 * np.exp(-1.0)
    err = [float((sample_midpoint(lambda x, t: -x, x0, steps=n) - exact).abs().max()) for n in (10, 20)]
    assert err[1] < err[0] / 3.5


def test_patchwise_velocity_equals_the_whole_volume_one_for_a_local_field():
    """For a voxel-wise velocity, averaging overlapping patches reproduces the field exactly."""
    x, cond = torch.randn(1, 1, 20, 18, 12), torch.randn(1, 4, 20, 18, 12)

    def field(xp, t, cp):
        return 2 * xp + cp[:, :1] + t.view(-1, 1, 1, 1, 1)

    whole = field(x, torch.tensor([0.4]), cond)
    torch.testing.assert_close(patchwise(field, patch=8, overlap=3)(x, torch.tensor([0.4]), cond), whole)


def test_refinement_raises_the_correlation_with_the_source():
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(1, 1, 12, 12, 12, generator=gen)
    x = 0.5 * source + torch.randn(1, 1, 12, 12, 12, generator=gen)
    mask = torch.ones_like(source, dtype=torch.bool)
    before = float(pearson(x, source, mask))
    after = float(pearson(refine(x, source, mask, steps=6, step=0.005), source, mask))
    assert after > before
    assert float(pearson(refine(x, source, mask, steps=6, step=0.05), source, mask)) > after


def test_normalise_round_trip_and_coordinates():
    v = blob_volume() * 1000 + 50
    mask = v > 100
    x, scale = normalise(v, mask)
    assert x.min() >= -1 and x.max() <= 1
    inside = (v >= np.percentile(v[mask], 0.5)) & (v <= np.percentile(v[mask], 99.5))
    np.testing.assert_allclose(denormalise(x, scale)[inside], v[inside], rtol=1e-4)
    c = coordinates((4, 5, 6), origin=(10, 0, 2), stride=(2, 1, 1), full_shape=(20, 5, 8))
    assert c.shape == (3, 4, 5, 6)
    assert c[0, 0, 0, 0] == pytest.approx(10 / 19 * 2 - 1) and c[0, -1, 0, 0] == pytest.approx(16 / 19 * 2 - 1)


def test_presets_build_the_documented_sizes():
    """Each preset builds its own network: sizes grow tiny < small < paper, and paper has the
    97.5 M parameters the README and docs/method.md §5 state (built on the meta device: no memory)."""
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_unet(name).parameters()) for name in PRESETS}
    assert counts["tiny"] < counts["small"] < counts["paper"]
    assert round(counts["paper"] / 1e6, 1) == 97.5, counts
