"""Simulated scanners: known transforms of a volume, whose truth is kept. The one place the project
simulates a scanner: the example dataset (``bidsharmony.example``: several effects at once, ``scan``)
and the quality benchmark (one effect per scanner, ``SCANNERS``) compose the same effects.

Every scanner acts on the whole volume (not slice by slice) and writes arbitrary scanner units, so
nothing downstream can rely on the target's scale. The papers' monotone transforms (docs/method.md §4)
act on the volume min-max scaled to [0, 1] and are min-max rescaled afterwards, as in the papers.
The physical ones are what histogram matching cannot undo: a smooth multiplicative bias field,
Rician noise, blur with thick slices, and a tissue-contrast change built from the parcellation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Context:
    """What a scanner may use besides the volume: a seeded generator, tissue classes, voxel size."""

    rng: np.random.Generator
    tissue: np.ndarray  # 0 background, 1 CSF, 2 grey matter, 3 white matter
    zooms: tuple[float, float, float]  # mm, in the array's axis order (RAS: the last axis is axial)


@dataclass(frozen=True)
class Scanner:
    name: str  # a BIDS session label: letters and digits only
    kind: str  # monotone | spatial | noise | resolution | contrast
    description: str
    apply: Callable[[np.ndarray, Context], np.ndarray]


def unit(v: np.ndarray) -> np.ndarray:
    lo, hi = float(v.min()), float(v.max())
    return ((v - lo) / max(hi - lo, 1e-12)).astype(np.float32)


def _monotone(f: Callable[[np.ndarray], np.ndarray], gain: float):
    return lambda v, ctx: (gain * unit(f(unit(v)))).astype(np.float32)


def smooth_field(shape, rng: np.random.Generator, amplitude: float, control: int = 4) -> np.ndarray:
    """A smooth positive field exp(g) with |g| ≤ log(amplitude): random values on a coarse
    control grid, upsampled with cubic splines (a bias field varies over centimetres)."""
    coarse = rng.standard_normal((control,) * 3)
    g = ndimage.zoom(coarse, [s / control for s in shape], order=3, mode="nearest")[tuple(slice(0, s) for s in shape)]
    g -= g.mean()
    return np.exp(np.log(amplitude) * g / max(np.abs(g).max(), 1e-12)).astype(np.float32)


def ramp_field(shape, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """1 + a·tanh(c·x): a sensitivity that rises across the volume in a random direction c ~ N(0, I)
    (x in [-1, 1]³), between 1 − a and 1 + a; unlike ``smooth_field`` its mean need not be 1, so it
    also changes the volume's overall level, as moving a head in a coil does."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.normal(size=3)
    return (1.0 + amplitude * np.tanh(sum(ci * x for ci, x in zip(c, grids)))).astype(np.float32)


def rician(u: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Rician noise of scale ``sigma`` (the magnitude of a complex signal u + n1 + i n2, n ~ N(0, σ²))."""
    n1, n2 = (sigma * rng.standard_normal(u.shape, dtype=np.float32) for _ in range(2))
    return np.sqrt((u + n1) ** 2 + n2**2).astype(np.float32)


def scan(u: np.ndarray, rng: np.random.Generator, *, gamma: float = 1.0, bias: float = 0.0, noise: float = 0.0,
         scale: float = 1.0) -> np.ndarray:
    """Several effects at once, in the order a scanner adds them: the contrast u^γ, a coil's
    sensitivity ramp 1 ± ``bias`` (``ramp_field``), Rician noise of σ = ``noise`` × the maximum, then
    arbitrary units (× ``scale``). ``u``: a non-negative volume, about [0, 1]."""
    out = np.power(np.asarray(u, np.float32), gamma)
    if bias:
        out = out * ramp_field(out.shape, rng, bias)
    if noise:
        out = rician(out, rng, noise * float(out.max()))
    return (scale * out).astype(np.float32)


def _bias(v, ctx: Context):
    return (1500.0 * unit(v) * smooth_field(v.shape, ctx.rng, amplitude=1.4)).astype(np.float32)


def _rician(v, ctx: Context, sigma: float = 0.04):
    u = unit(v)
    return (2000.0 * rician(u, ctx.rng, sigma * float(np.percentile(u[ctx.tissue > 0], 99)))).astype(np.float32)


def _blur(v, ctx: Context, fwhm_inplane: float = 4.0, fwhm_slice: float = 6.0):
    fwhm = (fwhm_inplane, fwhm_inplane, fwhm_slice)  # mm; thick axial slices
    sigma = [f / 2.3548 / z for f, z in zip(fwhm, ctx.zooms)]
    return (1200.0 * ndimage.gaussian_filter(unit(v), sigma)).astype(np.float32)


# CSF brighter, grey matter closer to white: contrast a histogram's monotone map cannot restore,
# because grey-matter and white-matter voxels of one intensity get different gains.
TISSUE_GAIN = {0: 1.0, 1: 1.6, 2: 1.15, 3: 0.95}


def _contrast(v, ctx: Context):
    gain = np.vectorize(TISSUE_GAIN.get, otypes=[np.float32])(ctx.tissue)
    gain = ndimage.gaussian_filter(gain, 1.0)  # no hard label edges in the image
    return (1800.0 * unit(v) * gain).astype(np.float32)


SCANNERS: dict[str, Scanner] = {
    s.name: s
    for s in [
        Scanner("exp", "monotone", "e^g (papers)", _monotone(np.exp, 1000.0)),
        Scanner("log", "monotone", "ln(1 + 3g) (papers)", _monotone(lambda g: np.log1p(3 * g), 1000.0)),
        *[
            Scanner(f"gamma{str(g).replace('.', 'p')}", "monotone", f"g^{g} (papers)", _monotone(lambda x, g=g: x**g, 1000.0))
            for g in (0.7, 0.8, 0.9, 1.2, 1.3, 1.5)
        ],
        Scanner("bias", "spatial", "smooth multiplicative bias field, ×1/1.4…×1.4", _bias),
        Scanner("noise", "noise", "Rician noise, σ = 4 % of the brain's 99th percentile", _rician),
        Scanner("blur", "resolution", "Gaussian blur, FWHM 4 mm in-plane and 6 mm across slices", _blur),
        Scanner("contrast", "contrast", "tissue gains CSF ×1.6, GM ×1.15, WM ×0.95 (from the parcellation)", _contrast),
    ]
}
QUICK_SCANNERS = ("gamma0p7", "bias", "noise", "contrast")


def simulate(name: str, volume: np.ndarray, tissue: np.ndarray, zooms, seed: int) -> np.ndarray:
    if name not in SCANNERS:
        raise ValueError(f"unknown simulated scanner {name!r}; known: {', '.join(SCANNERS)}")
    ctx = Context(np.random.default_rng(seed), tissue, tuple(float(z) for z in zooms))
    return SCANNERS[name].apply(np.asarray(volume, np.float32), ctx)
