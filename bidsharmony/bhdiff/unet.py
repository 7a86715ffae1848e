"""The 3D U-Net velocity field v(x_t, t | edges, coordinates) of BlindHarmonyDiff.

Input channels: the noisy volume x_t, the binary edge map and three normalised coordinates (the
true position of each voxel in the head's frame, so multi-stride patches know where they are).
Time enters every residual block through a sinusoidal embedding and an MLP. Attention (one
multi-head self-attention over voxels) sits at the deepest stage only, where few voxels remain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class UNetConfig:
    base: int = 64
    mults: tuple[int, ...] = (1, 2, 4, 8)
    blocks: int = 1  # residual blocks per encoder stage; the decoder has one more (one per skip)
    attention: bool = True  # self-attention at the deepest stage
    heads: int = 8
    cond_channels: int = 4  # edges + 3 coordinates
    mid_blocks: int = 2  # residual blocks at the deepest stage (attention after the first)

    def to_dict(self) -> dict:
        return {**asdict(self), "mults": list(self.mults)}


PRESETS = {
    "tiny": UNetConfig(base=8, mults=(1, 2), heads=2),  # tests and CPU smoke runs: 0.1 M parameters
    # The paper's four stages at a quarter of its width: 7.0 M parameters, 0.5 s per 2×32³ training
    # step on 2 CPU cores (base 32 with three stages has as many and is 2.6× slower).
    "small": UNetConfig(base=16, mults=(1, 2, 4, 8), heads=4),
    # The reference's shape (base 64, ×1/2/4/8, attention at the deepest stage): 97.6 M against its 98.5 M.
    "paper": UNetConfig(base=64, mults=(1, 2, 4, 8), mid_blocks=1, heads=8),
}


def _groups(ch: int) -> int:
    return math.gcd(ch, 8) or 1


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000, as diffusion models do)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.attn = nn.MultiheadAttention(ch, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x):
        b, c, *size = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, voxels, C)
        h, _ = self.attn(h, h, h, need_weights=False)
        return x + h.transpose(1, 2).reshape(b, c, *size)


class VelocityUNet(nn.Module):
    """v(x_t, t, cond) with x_t (B, 1, D, H, W), t (B,), cond (B, 4, D, H, W); D, H, W divisible
    by 2^(len(mults) − 1)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base * m for m in cfg.mults]
        tdim = 4 * cfg.base
        self.time = nn.Sequential(nn.Linear(cfg.base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.stem = nn.Conv3d(1 + cfg.cond_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [widths[0]], widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.blocks):
                self.down.append(ResBlock(ch, w, tdim))
                ch = w
                skips.append(ch)
            if i < len(widths) - 1:
                self.down.append(nn.Conv3d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        mid = [ResBlock(ch, ch, tdim), Attention(ch, cfg.heads) if cfg.attention else nn.Identity()]
        self.mid = nn.ModuleList(mid + [ResBlock(ch, ch, tdim) for _ in range(cfg.mid_blocks - 1)])
        self.up = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(cfg.blocks + 1):  # one per skip connection of the stage
                self.up.append(ResBlock(ch + skips.pop(), w, tdim))
                ch = w
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv3d(ch, ch, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv3d(ch, 1, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.cfg.mults) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = self.time(timestep_embedding(t, self.cfg.base))
        h = self.stem(torch.cat([x, cond], dim=1))
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.out(h)


def state_shapes(cfg: UNetConfig):
    """(name, shape) of each tensor of ``VelocityUNet(cfg).state_dict()``, computed without building
    it, so that a model file is checked against its config before anything is allocated (a test
    keeps this in step with the modules)."""

    def affine(p, cout, cin, *kernel):  # a convolution or linear layer
        yield from ((p + "weight", (cout, cin, *kernel)), (p + "bias", (cout,)))

    def norm(p, ch):
        yield from ((p + "weight", (ch,)), (p + "bias", (ch,)))

    def resblock(p, cin, cout):
        yield from norm(p + "norm1.", cin)
        yield from affine(p + "conv1.", cout, cin, 3, 3, 3)
        yield from affine(p + "temb.", cout, tdim)
        yield from norm(p + "norm2.", cout)
        yield from affine(p + "conv2.", cout, cout, 3, 3, 3)
        if cin != cout:
            yield from affine(p + "skip.", cout, cin, 1, 1, 1)

    widths = [cfg.base * m for m in cfg.mults]
    tdim = 4 * cfg.base
    yield from affine("time.0.", tdim, cfg.base)
    yield from affine("time.2.", tdim, tdim)
    yield from affine("stem.", widths[0], 1 + cfg.cond_channels, 3, 3, 3)
    skips, ch, n = [widths[0]], widths[0], 0
    for i, w in enumerate(widths):
        for _ in range(cfg.blocks):
            yield from resblock(f"down.{n}.", ch, w)
            n, ch = n + 1, w
            skips.append(ch)
        if i < len(widths) - 1:
            yield from affine(f"down.{n}.", ch, ch, 3, 3, 3)
            n += 1
            skips.append(ch)
    yield from resblock("mid.0.", ch, ch)
    if cfg.attention:
        yield from norm("mid.1.norm.", ch)
        yield from (("mid.1.attn.in_proj_weight", (3 * ch, ch)), ("mid.1.attn.in_proj_bias", (3 * ch,)))
        yield from affine("mid.1.attn.out_proj.", ch, ch)
    for j in range(2, cfg.mid_blocks + 1):
        yield from resblock(f"mid.{j}.", ch, ch)
    n = 0
    for i, w in reversed(list(enumerate(widths))):
        for _ in range(cfg.blocks + 1):
            yield from resblock(f"up.{n}.", ch + skips.pop(), w)
            n, ch = n + 1, w
        if i > 0:
            yield from affine(f"up.{n + 1}.", ch, ch, 3, 3, 3)  # after the upsampling, which has no tensors
            n += 2
    yield from norm("out.0.", ch)
    yield from affine("out.2.", 1, ch, 3, 3, 3)


def build_unet(preset: str | UNetConfig) -> VelocityUNet:
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    return VelocityUNet(cfg)
