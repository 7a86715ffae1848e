"""Scores of a harmonized volume against the true target volume, and distribution-level scores.

All volumes are RAS-canonical arrays (the last axis is axial). Every score is invariant to an
affine change of intensity units, because methods answer in different units (z-scores, Nyúl's
scale, scanner units): the papers' protocol min-max scales each slice, the volume protocol maps the
brain's 1st/99th percentiles to 0/1.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from bidsharmony.metrics import kmeans1d, mask_slices, robust_scale, slice_jumps, slice_profile


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Wang et al.'s SSIM per pixel/voxel (Gaussian window σ = 1.5), from scikit-image."""
    from skimage.metrics import structural_similarity

    _, full = structural_similarity(
        a.astype(np.float64), b.astype(np.float64), data_range=data_range, full=True,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    return full


def minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / max(hi - lo, 1e-12)


def slice_scores(out: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """The papers' protocol: each axial slice min-max scaled to [0, 1]; PSNR and SSIM over the
    whole slice, averaged over the slices that hold brain."""
    ps, ss = [], []
    for k in mask_slices(mask):
        a, b = minmax(out[..., k]), minmax(truth[..., k])
        ps.append(psnr(a, b))
        ss.append(float(ssim_map(a, b).mean()))
    return {"psnr_slice": float(np.mean(ps)), "ssim_slice": float(np.mean(ss))}


def volume_scores(out: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """The volume protocol: brain 1st/99th percentiles to 0/1, then PSNR, SSIM and NCC in the brain."""
    a, b = robust_scale(out, mask), robust_scale(truth, mask)
    return {
        "psnr_vol": psnr(a[mask], b[mask]),
        "ssim_vol": float(ssim_map(a, b)[mask].mean()),
        "ncc_vol": float(np.corrcoef(a[mask], b[mask])[0, 1]),
    }


def segment(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """CSF/GM/WM (1/2/3) by 3-class k-means of the brain's intensities; 0 outside the brain."""
    seg = np.zeros(v.shape, np.uint8)
    seg[mask] = kmeans1d(v[mask])[1] + 1
    return seg


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def tissue_dice(out: np.ndarray, truth: np.ndarray, mask: np.ndarray, truth_seg: np.ndarray | None = None) -> dict:
    """Dice of the k-means classes, and the output's grey-matter fraction of the brain (the
    benchmark correlates it with age: harmonization must keep that biology). ``truth_seg``: the
    truth's ``segment``, when the caller scores many outputs against one truth."""
    so = segment(out, mask)
    st = segment(truth, mask) if truth_seg is None else truth_seg
    per = {name: dice(so == i, st == i) for i, name in ((1, "csf"), (2, "gm"), (3, "wm"))}
    return {"dice": float(np.mean(list(per.values()))), **{f"dice_{k}": v for k, v in per.items()},
            "gm_fraction": gm_fraction(so)}


def gm_fraction(seg: np.ndarray) -> float:
    """Grey matter's share of the brain in a ``segment`` labelling."""
    brain = int((seg > 0).sum())
    return float((seg == 2).sum() / brain) if brain else float("nan")


def correlation(x, y) -> float:
    """Pearson r; NaN below 3 pairs or without spread."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def consistency_scores(out: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict:
    """Inter-slice consistency: the output's slice-to-slice steps relative to the truth's (1 is as
    smooth as the truth; a 2D method adds steps), and the RMS error of the slice profile."""
    po, pt = slice_profile(out, mask), slice_profile(truth, mask)
    return {
        "jump_ratio": slice_jumps(out, mask) / max(slice_jumps(truth, mask), 1e-12),
        "profile_rmse": float(np.sqrt(np.mean((po - pt) ** 2))),
    }


def score_volume(out: np.ndarray, truth: np.ndarray, mask: np.ndarray, truth_seg: np.ndarray | None = None) -> dict:
    return {**slice_scores(out, truth, mask), **volume_scores(out, truth, mask),
            **tissue_dice(out, truth, mask, truth_seg), **consistency_scores(out, truth, mask)}


def brain_sample(v: np.ndarray, mask: np.ndarray, n: int = 20000, seed: int = 0) -> np.ndarray:
    """A fixed-size random sample of robust-scaled brain intensities (for distribution scores)."""
    x = robust_scale(v, mask)[mask]
    return np.random.default_rng(seed).choice(x, size=min(n, x.size), replace=False)


def histogram_distance(v: np.ndarray, mask: np.ndarray, reference: np.ndarray) -> float:
    """Wasserstein-1 distance between the brain's robust-scaled intensities and a target-domain
    sample, in units of the brain's 1st–99th percentile range."""
    return float(stats.wasserstein_distance(brain_sample(v, mask), reference))


def gm_wm_ratio(v: np.ndarray, mask: np.ndarray) -> float:
    """Grey/white contrast: k-means GM centre over WM centre, on robust-scaled intensities."""
    centres, _ = kmeans1d(robust_scale(v, mask)[mask])
    return float(centres[1] / centres[2])


def tissue_classes(t1: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """CSF/GM/WM (1/2/3) from a parcellation, grouping its labels by their median brightness.

    A fixed label list would be wrong at 2 mm: partial volume puts ventricle labels with grey
    matter and deep nuclei with white (see the data README), so each label joins the class its
    voxels look like in this very image (k-means of the label medians, weighted by size)."""
    ids = np.unique(labels[labels > 0]).astype(int)
    medians = np.array([np.median(t1[labels == i]) for i in ids])
    counts = np.array([(labels == i).sum() for i in ids])
    _, cls = kmeans1d(np.repeat(medians, np.maximum(1, counts // 50)))
    centres = np.array([np.repeat(medians, np.maximum(1, counts // 50))[cls == c].mean() for c in range(3)])
    edges = (centres[1:] + centres[:-1]) / 2
    lut = np.zeros(int(labels.max()) + 1, np.uint8)
    lut[ids] = np.searchsorted(edges, medians) + 1
    return lut[labels.astype(int)]
