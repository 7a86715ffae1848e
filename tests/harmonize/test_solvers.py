import pytest
import torch
from torch import nn

from bidsharmony.flow.scaling import quantise
from bidsharmony.harmonize.solvers import HarmonizeParams, Trace, harmonize_slices


@pytest.fixture(scope="module")
def flow():
    from bidsharmony.flow.model import build_flow

    torch.manual_seed(0)
    f = build_flow("tiny")
    f.train()
    opt = torch.optim.Adam(f.parameters(), lr=2e-3)
    x = torch.rand(8, 1, 144, 176) - 0.5
    for _ in range(5):
        loss = -f.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return f.eval()


@pytest.fixture(scope="module")
def source():
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.avg_pool2d(torch.rand(12, 1, 144, 176, generator=g), 5, 1, 2)[:, 0]
    return (x - x.amin((1, 2), keepdim=True)) / (x.amax((1, 2), keepdim=True) - x.amin((1, 2), keepdim=True))


@pytest.mark.parametrize("use_start", [False, True])
def test_without_any_force_the_loop_returns_its_start(flow, source, use_start):
    start = torch.rand_like(source) if use_start else None
    p = HarmonizeParams(iterations=3, alpha=0.0, beta_fidelity=0.0, beta_gradient=0.0, batch_size=5)
    out = harmonize_slices(flow, source, p, start=start)
    expected = (source if start is None else start)
    # Up to quantisation (12 bits) and float32 inversion.
    assert (out - quantise(expected) / 4095).abs().max().item() <= 1.5 / 4095


@pytest.mark.parametrize("solver", ["alternating", "latent"])
def test_no_iterations_return_the_source_exactly_and_leave_the_flow_alone(flow, source, solver):
    """The default (0 iterations): the slices as given, bit for bit, with no flow pass (a flow
    that raises proves it); with a start image the start is what comes back, as before."""

    class Untouchable(nn.Module):
        def forward(self, *a):
            raise AssertionError("the flow ran")

        inverse = forward

    p = HarmonizeParams(iterations=0, solver=solver)
    assert torch.equal(harmonize_slices(Untouchable(), source, p), source)
    start = torch.rand_like(source)
    out = harmonize_slices(flow, source, HarmonizeParams(iterations=0), start=start)
    assert torch.equal(out, start)


def test_same_seed_same_output_and_batch_size_does_not_matter(flow, source):
    p = HarmonizeParams(iterations=3, batch_size=12, seed=7)
    a = harmonize_slices(flow, source, p)
    b = harmonize_slices(flow, source, p)
    c = harmonize_slices(flow, source, HarmonizeParams(iterations=3, batch_size=5, seed=7))
    d = harmonize_slices(flow, source, HarmonizeParams(iterations=3, batch_size=12, seed=8))
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)


@pytest.mark.parametrize("similarity", ["ncc", "cosine"])
def test_the_loop_moves_towards_the_source_and_records_a_trace(flow, source, similarity):
    # A blurred, reversed copy: another "anatomy", as a mean start image would be.
    start = torch.nn.functional.avg_pool2d(source.flip(0)[:, None], 9, 1, 4)[:, 0]
    trace = Trace()
    out = harmonize_slices(flow, source, HarmonizeParams(iterations=6, batch_size=12, similarity=similarity), start=start, trace=trace)
    assert len(trace.similarity) == 6 and len(trace.z_norm) == 6
    assert trace.similarity[-1] > trace.similarity[0]
    # NCC ignores offset and scale, so "towards" means correlation, not absolute error.
    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]

    assert corr(out, source) > corr(start, source) + 0.05


class _BrokenInverse(nn.Module):
    """Fault injection around a real flow: the inverse returns NaN for even slices."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, x):
        return self.flow(x)

    def inverse(self, z):
        x = self.flow.inverse(z).clone()
        x[::2] = float("nan")
        return x


def test_fallback_keeps_the_image_step_where_the_flow_fails(flow, source):
    trace = Trace()
    p = HarmonizeParams(iterations=2, batch_size=4)
    out = harmonize_slices(_BrokenInverse(flow), source, p, trace=trace)
    assert torch.isfinite(out).all()
    assert trace.fallbacks == [6, 6]
    good = harmonize_slices(flow, source, p)
    assert torch.equal(out[1::2], good[1::2])  # slices do not interact


class _OOMAbove(nn.Module):
    """Fault injection: raises CUDA-style out-of-memory for batches larger than `limit`."""

    def __init__(self, flow, limit):
        super().__init__()
        self.flow, self.limit = flow, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.flow(x)

    def inverse(self, z):
        return self.flow.inverse(z)


def test_out_of_memory_halves_the_batch_and_finishes(flow, source, caplog):
    p = HarmonizeParams(iterations=2, batch_size=12)
    out = harmonize_slices(_OOMAbove(flow, 3), source, p)
    assert torch.equal(out, harmonize_slices(flow, source, p))
    assert "batch size lowered to 3" in caplog.text


def test_latent_solver_lowers_its_objective(flow, source):
    trace = Trace()
    p = HarmonizeParams(solver="latent", iterations=8, batch_size=6, latent_lr=0.05)
    start = torch.nn.functional.avg_pool2d(source.flip(0)[:, None], 9, 1, 4)[:, 0]
    out = harmonize_slices(flow, source, p, start=start, trace=trace)
    assert out.shape == source.shape and torch.isfinite(out).all()
    assert trace.similarity[-1] > trace.similarity[0]


def test_invalid_parameters_are_refused(flow, source):
    with pytest.raises(ValueError, match="similarity"):
        harmonize_slices(flow, source, HarmonizeParams(similarity="mse"))
    with pytest.raises(ValueError, match="solver"):
        harmonize_slices(flow, source, HarmonizeParams(solver="sgd"))
