"""Training the learned denoiser (``bidsharmony.image.denoiser``) on the target's TRAIN volumes alone.

Each training volume (the target's own voxels, min-max scaled) gets ``draws`` copies with Rician
noise of σ ~ U(0, ``max_sigma``) × its head's 99th percentile. Each noisy copy's landmarks are
measured as harmonization measures them (on the 1.2 mm canonical grid), and both the noisy copy and
the clean volume are put through that one map: the pair differs by noise alone. The loss is L2 in
the head on random patches: outside it, the Rician floor stretched by the map's lowest segment
would dominate (measured: with the loss over whole patches the network learned nothing useful).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LOG = logging.getLogger("bidsharmony")
STATE = "denoiser-state"  # the resume point's files in a training's state folder
MAX_SIGMA = 0.08  # the strongest noise drawn, as a fraction of the head's 99th percentile
PAIR_VOXELS = 6e8  # voxels of all training pairs together (9 bytes each: about 5.4 GB)


def training_pairs(volumes: Iterable[tuple[np.ndarray, np.ndarray]], landmarks: np.ndarray, draws: int,
                   rng: np.random.Generator, max_sigma: float = MAX_SIGMA) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """[(noisy, clean, head)] on the network's scale (standard scale / SCALE), from (volume, affine)."""
    from bidsharmony.image.denoiser import SCALE
    from bidsharmony.image.slices import head_mask
    from bidsharmony.image.standardise import grid_landmarks, standardise
    from bidsharmony.simulation import rician, unit

    pairs = []
    for volume, affine in volumes:
        v = unit(volume)
        head = head_mask(v)
        p99 = float(np.percentile(v[head], 99))
        for _ in range(draws):
            noisy = rician(v, rng, rng.uniform(0.0, max_sigma) * p99)
            at = grid_landmarks(noisy, affine)[0]
            pairs.append((standardise(noisy, landmarks, source_landmarks=at) / SCALE,
                          standardise(v, landmarks, source_landmarks=at) / SCALE, head))
    return pairs


def patches(pairs, size: int, patch: int, rng: np.random.Generator, flip: bool = False):
    """A batch of ``size`` random patch³ crops whose first corner lies in the head: (noisy, clean, head)
    tensors; with ``flip``, each crop is mirrored left-right (the first, RAS axis) with probability ½."""
    import torch

    xs, ys, ms = [], [], []
    for _ in range(size):
        x, y, head = pairs[rng.integers(len(pairs))]
        corners = np.argwhere(head[tuple(slice(0, max(s - patch, 1)) for s in head.shape)])
        c = corners[rng.integers(len(corners))]
        sl = tuple(slice(int(a), int(a) + patch) for a in c)
        mirror = slice(None, None, -1 if flip and rng.random() < 0.5 else 1)
        xs.append(x[sl][mirror])
        ys.append(y[sl][mirror])
        ms.append(head[sl][mirror])
    return tuple(torch.from_numpy(np.ascontiguousarray(np.stack(a)[:, None], dtype=np.float32)) for a in (xs, ys, ms))


@dataclass
class DenoiserConfig:
    """The learned denoiser's training options (recorded in the model's config)."""

    steps: int = 12000
    batch: int = 6
    patch: int = 32
    learning_rate: float = 1e-3  # the one-cycle schedule's peak
    channels: int = 16
    draws: int = 3  # noisy copies of each training volume
    max_sigma: float = MAX_SIGMA
    flip: bool = True  # random left-right mirroring of the patches
    seed: int = 0
    checkpoint_every: int = 250

    def to_dict(self) -> dict:
        return asdict(self)


def fit(pairs, cfg: DenoiserConfig, state_dir=None, *, data: dict | None = None, stop_at: int | None = None,
        overwrite: bool = False, progress=None, device="cpu"):
    """Train a network on ``pairs`` (``training_pairs``); returns (network in eval mode, loss per step).
    Resumable in ``state_dir`` (``bidsharmony.train.resumable.fit``: ``data`` identifies the pairs)."""
    from bidsharmony.image.denoiser import build
    from bidsharmony.train.resumable import fit as run

    def loss_of(net, batch):
        x, y, m = batch
        return ((x + net(x) - y) ** 2 * m).sum() / m.sum().clamp(min=1.0)

    return run(lambda: build(cfg.channels), lambda rng: patches(pairs, cfg.batch, cfg.patch, rng, cfg.flip), loss_of, cfg,
               state_dir, STATE, data=data, stop_at=stop_at, overwrite=overwrite, progress=progress, device=device, what="denoiser")


def pairs_record(files) -> dict:
    """What identifies a training's volumes, for resuming: their paths and a hash of their bytes."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return {"volumes": [str(f) for f in files], "volumes_sha256": h.hexdigest()}


def canonical_volumes(files):
    """(volume, affine) of each T1w in RAS orientation, one file at a time (the network's orientation)."""
    from bidsharmony.image.io import load_t1w
    from bidsharmony.image.resample import canonical

    for f in files:
        img, data = load_t1w(f)
        yield canonical(data, img.affine)


def train_on_files(files, landmarks, cfg: DenoiserConfig, state_dir=None, *, stop_at: int | None = None,
                   overwrite: bool = False, progress=None, device="cpu"):
    """The learned denoiser of a target: pairs from its T1w ``files`` (``training_pairs``, drawn with
    the seed), then ``fit`` (resumable in ``state_dir``). Returns (network, loss per step)."""
    from bidsharmony.train.resumable import finished

    files = within_memory([Path(f) for f in files], cfg)
    data = pairs_record(files)
    pairs = []  # a finished training's state needs no pairs (a rerun after the flow's training stopped)
    if not finished(state_dir, STATE, cfg, data):
        pairs = training_pairs(canonical_volumes(files), landmarks, cfg.draws, np.random.default_rng([cfg.seed, 0]), cfg.max_sigma)
    return fit(pairs, cfg, state_dir, data=data, stop_at=stop_at, overwrite=overwrite, progress=progress, device=device)


def within_memory(files: list, cfg: DenoiserConfig, budget: float = PAIR_VOXELS) -> list:
    """``files``, or a seeded subset whose pairs (``cfg.draws`` each) hold at most ``budget`` voxels."""
    from bidsharmony.train.resumable import within_memory as capped

    return capped(files, cfg.draws, cfg.seed, budget, "denoiser")


def log_progress(steps: int, every: int | None = None):
    """A ``progress`` callback that logs the mean loss and the time left every 5 % of ``steps``."""
    from bidsharmony.train.resumable import log_progress as logger

    return logger(steps, "denoiser", every)


def model_entry(cfg: DenoiserConfig, volumes: int, steps: int) -> dict:
    """The denoiser's entry in a model's config (``preprocessing.detail.learned_denoiser``)."""
    return {"architecture": "unet3d", "channels": cfg.channels, "orientation": "RAS", "volumes": volumes,
            "trained_steps": steps, "training": cfg.to_dict(),
            "noise": f"Rician, sigma uniform in [0, {cfg.max_sigma}] x the head's 99th percentile"}


def to_tensors(net) -> dict:
    """The network's tensors under ``PREFIX``, for a model folder's weights file."""
    from bidsharmony.image import unet
    from bidsharmony.image.denoiser import PREFIX

    return unet.to_tensors(net, PREFIX)
