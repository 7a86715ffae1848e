"""The volume-wide intensity stages, in the order harmonization runs them, on one image.

1. **Standardisation** (``image.standardise``): landmarks measured on the pipeline's 1.2 mm grid, the
   map applied to that grid's volume and, with the same landmarks, to the native voxels; where the
   model holds class landmarks, the class pass follows, measured on the grid's mapped volume.
2. **Detail matching** (``image.detail``), where the model holds a detail band: the native voxels'
   detail level brought into the band (denoised or sharpened).
3. **The field stage** (``image.field``), where the model holds the target's typical field, and only
   where the detail stage left the volume alone: noise, blur and tissue contrast mislead N4 and each
   moves the detail level out of the band, so a volume the detail stage changed keeps its field.

The Standardise node (``bidsharmony.interfaces.standardise``) reads and writes the files around this
function; the probes under ``benchmarks/`` call it to score a change in the pipeline's own order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

LOG = logging.getLogger("bidsharmony")


class StageError(ValueError):
    """A stage could not measure what it needs on this image; the message names the stage's cause."""


@dataclass
class Prepared:
    """What the stages made: the grid's volume, the native voxels (None without a band or a field),
    and the record the sidecar keeps (the map's landmarks; ``Detail`` and ``Field`` where they ran)."""

    grid: np.ndarray
    native: np.ndarray | None
    record: dict


def prepare(grid: np.ndarray, grid_affine: np.ndarray, standard, percentiles, *, class_standard=None, zooms=None, native=None,
            band=None, target_voxel=None, denoiser=None, typical=None, source_landmarks=None, brain=None,
            name: str = "") -> Prepared:
    """Run the intensity stages on one volume.

    Parameters
    ----------
    grid, grid_affine
        The canonical 1.2 mm volume (the resample node's output) and its affine.
    standard, percentiles
        The target landmarks (the model's, or any others on the same percentiles) and their percentiles.
    class_standard
        The target's class landmarks (``image.standardise.class_landmarks``): with them, the class pass
        follows the percentile map.
    zooms
        The grid's voxel size (default: from ``grid_affine``).
    native
        (voxels as acquired, affine): needed by the detail and field stages, which act on the native voxels.
    band, target_voxel, denoiser
        The model's detail band (min, mean, max), the target's acquired voxel size and its learned
        denoiser: with ``band``, the detail stage runs.
    typical
        The target's typical field (``image.field.TypicalField``): with it, the field stage runs where the
        detail stage did nothing.
    source_landmarks
        The grid's landmarks when already measured (default: measured here).
    brain
        The model's learned brain mask (``image.brainmask``; needs ``native``): with it, the landmarks are
        measured in the brain it finds on the native voxels brought to its 2 mm grid, and the class pass and
        the field stage measure in that brain brought onto the grid, instead of the blind region; ``standard``
        and ``class_standard`` must be the model's landmarks measured in it (``extra.brain_landmarks``).
    name
        The source, as warnings name it.

    Raises
    ------
    StageError
        A stage cannot measure its quantity on this volume; the message says which.
    """
    from bidsharmony.image import standardise as std

    standard, percentiles = np.asarray(standard, np.float64), list(percentiles)
    if zooms is None:
        zooms = tuple(float(z) for z in np.linalg.norm(np.asarray(grid_affine)[:3, :3], axis=0))
    # The landmark region, found once: the landmarks, the class pass and the field stage all measure in it.
    needed = source_landmarks is None or class_standard is not None or typical is not None
    region, measured = None, grid
    if brain is not None and needed:
        # The mask is found on, and the landmarks measured in, the voxels as acquired brought to its 2 mm grid:
        # found on the 1.2 mm grid's re-interpolated copy, it lost 0.7 dB (docs/benchmarks/brainmask_probe-cpu.md).
        from bidsharmony.image import brainmask

        if native is None:
            raise ValueError("the learned brain mask needs the native voxels (native=(voxels, affine))")
        measured, coarse_affine, found = brainmask.brain_on_grid(brain, *native)
        if not found.any():
            raise StageError("cannot standardise its intensities (the learned brain mask found no brain in it)")
        region = found
    elif needed:
        region = std.landmark_region(grid, zooms)
    try:
        source = (std.volume_landmarks(measured, percentiles, zooms, region=lambda *_: region) if source_landmarks is None
                  else np.asarray(source_landmarks, np.float64))
    except ValueError as e:
        raise StageError(f"cannot standardise its intensities ({e})") from None
    if brain is not None and needed:  # the class pass and the field stage measure on the grid: the mask goes there
        region = brainmask.onto(found, coarse_affine, grid.shape, grid_affine)
    out = std.standardise(grid, standard, percentiles, source_landmarks=source)
    classes = None
    if class_standard is not None:
        class_standard = np.asarray(class_standard, np.float64)
        try:
            out, classes = std.class_pass(out, class_standard, region)
        except ValueError as e:
            raise StageError(f"cannot standardise its intensities ({e})") from None
    record = std.record(source, standard, percentiles, classes, class_standard)
    if brain is not None:
        record["Region"] = "learned brain mask"
    if band is None and typical is None:
        return Prepared(out, None, record)
    if native is None:
        raise ValueError("the detail and field stages need the native voxels (native=(voxels, affine))")
    data, affine = np.asarray(native[0], np.float32), native[1]
    mapped = std.apply_record(data, record)  # both stages start from the native voxels through the same map
    if band is not None:
        out, mapped, record["Detail"] = _detail(out, grid_affine, mapped, affine, band, target_voxel, denoiser, name)
    if typical is not None:
        if "Detail" in record and record["Detail"]["Action"] != "none":
            record["Field"] = {"Method": "n4-typical", "Weight": 0.0, "Skipped": "the detail stage changed the volume"}
        else:
            out, mapped, record["Field"] = _field(grid, region, out, grid_affine, data, mapped, affine, typical, standard,
                                                  percentiles, class_standard)
    return Prepared(np.asarray(out, np.float32), mapped, record)


def _detail(out, grid_affine, mapped, affine, band, target_voxel, denoiser, name):
    """The detail stage on the native voxels; the grid's volume is replaced by them where it acted."""
    from bidsharmony.image.detail import match_detail
    from bidsharmony.image.resample import resample_onto

    try:
        mapped, detail = match_detail(mapped, affine, band, (out.shape, grid_affine), target_voxel, denoiser)
    except ValueError as e:
        raise StageError(f"cannot measure its detail level ({e})") from None
    if detail["Action"] != "none":
        out = resample_onto(mapped, affine, out.shape, grid_affine)
    if detail["Action"] == "denoise" and detail["LevelReached"] > detail["Band"][2]:
        # Full denoising left it above the band: detail the target's images lack, or noise the
        # denoiser cannot remove; either way the output still differs from the target's in kind.
        LOG.warning("%s: detail level %.3f is still above the model's band (%.3f) after full denoising: the scan holds "
                    "finer detail or more noise than the target's images; consider --detail none (docs/method.md §8)",
                    name, detail["LevelReached"], detail["Band"][2])
    return np.asarray(out, np.float32), mapped, detail


def _field(grid, region, out, grid_affine, data, mapped, affine, typical, standard, percentiles, class_standard):
    """The foreign part of the native voxels' field undone (``data`` as acquired, ``mapped`` through the
    first map), their landmarks measured again in the grid's first landmark ``region``."""
    from bidsharmony.image import field
    from bidsharmony.image.resample import resample_onto
    try:
        mapped, rec = field.undo(data, affine, mapped, typical, standard, percentiles, (grid.shape, grid_affine),
                                 region, class_standard)
    except ValueError as e:
        raise StageError(f"cannot estimate its bias field ({e})") from None
    if rec["Weight"] == 0:
        return out, mapped, rec
    return resample_onto(mapped, affine, grid.shape, grid_affine).astype(np.float32), mapped, rec
