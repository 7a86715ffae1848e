"""Invertible layers of the image flow: squeeze, ActNorm, LU 1x1 convolution.

Each layer maps ``x -> (y, logdet)`` in ``forward`` and ``y -> x`` in ``inverse``; ``logdet`` is
per sample, shape ``(B,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """2x2 space-to-channel: (B, C, H, W) -> (B, 4C, H/2, W/2). Volume preserving."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(x, 2)


class ActNorm(nn.Module):
    """Per-channel affine map, initialised from the first batch to zero mean and unit variance."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x):
        if self.training and not self.initialized:
            self._init_from(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        return y * torch.exp(-self.log_scale) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution, W = P L (U + diag(sign(s) exp(log|s|))), plus a bias.

    The LU form makes log|det W| a sum and keeps W invertible by construction (Glow). The bias
    follows the reference architecture, whose count of 14 486 534 parameters includes it.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        rows, cols = torch.tril_indices(channels, channels, -1)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("tril_idx", torch.stack([rows, cols]))
        # Only the free entries are parameters (c(c-1)/2 each for L and U), so counts are honest.
        self.lower = nn.Parameter(lower[rows, cols].float())
        self.upper = nn.Parameter(upper.T[rows, cols].float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())
        self.bias = nn.Parameter(torch.zeros(channels))

    def weight(self) -> torch.Tensor:
        c = self.log_s.shape[0]
        rows, cols = self.tril_idx
        eye = torch.eye(c, device=self.log_s.device, dtype=self.log_s.dtype)
        lower = eye.index_put((rows, cols), self.lower)
        upper = torch.diag(self.sign_s * torch.exp(self.log_s)).index_put((cols, rows), self.upper)
        return self.perm @ lower @ upper

    def forward(self, x):
        w = self.weight()
        y = F.conv2d(x, w[:, :, None, None], self.bias)
        logdet = self.log_s.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        # Inverting in float64 keeps 28 stacked layers invertible to ~1e-5 in float32.
        w_inv = torch.linalg.inv(self.weight().double()).to(y.dtype)
        return F.conv2d(y - self.bias[None, :, None, None], w_inv[:, :, None, None])
