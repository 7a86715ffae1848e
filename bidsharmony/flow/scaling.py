"""The one place where [0, 1] slices meet the flow's input scale.

Slices are quantised to 12 bits (0…4095) and dequantised with uniform noise; the flow sees
``(q + u) / 4096 - 0.5`` (docs/method.md §1). Bits per dimension are computed against that discrete
grid, so they are comparable with the literature.
"""

from __future__ import annotations

import math

import torch

BITS = 12
LEVELS = 2**BITS  # 4096 bins; the largest code is 4095


def quantise(x01: torch.Tensor) -> torch.Tensor:
    """[0, 1] intensities -> integer codes 0…4095 (as float)."""
    return torch.round(x01.clamp(0.0, 1.0) * (LEVELS - 1))


def to_flow(x01: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """[0, 1] slice -> flow input. ``noise`` is U[0, 1) of the same shape (dequantisation);
    ``None`` uses the bin centre (deterministic evaluation)."""
    q = quantise(x01)
    q = q + (0.5 if noise is None else noise)
    return q / LEVELS - 0.5


def from_flow(y: torch.Tensor) -> torch.Tensor:
    """Flow output -> [0, 1] slice, re-quantised to the 12-bit grid and clipped."""
    q = torch.floor((y + 0.5) * LEVELS).clamp(0, LEVELS - 1)
    return q / (LEVELS - 1)


def bits_per_dim(log_prob: torch.Tensor, num_dims: int) -> torch.Tensor:
    """Discrete NLL in bits/dim from the continuous log-density of the flow input."""
    return -(log_prob - num_dims * math.log(LEVELS)) / (num_dims * math.log(2.0))
