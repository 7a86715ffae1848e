"""The slice grid: cut a canonical 1.2 mm volume into normalised axial slices, and undo it.

One place for the whole round trip. ``cut`` returns the slices the flow sees (each min-max
normalised to [0, 1] inside a fixed H x W grid centred on the head) and a ``SliceRecord`` that
says how to put harmonized slices back: the crop/pad offsets, each slice's min and max, and which
slices hold enough head to be harmonized. Slices without head are left as they were.

Undoing the normalisation with each slice's own (min, max) is what keeps the reassembled volume
free of slice-to-slice steps: a harmonized slice keeps its place on the input's intensity scale.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from bidsharmony.space import DEFAULT

# A voxel is "head" above this fraction of the volume's robust maximum.
HEAD_THRESHOLD = 0.1
# A slice is harmonized (and used for training) when this fraction of its grid is head.
MIN_HEAD_FRACTION = 0.02
# Positions along the head's inferior-superior extent for the mean-target start image.
POSITION_BINS = 50


@dataclass
class SliceRecord:
    """How slices relate to their volume. Stored as .npz (no pickle)."""

    volume_shape: np.ndarray  # (3,) shape of the canonical 1.2 mm volume
    grid_shape: np.ndarray  # (2,) H, W
    offset: np.ndarray  # (2,) volume index of grid pixel (0, 0) along x, y (may be negative)
    slice_min: np.ndarray  # (Z,) per-slice minimum inside the grid
    slice_max: np.ndarray  # (Z,)
    harmonize: np.ndarray  # (Z,) bool
    position: np.ndarray  # (Z,) relative position in the head's z extent, 0 (inferior) .. 1

    def save(self, path) -> None:
        np.savez(path, **{f.name: np.asarray(getattr(self, f.name)) for f in fields(self)})

    @classmethod
    def load(cls, path) -> "SliceRecord":
        with np.load(path, allow_pickle=False) as z:
            return cls(**{f.name: z[f.name] for f in fields(cls)})

    @property
    def position_bin(self) -> np.ndarray:
        return np.clip((self.position * POSITION_BINS).astype(int), 0, POSITION_BINS - 1)


def head_mask(volume: np.ndarray) -> np.ndarray:
    fg = volume[volume > 0]
    if fg.size == 0:
        return np.zeros(volume.shape, bool)
    lo = float(volume.min())
    return volume > lo + HEAD_THRESHOLD * (np.percentile(fg, 99.5) - lo)


def solid_head_mask(volume: np.ndarray) -> np.ndarray:
    """``head_mask`` without specks: the connected pieces smaller than 5 % of the largest. Rician
    noise lifts background voxels over the head threshold one by one, all over the field of view;
    in a plain head mask they reach its edges and move the head's top (``standardise.landmark_region``:
    by 7 voxels on a noisy IXI-HH head). The scalp and the brain may be separate pieces (a dark
    skull): both stay. No opening: on a darkened head (γ 1.5) it eats the thin scalp, and the
    region measured from the surface shrinks."""
    from scipy import ndimage

    head = head_mask(volume)
    labels, n = ndimage.label(head)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        head = (sizes >= 0.05 * sizes.max())[labels]
    return head


def _window(n_grid: int, lo: int, hi: int) -> int:
    """Start index (in volume coordinates) of a grid window of n_grid centred on [lo, hi)."""
    return int(round((lo + hi) / 2 - n_grid / 2))


def _copy_window(src: np.ndarray, dst: np.ndarray, offset, to_grid: bool) -> None:
    """Copy the overlap between a volume plane (X, Y, ...) and a grid (H, W, ...) placed at offset."""
    (ox, oy), (h, w) = offset, dst.shape[:2] if to_grid else src.shape[:2]
    nx, ny = (src.shape[:2] if to_grid else dst.shape[:2])
    vx0, vy0 = max(ox, 0), max(oy, 0)
    vx1, vy1 = min(ox + h, nx), min(oy + w, ny)
    if vx1 <= vx0 or vy1 <= vy0:
        return
    vol_sl = (slice(vx0, vx1), slice(vy0, vy1))
    grid_sl = (slice(vx0 - ox, vx1 - ox), slice(vy0 - oy, vy1 - oy))
    if to_grid:
        dst[grid_sl] = src[vol_sl]
    else:
        dst[vol_sl] = src[grid_sl]


def cut(volume: np.ndarray, grid_shape=DEFAULT.slice_shape, offset=None) -> tuple[np.ndarray, SliceRecord]:
    """Canonical volume (X, Y, Z) -> slices (Z, H, W) in [0, 1] and the record to undo it.
    ``offset`` (from another record) puts the grid where that volume's was, to compare the two."""
    h, w = grid_shape
    mask = head_mask(volume)
    if not mask.any():
        mask = np.ones(volume.shape, bool)
    xs, ys, zs = (np.flatnonzero(mask.any(axis=a)) for a in [(1, 2), (0, 2), (0, 1)])
    if offset is None:
        offset = np.array([_window(h, xs[0], xs[-1] + 1), _window(w, ys[0], ys[-1] + 1)])
    offset = np.asarray(offset)

    background = float(volume.min())
    grid = np.full((h, w, volume.shape[2]), background, np.float32)
    _copy_window(volume, grid, offset, to_grid=True)
    grid_mask = np.zeros((h, w, volume.shape[2]), bool)
    _copy_window(mask, grid_mask, offset, to_grid=True)

    slices = np.moveaxis(grid, 2, 0)  # (Z, H, W)
    smin = slices.min(axis=(1, 2))
    smax = slices.max(axis=(1, 2))
    span = np.where(smax > smin, smax - smin, 1.0)
    norm = (slices - smin[:, None, None]) / span[:, None, None]
    frac = grid_mask.mean(axis=(0, 1))
    z0, z1 = zs[0], zs[-1]
    position = np.clip((np.arange(volume.shape[2]) - z0) / max(z1 - z0, 1), 0.0, 1.0)
    record = SliceRecord(
        volume_shape=np.array(volume.shape),
        grid_shape=np.array(grid_shape),
        offset=offset,
        slice_min=smin.astype(np.float32),
        slice_max=smax.astype(np.float32),
        harmonize=(frac >= MIN_HEAD_FRACTION) & (smax > smin),
        position=position.astype(np.float32),
    )
    return norm.astype(np.float32), record


def assemble(slices: np.ndarray, record: SliceRecord, volume: np.ndarray) -> np.ndarray:
    """Put harmonized slices (Z, H, W) in [0, 1] back into a copy of the volume they were cut from.

    Only harmonized slices and the grid window are written; everything else keeps the input.
    """
    out = np.array(volume, dtype=np.float32, copy=True)
    span = (record.slice_max - record.slice_min)[:, None, None]
    restored = slices * span + record.slice_min[:, None, None]
    for k in np.flatnonzero(record.harmonize):
        _copy_window(restored[k], out[:, :, k], record.offset, to_grid=False)
    return out
