"""Training the learned brain mask (``bidsharmony.image.brainmask``) on the target's TRAIN heads and their brain masks.

Each training head (on the ``MM`` grid, RAS) gets ``draws`` copies, each with, at even odds, Rician
noise of σ ~ U(0, ``max_sigma``) × its head's 99th percentile and a smooth multiplicative field of
amplitude ~ U(1, ``max_bias``) (``simulation.smooth_field``): the two scanner effects that change
the ranks the network sees. Monotone changes of intensity do not change them, and are not drawn.
Blur and tissue-contrast changes are not drawn either. The loss on random patch³ crops is binary
cross-entropy plus (1 − soft Dice) against the brain mask (the parcellation's labels > 0).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

STATE = "brainmask-state"  # the resume point's files in a training's state folder


@dataclass
class BrainMaskConfig:
    """The learned brain mask's training options (recorded in the model's config)."""

    steps: int = 1500
    batch: int = 2
    patch: int = 64
    learning_rate: float = 2e-3  # the one-cycle schedule's peak
    channels: int = 8
    draws: int = 2  # distorted copies of each training head
    max_sigma: float = 0.08
    max_bias: float = 1.5
    flip: bool = True  # random left-right mirroring of the patches
    seed: int = 0
    checkpoint_every: int = 250

    def to_dict(self) -> dict:
        return asdict(self)


def training_inputs(heads: Iterable[tuple[np.ndarray, np.ndarray]], cfg: BrainMaskConfig,
                    rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(rank input as float16, brain mask)] from (volume, brain mask) pairs on the ``MM`` RAS grid."""
    from bidsharmony.image.brainmask import rank_input
    from bidsharmony.image.slices import head_mask
    from bidsharmony.simulation import rician, smooth_field, unit

    items = []
    for volume, brain in heads:
        v = unit(volume)
        p99 = float(np.percentile(v[head_mask(v)], 99))
        for _ in range(cfg.draws):
            u = v
            if rng.random() < 0.5:
                u = u * smooth_field(u.shape, rng, rng.uniform(1.0, cfg.max_bias))
            if rng.random() < 0.5:
                u = rician(u, rng, rng.uniform(0.0, cfg.max_sigma) * p99)
            items.append((rank_input(u).astype(np.float16), np.asarray(brain, bool)))
    return items


def patches(items, size: int, patch: int, rng: np.random.Generator, flip: bool = False):
    """A batch of ``size`` patch³ crops centred (where the volume allows) on a random voxel of the
    input's head: (input, brain) float32 tensors; with ``flip``, mirrored left-right at even odds."""
    import torch

    xs, ys = [], []
    for _ in range(size):
        x, y = items[rng.integers(len(items))]
        pad = [(0, max(patch - s, 0)) for s in x.shape]
        if any(p for _, p in pad):
            x, y = np.pad(x, pad), np.pad(y, pad)
        head = np.argwhere(x > 0)
        centre = head[rng.integers(len(head))] if len(head) else np.array(x.shape) // 2
        corner = [int(np.clip(c - patch // 2, 0, s - patch)) for c, s in zip(centre, x.shape)]
        sl = tuple(slice(c, c + patch) for c in corner)
        mirror = slice(None, None, -1 if flip and rng.random() < 0.5 else 1)
        xs.append(x[sl][mirror])
        ys.append(y[sl][mirror])
    return tuple(torch.from_numpy(np.ascontiguousarray(np.stack(a)[:, None], dtype=np.float32)) for a in (xs, ys))


def loss_of(net, batch):
    """Binary cross-entropy + (1 − soft Dice) of the network's logits against the mask."""
    import torch

    x, y = batch
    logits = net(x)
    p = torch.sigmoid(logits)
    dice = 2 * (p * y).sum() / (p.sum() + y.sum()).clamp(min=1.0)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 1 - dice


def fit(items, cfg: BrainMaskConfig, state_dir=None, *, data: dict | None = None, stop_at: int | None = None,
        overwrite: bool = False, progress=None, device="cpu"):
    """Train a network on ``items`` (``training_inputs``); returns (network in eval mode, loss per step).
    Resumable in ``state_dir`` (``bidsharmony.train.resumable.fit``: ``data`` identifies the heads)."""
    from bidsharmony.image.unet import build
    from bidsharmony.train.resumable import fit as run

    return run(lambda: build(cfg.channels), lambda rng: patches(items, cfg.batch, cfg.patch, rng, cfg.flip), loss_of, cfg,
               state_dir, STATE, data=data, stop_at=stop_at, overwrite=overwrite, progress=progress, device=device,
               what="brain mask")


def on_grid(t1w, labels) -> tuple[np.ndarray, np.ndarray]:
    """(volume, brain mask) of a T1w file and its parcellation (labels > 0) on the ``MM`` RAS grid, as
    harmonization brings a source there (``brainmask.on_mm_grid``)."""
    from bidsharmony.image.brainmask import on_mm_grid
    from bidsharmony.image.io import load_t1w

    volume, labels = (on_mm_grid(data, img.affine)[0] for img, data in (load_t1w(t1w), load_t1w(labels)))
    return volume, labels > 0.5


def target_landmarks(net, files, percentiles) -> tuple[np.ndarray, np.ndarray]:
    """(standard landmarks, class landmarks) of the target's T1w ``files``, measured in the learned mask on
    the ``MM`` grid, as harmonization measures a source's (``standardise.fit_target_scale``)."""
    from bidsharmony.image.brainmask import MM, mask, on_mm_grid
    from bidsharmony.image.io import load_t1w
    from bidsharmony.image.standardise import fit_target_scale

    def volumes():
        for f in files:
            img, data = load_t1w(f)
            yield on_mm_grid(data, img.affine)[0]

    return fit_target_scale(volumes(), percentiles, (MM,) * 3, region_of=lambda v, z: mask(net, v))


def model_entry(cfg: BrainMaskConfig, volumes: int, steps: int) -> dict:
    """The brain mask's entry in a model's config (``preprocessing.standardisation.brain_mask``)."""
    from bidsharmony.image.brainmask import MM

    return {"architecture": "unet3d", "channels": cfg.channels, "orientation": "RAS", "grid_mm": MM,
            "input": "ranks of the head's voxels", "volumes": volumes, "trained_steps": steps, "training": cfg.to_dict(),
            "distortions": f"Rician noise (sigma up to {cfg.max_sigma} x the head's P99) and smooth fields (amplitude up to "
                           f"{cfg.max_bias}), each at even odds"}


def to_tensors(net) -> dict:
    """The network's tensors under ``PREFIX``, for a model folder's weights file."""
    from bidsharmony.image import unet
    from bidsharmony.image.brainmask import PREFIX

    return unet.to_tensors(net, PREFIX)
