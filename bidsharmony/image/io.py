"""Reading T1w images with checks that turn bad files into one-line errors.

Everything a header can lie about is checked from the header before the voxel data are read: the
shape against the bytes the file can hold (a 2 KB file declaring 2 GB is refused before 2 GB are
allocated), the affine, and whether the volume can hold one axial slice of head at all.
"""

from __future__ import annotations

import gzip
import logging
import math
import warnings
import zlib
from pathlib import Path

import nibabel as nb
import numpy as np

from bidsharmony.errors import ImageError
from bidsharmony.space import DEFAULT

LOG = logging.getLogger("bidsharmony")

# Largest volume read: 1024³ voxels (4 GiB as float32), beyond any anatomical T1w.
MAX_VOXELS = 1024**3
# deflate cannot compress better than about 1032:1 (one 258-byte match per ~2 bits): a gzip
# holding more than this many times its own size is a lie, whatever its trailer says.
MAX_DEFLATE_RATIO = 1032


def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _gzip_holds(path: Path, need: int) -> int:
    """Uncompressed bytes of a gzip file, counted up to ``need`` only.

    The ISIZE trailer (the last 4 bytes: the size mod 2³²) answers at once for the usual
    single-member file whose data end the file; anything else (a multi-member file, trailing
    bytes, a truncated file, a lying header) is settled by decompressing in small chunks
    without keeping them.
    """
    size = path.stat().st_size
    if size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
        if isize == need % 2**32:
            return need
    count = 0
    try:
        with gzip.open(path, "rb") as f:
            while count < need:
                chunk = f.read1(1 << 16)  # read1: a truncated stream keeps what came before
                if not chunk:
                    break
                count += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass  # truncated or corrupt: what was read is what the file holds
    return count


def check_declared_size(path: Path, img) -> None:
    """Refuse a header whose shape the file cannot hold, before anything of that size is allocated."""
    hdr = img.header
    shape = tuple(int(n) for n in hdr.get_data_shape())
    dtype = hdr.get_data_dtype()
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise ImageError(f"{path}: header declares shape {shape} ({voxels:.3g} voxels); bidsharmony reads at most "
                         f"1024³ = {MAX_VOXELS:.3g} voxels (a corrupt header?)")
    data_file = Path(img.file_map["image"].filename)
    offset = int(getattr(img.dataobj, "offset", hdr.get_data_offset()))  # a loaded header's vox_offset may read 0
    need = offset + voxels * dtype.itemsize
    what = f"header declares shape {shape} {dtype} ({_human(voxels * dtype.itemsize)} of voxels)"
    if data_file.suffix == ".gz":
        size = data_file.stat().st_size
        if need > size * MAX_DEFLATE_RATIO + 1024:
            raise ImageError(f"{path}: {what}, more than a {_human(size)} gzip file can hold (a corrupt header?)")
        held = _gzip_holds(data_file, need)
    elif data_file.suffix in (".nii", ".img"):
        held = data_file.stat().st_size
    else:  # .bz2, .zst: only the voxel bound applies
        return
    if held < need:
        raise ImageError(f"{path}: {what} after a {offset}-byte header, but the file holds only {_human(held)} "
                         "(truncated, or a corrupt header)")


def check_affine(path: Path, img) -> None:
    """A voxel-to-world affine that is non-finite or singular has no orientation or voxel size:
    resampling would crash deep inside the workflow (or silently produce nonsense)."""
    hdr = img.header
    source = ("sform" if int(hdr["sform_code"]) > 0 else "qform" if int(hdr["qform_code"]) > 0 else "pixdim (no sform/qform)") \
        if isinstance(hdr, nb.Nifti1Header) else "header"  # fmt: skip
    aff = np.asarray(img.affine, dtype=float)
    if not np.isfinite(aff).all():
        raise ImageError(f"{path}: the affine ({source}) has non-finite values; fix the header's orientation")
    rzs = aff[:3, :3]
    norms = np.linalg.norm(rzs, axis=0)
    if not (norms > 0).all() or abs(np.linalg.det(rzs)) < 1e-6 * np.prod(norms):
        raise ImageError(f"{path}: the affine ({source}) is singular (voxel sizes {np.round(norms, 4).tolist()}); "
                         "fix the header's orientation")


# The harmonization grid (bidsharmony.image.slices): a slice is harmonized when head covers
# MIN_HEAD_FRACTION of its slice grid (the default space's). Half that area is asked for here: the
# check runs on the native grid, before resampling, and must never refuse a usable volume.
_GRID_MM2 = DEFAULT.slice_area_mm2


def check_head_slices(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Refuse a volume in which no axial slice holds enough head to be harmonized: the run would
    otherwise 'succeed' with 0 slices harmonized (a 2 × 2 × 2 volume, a tiny field of view)."""
    from bidsharmony.image.slices import HEAD_THRESHOLD, MIN_HEAD_FRACTION

    ornt = nb.io_orientation(affine)
    axial = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    in_plane = [a for a in range(3) if a != axial]
    pixel_mm2 = float(zooms[in_plane[0]] * zooms[in_plane[1]])
    need_mm2 = 0.5 * MIN_HEAD_FRACTION * _GRID_MM2
    if data.shape[in_plane[0]] * data.shape[in_plane[1]] * pixel_mm2 >= need_mm2:
        # As slices.head_mask, with the percentile from every 2nd voxel (cheap, and ample here).
        lo = float(data.min())
        fg = data[::2, ::2, ::2]
        fg = fg[fg > 0]
        mask = data > lo + HEAD_THRESHOLD * (np.percentile(fg, 99.5) - lo) if fg.size else np.ones(data.shape, bool)
        if mask.sum(axis=tuple(in_plane)).max() * pixel_mm2 >= need_mm2:
            return
    raise ImageError(f"{path}: no axial slice holds enough head to harmonize (shape {data.shape}, voxel size "
                     f"{np.round(zooms, 3).tolist()} mm; a slice needs about {need_mm2:.0f} mm² of head)")


def load_t1w(path) -> tuple[nb.Nifti1Image, np.ndarray]:
    """Load a 3D T1w image as (image, float32 data).

    A 4D image with one volume is squeezed; with several volumes it is refused (average or pick
    one volume first: which one is right is the user's call). Non-finite voxels become 0 (logged).
    The header is checked before the data are read (see the module's docstring); nibabel's
    warnings become one log line each.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    unreadable = (nb.filebasedimages.ImageFileError, nb.spatialimages.HeaderDataError, EOFError, OSError, zlib.error,
                  gzip.BadGzipFile, ValueError, IndexError)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            img = nb.load(str(path))
            shape = tuple(int(n) for n in img.header.get_data_shape())
        except unreadable as e:
            raise ImageError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) == 4:
            raise ImageError(f"{path}: 4D image with {shape[3]} volumes; bidsharmony takes one 3D T1w volume")
        if len(shape) != 3 or min(shape) < 2:
            raise ImageError(f"{path}: expected a 3D volume, got shape {shape}")
        check_declared_size(path, img)
        check_affine(path, img)
        try:
            data = np.asanyarray(img.dataobj, dtype=np.float32)
        except unreadable as e:
            raise ImageError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
    for w in caught:
        if not issubclass(w.category, ResourceWarning):
            LOG.warning("%s: %s", path, str(w.message).replace("\n", " "))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    bad = ~np.isfinite(data)
    if bad.any():
        LOG.warning("%s: %d non-finite voxels set to 0", path, int(bad.sum()))
        data = np.where(bad, 0.0, data).astype(np.float32)
    if not np.any(data != data.flat[0]):
        raise ImageError(f"{path}: image is constant ({float(data.flat[0])}); nothing to harmonize")
    check_head_slices(path, data, img.affine)
    return img, data
