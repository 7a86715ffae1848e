"""Contrast-invariant 3D edges: Canny on the rank-transformed volume, with subject-level thresholds.

Edges must mark the same anatomy whatever the scanner's contrast. Replacing each head voxel by its
rank (its quantile among the head's voxels) makes the volume exactly invariant to any strictly
increasing intensity map, so the edges of a gamma- or log-transformed scan are those of the
original inside the head (the head region itself is found by an affine-invariant rule, so a
non-linear map can move its boundary by a voxel); thresholds are percentiles of this subject's own
gradient magnitudes, so no absolute intensity or gradient scale enters. Spatially varying changes (bias fields, tissue-specific gains)
are not monotone maps of the whole volume: there the agreement is measured, not guaranteed
(``edge_agreement``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bidsharmony.space import DEFAULT


def head_region(v: np.ndarray) -> np.ndarray:
    """Voxels above 10 % of the way from the 1st to the 99th percentile: the head, by a rule that
    an increasing affine map of the intensities does not change (offsets included)."""
    lo, hi = np.percentile(v, [1, 99])
    return v > lo + 0.1 * (hi - lo)


def rank_transform(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each mask voxel -> its quantile in (0, 1] among the mask's voxels (ties share the mean rank);
    0 outside the mask."""
    from scipy.stats import rankdata

    out = np.zeros(v.shape, np.float32)
    vals = v[mask]
    out[mask] = (rankdata(vals, method="average") / max(vals.size, 1)).astype(np.float32)
    return out


def _nonmax_suppress(mag: np.ndarray, grads: list[np.ndarray]) -> np.ndarray:
    """Keep voxels whose gradient magnitude is a maximum along the gradient direction (rounded to
    the nearest of the 26 neighbour directions)."""
    norm = np.maximum(mag, 1e-12)
    step = [np.rint(g / norm).astype(np.int8) for g in grads]
    keep = np.ones(mag.shape, bool)
    pad = np.pad(mag, 1, mode="edge")
    idx = np.indices(mag.shape)
    for sign in (1, -1):
        nb = pad[tuple(idx[a] + 1 + sign * step[a] for a in range(3))]
        keep &= mag >= nb
    return keep


def edge_map(v: np.ndarray, zooms=DEFAULT.zooms, sigma_mm: float = 1.2, low: float = 80.0, high: float = 92.0) -> np.ndarray:
    """Binary 3D edges of a RAS volume (float32 0/1).

    Gaussian derivatives (σ in mm) of the rank-transformed head, non-maximum suppression, then
    hysteresis: maxima above the head's ``high`` percentile of suppressed magnitudes seed edges that
    grow through maxima above the ``low`` percentile (26-connectivity)."""
    mask = head_region(v)
    r = rank_transform(v, ndimage.binary_dilation(mask, iterations=2))
    sigma = [sigma_mm / z for z in zooms]
    grads = [ndimage.gaussian_filter(r, sigma, order=tuple(int(a == b) for b in range(3))) / z for a, z in enumerate(zooms)]
    mag = np.sqrt(sum(g**2 for g in grads))
    cand = _nonmax_suppress(mag, grads) & (mag > 0)
    vals = mag[cand & ndimage.binary_dilation(mask, iterations=2)]
    if vals.size == 0:
        return np.zeros(v.shape, np.float32)
    lo, hi = np.percentile(vals, [low, high])
    weak = cand & (mag >= lo)
    labels, _ = ndimage.label(weak, structure=np.ones((3, 3, 3), bool))
    strong_labels = np.unique(labels[weak & (mag >= hi)])
    return np.isin(labels, strong_labels[strong_labels > 0]).astype(np.float32)


def edge_agreement(a: np.ndarray, b: np.ndarray, tolerance_vox: int = 1) -> float:
    """Symmetric fraction of edge voxels of one map within ``tolerance_vox`` of an edge of the
    other (1: the same edges; a 1-voxel tolerance forgives sub-voxel shifts of a maximum)."""
    a, b = a > 0.5, b > 0.5
    if not a.any() and not b.any():
        return 1.0
    da = ndimage.binary_dilation(a, iterations=tolerance_vox) if tolerance_vox else a
    db = ndimage.binary_dilation(b, iterations=tolerance_vox) if tolerance_vox else b
    return float(((a & db).sum() + (b & da).sum()) / max(a.sum() + b.sum(), 1))
