"""Bias fields: undo the part of a source's smooth intensity field that the target's own images lack.

A target scanner's images carry a field of their own (IXI-HH's is strong), so removing a source's
whole field, as N4 alone does, moves it away from the target. Here the source's field is compared
with the target's *typical* field, and only the difference is undone, as far as two independent
estimates agree that it is a field:

1. **N4's field** (Tustison et al. 2010, *IEEE TMI* 29:1310; antspyx) of the standardised volume, as
   a log-field g with zero mean in the head, sampled on a G³ grid over the head's bounding box (a
   crude but blind alignment between heads). The target's TRAIN volumes give the typical field m (the
   grid mean) and the between-subject variance σ₀². A source departs from m by d² = mean((g − m)²);
   a target head departs by about σ₀², so the share of the departure that is the source's own is
   estimated by the James–Stein-type weight w = max(0, 1 − σ₀²/d²) (Efron & Morris 1973).
2. **A check on white matter.** N4 sharpens the whole head's histogram, so noise, blur or a change
   of tissue contrast also move its field. A second estimate reads the field off white matter alone
   (as tissue-model corrections such as FAST do, Zhang et al. 2001): the voxels brighter than their
   neighbourhood (``local_white_matter``), whose log-intensity is fitted by a smooth cubic B-spline.
   Its typical field over the target's TRAIN volumes is m_wm. The correction c = w (m − g) is kept as
   far as it brings the source's white-matter field towards m_wm: with a = (its departure from m_wm
   before) and b = (the change the full correction makes to it), t = clip(−⟨a, b⟩ / ⟨b, b⟩, 0, 1), the
   least-squares step along the correction. The volume is multiplied by exp(t · c) in the head.

The corrected volume is standardised again by the caller (the field moved its landmarks), with
landmarks measured on the first standardisation's region (a region measured again on the mapped
volume is not the same region, and moves monotone scanners by up to ±3 dB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GRID = 24  # grid points per axis over the head's bounding box
WM_LOCAL_MM = 10.0  # the neighbourhood white matter is brighter than
WM_TOP = 40.0  # percent of the landmark region taken as white matter
WM_CONTROL = 5  # B-spline coefficients per axis of the white-matter field
N4_SHRINK = 2
# A model folder's extra tensors (``extra.NAME``) holding the typical field; its config entry is ``preprocessing.field``
EXTRAS = ("field_n4_mean", "field_wm_mean", "field_wm_keep")


@dataclass(frozen=True)
class TypicalField:
    """The target's typical fields on the G³ grid: N4's mean log-field and between-subject variance,
    the white-matter field's mean, and the grid points inside the landmark region it is compared on."""

    n4_mean: np.ndarray
    n4_var: float
    wm_mean: np.ndarray
    wm_keep: np.ndarray
    volumes: int

    def to_extras(self) -> dict:
        """The model folder's extras (``save_model(extras=...)``)."""
        return {"field_n4_mean": self.n4_mean.astype(np.float32), "field_wm_mean": self.wm_mean.astype(np.float32),
                "field_wm_keep": self.wm_keep.astype(np.float32)}

    def model_entry(self) -> dict:
        return {"method": "n4-typical", "grid": GRID, "n4_variance": float(self.n4_var), "volumes": int(self.volumes),
                "white_matter": {"local_mm": WM_LOCAL_MM, "top_percent": WM_TOP, "control_points": WM_CONTROL}}

    @classmethod
    def from_model(cls, tensors: dict, entry: dict) -> TypicalField:
        """From a model folder's tensors (``extra.NAME``, torch) and its ``preprocessing.field`` entry."""
        t = {k: np.asarray(tensors[f"extra.{k}"].float().numpy(), np.float32) for k in EXTRAS}
        return cls(t["field_n4_mean"], float(entry["n4_variance"]), t["field_wm_mean"], t["field_wm_keep"] > 0.5,
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


def n4_log_field(v: np.ndarray, affine: np.ndarray, head: np.ndarray) -> np.ndarray:
    """N4's log-field of ``v`` in ``head`` (antspyx defaults, shrink factor 2), zero mean in the head."""
    import ants

    from bidsharmony.image.resample import to_ants

    field = ants.n4_bias_field_correction(to_ants(np.asarray(v, np.float32), affine), mask=to_ants(head.astype(np.float32), affine),
                                          shrink_factor=N4_SHRINK, return_bias_field=True).numpy()
    g = np.log(np.maximum(field, 1e-6))
    return (g - g[head].mean()).astype(np.float32)


def _axis_basis(n: int, control: int) -> np.ndarray:
    """(n, control) clamped cubic B-spline basis over n samples."""
    from scipy.interpolate import BSpline

    t = np.concatenate([[0.0] * 3, np.linspace(0, 1, control - 2), [1.0] * 3])
    return BSpline.design_matrix(np.linspace(0, 1, n), t, 3).toarray()


def local_white_matter(logv: np.ndarray, region: np.ndarray, sigma_vox, top: float = WM_TOP) -> np.ndarray:
    """White-matter stand-in: the voxels of ``region`` brightest relative to their neighbourhood (log-intensity
    minus its Gaussian-weighted mean over the region), the top ``top`` percent but the brightest 0.5 %, eroded by one
    voxel. A field that varies over centimetres shifts a voxel and its neighbourhood alike, so the choice does not
    follow the field (a global percentile does: under IXI-HH's own field it picks the bright half of the head)."""
    m = region.astype(np.float32)
    ref = ndimage.gaussian_filter(logv * m, sigma_vox) / np.maximum(ndimage.gaussian_filter(m, sigma_vox), 1e-6)
    c = logv - ref
    lo, hi = np.percentile(c[region], [100 - top, 99.5])
    return ndimage.binary_erosion(region & (c >= lo) & (c <= hi))


def wm_log_field(v: np.ndarray, zooms, region: np.ndarray, *, local_mm: float = WM_LOCAL_MM, top: float = WM_TOP,
                 control: int = WM_CONTROL, step: int = 2, ridge: float = 1e-4) -> np.ndarray:
    """The log-field of ``v`` read off its white matter: a cubic B-spline of ``control``³ coefficients, fitted by
    (slightly ridged) least squares to the log-intensity of ``local_white_matter`` on every ``step``-th voxel, zero
    mean in ``region``."""
    full = np.log(np.maximum(np.asarray(v, np.float32), 1e-3))
    sl = (slice(None, None, step),) * 3  # the fit on a coarse copy: the field is smooth
    wm = local_white_matter(full, region, [local_mm / float(z) for z in zooms], top)[sl]
    logv = full[sl]
    bases = [_axis_basis(n, control) for n in logv.shape]
    i, j, k = np.nonzero(wm)
    if i.size < control**3:
        return np.zeros(v.shape, np.float32)
    a = (bases[0][i][:, :, None, None] * bases[1][j][:, None, :, None] * bases[2][k][:, None, None, :]).reshape(i.size, -1)
    y = logv[i, j, k] - logv[i, j, k].mean()
    coef = np.linalg.solve(a.T @ a + ridge * y.size * np.eye(a.shape[1]), a.T @ y)
    f = np.einsum("ia,jb,kc,abc->ijk", *bases, coef.reshape((control,) * 3))
    out = ndimage.zoom(f, [s / c for s, c in zip(v.shape, f.shape, strict=True)], order=1, grid_mode=True,
                       mode="nearest")[tuple(slice(0, s) for s in v.shape)]
    return (out - out[region].mean()).astype(np.float32)


def _canonical(v: np.ndarray, affine: np.ndarray):
    """(``v`` in RAS voxel order, its affine, a function taking a RAS array back to ``v``'s order): the grid over the
    head box aligns heads only if their axes agree."""
    import nibabel.orientations as no

    ornt = no.io_orientation(affine)
    to_ras = no.ornt_transform(ornt, no.axcodes2ornt("RAS"))
    back = no.ornt_transform(no.axcodes2ornt("RAS"), ornt)
    ras = no.apply_orientation(np.asarray(v, np.float32), to_ras)
    return np.ascontiguousarray(ras), affine @ no.inv_ornt_aff(to_ras, v.shape), lambda x: np.ascontiguousarray(no.apply_orientation(x, back))


def _masks(v: np.ndarray, zooms) -> tuple[np.ndarray, np.ndarray]:
    from bidsharmony.image.slices import solid_head_mask
    from bidsharmony.image.standardise import landmark_region

    return solid_head_mask(v), landmark_region(v, zooms)


def measure(v: np.ndarray, affine: np.ndarray) -> dict:
    """One standardised volume's fields on the grid: N4's (``n4``), the white matter's (``wm``), and which grid
    points lie in the landmark region (``inside``); with the full-size arrays the correction needs. ``v``: in RAS
    voxel order (``_canonical``)."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    head, region = _masks(v, zooms)
    g = n4_log_field(v, affine, head)
    gw = wm_log_field(v, zooms, region)
    return {"head": head, "region": region, "zooms": zooms, "g": g, "n4": to_grid(g, head), "wm": to_grid(gw, head),
            "inside": to_grid(region.astype(np.float32), head) > 0.5}


def fit_typical(volumes) -> TypicalField:
    """The target's typical fields from ``(standardised volume, affine)`` pairs of its TRAIN images."""
    n4, wm, inside = [], [], []
    for v, affine in volumes:
        got = measure(*_canonical(v, affine)[:2])
        n4.append(got["n4"]), wm.append(got["wm"]), inside.append(got["inside"])
    if len(n4) < 2:
        raise ValueError("the typical field needs at least two training volumes")
    n4, wm = np.array(n4), np.array(wm)
    return TypicalField(n4.mean(0), float(np.mean(np.var(n4, 0, ddof=1))), wm.mean(0), np.mean(inside, 0) > 0.5, len(n4))


def correct(v: np.ndarray, affine: np.ndarray, typical: TypicalField) -> tuple[np.ndarray, dict]:
    """(the standardised volume ``v`` with its foreign field undone; the record a sidecar states)."""
    original = np.asarray(v, np.float32)
    v, affine, back = _canonical(original, affine)
    got = measure(v, affine)
    head, region, zooms, keep = got["head"], got["region"], got["zooms"], typical.wm_keep
    d2 = float(np.mean((got["n4"] - typical.n4_mean) ** 2))
    w = max(0.0, 1.0 - typical.n4_var / d2) if d2 > 0 else 0.0
    rec = {"Method": "n4-typical", "N4Departure": round(d2, 6), "TypicalVariance": round(typical.n4_var, 6),
           "Shrinkage": round(w, 4), "Kept": 0.0, "Weight": 0.0}
    if w == 0.0:
        return original, rec
    c = np.where(head, w * (from_grid(typical.n4_mean, head) - got["g"]), 0.0).astype(np.float32)
    full = (v * np.exp(c)).astype(np.float32)
    a = (got["wm"] - typical.wm_mean)[keep]
    b = (to_grid(wm_log_field(full, zooms, region), head) - got["wm"])[keep]
    t = float(np.clip(-np.dot(a, b) / np.dot(b, b), 0.0, 1.0)) if np.dot(b, b) > 0 else 0.0
    rec.update(Kept=round(t, 4), Weight=round(w * t, 4), WhiteMatterDeparture=[round(float(np.mean(a**2)), 6),
                                                                              round(float(np.mean((a + t * b) ** 2)), 6)])
    return (original * np.exp(t * back(c))).astype(np.float32), rec
