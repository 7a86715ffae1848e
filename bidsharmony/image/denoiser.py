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

Architecture: three levels (c, 2c, 4c channels), two 3×3×3 convolutions with leaky ReLU per level,
average pooling down, transposed convolutions up, skip connections, a 1×1×1 convolution out. The
input is padded (replicate) to a multiple of 4 and the output cropped back, so any volume shape works.
"""

from __future__ import annotations

import numpy as np

PREFIX = "denoiser."  # its tensors in a model folder's weights file
SCALE = 100.0  # the standard scale's top landmark: the network sees volumes / SCALE


def build(channels: int = 16):
    """A freshly initialised network (torch is imported here, not at module import)."""
    import torch
    from torch import nn

    def block(i, o):
        return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv3d(o, o, 3, padding=1), nn.LeakyReLU(0.1))

    class UNet3D(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.e1, self.e2, self.e3 = block(1, c), block(c, 2 * c), block(2 * c, 4 * c)
            self.u2, self.d2 = nn.ConvTranspose3d(4 * c, 2 * c, 2, stride=2), block(4 * c, 2 * c)
            self.u1, self.d1 = nn.ConvTranspose3d(2 * c, c, 2, stride=2), block(2 * c, c)
            self.out = nn.Conv3d(c, 1, 1)

        def forward(self, x):
            pad = [(-s) % 4 for s in x.shape[2:]]
            xp = nn.functional.pad(x, [q for p in reversed(pad) for q in (0, p)], mode="replicate")
            a = self.e1(xp)
            b = self.e2(nn.functional.avg_pool3d(a, 2))
            c = self.e3(nn.functional.avg_pool3d(b, 2))
            b = self.d2(torch.cat([self.u2(c), b], 1))
            a = self.d1(torch.cat([self.u1(b), a], 1))
            return self.out(a)[..., : x.shape[2], : x.shape[3], : x.shape[4]]

    return UNet3D(channels)


CHUNK = 96  # slices of the last RAS axis run at once: bounds the activations' memory on large grids
MARGIN = 24  # context either side of a chunk, beyond the network's receptive radius (~22 voxels)


def _run(net, v: np.ndarray) -> np.ndarray:
    """D(v / SCALE) · SCALE over a RAS-ordered volume, in chunks of ``CHUNK`` slices along the last
    axis with ``MARGIN`` slices of context each side (multiples of 4, the pooling's period, so a
    chunk computes what the whole volume would)."""
    import torch

    device = next(net.parameters()).device
    out = np.empty(v.shape, np.float32)
    n = v.shape[2]
    with torch.no_grad():
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            lo, hi = max(start - MARGIN, 0), min(stop + MARGIN, n)
            x = torch.from_numpy(np.ascontiguousarray(v[..., lo:hi]) / SCALE)[None, None].to(device)
            out[..., start:stop] = net(x)[0, 0, ..., start - lo: stop - lo].cpu().numpy()
    return SCALE * out


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


def state_shapes(channels: int):
    """(name, shape) of every tensor of ``build(channels)``, without building it (``modelfolder.check_shapes``)."""
    c = int(channels)
    if not 1 <= c <= 256:
        raise ValueError(f"denoiser channels {c} outside 1..256")
    convs = {"e1": (1, c), "e2": (c, 2 * c), "e3": (2 * c, 4 * c), "d2": (4 * c, 2 * c), "d1": (2 * c, c)}
    for name, (i, o) in convs.items():
        yield f"{name}.0.weight", (o, i, 3, 3, 3)
        yield f"{name}.0.bias", (o,)
        yield f"{name}.2.weight", (o, o, 3, 3, 3)
        yield f"{name}.2.bias", (o,)
    yield "u2.weight", (4 * c, 2 * c, 2, 2, 2)
    yield "u2.bias", (2 * c,)
    yield "u1.weight", (2 * c, c, 2, 2, 2)
    yield "u1.bias", (c,)
    yield "out.weight", (1, c, 1, 1, 1)
    yield "out.bias", (1,)


def from_tensors(tensors: dict, channels: int, folder=None):
    """The network held under ``PREFIX`` in a model folder's tensors (eval mode, float32, CPU)."""
    from bidsharmony.modelfolder import check_shapes

    check_shapes(tensors, PREFIX, state_shapes(channels), folder or ".")
    net = build(channels)
    net.load_state_dict({k[len(PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(PREFIX)}, strict=True)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()
