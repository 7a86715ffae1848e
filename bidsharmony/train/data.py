"""Training slices from the preprocessing nodes' outputs, plus what harmonization needs from them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bidsharmony.image.slices import POSITION_BINS, SliceRecord

LOG = logging.getLogger("bidsharmony")


class PreparedRun(NamedTuple):
    """One target run after the training preparation (``workflows.train``): its files."""

    subject: str
    slices: str  # .npy
    record: str  # .npz
    resampled: str  # the canonical volume on the harmonization grid
    source: str  # the original T1w


@dataclass
class SliceSet:
    """12-bit codes of head slices (N, H, W) uint16, with each slice's subject and position bin."""

    codes: np.ndarray
    subject: np.ndarray
    position_bin: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)

    def subset(self, mask: np.ndarray) -> "SliceSet":
        return SliceSet(self.codes[mask], self.subject[mask], self.position_bin[mask])


def target_landmarks(prepared, subjects: set) -> tuple[np.ndarray, np.ndarray, int]:
    """(standard landmarks, class landmarks, how many volumes) fitted on the resampled volumes of
    ``subjects`` (``prepared``: a ``PreparedRun`` per run), one volume in memory at a time and each read
    once (``image.standardise.fit_target_scale``): the target's intensity scale that harmonization maps
    every source onto, and the class pass's target."""
    import nibabel as nb

    from bidsharmony.errors import BidsHarmonyError
    from bidsharmony.image.standardise import fit_target_scale

    paths = [run.resampled for run in prepared if run.subject in subjects]
    if not paths:
        raise BidsHarmonyError("no training volume to fit the intensity landmarks on")
    zooms = nb.load(paths[0]).header.get_zooms()[:3]  # every resampled volume has the same voxel size
    try:
        landmarks, classes = fit_target_scale((np.asanyarray(nb.load(p).dataobj, dtype=np.float32) for p in paths), zooms=zooms)
    except ValueError as e:
        raise BidsHarmonyError(f"cannot fit the target's intensity landmarks: {e}") from None
    return landmarks, classes, len(paths)


def target_detail_band(prepared, subjects: set, landmarks) -> tuple[np.ndarray, np.ndarray]:
    """((min, mean, max) detail level, acquired voxel size) of the target (``bidsharmony.image.detail``):
    the voxel size is the median over the original T1w of ``subjects`` (RAS axes); the levels are
    those of their resampled volumes, each standardised onto ``landmarks`` and measured at that
    voxel size, as harmonization measures a source."""
    import nibabel as nb

    from bidsharmony.image.detail import at_resolution, detail_level, fit_band, ras_voxel_mm
    from bidsharmony.image.standardise import standardise

    runs = [(run.resampled, ras_voxel_mm(nb.load(run.source).affine)) for run in prepared if run.subject in subjects]
    voxel = np.median([acquired for _, acquired in runs], axis=0)
    levels = []
    for path, acquired in runs:
        img = nb.load(path)
        zooms = img.header.get_zooms()[:3]
        volume = standardise(np.asanyarray(img.dataobj, dtype=np.float32), landmarks, zooms=zooms)
        levels.append(detail_level(at_resolution(volume, img.affine, acquired, voxel), zooms))
    return fit_band(levels), voxel


def target_field(prepared, subjects: set, landmarks, count: int, seed: int):
    """The target's typical bias field (``bidsharmony.image.field.fit_typical``) from the native T1w of
    up to ``count`` of ``subjects``' runs (a seeded choice), each standardised as harmonization
    standardises a source: landmarks measured on its resampled volume, applied to its native voxels.
    None with fewer than 2 runs (a between-subject variance needs two)."""
    import time

    import nibabel as nb

    from bidsharmony.image.field import fit_typical
    from bidsharmony.image.io import load_t1w
    from bidsharmony.image.standardise import standardise, volume_landmarks

    runs = sorted((run for run in prepared if run.subject in subjects), key=lambda r: r.source)
    if len(runs) < 2:
        LOG.warning("no typical bias field: it needs at least 2 training volumes, there are %d", len(runs))
        return None
    if len(runs) > count:
        pick = np.random.default_rng(seed).choice(len(runs), count, replace=False)
        runs = [runs[i] for i in sorted(pick)]
    t0 = time.perf_counter()

    def volumes():
        for i, run in enumerate(runs):
            img = nb.load(run.resampled)
            source = volume_landmarks(np.asanyarray(img.dataobj, dtype=np.float32), zooms=img.header.get_zooms()[:3])
            orig, data = load_t1w(run.source)
            yield standardise(data, landmarks, source_landmarks=source), orig.affine
            LOG.info("typical bias field: %d/%d volumes (%.0f s)", i + 1, len(runs), time.perf_counter() - t0)

    return fit_typical(volumes())


def load_slice_set(items) -> SliceSet:
    """items: iterable of (subject, slices.npy, record.npz). Keeps the slices that hold head."""
    from bidsharmony.flow.scaling import LEVELS

    codes, subjects, bins = [], [], []
    for subject, slices_path, record_path in items:
        record = SliceRecord.load(record_path)
        keep = np.flatnonzero(record.harmonize)
        slices = np.load(slices_path, mmap_mode="r", allow_pickle=False)[keep]
        codes.append(np.round(np.clip(slices, 0, 1) * (LEVELS - 1)).astype(np.uint16))
        subjects += [subject] * len(keep)
        bins.append(record.position_bin[keep])
    if not codes:
        return SliceSet(np.zeros((0, 1, 1), np.uint16), np.array([], str), np.array([], int))
    return SliceSet(np.concatenate(codes), np.array(subjects), np.concatenate(bins))


def split_by_subject(data: SliceSet, fraction: float, seed: int) -> tuple[SliceSet, SliceSet]:
    """Validation subjects are drawn with the seed: round(fraction x subjects), but at least one
    (with 2 or more subjects) and never all. With one subject, a contiguous block of its slices
    (``fraction`` of them, at least one; the middle of the stack, where the head is) validates:
    neighbouring slices are near copies, so every 10th slice would validate on training data."""
    subjects = np.unique(data.subject)
    if len(subjects) < 2:
        n = len(data)
        n_val = min(n - 1, max(1, int(round(fraction * n)))) if n > 1 else 0
        start = (n - n_val) // 2
        val = np.zeros(n, bool)
        val[start:start + n_val] = True
        LOG.warning("one subject only: validating on a held-out contiguous block of %d of its %d slices "
                    "(slices %d-%d; no subject-level split: add subjects for an honest validation)",
                    n_val, n, start, start + n_val - 1)
        return data.subset(~val), data.subset(val)
    rng = np.random.default_rng(seed)
    n_val = min(len(subjects) - 1, max(1, int(round(fraction * len(subjects)))))
    val_subjects = rng.choice(subjects, size=n_val, replace=False)
    LOG.info("validation: %d of %d subjects held out (%s)", n_val, len(subjects), ", ".join(map(str, sorted(val_subjects))))
    val = np.isin(data.subject, val_subjects)
    return data.subset(~val), data.subset(val)


def mean_start_images(data: SliceSet) -> np.ndarray:
    """Mean target slice per position bin (POSITION_BINS, H, W) in [0, 1]: the reference's x_0."""
    from bidsharmony.flow.scaling import LEVELS

    h, w = data.codes.shape[1:]
    sums = np.zeros((POSITION_BINS, h, w), np.float64)
    counts = np.bincount(data.position_bin, minlength=POSITION_BINS).astype(np.float64)
    for b in range(POSITION_BINS):
        sel = data.position_bin == b
        if sel.any():
            sums[b] = data.codes[sel].sum(axis=0, dtype=np.float64)
    filled = counts > 0
    means = np.zeros_like(sums)
    means[filled] = sums[filled] / counts[filled, None, None] / (LEVELS - 1)
    # Empty bins borrow the nearest filled one, so every position has a start image.
    if filled.any():
        nearest = np.flatnonzero(filled)
        for b in np.flatnonzero(~filled):
            means[b] = means[nearest[np.argmin(np.abs(nearest - b))]]
    return means.astype(np.float32)


def intensity_histogram(data: SliceSet) -> np.ndarray:
    """The target histogram stored with a model (``metrics.slice_histogram`` of the training slices)."""
    from bidsharmony.flow.scaling import LEVELS
    from bidsharmony.metrics import slice_histogram

    codes = data.codes  # filter before converting: the training codes are large
    return slice_histogram(codes[codes > 0.05 * (LEVELS - 1)].astype(np.float32) / (LEVELS - 1))
