"""Reading T1w images with checks that turn bad files into one-line errors."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import nibabel as nb
import numpy as np

from bidsharmony.errors import ImageError

LOG = logging.getLogger("bidsharmony")


def load_t1w(path) -> tuple[nb.Nifti1Image, np.ndarray]:
    """Load a 3D T1w image as (image, float32 data).

    A 4D image with one volume is squeezed; with several volumes it is refused (average or pick
    one volume first: which one is right is the user's call). Non-finite voxels become 0 (logged).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    try:
        img = nb.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except (nb.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise ImageError(f"{path}: not a readable NIfTI image ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise ImageError(f"{path}: 4D image with {data.shape[3]} volumes; bidsharmony takes one 3D T1w volume")
    if data.ndim != 3 or min(data.shape) < 2:
        raise ImageError(f"{path}: expected a 3D volume, got shape {data.shape}")
    bad = ~np.isfinite(data)
    if bad.any():
        LOG.warning("%s: %d non-finite voxels set to 0", path, int(bad.sum()))
        data = np.where(bad, 0.0, data).astype(np.float32)
    if not np.any(data != data.flat[0]):
        raise ImageError(f"{path}: image is constant ({float(data.flat[0])}); nothing to harmonize")
    return img, data
