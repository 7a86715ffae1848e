"""Rational-quadratic spline coupling with a convolutional residual conditioner.

The spline arithmetic (bins, knots, forward, analytic inverse, log-derivative, linear tails outside
[-B, B]) comes from zuko's ``MonotonicRQSTransform``: it is maintained, tested and exactly what the
Neural Spline Flow defines. Only the image structure (channel split, conditioner) is written here.
zuko keeps bins and derivatives away from zero by a soft bound on the logits governed by
``slope`` (1e-3 here) rather than nflows' additive minimum of 1e-3; the role is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from zuko.transforms import MonotonicRQSTransform


def _softmax_last(t: torch.Tensor) -> torch.Tensor:
    # torch's CPU softmax over a short last axis (K = 8) is ~5x slower than this; same result.
    e = (t - t.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


class RQSpline(MonotonicRQSTransform):
    """zuko's monotonic RQ spline with the knots computed by a faster softmax.

    Only ``__init__`` (the map from unconstrained parameters to knots) is restated, with zuko's
    exact formulas; evaluation, analytic inverse and log-derivative are zuko's.
    """

    def __init__(self, widths, heights, derivatives, bound: float = 5.0, slope: float = 1e-3):
        super(MonotonicRQSTransform, self).__init__()
        log_slope = math.log(slope)
        widths = widths / (1 + abs(2 * widths / log_slope))
        heights = heights / (1 + abs(2 * heights / log_slope))
        derivatives = derivatives / (1 + abs(derivatives / log_slope))
        widths = F.pad(_softmax_last(widths), (1, 0), value=0)
        heights = F.pad(_softmax_last(heights), (1, 0), value=0)
        self.horizontal = bound * (2 * torch.cumsum(widths, dim=-1) - 1)
        self.vertical = bound * (2 * torch.cumsum(heights, dim=-1) - 1)
        self.derivatives = torch.exp(F.pad(derivatives, (1, 1), value=0))


class ResidualBlock(nn.Module):
    """BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv, plus the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        # Near-zero last layer: each block starts as the identity, so a deep flow starts stable.
        last = self.net[-1]
        nn.init.uniform_(last.weight, -1e-3, 1e-3)
        nn.init.uniform_(last.bias, -1e-3, 1e-3)

    def forward(self, x):
        return x + self.net(x)


class Conditioner(nn.Module):
    """1x1 conv in -> R residual blocks -> 1x1 conv out."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, blocks: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            *[ResidualBlock(hidden) for _ in range(blocks)],
            nn.Conv2d(hidden, out_channels, 1),
        )
        # Zero output (Glow): every spline starts as the identity. A randomly initialised deep
        # spline flow is chaotic (a perturbation grows ~40x per coupling), which makes float32
        # inversion useless; starting from the identity keeps it well conditioned as it trains.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return self.net(x)


class SplineCoupling(nn.Module):
    """The first half of the channels parameterises an elementwise RQ spline on the second half."""

    def __init__(self, channels: int, hidden: int, blocks: int, bins: int, bound: float):
        super().__init__()
        self.split = channels // 2
        self.bins = bins
        self.bound = bound
        transformed = channels - self.split
        self.params_per_dim = 3 * bins - 1  # K widths, K heights, K-1 interior derivatives
        self.conditioner = Conditioner(self.split, transformed * self.params_per_dim, hidden, blocks)

    # Mixed precision touches only the conditioner (set by training with --amp): the spline, its
    # inverse and log-derivative stay float32, so invertibility and log-likelihoods do not degrade.
    amp_dtype: torch.dtype | None = None

    def _spline(self, xa: torch.Tensor) -> RQSpline:
        b, _, h, w = xa.shape
        if self.amp_dtype is not None and self.training:
            with torch.autocast(xa.device.type, dtype=self.amp_dtype):
                p = self.conditioner(xa)
            p = p.float()
        else:
            p = self.conditioner(xa)
        p = p.view(b, -1, self.params_per_dim, h, w).permute(0, 1, 3, 4, 2)
        k = self.bins
        # Contiguous parameter tensors: softmax over a strided last axis is ~10x slower on CPU.
        widths, heights, derivs = (t.contiguous() for t in p.split([k, k, k - 1], dim=-1))
        return RQSpline(widths, heights, derivs, bound=self.bound, slope=1e-3)

    def forward(self, x):
        xa, xb = x[:, : self.split], x[:, self.split :]
        yb, ladj = self._spline(xa).call_and_ladj(xb)
        return torch.cat([xa, yb], dim=1), ladj.flatten(1).sum(1)

    def inverse(self, y):
        ya, yb = y[:, : self.split], y[:, self.split :]
        return torch.cat([ya, self._spline(ya).inv(yb)], dim=1)
