"""The harmonization space: the grid every method works on, and the 2D prior's slice grid.

One place for what would otherwise be literals across the code: volumes are reoriented to RAS and
resampled to ``voxel_mm`` isotropic; the 2D flow sees axial slices on a ``slice_shape`` grid
centred on the head. ``DEFAULT`` is what ``train`` writes into a model's ``config.json``
(``preprocessing.voxel_size``, ``preprocessing.orientation``, ``architecture.slice_shape``) and what
``Space.of_model`` falls back to for a field a config leaves out; the workflows build a model's
nodes from ``Space.of_model(config)``, so a model on another grid gets its own grid throughout.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Space:
    voxel_mm: float = 1.2
    orientation: str = "RAS"  # what the resample node produces (nibabel's closest canonical)
    slice_shape: tuple[int, int] = (144, 176)  # axial slices, (R-L, A-P) pixels

    @property
    def zooms(self) -> tuple[float, float, float]:
        return (self.voxel_mm,) * 3

    @property
    def slice_area_mm2(self) -> float:
        return self.slice_shape[0] * self.slice_shape[1] * self.voxel_mm**2

    @classmethod
    def of_model(cls, config: dict) -> Space:
        """The space a model folder's ``config.json`` records (``DEFAULT``'s value where it is silent)."""
        prep = config.get("preprocessing") or {}
        arch = config.get("architecture") or {}
        shape = arch.get("slice_shape") or prep.get("slice_shape") or DEFAULT.slice_shape
        return cls(float(prep.get("voxel_size", DEFAULT.voxel_mm)), str(prep.get("orientation", DEFAULT.orientation)),
                   (int(shape[0]), int(shape[1])))


DEFAULT = Space()
