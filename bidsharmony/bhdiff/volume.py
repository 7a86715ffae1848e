"""Harmonize one 1.2 mm RAS volume with a BlindHarmonyDiff model: edges of the source as the
condition, noise integrated to an image by the midpoint rule, then the correlation refinement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from bidsharmony.bhdiff.edges import edge_map, head_region
from bidsharmony.bhdiff.rectified import coordinates, denormalise, normalise, patchwise, pearson, refine, sample_midpoint


@dataclass(frozen=True)
class BHDiffParams:
    ode_steps: int = 15  # midpoint steps: 2 network evaluations each
    refine_steps: int = 6
    refine_step: float = 0.005
    patch: int = 0  # 0: the whole volume at once; else overlapping cubes of this size, averaged each evaluation
    seed: int = 0

    def validate(self) -> BHDiffParams:
        if self.ode_steps < 1 or self.refine_steps < 0 or self.refine_step < 0 or self.patch < 0:
            raise ValueError(f"invalid bhdiff parameters: {self}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def harmonize_volume_bhdiff(vol: np.ndarray, unet, params: BHDiffParams, device="cpu", trace: dict | None = None) -> np.ndarray:
    """vol (X, Y, Z) in any units -> harmonized volume in the source's units (its own 0.5/99.5 %
    head percentiles map the model's [−1, 1] back). Deterministic for ``params.seed``."""
    params = params.validate()
    mask = head_region(vol)
    source, scale = normalise(vol, mask)
    edges = edge_map(vol)
    m = unet.multiple
    pads = [(0, (-n) % m) for n in vol.shape]
    padded = [n + p[1] for n, p in zip(vol.shape, pads)]
    coords = coordinates(tuple(padded), full_shape=vol.shape)  # padding extends past the true edge (> 1)
    cond = np.concatenate([np.pad(edges, pads)[None], coords])[None]
    cond_t = torch.from_numpy(np.ascontiguousarray(cond)).to(device)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    x0 = torch.randn((1, 1, *padded), generator=gen, device=device)

    def net(x, t, c):
        with torch.no_grad():
            return unet(x, t, c)

    whole = not params.patch or max(padded) <= params.patch
    size = params.patch - params.patch % m
    field = net if whole else patchwise(net, size, overlap=size // 4)

    def velocity(x, t):
        return field(x, t, cond_t)
    unet.eval()
    x = sample_midpoint(velocity, x0, steps=params.ode_steps)
    x = x[..., : vol.shape[0], : vol.shape[1], : vol.shape[2]]
    src = torch.from_numpy(source)[None, None].to(device)
    mask_t = torch.from_numpy(mask)[None, None].to(device)
    corr = [float(pearson(x, src, mask_t))]
    for _ in range(params.refine_steps):
        x = refine(x, src, mask_t, steps=1, step=params.refine_step)
        corr.append(float(pearson(x, src, mask_t)))
    if trace is not None:
        trace["similarity"] = [round(c, 6) for c in corr]  # Pearson r with the source, before and after each refinement step
    return denormalise(x[0, 0].cpu().numpy(), scale)
