"""Blind intensity standardisation: Nyúl-style landmarks of a brain stand-in, no brain mask.

Nyúl & Udupa (1999, *Magn Reson Med* 42:1072) and Nyúl, Udupa & Zhang (2000, *IEEE Trans Med
Imaging* 19:143) standardise an MR intensity scale with a piecewise-linear map between landmarks
(percentiles of the foreground histogram), learned from a set of training images. Here:

Landmarks of a volume v: λ_0 = min(v) (the background) and λ_k = the P_k-th percentile of v in a
landmark region, k = 1..K. The region stands in for the brain without a brain mask
(``landmark_region``): the head of ``slices.solid_head_mask`` (the pipeline's own rule, without
isolated voxels of background noise), closed and filled slice by slice, then its part deeper than
DEPTH_MM below the head's surface and within TOP_MM of its top. Mostly brain whatever the sequence, field of view or defacing, which the whole
head is not: its non-brain majority (scalp, fat, muscle, face, neck) sits elsewhere in the
histogram, relative to the brain, on other sequences and fields of view.

Training (``fit_landmarks``): each training volume i is mapped to the standard scale by the affine
x ↦ S (x − λ_i,0) / (λ_i,K − λ_i,0), S = 100 (background to 0, top landmark to S), and the
standard landmarks are the means μ_k = mean_i S (λ_i,k − λ_i,0) / (λ_i,K − λ_i,0).

Standardisation (``standardise``): the map τ through the points (λ_k, μ_k), k = 0..K, linear
between them and extended beyond λ_K with the last segment's slope (and below λ_0 with the
first's). τ is monotone (landmarks are non-decreasing; ties are separated by a negligible step), so
the image's order of intensities is kept; the background goes to 0 and stays the darkest.

The region and the percentiles (5, 25, 50, 75, 95) were chosen with ``benchmarks/standardise_probe.py``
and its exploration (fit on TRAIN; scored on simulated scanners of held-out TRAIN and of TEST
subjects, and on the unseen real scanners' brain histograms): Nyúl's deciles score lower on the
simulated scanners, and landmarks of the whole head (every percentile set tried) moved at least
one of the two unseen scanners' brain histograms further from IXI-HH's than it was.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from bidsharmony.image.slices import solid_head_mask
from bidsharmony.space import DEFAULT

LANDMARKS = "standard_landmarks"  # a model folder's extra tensor: the (K + 1,) standard landmarks
PERCENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)
SCALE = 100.0  # the standard scale: background 0, top landmark SCALE
DEPTH_MM = 15.0  # below the head's surface: past scalp and skull
TOP_MM = 110.0  # from the top of the head down: the cerebrum, not the face or neck
VOXEL_MM = DEFAULT.zooms  # the pipeline's canonical grid
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def landmark_region(volume: np.ndarray, zooms=VOXEL_MM) -> np.ndarray:
    """A blind stand-in for the brain in a canonical (RAS: the last axis points up) volume.

    The solid head mask (isolated voxels of background noise left out), closed and hole-filled in
    each axial slice (so skull, sinuses and ventricles count as inside whatever their brightness:
    the region is geometric, hence the same after any monotone change of intensities), then the
    voxels more than DEPTH_MM inside and within TOP_MM of the head's top. Where the field of view cuts the head, "top" is the top of what was scanned."""
    head = solid_head_mask(np.asarray(volume, np.float32))
    if not head.any():
        return head
    inside = ndimage.binary_fill_holes(ndimage.binary_closing(head, _IN_PLANE, iterations=3), _IN_PLANE)
    depth = ndimage.distance_transform_edt(inside, sampling=[float(z) for z in zooms])
    top = np.flatnonzero(head.any(axis=(0, 1)))[-1]
    upper = (top - np.arange(head.shape[2])) * float(zooms[2]) <= TOP_MM
    return (depth > DEPTH_MM) & upper[None, None, :]


def volume_landmarks(volume: np.ndarray, percentiles=PERCENTILES, zooms=VOXEL_MM, region=landmark_region) -> np.ndarray:
    """(K + 1,) landmarks of one volume: its minimum, then the percentiles of its landmark region,
    ``region(volume, zooms)`` (another rule may be given, e.g. the whole head, to compare)."""
    v = np.asarray(volume, np.float32)
    mask = region(v, zooms)
    if not mask.any():
        raise ValueError(f"no landmark region: no head, or none deeper than {DEPTH_MM:g} mm (is the voxel size right?)")
    return np.concatenate([[float(v.min())], np.percentile(v[mask], percentiles)]).astype(np.float64)


def on_standard_scale(landmarks: np.ndarray) -> np.ndarray:
    """A volume's landmarks mapped affinely onto the standard scale (λ_0 → 0, λ_K → SCALE): its landmark shape."""
    lm = np.asarray(landmarks, np.float64)
    return SCALE * (lm - lm[0]) / max(lm[-1] - lm[0], 1e-12)


def fit_landmarks(volumes: Iterable[np.ndarray], percentiles=PERCENTILES, zooms=VOXEL_MM, region=landmark_region) -> np.ndarray:
    """(K + 1,) standard landmarks: the mean of the training volumes' landmarks (canonical volumes
    of voxel size ``zooms``) on the standard scale."""
    scaled = []
    for v in volumes:
        scaled.append(on_standard_scale(volume_landmarks(v, percentiles, zooms, region)))
    if not scaled:
        raise ValueError("fit_landmarks needs at least one training volume")
    return np.mean(scaled, axis=0)


def _increasing(x: np.ndarray) -> np.ndarray:
    x = np.maximum.accumulate(np.asarray(x, np.float64))
    if np.any(np.diff(x) <= 0):  # tied landmarks (a few grey levels): separate them negligibly
        x = x + np.arange(x.size) * 1e-6 * max(x[-1] - x[0], 1e-12)
    return x


def grid_landmarks(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple]:
    """(landmarks, (shape, affine) of the grid) of a native volume, measured where harmonization
    measures them: on the pipeline's canonical ``VOXEL_MM`` grid. ``standardise(volume, standard,
    source_landmarks=...)`` then maps the native voxels, as the Standardise node does.

    The volume is reoriented to RAS first, whatever its voxel order: the landmark region measures the
    head's top along the last axis (IXI's PSR volumes have the right ear there)."""
    from bidsharmony.image.resample import canonical, resample_isotropic

    grid, grid_affine = resample_isotropic(*canonical(volume, affine), float(VOXEL_MM[0]))
    return volume_landmarks(grid), (grid.shape, grid_affine)


def standardise(volume: np.ndarray, landmarks: np.ndarray, percentiles=PERCENTILES,
                source_landmarks: np.ndarray | None = None, zooms=VOXEL_MM) -> np.ndarray:
    """Map a volume's intensities onto the standard scale of ``landmarks`` (from ``fit_landmarks``).

    ``source_landmarks`` (default: the volume's own) lets landmarks measured on one copy of an image
    be applied to another, e.g. from the 1.2 mm resampled volume to the voxels of the native grid:
    a voxel-wise map must act on the native voxels, not travel through a resampling."""
    y = np.asarray(landmarks, np.float64)
    x = volume_landmarks(volume, percentiles, zooms) if source_landmarks is None else np.asarray(source_landmarks, np.float64)
    if x.shape != y.shape or y.size != len(percentiles) + 1:
        raise ValueError(f"{y.size} standard and {x.size} source landmarks for {len(percentiles)} percentiles "
                         "(fit and standardise with the same percentiles)")
    x = _increasing(x)
    v = np.asarray(volume, np.float64)
    out = np.interp(v, x, y)
    lo, hi = v < x[0], v > x[-1]
    out[lo] = y[0] + (v[lo] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    out[hi] = y[-1] + (v[hi] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return out.astype(np.float32)


def model_entry(volumes: int, percentiles=PERCENTILES) -> dict:
    """What a model's ``config.json`` says about its standardisation (``preprocessing.standardisation``);
    the landmarks themselves are the weights file's ``extra.standard_landmarks``, under its sha256."""
    return {"method": "landmarks", "percentiles": [float(p) for p in percentiles], "scale": SCALE,
            "region": f"head deeper than {DEPTH_MM:g} mm and within {TOP_MM:g} mm of its top", "volumes": int(volumes)}


def record(source: np.ndarray, standard: np.ndarray, percentiles=PERCENTILES) -> dict:
    """One run's standardisation, as its sidecar states it (JSON-ready)."""
    return {"Method": "landmarks", "Percentiles": [float(p) for p in percentiles],
            "SourceLandmarks": [float(x) for x in source], "StandardLandmarks": [float(x) for x in standard]}


def apply_record(volume: np.ndarray, rec: dict) -> np.ndarray:
    """``standardise`` with the landmarks a run recorded (``record``): the same map on another grid."""
    return standardise(volume, np.asarray(rec["StandardLandmarks"]), rec["Percentiles"], source_landmarks=np.asarray(rec["SourceLandmarks"]))
