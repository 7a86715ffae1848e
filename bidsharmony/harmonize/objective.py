"""Terms of the harmonization distance D(x, x_s) with their analytic gradients.

All functions take batches ``(B, 1, H, W)`` and return per-slice values ``(B,)`` and, where a
gradient is needed by the alternating solver, ``d value / d x`` with the input's shape. The same
functions are differentiable by autograd, which the latent solver uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8
# Non-edge mask (docs/method.md §3): |Sobel| below this per-slice quantile, on foreground.
EDGE_QUANTILE = 0.30
FOREGROUND = 0.05


def _sobel_kernels(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    return torch.stack([k, k.T])[:, None]  # (2, 1, 3, 3): d/dW (columns), d/dH (rows)


def sobel(x: torch.Tensor) -> torch.Tensor:
    """G x: (B, 1, H, W) -> (B, 2, H, W), zero padding."""
    return F.conv2d(x, _sobel_kernels(x), padding=1)


def sobel_adjoint(v: torch.Tensor) -> torch.Tensor:
    """G^T v: (B, 2, H, W) -> (B, 1, H, W); the exact adjoint of ``sobel`` (zero padding included)."""
    return F.conv_transpose2d(v, _sobel_kernels(v), padding=1)


def non_edge_mask(source: torch.Tensor) -> torch.Tensor:
    """M: (B, 1, H, W) -> (B, 2, H, W) bool, per direction: flat (|G s| below the slice's 30th
    percentile) and foreground (s > 0.05)."""
    g = sobel(source).abs()
    thr = torch.quantile(g.flatten(2), EDGE_QUANTILE, dim=2)[..., None, None]
    return (g < thr) & (source > FOREGROUND)


def masked_gradient_l1(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """||M . G x||_1 per slice and its (sub)gradient G^T (M . sign(G x))."""
    g = sobel(x) * mask
    return g.abs().flatten(1).sum(1), sobel_adjoint(torch.sign(g))


def _cosine(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf, sf = x.flatten(1), s.flatten(1)
    nx, ns = xf.norm(dim=1).clamp_min(EPS), sf.norm(dim=1).clamp_min(EPS)
    sim = (xf * sf).sum(1) / (nx * ns)
    grad = sf / (nx * ns)[:, None] - sim[:, None] * xf / (nx**2)[:, None]
    return sim, grad.view_as(x)


def cosine_similarity(x, s):
    """Uncentred cosine <x, s> / (|x| |s|) over the slice: what the published code uses."""
    return _cosine(x, s)


def normalized_cross_correlation(x, s):
    """Mean-removed NCC, as the poster writes D. The centring is a symmetric projection, so the
    gradient is the cosine gradient of the centred images (already mean-free)."""
    xc = x - x.mean(dim=(1, 2, 3), keepdim=True)
    sc = s - s.mean(dim=(1, 2, 3), keepdim=True)
    return _cosine(xc, sc)


SIMILARITIES = {"cosine": cosine_similarity, "ncc": normalized_cross_correlation}
