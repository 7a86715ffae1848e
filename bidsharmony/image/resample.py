"""Resampling with antspyx in physical space.

NIfTI affines are RAS; ITK (ANTs) works in LPS. ``to_ants``/``from_ants`` convert between the two
in one place, so every orientation (LPS, PSR, oblique) goes through the same code: resampling
to 1.2 mm and back onto the input's own grid happens between physical coordinates, not indices.
(antspyx's own ``from_nibabel_nifti`` takes a whole image rather than an array and an affine,
prints to stdout and rewrites the header when units are unknown, and refuses non-mm units that
a header often states wrongly; these few lines do only the frame change.)
"""

from __future__ import annotations

import nibabel as nb
import numpy as np

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _affine_parts(affine: np.ndarray):
    rzs = affine[:3, :3]
    spacing = np.sqrt((rzs**2).sum(axis=0))
    direction = rzs / spacing
    return spacing, direction, affine[:3, 3]


def to_ants(data: np.ndarray, affine: np.ndarray):
    import ants

    spacing, direction, origin = _affine_parts(affine)
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(v) for v in _RAS_TO_LPS @ origin),
        spacing=tuple(float(v) for v in spacing),
        direction=_RAS_TO_LPS @ direction,
    )


def from_ants(image) -> tuple[np.ndarray, np.ndarray]:
    direction = _RAS_TO_LPS @ np.asarray(image.direction)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.spacing)
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(image.origin)
    return image.numpy().astype(np.float32), affine


def canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient voxel axes to the closest RAS (nibabel), so axis 2 is inferior->superior."""
    img = nb.as_closest_canonical(nb.Nifti1Image(data, affine))
    return np.asanyarray(img.dataobj, dtype=np.float32), img.affine


def resample_isotropic(data: np.ndarray, affine: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling to ``voxel_size`` mm isotropic, keeping origin, direction and extent."""
    import ants

    out = ants.resample_image(to_ants(data, affine), (voxel_size,) * 3, use_voxels=False, interp_type=0)
    return from_ants(out)


def resample_onto(data: np.ndarray, affine: np.ndarray, ref_shape, ref_affine: np.ndarray) -> np.ndarray:
    """Linear resampling of (data, affine) onto the grid (ref_shape, ref_affine)."""
    import ants

    ref = to_ants(np.zeros(tuple(ref_shape), dtype=np.float32), ref_affine)
    out = ants.resample_image_to_target(to_ants(data, affine), ref, interpolator="linear")
    return out.numpy().astype(np.float32)
