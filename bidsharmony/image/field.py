"""Bias fields: undo the part of a source's smooth intensity field that the target's own images lack.

A target scanner's images carry a field of their own (IXI-HH's is strong), so removing a source's
whole field, as N4 alone does, moves it away from the target. Here only the source's departure
from the target's *typical* field is undone:

1. **N4's field** (Tustison et al. 2010, *IEEE TMI* 29:1310; antspyx) of the standardised volume, as
   a log-field g with zero mean in the head, sampled on a G³ grid over the head's bounding box (a
   crude but blind alignment between heads; RAS voxel order).
2. **How the target's own fields vary.** The target's TRAIN volumes give the typical field m (the
   grid mean) and the K leading principal components B of their fields (the ways a target head's
   own field departs from m: its position in the coil, its size). A field g is explained by the
   target as far as it lies in that subspace: ĝ = m + BᵀB (g − m); what is left, r = g − ĝ, is what
   no target head shows. σ₀² is a target head's own leftover, mean(r²), each TRAIN head left out of
   the fit that judges it (without leaving out, K components fitted on n heads flatter the fit).
3. **A soft gate.** A source leaves d² = mean(r²). If d² is no larger than the largest leftover of
   any left-out TRAIN head (d²_max), the field is one a target head could have, and nothing is
   done: on clean, well-standardised volumes (~40 dB) even a 1 % smooth change costs 2–3 dB, so a
   correction shrunk by size alone, which always removes part of a head's own field, cannot be
   afforded. Beyond it, the share of the leftover that is foreign is estimated by the
   James–Stein-type weight w = 1 − d²_max/d² (Efron & Morris 1973), with the gate in place of the
   typical leftover σ₀²: w rises continuously from 0 at the gate, so a head just past it is barely
   touched (with 1 − σ₀²/d² past a hard gate, w jumped from 0 to 0.45 there, and a TEST head at the
   edge lost up to 13 dB on a monotone scan). The log-correction is c = w (ĝ − g) in the head: the
   field is moved towards the nearest field a target head could have, not towards the mean one.
4. **On the source's own intensities.** The field multiplied the scanner's intensities, so the
   correction does too: the source is multiplied by exp(c) and standardised afresh, its landmarks
   measured as the first standardisation measured them (on the same 1.2 mm grid and landmark
   region). With c = 0 this is exactly the first standardisation; landmarks measured again on the
   already standardised volume are not (the map and the resampling do not commute), which alone cost
   2–3 dB on held-out heads.

N4 is misled by noise, blur and changes of tissue contrast (each moved its field as much as a real
field on held-out heads), and each of those moves the volume's detail level out of the target's band
(``image.detail``). So the pipeline runs this stage only where the detail stage leaves the volume
alone (``interfaces.standardise``).

Whether the pipeline runs it by default (``--field``), and what it measured on held-out and TEST heads: docs/method.md §9.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as _default

import numpy as np
from scipy import ndimage

GRID = 24  # grid points per axis over the head's bounding box
COMPONENTS = 8  # principal components of the target's own fields kept (K; chosen on held-out heads, docs/method.md §9)
WORKING_MM = 4.0  # N4 works on about this voxel size (its shrink factor): the field holds nothing finer
# A model folder's extra tensors (``extra.NAME``) holding the typical field; its config entry is ``preprocessing.field``
EXTRAS = ("field_n4_mean",)
BASIS = "field_n4_basis"  # and, where K > 0, the (K, G³) components


@dataclass(frozen=True)
class TypicalField:
    """The target's typical field: N4's mean log-field m on the G³ grid, the (K, G³) orthonormal components B of
    its heads' own departures (K may be 0), a target head's own leftover variance σ₀² outside them (mean over
    left-out heads) and the largest such leftover, the gate (0: no gate)."""

    n4_mean: np.ndarray
    n4_var: float
    volumes: int
    n4_gate: float = 0.0
    n4_basis: np.ndarray = _default(default_factory=lambda: np.zeros((0, GRID**3), np.float32))

    def explained(self, grid: np.ndarray) -> np.ndarray:
        """ĝ = m + BᵀB (g − m): the field on the grid nearest to ``grid`` that the target's own heads span."""
        d = (grid - self.n4_mean).ravel()
        return self.n4_mean + (self.n4_basis.T @ (self.n4_basis @ d)).reshape(self.n4_mean.shape)

    def weight(self, grid: np.ndarray) -> tuple[float, float]:
        """(d², w) of a field on the grid: its leftover beyond ĝ, and the share of it deemed foreign,
        w = max(0, 1 − d²_max/d²) (0 up to the gate, continuous past it); a model without a gate: 1 − σ₀²/d²."""
        d2 = float(np.mean((grid - self.explained(grid)) ** 2))
        return d2, max(0.0, 1.0 - (self.n4_gate or self.n4_var) / max(d2, 1e-12))

    def to_extras(self) -> dict:
        """The model folder's extras (``save_model(extras=...)``)."""
        out = {"field_n4_mean": self.n4_mean.astype(np.float32)}
        if len(self.n4_basis):
            out[BASIS] = self.n4_basis.astype(np.float32)
        return out

    def model_entry(self) -> dict:
        return {"method": "n4-typical", "grid": GRID, "working_mm": WORKING_MM, "n4_variance": float(self.n4_var),
                "n4_gate": float(self.n4_gate), "components": len(self.n4_basis), "volumes": int(self.volumes)}

    @classmethod
    def from_model(cls, tensors: dict, entry: dict) -> TypicalField:
        """From a model folder's tensors (``extra.NAME``, torch) and its ``preprocessing.field`` entry."""
        k = int(entry.get("components", 0))
        basis = np.asarray(tensors[f"extra.{BASIS}"].float().numpy(), np.float32) if k else np.zeros((0, GRID**3), np.float32)
        if len(basis) != k:
            from bidsharmony.errors import ModelError

            raise ModelError(f"its field entry says {k} components, its weights hold {len(basis)} (extra.{BASIS})")
        return cls(np.asarray(tensors["extra.field_n4_mean"].float().numpy(), np.float32), float(entry["n4_variance"]),
                   int(entry.get("volumes", 0)), float(entry.get("n4_gate", 0.0)), basis)


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
    return max(1, round(WORKING_MM / float(min(zooms))))


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


def _subspace(grids: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, (k, G³) leading principal components) of (n, G³) fields; k = min(components, n − 1)."""
    mean = grids.mean(0)
    k = min(components, len(grids) - 1)
    if k <= 0:
        return mean, np.zeros((0, grids.shape[1]), np.float32)
    return mean, np.linalg.svd(grids - mean, full_matrices=False)[2][:k].astype(np.float32)


def fit_from_grids(grids: np.ndarray, components: int = COMPONENTS) -> TypicalField:
    """The typical field from the (n, G, G, G) grids of n target heads; σ₀² and the gate by leaving each head out in turn."""
    flat = np.asarray(grids, np.float64).reshape(len(grids), -1)
    if len(flat) < 2:
        raise ValueError("the typical field needs at least two training volumes (a left-out head and one to judge it)")
    left = []
    for i in range(len(flat)):
        mean, basis = _subspace(np.delete(flat, i, 0), components)
        d = flat[i] - mean
        left.append(np.mean((d - basis.T @ (basis @ d)) ** 2))
    mean, basis = _subspace(flat, components)
    return TypicalField(mean.reshape(grids.shape[1:]).astype(np.float32), float(np.mean(left)), len(flat), float(np.max(left)), basis)


def head_grid(v: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The G³ grid of N4's log-field of one standardised volume, in any voxel order."""
    return measure(*_canonical(v, affine)[:2])["grid"]


def fit_typical(volumes, components: int = COMPONENTS) -> TypicalField:
    """The target's typical field from ``(standardised volume, affine)`` pairs of its TRAIN images."""
    return fit_from_grids(np.array([head_grid(v, affine) for v, affine in volumes]), components)


def correction(v: np.ndarray, affine: np.ndarray, typical: TypicalField) -> tuple[np.ndarray, dict]:
    """(the log-correction c of the standardised volume ``v``, in its voxel order: zero outside the head, and
    everywhere when the shrinkage weight is 0; the record a sidecar states)."""
    ras, ras_affine, back = _canonical(v, affine)
    got = measure(ras, ras_affine)
    nearest = typical.explained(got["grid"])
    d2, w = typical.weight(got["grid"])
    rec = {"Method": "n4-typical", "Components": len(typical.n4_basis), "N4Departure": round(d2, 6),
           "TypicalVariance": round(typical.n4_var, 6), "Gate": round(typical.n4_gate, 6), "Weight": round(w, 4)}
    if w == 0.0:
        return np.zeros(np.shape(v), np.float32), rec
    c = np.where(got["head"], w * (from_grid(nearest, got["head"]) - got["g"]), 0.0).astype(np.float32)
    return back(c), rec


def undo(source: np.ndarray, affine: np.ndarray, standardised: np.ndarray, typical: TypicalField, standard, percentiles,
         grid: tuple, region: np.ndarray, class_standard=None) -> tuple[np.ndarray, dict]:
    """(the source with its foreign field undone, standardised afresh; the record with the landmarks after it).

    ``source``/``affine``: the native voxels as acquired; ``standardised``: the same voxels through the first
    standardisation; ``standard``, ``percentiles``: the model's landmarks (``class_standard``: its class
    landmarks, where the standardisation runs its class pass); ``grid`` = (shape, affine) and ``region``:
    the 1.2 mm grid and landmark region the first landmarks were measured on."""
    from bidsharmony.image.resample import resample_onto
    from bidsharmony.image.standardise import class_pass, piecewise_linear, standardise, volume_landmarks

    c, rec = correction(standardised, affine, typical)
    if rec["Weight"] == 0.0:
        return np.asarray(standardised, np.float32), rec
    corrected = (np.asarray(source, np.float32) * np.exp(c)).astype(np.float32)
    on_grid = resample_onto(corrected, affine, *grid)
    after = volume_landmarks(on_grid, percentiles, region=lambda v, z: region)
    rec["LandmarksAfter"] = [float(x) for x in after]
    rec["CorrectionRange"] = [round(float(np.exp(q)), 4) for q in np.percentile(c[c != 0], [1, 99])] if np.any(c) else [1.0, 1.0]
    out = standardise(corrected, standard, percentiles, source_landmarks=after)
    if class_standard is not None:
        _, classes = class_pass(standardise(on_grid, standard, percentiles, source_landmarks=after), class_standard, region)
        rec["ClassLandmarksAfter"] = [float(x) for x in classes]
        out = piecewise_linear(out, classes, class_standard)
    return out, rec
