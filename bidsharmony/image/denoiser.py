"""A denoiser learned from the target scanner's own images, used by the detail stage above its band.

A small 3D U-Net predicts the change that takes a standardised volume with more noise than the
target's back to a target image: u = v + D(v / SCALE) · SCALE. It is trained on the target's TRAIN
volumes alone (``bidsharmony.train.denoiser``), Noise2Noise-style: Rician noise of random strength is
added to a target volume, and both the noisy volume and the clean one are put through the noisy
one's standardisation, so the network learns to remove noise, not to re-standardise. The reference
carries the target's own noise, so the network learns E[target image | noisier image]: it removes the
added noise, not the target's.

Measured (``benchmarks/learned_denoise_probe.py``, held-out TRAIN heads): +1.48 dB in volume PSNR on the
benchmark's noise scanner after 7000 steps on 2 CPU cores, beyond every classical denoiser tried;
it also changes scans without added noise (−0.9 to −2 dB), so it may only run where the detail level
says the scan is noisier than the target's (``bidsharmony.image.detail``).

Architecture: the small 3D U-Net of ``bidsharmony.image.unet`` (shared with the brain mask).
"""

from __future__ import annotations

import numpy as np

PREFIX = "denoiser."  # its tensors in a model folder's weights file
SCALE = 100.0  # the standard scale's top landmark: the network sees volumes / SCALE


def build(channels: int = 16):
    """A freshly initialised network (``bidsharmony.image.unet``, one input and one output channel)."""
    from bidsharmony.image.unet import build as unet

    return unet(channels)


def _run(net, v: np.ndarray) -> np.ndarray:
    """D(v / SCALE) · SCALE over a RAS-ordered volume, in chunks (``unet.run``)."""
    from bidsharmony.image.unet import run

    return SCALE * run(net, v / SCALE)


def denoise(net, volume: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """The network applied to a whole standardised volume: v + D(v / SCALE) · SCALE (float32).

    The network was trained on volumes in RAS orientation and is not equivariant to flips, so the
    volume is brought to RAS (``affine``; None: it already is), and the change is the mean of the
    network's on the volume and on its left-right mirror, which the brain's near-symmetry makes an
    equally likely input (+0.1 to +0.2 dB on held-out heads' noise scanner; mirroring the other axes
    lost 0.1 to 0.4 dB)."""
    import nibabel as nb

    v = np.asarray(volume, np.float32)
    ornt = nb.orientations.io_orientation(np.eye(4) if affine is None else affine)
    ras = nb.orientations.apply_orientation(v, ornt)
    change = 0.5 * (_run(net, ras) + _run(net, ras[::-1])[::-1])
    back = nb.orientations.ornt_transform(nb.orientations.axcodes2ornt("RAS"), ornt)
    return (v + nb.orientations.apply_orientation(change, back)).astype(np.float32)


def from_tensors(tensors: dict, channels: int, folder=None):
    """The network held under ``PREFIX`` in a model folder's tensors (``unet.from_tensors``)."""
    from bidsharmony.image import unet

    return unet.from_tensors(tensors, PREFIX, channels, folder)
