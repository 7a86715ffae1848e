"""Checks that need a CUDA GPU (marker ``cuda``); they skip without one.

``benchmarks/gpu_window.py`` runs them first on a GPU machine, where only torch, numpy, scipy and
safetensors are installed: nothing here may need nibabel, pybids, nipype or antspyx, nor a pytest
fixture (the window can run these as plain functions).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHIPPED = Path(__file__).resolve().parents[1] / "bidsharmony" / "data" / "models" / "ixi-hh-fast"


def _slices(n: int = 24) -> torch.Tensor:
    """(n, 144, 176) real head slices in [0, 1]: the shipped model's mean target slices, spread over
    the head (no data set needed; the model is inside the working tree)."""
    from bidsharmony.flow.checkpoint import load_model

    start = load_model(SHIPPED).extras["start_images"]
    return start[torch.linspace(5, len(start) - 5, n).round().long()].clone()


def _trained_flow(device="cuda"):
    """The shipped `fast` model's flow (trained weights: splines that are not the identity)."""
    from bidsharmony.flow.checkpoint import load_model

    return load_model(SHIPPED, device=device).flow


@pytest.mark.cuda
def test_harmonization_is_reproducible_on_cuda():
    from bidsharmony.harmonize.solvers import HarmonizeParams, harmonize_slices

    flow, src = _trained_flow(), _slices()
    a = harmonize_slices(flow, src, HarmonizeParams(batch_size=8), device="cuda")
    b = harmonize_slices(flow, src, HarmonizeParams(batch_size=8), device="cuda")
    assert torch.equal(a, b), "same seed, same batch: the CUDA generator must give the same volume"
    c = harmonize_slices(flow, src, HarmonizeParams(batch_size=24), device="cuda")
    d = (a - c).abs() * 4095
    # noise is drawn for the whole volume, so the batch size only changes cuDNN's algorithm choice
    # (TF32 by default): a code here and there, nothing systematic (on a CPU the two are equal)
    assert (d > 1.5).float().mean().item() < 1e-2 and d.mean().item() < 0.1, (float((d > 1.5).float().mean()), float(d.mean()))
    e = harmonize_slices(flow, src, HarmonizeParams(batch_size=8, seed=1), device="cuda")
    assert not torch.equal(a, e), "another seed must draw other dequantisation noise"
    assert a.device.type == "cpu" and a.shape == src.shape and 0 <= a.min() and a.max() <= 1


@pytest.mark.cuda
def test_mean_start_runs_on_cuda_with_start_images_on_the_cpu():
    from bidsharmony.flow.checkpoint import load_model
    from bidsharmony.harmonize.solvers import HarmonizeParams, harmonize_slices

    m = load_model(SHIPPED, device="cuda")
    src = _slices(6)
    start = m.extras["start_images"][torch.arange(20, 26)]
    out = harmonize_slices(m.flow, src, HarmonizeParams(start="mean", batch_size=4), start=start, device="cuda")
    assert out.shape == src.shape and torch.isfinite(out).all()


@pytest.mark.cuda
def test_bf16_autocast_training_step():
    from bidsharmony.flow.coupling import SplineCoupling
    from bidsharmony.flow.model import build_flow
    from bidsharmony.flow.scaling import bits_per_dim, to_flow

    torch.manual_seed(0)
    flow = build_flow("fast").cuda()
    flow.load_state_dict(_trained_flow().state_dict())
    flow.train()
    x = to_flow(_slices(16).cuda()[:, None], torch.rand(16, 1, 144, 176, device="cuda"))
    with torch.no_grad():
        fp32 = bits_per_dim(flow.log_prob(x), flow.num_dims).mean().item()
    for m in flow.modules():
        if isinstance(m, SplineCoupling):
            m.amp_dtype = torch.bfloat16  # what --amp sets
    opt = torch.optim.Adam(flow.parameters(), lr=1e-5)
    loss = bits_per_dim(flow.log_prob(x), flow.num_dims).mean()
    assert abs(loss.item() - fp32) < 0.05, (loss.item(), fp32)  # bf16 conditioners, float32 splines
    opt.zero_grad()
    loss.backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    opt.step()
    after = bits_per_dim(flow.log_prob(x), flow.num_dims).mean().item()
    assert after == after and after < loss.item() + 0.05
    flow.eval()
    with torch.no_grad():
        z, _ = flow(x)
        assert (flow.inverse(z) - x).abs().max().item() < 1e-4


@pytest.mark.cuda
def test_out_of_memory_halves_the_batch_on_cuda():
    from bidsharmony.harmonize.solvers import HarmonizeParams, _is_oom, harmonize_slices

    # a real allocation far beyond the card: the error the solvers must recognise
    free, total = torch.cuda.mem_get_info()
    try:
        torch.empty(int(total) * 4, dtype=torch.uint8, device="cuda")
        raise AssertionError("allocating four times the card's memory did not fail")
    except RuntimeError as e:
        assert _is_oom(e), repr(e)
    torch.cuda.empty_cache()

    flow = _trained_flow()

    class OOMAbove(torch.nn.Module):  # the flow, failing like the allocator above 4 slices
        def __init__(self):
            super().__init__()
            self.flow, self.cfg, self.calls = flow, flow.cfg, []

        def forward(self, x):
            self.calls.append(x.shape[0])
            if x.shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self.flow(x)

        def inverse(self, z):
            return self.flow.inverse(z)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("bidsharmony")
    log.addHandler(handler)
    try:
        src = _slices(12)
        wrapped = OOMAbove()
        got = harmonize_slices(wrapped, src, HarmonizeParams(iterations=3, batch_size=16), device="cuda")
    finally:
        log.removeHandler(handler)
    want = harmonize_slices(flow, src, HarmonizeParams(iterations=3, batch_size=4), device="cuda")
    assert torch.equal(got, want)
    assert wrapped.calls[:3] == [12, 8, 4] and max(wrapped.calls[3:]) == 4  # halved once, then kept
    assert any("out of memory" in r.getMessage() for r in records)


@pytest.mark.cuda
def test_flow_is_invertible_on_cuda_and_agrees_with_the_cpu():
    from bidsharmony.flow.model import build_flow
    from bidsharmony.flow.scaling import to_flow

    x = to_flow(_slices(8)[:, None])
    cpu = _trained_flow("cpu")
    gpu = _trained_flow("cuda")
    with torch.no_grad():
        z_cpu, ld_cpu = cpu(x)
        z, ld = gpu(x.cuda())
        assert (gpu.inverse(z) - x.cuda()).abs().max().item() < 1e-4
        # TF32 convolutions (torch's default for cuDNN) move z a little; the log-density barely
        torch.testing.assert_close(z.cpu(), z_cpu, atol=5e-2, rtol=1e-2)
        torch.testing.assert_close(ld.cpu(), ld_cpu, atol=0.5, rtol=1e-4)

    # `paper` with conditioners that are not zero (random weights would start as identities)
    torch.manual_seed(0)
    paper = build_flow("paper").cuda().train()
    with torch.no_grad():
        paper(x.cuda())  # ActNorm initialisation
        for name, p in paper.named_parameters():
            if "conditioner.net" in name and name.endswith(("weight", "bias")) and p.abs().max() == 0:
                p.normal_(0, 1e-2)
        paper.eval()
        z, _ = paper(x.cuda())
        assert (paper.inverse(z) - x.cuda()).abs().max().item() < 1e-3


@pytest.mark.cuda
def test_gpu_window_bf16_conditioners_keep_the_flow_invertible():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_window import conditioners_in

    from bidsharmony.flow.scaling import to_flow

    flow = _trained_flow()
    x = to_flow(_slices(8)[:, None]).cuda()
    with torch.no_grad():
        z, _ = flow(x)
        with conditioners_in(flow, torch.bfloat16):
            zb, _ = flow(x)
            err = (flow.inverse(zb) - x).abs()
    # bf16 rounding of the conditioners' outputs is not exactly repeated on the way back: on a CPU the
    # round trip is off by 2e-3 at most (9 of 4096 codes), 7e-5 on average; float32 by 1e-6
    assert err.max().item() < 0.02 and err.mean().item() < 1e-3, (err.max().item(), err.mean().item())
    assert 0 < (z - zb).abs().mean().item() < 0.5
    assert "forward" not in vars(next(m for m in flow.modules() if type(m).__name__ == "Conditioner"))
