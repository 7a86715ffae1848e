import math

import pytest
import torch

from bidsharmony.flow.coupling import RQSpline
from bidsharmony.flow.model import PRESETS, FlowConfig, SliceFlow, build_flow


def _initialised(flow, x, steps=3):
    """ActNorm init on a batch plus a few optimisation steps: a realistic, non-identity flow."""
    flow.train()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow.eval()


def test_paper_preset_matches_reference_parameter_count():
    # docs/method.md §2: 14 486 534 parameters (1x1 convs store only their free LU entries + bias).
    flow = build_flow("paper")
    assert sum(p.numel() for p in flow.parameters()) == 14_486_534


def test_level_shapes_follow_the_reference():
    flow = build_flow("paper")
    assert flow.latent_shapes == [(2, 72, 88), (4, 36, 44), (8, 18, 22), (32, 9, 11)]
    assert sum(math.prod(s) for s in flow.latent_shapes) == 144 * 176 == 25_344


def test_presets_are_ordered_by_size():
    sizes = {name: sum(p.numel() for p in build_flow(name).parameters()) for name in PRESETS}
    assert sizes["tiny"] < sizes["fast"] < sizes["paper"]


@pytest.mark.parametrize("preset", ["tiny", "fast"])
def test_inverse_of_forward_is_identity_on_random_input(preset):
    torch.manual_seed(0)
    x = torch.rand(4, 1, 144, 176) - 0.5
    flow = _initialised(build_flow(preset), x)
    with torch.no_grad():
        z, logdet = flow(x)
        assert z.shape == (4, 25_344) and logdet.shape == (4,)
        assert (flow.inverse(z) - x).abs().max().item() < 1e-4


def test_inverse_of_forward_is_identity_on_real_slices(real_slices):
    from bidsharmony.flow.scaling import to_flow

    x = to_flow(torch.from_numpy(real_slices[::20].copy())[:, None])
    flow = _initialised(build_flow("fast"), x, steps=5)
    with torch.no_grad():
        z, _ = flow(x)
        assert (flow.inverse(z) - x).abs().max().item() < 1e-4


def test_logdet_equals_brute_force_jacobian():
    torch.manual_seed(1)
    cfg = FlowConfig(levels=2, steps=1, hidden=4, blocks=1, slice_shape=(4, 4))
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64) * 0.8
    flow = _initialised(SliceFlow(cfg).double(), x.repeat(8, 1, 1, 1) + 0.3 * torch.randn(8, 1, 4, 4, dtype=torch.float64))
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 1, 4, 4))[0].view(-1), x.view(-1))
    _, logdet = flow(x)
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-8)


def test_rq_spline_agrees_with_zuko():
    from zuko.transforms import MonotonicRQSTransform

    g = torch.Generator().manual_seed(0)
    w, h, d = (torch.randn(6, 10, k, generator=g) * 3 for k in (8, 8, 7))
    x = torch.randn(6, 10, generator=g) * 3
    ours, ref = RQSpline(w, h, d, bound=3.0), MonotonicRQSTransform(w, h, d, bound=3.0)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.inv(x), ref.inv(x))
    torch.testing.assert_close(ours.call_and_ladj(x)[1], ref.call_and_ladj(x)[1], atol=1e-5, rtol=1e-5)


def test_untrained_flow_is_an_orthogonal_map():
    # Before training: splines are the identity, ActNorm is the identity and each 1x1 conv is a
    # random rotation (QR), so f preserves norms and has log|det| = 0.
    flow = build_flow("tiny").eval()
    x = torch.randn(3, 1, 144, 176)
    with torch.no_grad():
        z, logdet = flow(x)
    torch.testing.assert_close(z.norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logdet, torch.zeros(3), atol=1e-3, rtol=0)


def test_sample_shape_and_temperature():
    flow = build_flow("tiny").eval()
    g = torch.Generator().manual_seed(0)
    cold = flow.sample(2, temperature=0.1, generator=g)
    hot = flow.sample(2, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert cold.shape == (2, 1, 144, 176)
    assert cold.std() < hot.std()


def test_bad_slice_shape_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        build_flow("paper", slice_shape=(100, 176))
