"""Intensity measures shared by the reports and the benchmark (one definition of each)."""

from __future__ import annotations

import numpy as np

# Axial slices with less mask than this are left out of slice-wise measures.
MIN_MASK_FRACTION = 0.05
HISTOGRAM_BINS = 64  # of normalised [0, 1] slice intensities, as stored with a model


def robust_scale(v: np.ndarray, mask: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    """Map the mask's lo/hi percentiles to 0/1: comparisons free of intensity units."""
    p_lo, p_hi = np.percentile(v[mask], [lo, hi])
    return ((v - p_lo) / max(float(p_hi - p_lo), 1e-12)).astype(np.float32)


def kmeans1d(x: np.ndarray, k: int = 3, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1D k-means (Lloyd, started evenly over the 1–99 % range): (sorted centres,
    labels 0..k-1 in centre order). Used for tissue classes by the standardisation's class pass and by
    the benchmark; ANTs Atropos was tried first: its runs differ from each other even single-threaded."""
    x = np.asarray(x, np.float64).ravel()
    lo, hi = np.percentile(x, [1, 99])
    centres = lo + (hi - lo) * (np.arange(k) + 0.5) / k  # spread over the range: quantile starts sit
    # all in the largest class when classes are unbalanced (CSF-rich heads)
    tol = 1e-9 * max(float(x.max() - x.min()), 1e-30)  # relative to the range: unit-free
    for _ in range(iterations):
        edges = (centres[1:] + centres[:-1]) / 2
        labels = np.searchsorted(edges, x)
        new = np.array([x[labels == i].mean() if np.any(labels == i) else centres[i] for i in range(k)])
        done = np.max(np.abs(new - centres)) <= tol
        centres = np.sort(new)
        if done:
            break
    return centres, np.searchsorted((centres[1:] + centres[:-1]) / 2, x)


def mask_slices(mask: np.ndarray) -> np.ndarray:
    """Indices of the axial slices (last axis of a RAS array) that hold enough of the mask."""
    return np.flatnonzero(mask.mean(axis=(0, 1)) >= MIN_MASK_FRACTION)


def slice_profile(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean robust-scaled intensity inside the mask of each axial slice that holds the mask."""
    s = robust_scale(v, mask)
    return np.array([s[..., k][mask[..., k]].mean() for k in mask_slices(mask)])


def slice_jumps(v: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute step of the slice profile between neighbouring axial slices."""
    return float(np.mean(np.abs(np.diff(slice_profile(v, mask)))))


def slice_step_ratio(out: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """The output's slice-to-slice steps relative to a reference's (1: as smooth; a 2D method
    that treats slices inconsistently gives more)."""
    return slice_jumps(out, mask) / max(slice_jumps(reference, mask), 1e-12)


def slice_histogram(slices: np.ndarray) -> np.ndarray:
    """Density of normalised head intensities (> 0.05) of [0, 1] slices over HISTOGRAM_BINS bins:
    the definition of a model's target histogram."""
    values = np.asarray(slices, np.float32)
    values = values[values > 0.05]
    hist, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(0.0, 1.0), density=True)
    return hist.astype(np.float32)


def histogram_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Wasserstein-1 distance between two densities on the same bins of [0, 1] (0: the same
    distribution; the unit is the intensity range), each bin's mass at its centre (scipy)."""
    from scipy.stats import wasserstein_distance

    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    centres = (np.arange(len(p)) + 0.5) / len(p)
    if p.sum() <= 0 or q.sum() <= 0:  # an empty histogram: as far as it can be
        return 1.0 if p.sum() != q.sum() else 0.0
    return float(wasserstein_distance(centres, centres, p, q))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def harmonization_quality(before: np.ndarray, after: np.ndarray, target: np.ndarray | None) -> tuple[dict, dict]:
    """For harmonized [0, 1] slices and their inputs: (the histograms the report draws, JSON-ready;
    the sidecar's ``Quality``: similarity to the input and, with a target histogram, the distance
    to it before and after)."""
    hist = {"before": slice_histogram(before), "after": slice_histogram(after), "target": target}
    quality = {"SimilarityToInput": round(cosine(after, before), 5)}
    if target is not None:
        quality["HistogramDistanceBefore"] = round(histogram_distance(hist["before"], target), 5)
        quality["HistogramDistanceAfter"] = round(histogram_distance(hist["after"], target), 5)
    return {k: (None if v is None else [round(float(x), 5) for x in v]) for k, v in hist.items()}, quality
