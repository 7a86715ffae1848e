"""The multiscale image flow and its named presets.

Level l: squeeze 2x2 -> S steps (ActNorm -> LU 1x1 conv -> RQ spline coupling) -> one more 1x1
conv -> factor out half of the channels (except after the last level). For a 1x144x176 slice and
4 levels the level shapes are 4x72x88, 8x36x44, 16x18x22, 32x9x11 (docs/method.md §2).
The latent ``z`` is returned flat, ``(B, H*W)``: the harmonization loop treats it as one vector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bidsharmony.flow.coupling import SplineCoupling
from bidsharmony.flow.layers import ActNorm, InvConv1x1, squeeze, unsqueeze
from bidsharmony.space import DEFAULT


@dataclass(frozen=True)
class FlowConfig:
    """Architecture of a flow; stored in a model folder's config.json."""

    levels: int = 4
    steps: int = 7
    bins: int = 8
    tail_bound: float = 3.0
    hidden: int = 96
    blocks: int = 3
    slice_shape: tuple[int, int] = DEFAULT.slice_shape
    seed: int = 0  # fixes the random 1x1-conv initialisations

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        d = dict(d)
        d["slice_shape"] = tuple(d["slice_shape"])
        return cls(**d)


PRESETS: dict[str, FlowConfig] = {
    # docs/method.md §2: 4 x 7 steps, K=8, B=3, 96 hidden channels, 3 residual blocks.
    "paper": FlowConfig(),
    # About 20x faster than `paper` on a CPU: a whole 1.2 mm volume (~160 head slices) harmonizes
    # in about a minute on 2 CPU cores (benchmarks/flow_throughput.py measures it).
    "fast": FlowConfig(levels=4, steps=3, hidden=32, blocks=1),
    # Seconds to train on a CPU: for tests.
    "tiny": FlowConfig(levels=2, steps=2, hidden=8, blocks=1),
}


class _Level(nn.Module):
    def __init__(self, channels: int, cfg: FlowConfig, gen: torch.Generator):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(cfg.steps):
            layers += [
                ActNorm(channels),
                InvConv1x1(channels, gen),
                SplineCoupling(channels, cfg.hidden, cfg.blocks, cfg.bins, cfg.tail_bound),
            ]
        layers.append(InvConv1x1(channels, gen))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y):
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class SliceFlow(nn.Module):
    """f: flow-scaled slice x (B, 1, H, W) <-> latent z (B, H*W), with a standard normal base."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        h, w = cfg.slice_shape
        if h % 2**cfg.levels or w % 2**cfg.levels:
            raise ValueError(f"slice shape {cfg.slice_shape} is not divisible by 2**levels = {2**cfg.levels}")
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        self.levels = nn.ModuleList()
        self.latent_shapes: list[tuple[int, int, int]] = []
        c = 1
        for i in range(cfg.levels):
            c, h, w = c * 4, h // 2, w // 2
            self.levels.append(_Level(c, cfg, gen))
            last = i == cfg.levels - 1
            self.latent_shapes.append((c if last else c // 2, h, w))
            c = c if last else c // 2

    @property
    def num_dims(self) -> int:
        return self.cfg.slice_shape[0] * self.cfg.slice_shape[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 1, H, W) -> (z (B, H*W), log|det dz/dx| (B,))."""
        zs, logdet = [], x.new_zeros(x.shape[0])
        for i, level in enumerate(self.levels):
            x, ld = level(squeeze(x))
            logdet = logdet + ld
            if i < len(self.levels) - 1:
                half = x.shape[1] // 2
                zs.append(x[:, :half].flatten(1))
                x = x[:, half:]
        zs.append(x.flatten(1))
        return torch.cat(zs, dim=1), logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, H*W) -> x (B, 1, H, W)."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        parts = list(torch.split(z, sizes, dim=1))
        x = parts[-1].view(z.shape[0], *self.latent_shapes[-1])
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                x = torch.cat([parts[i].view(z.shape[0], *self.latent_shapes[i]), x], dim=1)
            x = unsqueeze(self.levels[i].inverse(x))
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of flow inputs under the model, per sample (nats)."""
        z, logdet = self(x)
        base = -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
        return base + logdet

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(n, self.num_dims, generator=generator, device=device) * temperature
        return self.inverse(z)


def state_shapes(cfg: FlowConfig):
    """(name, shape) of each tensor of ``SliceFlow(cfg).state_dict()``, computed without building
    it, so that a model file is checked against its config before anything is allocated (a test
    keeps this in step with the modules)."""
    k = 3 * cfg.bins - 1  # spline parameters per transformed channel

    def invconv(p, c):
        n = c * (c - 1) // 2
        yield from ((p + "lower", (n,)), (p + "upper", (n,)), (p + "log_s", (c,)), (p + "bias", (c,)),
                    (p + "perm", (c, c)), (p + "sign_s", (c,)), (p + "tril_idx", (2, n)))  # fmt: skip

    def coupling(p, c):
        p, h = p + "conditioner.net.", cfg.hidden
        yield from ((p + "0.weight", (h, c // 2, 1, 1)), (p + "0.bias", (h,)))
        for b in range(1, cfg.blocks + 1):
            for i in (0, 3):  # BatchNorm2d
                yield from ((f"{p}{b}.net.{i}.{n}", (h,)) for n in ("weight", "bias", "running_mean", "running_var"))
                yield f"{p}{b}.net.{i}.num_batches_tracked", ()
            for i in (2, 5):  # 3x3 convolutions
                yield from ((f"{p}{b}.net.{i}.weight", (h, h, 3, 3)), (f"{p}{b}.net.{i}.bias", (h,)))
        out = (c - c // 2) * k
        yield from ((f"{p}{cfg.blocks + 1}.weight", (out, h, 1, 1)), (f"{p}{cfg.blocks + 1}.bias", (out,)))

    c = 1
    for level in range(cfg.levels):
        c *= 4
        p = f"levels.{level}.layers."
        for step in range(cfg.steps):
            a = 3 * step
            yield from ((f"{p}{a}.bias", (1, c, 1, 1)), (f"{p}{a}.log_scale", (1, c, 1, 1)), (f"{p}{a}.initialized", ()))
            yield from invconv(f"{p}{a + 1}.", c)
            yield from coupling(f"{p}{a + 2}.", c)
        yield from invconv(f"{p}{3 * cfg.steps}.", c)
        c = c if level == cfg.levels - 1 else c // 2


def build_flow(preset_or_cfg: str | FlowConfig, **overrides) -> SliceFlow:
    """A flow from a preset name (with optional field overrides) or a FlowConfig."""
    if isinstance(preset_or_cfg, str):
        if preset_or_cfg not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_cfg!r}; choose from {', '.join(PRESETS)}")
        cfg = PRESETS[preset_or_cfg]
    else:
        cfg = preset_or_cfg
    if overrides:
        cfg = FlowConfig(**{**cfg.to_dict(), **overrides})
    return SliceFlow(cfg)
