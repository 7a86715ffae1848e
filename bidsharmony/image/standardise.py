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
CLASS_LANDMARKS = "class_landmarks"  # and the class pass's: 0, then the CLASS_POINTS quantiles
PERCENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)
# The class pass's points: quantiles within the CSF-, grey- and white-like k-means classes of the region.
CLASS_POINTS = ((50.0,), (25.0, 50.0, 75.0), (25.0, 50.0, 75.0, 95.0))
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
    return piecewise_linear(volume, x, y)


def piecewise_linear(volume: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The monotone map through the points (x_k, y_k), linear between them and extended beyond the first
    and last with the end segments' slopes (``x`` is made strictly increasing first)."""
    x, y = _increasing(x), np.asarray(y, np.float64)
    v = np.asarray(volume, np.float64)
    out = np.interp(v, x, y)
    lo, hi = v < x[0], v > x[-1]
    out[lo] = y[0] + (v[lo] - x[0]) * (y[1] - y[0]) / (x[1] - x[0])
    out[hi] = y[-1] + (v[hi] - x[-1]) * (y[-1] - y[-2]) / (x[-1] - x[-2])
    return out.astype(np.float32)


def class_landmarks(standardised: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(1 + Σ quantiles,) class landmarks of a volume on the standard scale: 0 (the background), then the
    CLASS_POINTS quantiles within the three tissue-like classes of a 1D k-means of its landmark region."""
    from bidsharmony.metrics import kmeans1d

    x = np.asarray(standardised, np.float64)[region]
    if x.size < 3:
        raise ValueError("no landmark region to find tissue classes in")
    centres, labels = kmeans1d(x)
    points = [np.percentile(x[labels == c], q) if np.any(labels == c) else np.full(len(q), centres[c])
              for c, q in enumerate(CLASS_POINTS)]
    return np.concatenate([[0.0], *points])


def fit_target_scale(volumes: Iterable[np.ndarray], percentiles=PERCENTILES, zooms=VOXEL_MM,
                     region_of=landmark_region) -> tuple[np.ndarray, np.ndarray]:
    """(standard landmarks, class landmarks) of the training volumes in one pass (each read and its region
    found once). The standard landmarks are ``fit_landmarks``'; the class landmarks are the mean of
    ``class_landmarks`` of each volume mapped affinely onto its own landmark shape (its anatomy untouched).
    ``region_of(volume, zooms)``: where the landmarks are measured (the blind region, or a learned brain mask)."""
    shapes, classes = [], []
    for v in volumes:
        v = np.asarray(v, np.float32)
        region = region_of(v, zooms)
        lm = volume_landmarks(v, percentiles, zooms, region=lambda *_, r=region: r)
        shapes.append(on_standard_scale(lm))
        classes.append(class_landmarks(standardise(v, shapes[-1], percentiles, source_landmarks=lm), region))
    if not shapes:
        raise ValueError("fitting the target's scale needs at least one training volume")
    return np.mean(shapes, axis=0), np.mean(classes, axis=0)


def class_pass(standardised: np.ndarray, class_standard: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the volume with its class landmarks mapped onto ``class_standard``, its class landmarks before)."""
    source = class_landmarks(standardised, region)
    return piecewise_linear(standardised, source, class_standard), source


def model_entry(volumes: int, percentiles=PERCENTILES, classes: bool = True) -> dict:
    """What a model's ``config.json`` says about its standardisation (``preprocessing.standardisation``);
    the landmarks themselves are the weights file's ``extra.standard_landmarks`` (and ``extra.class_landmarks``),
    under its sha256."""
    entry = {"method": "landmarks", "percentiles": [float(p) for p in percentiles], "scale": SCALE,
             "region": f"head deeper than {DEPTH_MM:g} mm and within {TOP_MM:g} mm of its top", "volumes": int(volumes)}
    if classes:
        entry["class_pass"] = {"classes": "3-class 1D k-means of the landmark region on the standard scale (CSF-, grey-, white-like)",
                               "quantiles": [[float(q) for q in c] for c in CLASS_POINTS]}
    return entry


def record(source: np.ndarray, standard: np.ndarray, percentiles=PERCENTILES, class_source=None, class_standard=None) -> dict:
    """One run's standardisation, as its sidecar states it (JSON-ready); with the class pass, its landmarks too."""
    rec = {"Method": "landmarks", "Percentiles": [float(p) for p in percentiles],
           "SourceLandmarks": [float(x) for x in source], "StandardLandmarks": [float(x) for x in standard]}
    if class_source is not None:
        rec["ClassPass"] = {"Quantiles": [[float(q) for q in c] for c in CLASS_POINTS],
                            "SourceLandmarks": [float(x) for x in class_source],
                            "StandardLandmarks": [float(x) for x in class_standard]}
    return rec


def apply_record(volume: np.ndarray, rec: dict) -> np.ndarray:
    """``standardise`` with the landmarks a run recorded (``record``), then its class pass where it ran:
    the same map on another grid."""
    out = standardise(volume, np.asarray(rec["StandardLandmarks"]), rec["Percentiles"], source_landmarks=np.asarray(rec["SourceLandmarks"]))
    if "ClassPass" in rec:
        out = piecewise_linear(out, np.asarray(rec["ClassPass"]["SourceLandmarks"]), np.asarray(rec["ClassPass"]["StandardLandmarks"]))
    return out
