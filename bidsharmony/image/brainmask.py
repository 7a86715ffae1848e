"""A brain mask learned from the target's own parcellations, for measuring the standardisation's landmarks.

The blind standardisation measures its landmarks in a geometric stand-in for the brain (the head
deeper than 15 mm: skull, sinuses and eyes included). Measured in the brain itself (the target's
parcellation on both sides), the same five landmarks gain +1.5 dB of volume PSNR over the twelve
simulated scanners on held-out heads; a mask brought over by affine registration loses 0.4 dB and is
not repeatable (``benchmarks/brain_landmark_probe.py``). This mask comes from a network instead:
the small 3D U-Net of ``bidsharmony.image.unet``, trained on the target's TRAIN heads and their
brain masks (``bidsharmony.train.brainmask``).

The network sees the volume's *ranks*: each head voxel is replaced by the share of head voxels
darker than it, ``r(v) = #{u ≤ v in the head} / #head`` (0 outside the head). Ranks are unchanged by
any increasing map of intensities, so a monotone scanner difference (γ, exp, log, a different
sequence's grey levels in the same order) is invisible to it, and the training need not simulate
them; only the head's outline (``slices.solid_head_mask``, a threshold at a tenth of the head's
range) can move under a strong map, where dim tissue crosses that threshold. It runs on a ``MM`` grid (the target's own), in RAS orientation; its output
is a probability, averaged with that of the left-right mirror, thresholded at ½; the largest
connected piece is kept and its holes filled.
"""

from __future__ import annotations

import numpy as np

PREFIX = "brainmask."  # its tensors in a model folder's weights file
LANDMARKS = "brain_landmarks"  # a model folder's extra tensors: the standard landmarks measured in the mask,
CLASS_LANDMARKS = "brain_class_landmarks"  # and the class pass's
MM = 2.0  # the isotropic grid (mm) the network is trained and run on


def rank_input(volume: np.ndarray) -> np.ndarray:
    """The network's input: the ranks of the head's voxels in (0, 1) (mid-ranks for ties), 0 elsewhere."""
    from scipy.stats import rankdata

    from bidsharmony.image.slices import solid_head_mask

    v = np.asarray(volume, np.float32)
    head = solid_head_mask(v)
    out = np.zeros(v.shape, np.float32)
    if head.any():
        out[head] = ((rankdata(v[head]) - 0.5) / head.sum()).astype(np.float32)
    return out


def probability(net, ras: np.ndarray) -> np.ndarray:
    """P(brain) of each voxel of a RAS-ordered volume on the ``MM`` grid: the mean of the network's
    on the volume and on its left-right mirror."""
    from bidsharmony.image.unet import run

    x = rank_input(ras)
    logits = 0.5 * (run(net, x) + run(net, x[::-1])[::-1])
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def clean(prob: np.ndarray) -> np.ndarray:
    """prob > ½, its largest connected piece, holes filled."""
    from scipy import ndimage

    m = prob > 0.5
    labels, n = ndimage.label(m)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        m = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(m)


def on_mm_grid(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the volume in RAS on the isotropic ``MM`` grid, its affine): linear resampling of the voxels as
    acquired (none where they are already there), where the mask is found and the landmarks measured."""
    from bidsharmony.image.resample import canonical, resample_isotropic

    ras, ras_affine = canonical(np.asarray(volume, np.float32), affine)
    if np.allclose(np.sqrt((ras_affine[:3, :3] ** 2).sum(0)), MM, atol=1e-3):
        return ras, ras_affine
    return resample_isotropic(ras, ras_affine, MM)


def mask(net, coarse: np.ndarray) -> np.ndarray:
    """The brain mask of a volume already on the ``MM`` RAS grid (``on_mm_grid``)."""
    return clean(probability(net, coarse))


def brain_on_grid(net, volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the volume on the ``MM`` RAS grid, that grid's affine, its brain mask there)."""
    coarse, coarse_affine = on_mm_grid(volume, affine)
    return coarse, coarse_affine, mask(net, coarse)


def onto(brain: np.ndarray, brain_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """A mask brought onto another grid (linear interpolation, threshold ½; outside its own grid: not brain)."""
    from bidsharmony.image.resample import resample_onto

    return resample_onto(np.asarray(brain, np.float32), brain_affine, shape, affine) > 0.5


def from_tensors(tensors: dict, channels: int, folder=None):
    """The network held under ``PREFIX`` in a model folder's tensors (``unet.from_tensors``)."""
    from bidsharmony.image import unet

    return unet.from_tensors(tensors, PREFIX, channels, folder)
