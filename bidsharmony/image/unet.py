"""The small 3D U-Net shared by the learned stages (the denoiser, the brain mask).

Three levels (c, 2c, 4c channels), two 3×3×3 convolutions with leaky ReLU per level, average pooling
down, transposed convolutions up, skip connections, a 1×1×1 convolution out (one input channel, one
output channel). The input is padded (replicate) to a multiple of 4 and the output cropped back, so
any volume shape works. Its receptive radius is about 22 voxels.
"""

from __future__ import annotations

import numpy as np

CHUNK = 96  # slices of the last axis run at once: bounds the activations' memory on large grids
MARGIN = 24  # context either side of a chunk, beyond the network's receptive radius (~22 voxels)


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


def run(net, v: np.ndarray) -> np.ndarray:
    """The network over a whole volume (float32 out), in chunks of ``CHUNK`` slices along the last axis
    with ``MARGIN`` slices of context each side (multiples of 4, the pooling's period, so a chunk
    computes what the whole volume would)."""
    import torch

    device = next(net.parameters()).device
    out = np.empty(v.shape, np.float32)
    n = v.shape[2]
    with torch.no_grad():
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            lo, hi = max(start - MARGIN, 0), min(stop + MARGIN, n)
            x = torch.from_numpy(np.ascontiguousarray(v[..., lo:hi], dtype=np.float32))[None, None].to(device)
            out[..., start:stop] = net(x)[0, 0, ..., start - lo: stop - lo].cpu().numpy()
    return out


def state_shapes(channels: int):
    """(name, shape) of every tensor of ``build(channels)``, without building it (``modelfolder.check_shapes``)."""
    c = int(channels)
    if not 1 <= c <= 256:
        raise ValueError(f"U-Net channels {c} outside 1..256")
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


def from_tensors(tensors: dict, prefix: str, channels: int, folder=None):
    """The network held under ``prefix`` in a model folder's tensors (shapes checked first; eval mode, float32,
    CPU, no gradients)."""
    from bidsharmony.modelfolder import check_shapes

    check_shapes(tensors, prefix, state_shapes(channels), folder or ".")
    net = build(channels)
    net.load_state_dict({k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def to_tensors(net, prefix: str) -> dict:
    """The network's tensors under ``prefix``, for a model folder's weights file."""
    return {prefix + k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
