"""Blind detail matching: denoise or sharpen a standardised volume until its fine-scale level is the target's.

Stage 1 (``standardise``) puts a volume on the target's intensity scale; it cannot change how
noisy or how sharp the image is. A scanner with more noise, or thicker slices and a softer point
spread, leaves a volume whose *detail level* is off the target's, however its histogram is mapped.

Detail level of a volume v (``detail_level``): the robust standard deviation of the 6-neighbour
residual r = v − mean(6 face neighbours), σ = 1.4826 · MAD(r) / √(1 + 1/6) (white noise of
variance s² gives σ ≈ s), divided by the median gradient magnitude at COARSE_MM (the anatomy's
edges), both over the landmark region (``standardise.landmark_region``, a blind stand-in for the
brain). Noise raises it; blur lowers it; a monotone change of intensities scales the fine residual
and the edges alike and leaves it almost unchanged (a level in absolute units sent γ = 1.5 above
the target's band, and denoising it cost 2 dB). It is measured on the pipeline's 1.2 mm grid after
standardisation, *at the target's resolution* (``at_resolution``): a scan acquired with finer
voxels than the target's holds detail the target's images cannot (a 0.7 mm scan measured plainly
sat 2.5x above a 2 mm target's band, and denoising it moved it away from the target), so it is
first brought to the target's acquired voxel size as an acquisition would (each voxel the mean of
its extent), then back onto the grid. Scans as coarse as the target's, or coarser, are measured as
they are.

Training (``fit_band``): the target's levels over its TRAIN volumes give a band (min, mean, max),
and the median of their acquired voxel sizes is the target's resolution (``VOXEL``).

Matching (``match_detail``): a volume whose level lies inside the band is left exactly as it is.
Outside it, the level is moved towards the band's mean: above the band, the whole way once it lies
half the band's width beyond it and in proportion nearer its edge; below it, the same ramp starts
half the band's width under the edge (``_strength``: continuous, so that a target volume just
outside a band fitted on a finite sample is barely touched, and a merely soft one not sharpened).
Above the band the volume is blended towards a non-local-means denoising of itself,
u = v + w (NLM(v) − v), w ∈ [0, 1]; below it, sharpened by an unsharp mask, u = v + a (v − G_σ v),
a ∈ [0, A_MAX], G_σ a Gaussian of SIGMA_MM. (Where the given voxels are finer than the grid the
level is defined on, the denoising runs on that grid, with fewer voxels, and its change is resampled
back: a 0.7 mm head takes a fifth of the time.) The weight is found by bisection so that the level
of u (resampled to the grid the level is defined on) equals that goal. Both act volume-wide in 3D,
on the voxels they are given (the native grid: the output the user reads is not a resampling of the
filtered image), and are deterministic.

Measured on held-out TRAIN subjects under the benchmark's simulated scanners (``benchmarks/detail_probe.py``):
see docs/method.md §8 and docs/benchmarks/.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage

from bidsharmony.image.standardise import VOXEL_MM, landmark_region

BAND = "detail_band"  # a model folder's extra tensor: (min, mean, max) detail level of the target's TRAIN volumes
VOXEL = "detail_voxel_mm"  # and (3,): the target's acquired voxel size (RAS axes, median over TRAIN) levels are measured at
SIGMA_MM = 1.6  # the unsharp mask's Gaussian: about one 1.2 mm voxel's worth of blur, in mm
A_MAX = 4.0  # the strongest sharpening allowed: beyond it, noise is amplified more than detail restored
COARSE_MM = 3.0  # the scale of the anatomy's edges the fine residual is measured against
STEPS = 12  # bisection steps: the weight to 1/4096 of its range

_NEIGHBOURS = np.zeros((3, 3, 3), np.float32)
_NEIGHBOURS[1, 1, 1] = 1.0
for _axis in range(3):
    for _side in (0, 2):
        _index = [1, 1, 1]
        _index[_axis] = _side
        _NEIGHBOURS[tuple(_index)] = -1.0 / 6.0


def detail_level(volume: np.ndarray, zooms=VOXEL_MM, region: np.ndarray | None = None) -> float:
    """Robust σ of the 6-neighbour residual over the median gradient magnitude at COARSE_MM, over
    ``region`` (default: the landmark region)."""
    v = np.asarray(volume, np.float32)
    mask = landmark_region(v, zooms) if region is None else region
    if not mask.any():
        raise ValueError("no landmark region to measure the detail level in")
    r = ndimage.convolve(v, _NEIGHBOURS, mode="nearest")[mask].astype(np.float64)
    fine = float(1.4826 * np.median(np.abs(r - np.median(r))) / np.sqrt(1.0 + 1.0 / 6.0))
    g = ndimage.gaussian_gradient_magnitude(v, [COARSE_MM / float(z) for z in zooms])[mask]
    return fine / float(np.median(g))


def ras_voxel_mm(affine: np.ndarray) -> np.ndarray:
    """The voxel size along each RAS axis (x, y, z) of a volume with ``affine``, whatever its voxel
    axes' order (a sagittal acquisition's first voxel axis runs along z, say)."""
    from nibabel.orientations import io_orientation

    zooms, out = voxel_sizes(affine), np.zeros(3)
    for axis, (ras, _) in enumerate(io_orientation(affine)):
        out[int(ras)] = zooms[axis]
    return out


def measured_voxel(acquired_mm, grid_mm, target_mm) -> np.ndarray:
    """Per RAS axis, the voxel size a level is measured at on a grid of ``grid_mm`` voxels: the
    target's where the scan is finer than it on that grid, else the scan's own (a grid voxel holds no
    finer detail than its size, whatever was acquired). ``target_mm`` None: as acquired."""
    a = np.maximum(np.asarray(acquired_mm, np.float64), np.asarray(grid_mm, np.float64))
    if target_mm is None:
        return a
    t = np.asarray(target_mm, np.float64)
    return np.where(a < t - 1e-3, t, a)


def at_resolution(volume: np.ndarray, affine: np.ndarray, acquired_mm, target_mm) -> np.ndarray:
    """``volume`` (a canonical grid, ``affine``) as if acquired with ``target_mm`` voxels (RAS axes)
    where it was acquired with finer ``acquired_mm`` ones, back on its own grid: along each such axis
    a Gaussian of the missing width (a voxel averages its extent, a box of variance w²/12, so
    σ² = (t² − a²)/12, with a at least the grid's own voxel size), linear resampling to the target's
    voxel size and back. Bit for bit the same volume where nothing on the grid is finer than the
    target (or ``target_mm`` is None)."""
    from bidsharmony.image.resample import from_ants, resample_onto, to_ants

    zooms = voxel_sizes(affine)
    a = np.maximum(np.asarray(acquired_mm, np.float64), zooms)
    t = measured_voxel(acquired_mm, zooms, target_mm)
    finer = t > a
    if not finer.any():
        return volume
    import ants

    sigma = np.where(finer, np.sqrt(t**2 - a**2) / np.sqrt(12.0), 0.0) / zooms
    smooth = ndimage.gaussian_filter(np.asarray(volume, np.float32), sigma, mode="nearest")
    spacing = tuple(float(x) for x in np.where(finer, t, zooms))
    coarse, coarse_affine = from_ants(ants.resample_image(to_ants(smooth, affine), spacing, use_voxels=False, interp_type=0))
    return resample_onto(coarse, coarse_affine, volume.shape, affine)


def fit_band(levels: Iterable[float]) -> np.ndarray:
    """(min, mean, max) of the target's training levels: inside it, a volume is left alone."""
    x = np.asarray(list(levels), np.float64)
    if x.size == 0:
        raise ValueError("fit_band needs at least one training level")
    return np.array([x.min(), x.mean(), x.max()])


def model_entry(volumes: int) -> dict:
    """What a model's ``config.json`` says about its detail band (``preprocessing.detail``); the
    band and the voxel size are the weights file's ``extra.detail_band`` and ``extra.detail_voxel_mm``,
    under its sha256."""
    return {"method": "detail-level matching", "level": f"6-neighbour residual / gradient magnitude at {COARSE_MM:g} mm, "
            "measured at the target's acquired voxel size",
            "denoiser": "ANTs non-local means (Rician)", "sharpening": f"unsharp mask, Gaussian {SIGMA_MM:g} mm, at most ×{A_MAX:g}",
            "volumes": int(volumes)}


def _strength(level: float, lo: float, hi: float) -> float:
    """How far towards the band's mean to move a level outside the band (0: not at all, 1: the
    whole way). Above the band: 0 at its edge, rising linearly to 1 at half the band's width beyond
    it, so that a target volume just outside a band fitted on a finite sample is barely touched.
    Below it, the same ramp starts half the band's width under the edge: on a held-out TRAIN head
    3 % under the band of 30 others, even a light sharpening (a = 0.05-0.15) cost 2.5-7 dB, while a
    blurred scanner lies far below (a third of the band's minimum)."""
    half = max(0.5 * (hi - lo), 1e-12)
    if level > hi:
        return float(np.clip((level - hi) / half, 0.0, 1.0))
    return float(np.clip((lo - level) / half - 1.0, 0.0, 1.0))


def _bisect(level_of: Callable[[float], float], target: float, lo: float, hi: float, rising: bool) -> float:
    """The weight in [lo, hi] whose level is ``target`` (level_of monotone: rising or falling in w)."""
    if (level_of(hi) <= target) if rising else (level_of(hi) >= target):
        return hi  # even the strongest allowed cannot reach it
    for _ in range(STEPS):
        mid = 0.5 * (lo + hi)
        if (level_of(mid) < target) == rising:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def denoise(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """ANTs' adaptive non-local means (Manjón et al., 2010; Rician model) over the head.

    Run in a child process started with one ITK thread: multi-threaded runs differ from each other
    (by up to 5 % of the range, measured), ITK fixes its thread count when it first runs in a
    process, and an output must be a function of its input and parameters."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="bidsharmony-nlm-") as tmp:
        np.save(Path(tmp) / "in.npy", np.asarray(volume, np.float32))
        np.save(Path(tmp) / "affine.npy", np.asarray(affine, np.float64))
        env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "bidsharmony.image.detail", tmp], env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"non-local-means denoising failed: {proc.stderr.strip()[-500:]}")
        return np.load(Path(tmp) / "out.npy")


def _denoise_here(folder) -> None:
    """The child process of ``denoise``: in.npy, affine.npy → out.npy in ``folder``."""
    from pathlib import Path

    import ants

    from bidsharmony.image.resample import to_ants
    from bidsharmony.image.slices import head_mask

    v, affine = np.load(Path(folder) / "in.npy"), np.load(Path(folder) / "affine.npy")
    mask = to_ants(head_mask(v).astype(np.float32), affine)
    out = ants.denoise_image(to_ants(v - v.min(), affine), mask, noise_model="Rician").numpy()
    np.save(Path(folder) / "out.npy", out.astype(np.float32) + v.min())


def _learned_change(denoiser, v: np.ndarray, affine: np.ndarray, target_mm) -> tuple[np.ndarray, str]:
    """(the learned denoiser's change to ``v``, the grid it was computed on), computed at the voxel size it was trained at (the
    target's acquired ``target_mm``) where the scan is finer: noise of a finer grid has another
    texture, and a quarter of the voxels costs a quarter of the time; the change is brought back
    to the native grid (it then holds no detail finer than the target's)."""
    from bidsharmony.image.denoiser import denoise as learned

    voxel = voxel_sizes(affine)
    if target_mm is None or np.prod(voxel) >= 0.8 * np.prod(target_mm):
        return learned(denoiser, v, affine) - v, "native grid"
    import nibabel as nb

    axes = nb.orientations.io_orientation(affine)[:, 0].astype(int)  # the RAS axis of each array axis
    factors = voxel / np.asarray(target_mm, float)[axes]
    # Linear zoom over the whole extent (grid_mode) and back: every native voxel gets a change.
    coarse = ndimage.zoom(v, factors, order=1, mode="nearest", grid_mode=True)
    change = learned(denoiser, coarse, affine) - coarse  # the affine's directions are the coarse grid's
    back = ndimage.zoom(change, np.divide(v.shape, change.shape), order=1, mode="nearest", grid_mode=True)
    return back.astype(np.float32), "target voxel size"


def match_detail(volume: np.ndarray, affine: np.ndarray, band, grid: tuple[tuple[int, ...], np.ndarray],
                 target_mm=None, denoiser=None) -> tuple[np.ndarray, dict]:
    """Bring a standardised volume's detail level into the target's ``band`` (``fit_band``).

    ``volume``/``affine``: the voxels to change (the native grid, standardised). ``grid``: (shape,
    affine) of the grid the level is defined on (the pipeline's 1.2 mm grid): every level, the
    volume's own included, is measured on the volume resampled there, at the target's acquired
    voxel size ``target_mm`` (``at_resolution``; None: as it is). Returns (the volume, changed or
    not; the record a sidecar states: level, band, action, weight and level reached).

    ``denoiser``: a learned denoiser (``bidsharmony.image.denoiser``) to use above the band instead of
    non-local means. Its change is applied as far as the gate's strength says (in full half the
    band's width above it), not bisected to a level: the level reaches the band's mean after a third
    of the network's change, which leaves most of its gain unused (benchmarks/learned_denoise_probe.py)."""
    from bidsharmony.image.resample import resample_onto

    lo, mean, hi = (float(x) for x in band)
    shape, grid_affine = grid
    v = np.asarray(volume, np.float32)
    zooms = tuple(float(z) for z in voxel_sizes(grid_affine))

    acquired = ras_voxel_mm(affine)

    def on_grid(x):
        return resample_onto(x, affine, shape, grid_affine)

    def level_on_grid(x):
        return detail_level(at_resolution(x, grid_affine, acquired, target_mm), zooms, region)

    start = on_grid(v)
    region = landmark_region(start, zooms)
    level = level_on_grid(start)
    rec = {"Method": "detail-level matching", "Level": level, "Band": [lo, mean, hi], "Action": "none", "Weight": 0.0,
           "LevelReached": level, "AcquiredVoxel": [float(x) for x in acquired],
           "MeasuredAtVoxel": None if target_mm is None else [float(x) for x in measured_voxel(acquired, zooms, target_mm)]}
    goal = level + _strength(level, lo, hi) * (mean - level)
    rec["LevelGoal"] = goal
    if goal == level:  # inside the band, or under it by less than half its width
        return v, rec
    voxel = voxel_sizes(affine)
    if level > hi and denoiser is not None:
        w = _strength(level, lo, hi)
        change, where = _learned_change(denoiser, v, affine, target_mm)
        out = v + w * change
        rec.update(Action="denoise", Denoiser="learned", DenoisedOn=where, Weight=float(w), LevelReached=level_on_grid(on_grid(out)))
        return out.astype(np.float32), rec
    if level > hi:
        rising, top, rec["Action"], rec["Denoiser"] = False, 1.0, "denoise", "non-local means"
        if np.prod(voxel) < np.prod(zooms):  # finer than the grid: denoise there (fewer voxels), bring the change back
            direction = resample_onto(denoise(start, grid_affine) - start, grid_affine, v.shape, affine)
            rec["DenoisedOn"] = "harmonization grid"
        else:
            direction = denoise(v, affine) - v
            rec["DenoisedOn"] = "native grid"
    else:
        rising, top, rec["Action"] = True, A_MAX, "sharpen"
        direction = v - ndimage.gaussian_filter(v, SIGMA_MM / voxel)
    levels: dict[float, float] = {}

    def level_of(w: float) -> float:
        if w not in levels:
            levels[w] = level_on_grid(on_grid(v + w * direction))
        return levels[w]

    w = _bisect(level_of, goal, 0.0, top, rising)
    rec.update(Weight=float(w), LevelReached=level_of(w))
    return (v + w * direction).astype(np.float32), rec


if __name__ == "__main__":
    import sys

    _denoise_here(sys.argv[1])
