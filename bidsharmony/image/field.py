"""Bias fields: undo the part of a source's smooth intensity field that the target's own images lack.

A target scanner's images carry a field of their own (IXI-HH's is strong), so removing a source's
whole field, as N4 alone does, moves it away from the target. Here only the source's departure
from the target's *typical* field is undone:

1. **N4's field** (Tustison et al. 2010, *IEEE TMI* 29:1310; antspyx) of the standardised volume, as
   a log-field g with zero mean in the head, sampled on a G³ grid over the head's bounding box (a
   crude but blind alignment between heads; RAS voxel order). The target's TRAIN volumes give the
   typical field m (the grid mean) and the between-subject variance σ₀² (per grid point, averaged).
2. **Shrinkage.** A source departs from m by d² = mean((g − m)²); a target head departs by about σ₀²,
   so the share of the departure that is the source's own is estimated by the James–Stein-type
   weight w = max(0, 1 − σ₀²/d²) (Efron & Morris 1973). The log-correction is c = w (m − g) in the
   head.
3. **On the source's own intensities.** The field multiplied the scanner's intensities, so the
   correction does too: the source is multiplied by exp(c) and standardised afresh, its landmarks
   measured as the first standardisation measured them (on the same 1.2 mm grid and landmark
   region). With c = 0 this is exactly the first standardisation; landmarks measured again on the
   already standardised volume are not (the map and the resampling do not commute), which alone cost
   2–3 dB on held-out heads.

N4 is misled by noise, blur and changes of tissue contrast (each moved its field as much as a real
field on held-out heads), and each of those moves the volume's detail level out of the target's band
(``image.detail``). So the pipeline runs this stage only where the detail stage leaves the volume
alone (``interfaces.standardise``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GRID = 24  # grid points per axis over the head's bounding box
WORKING_MM = 4.0  # N4 works on about this voxel size (its shrink factor): the field holds nothing finer
# A model folder's extra tensors (``extra.NAME``) holding the typical field; its config entry is ``preprocessing.field``
EXTRAS = ("field_n4_mean",)


@dataclass(frozen=True)
class TypicalField:
    """The target's typical field: N4's mean log-field on the G³ grid and its between-subject variance."""

    n4_mean: np.ndarray
    n4_var: float
    volumes: int

    def to_extras(self) -> dict:
        """The model folder's extras (``save_model(extras=...)``)."""
        return {"field_n4_mean": self.n4_mean.astype(np.float32)}

    def model_entry(self) -> dict:
        return {"method": "n4-typical", "grid": GRID, "working_mm": WORKING_MM, "n4_variance": float(self.n4_var),
                "volumes": int(self.volumes)}

    @classmethod
    def from_model(cls, tensors: dict, entry: dict) -> TypicalField:
        """From a model folder's tensors (``extra.NAME``, torch) and its ``preprocessing.field`` entry."""
        return cls(np.asarray(tensors["extra.field_n4_mean"].float().numpy(), np.float32), float(entry["n4_variance"]),
                   int(entry.get("volumes", 0)))


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    return tuple(slice(int(a), int(b)) for a, b in zip(idx.min(0), idx.max(0) + 1, strict=True))


def to_grid(g: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``g`` on the G³ grid over ``head``'s bounding box (linear interpolation)."""
    c = g[_box(head)]
    return ndimage.zoom(c, [GRID / s for s in c.shape], order=1, grid_mode=True, mode="nearest")


def from_grid(m: np.ndarray, head: np.ndarray) -> np.ndarray:
    """A G³ grid back onto the voxels of ``head``'s bounding box (zero outside it)."""
    box = _box(head)
    size = [s.stop - s.start for s in box]
    out = np.zeros(head.shape, np.float32)
    out[box] = ndimage.zoom(m, [s / GRID for s in size], order=1, grid_mode=True, mode="nearest")[tuple(slice(0, s) for s in size)]
    return out


def _step(zooms) -> int:
    """N4's shrink factor for a ~WORKING_MM grid (2 on 2 mm voxels, 4 on 1 mm, 6 on 0.7 mm): its cost does not grow
    with the scan's resolution."""
    return max(1, int(round(WORKING_MM / float(min(zooms)))))


def n4_log_field(v: np.ndarray, affine: np.ndarray, head: np.ndarray) -> np.ndarray:
    """N4's log-field of ``v`` in ``head`` (antspyx defaults; shrink factor ``_step``), zero mean in the head."""
    import ants

    from bidsharmony.image.resample import to_ants

    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    field = ants.n4_bias_field_correction(to_ants(np.asarray(v, np.float32), affine), mask=to_ants(head.astype(np.float32), affine),
                                          shrink_factor=_step(zooms), return_bias_field=True).numpy()
    g = np.log(np.maximum(field, 1e-6))
    return (g - g[head].mean()).astype(np.float32)


def _canonical(v: np.ndarray, affine: np.ndarray):
    """(``v`` in RAS voxel order, its affine, a function taking a RAS array back to ``v``'s order): the grid over the
    head box aligns heads only if their axes agree."""
    import nibabel.orientations as no

    ornt = no.io_orientation(affine)
    to_ras = no.ornt_transform(ornt, no.axcodes2ornt("RAS"))
    back = no.ornt_transform(no.axcodes2ornt("RAS"), ornt)
    ras = no.apply_orientation(np.asarray(v, np.float32), to_ras)
    return np.ascontiguousarray(ras), affine @ no.inv_ornt_aff(to_ras, v.shape), lambda x: np.ascontiguousarray(no.apply_orientation(x, back))


def measure(v: np.ndarray, affine: np.ndarray) -> dict:
    """One standardised volume's N4 log-field (``g``, full size), its head (``head``) and the field on the grid
    (``grid``). ``v``: in RAS voxel order (``_canonical``)."""
    from bidsharmony.image.slices import solid_head_mask

    head = solid_head_mask(v)
    if not head.any():
        raise ValueError("no head to estimate a field in")
    g = n4_log_field(v, affine, head)
    return {"head": head, "g": g, "grid": to_grid(g, head)}


def fit_typical(volumes) -> TypicalField:
    """The target's typical field from ``(standardised volume, affine)`` pairs of its TRAIN images."""
    grids = np.array([measure(*_canonical(v, affine)[:2])["grid"] for v, affine in volumes])
    if len(grids) < 2:
        raise ValueError("the typical field needs at least two training volumes")
    return TypicalField(grids.mean(0), float(np.mean(np.var(grids, 0, ddof=1))), len(grids))


def correction(v: np.ndarray, affine: np.ndarray, typical: TypicalField) -> tuple[np.ndarray, dict]:
    """(the log-correction c of the standardised volume ``v``, in its voxel order: zero outside the head, and
    everywhere when the shrinkage weight is 0; the record a sidecar states)."""
    ras, ras_affine, back = _canonical(v, affine)
    got = measure(ras, ras_affine)
    d2 = float(np.mean((got["grid"] - typical.n4_mean) ** 2))
    w = max(0.0, 1.0 - typical.n4_var / d2) if d2 > 0 else 0.0
    rec = {"Method": "n4-typical", "N4Departure": round(d2, 6), "TypicalVariance": round(typical.n4_var, 6), "Weight": round(w, 4)}
    if w == 0.0:
        return np.zeros(np.shape(v), np.float32), rec
    c = np.where(got["head"], w * (from_grid(typical.n4_mean, got["head"]) - got["g"]), 0.0).astype(np.float32)
    return back(c), rec


def undo(source: np.ndarray, affine: np.ndarray, standardised: np.ndarray, typical: TypicalField, standard, percentiles,
         grid: tuple, region: np.ndarray) -> tuple[np.ndarray, dict]:
    """(the source with its foreign field undone, standardised afresh; the record with the landmarks after it).

    ``source``/``affine``: the native voxels as acquired; ``standardised``: the same voxels through the first
    standardisation; ``standard``, ``percentiles``: the model's landmarks; ``grid`` = (shape, affine) and ``region``:
    the 1.2 mm grid and landmark region the first landmarks were measured on."""
    from bidsharmony.image.resample import resample_onto
    from bidsharmony.image.standardise import standardise, volume_landmarks

    c, rec = correction(standardised, affine, typical)
    if rec["Weight"] == 0.0:
        return np.asarray(standardised, np.float32), rec
    corrected = (np.asarray(source, np.float32) * np.exp(c)).astype(np.float32)
    after = volume_landmarks(resample_onto(corrected, affine, *grid), percentiles, region=lambda v, z: region)
    rec["LandmarksAfter"] = [float(x) for x in after]
    rec["CorrectionRange"] = [round(float(np.exp(q)), 4) for q in np.percentile(c[c != 0], [1, 99])] if np.any(c) else [1.0, 1.0]
    return standardise(corrected, standard, percentiles, source_landmarks=after), rec
