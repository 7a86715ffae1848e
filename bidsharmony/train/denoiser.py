"""Training the learned denoiser (``bidsharmony.image.denoiser``) on the target's TRAIN volumes alone.

Each training volume (the target's own voxels, min-max scaled) gets ``draws`` copies with Rician
noise of σ ~ U(0, ``max_sigma``) × its head's 99th percentile. Each noisy copy's landmarks are
measured as harmonization measures them (on the 1.2 mm canonical grid), and both the noisy copy and
the clean volume are put through that one map: the pair differs by noise alone. The loss is L2 in
the head on random patches: outside it, the Rician floor stretched by the map's lowest segment
would dominate (measured: with the loss over whole patches the network learned nothing useful).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

MAX_SIGMA = 0.08  # the strongest noise drawn, as a fraction of the head's 99th percentile


def training_pairs(volumes: Iterable[tuple[np.ndarray, np.ndarray]], landmarks: np.ndarray, draws: int,
                   rng: np.random.Generator, max_sigma: float = MAX_SIGMA) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """[(noisy, clean, head)] on the network's scale (standard scale / SCALE), from (volume, affine)."""
    from bidsharmony.image.denoiser import SCALE
    from bidsharmony.image.resample import resample_isotropic
    from bidsharmony.image.slices import head_mask
    from bidsharmony.image.standardise import standardise, volume_landmarks
    from bidsharmony.simulation import rician, unit

    pairs = []
    for volume, affine in volumes:
        v = unit(volume)
        head = head_mask(v)
        p99 = float(np.percentile(v[head], 99))
        for _ in range(draws):
            noisy = rician(v, rng, rng.uniform(0.0, max_sigma) * p99)
            at = volume_landmarks(resample_isotropic(noisy, affine, 1.2)[0])
            pairs.append((standardise(noisy, landmarks, source_landmarks=at) / SCALE,
                          standardise(v, landmarks, source_landmarks=at) / SCALE, head))
    return pairs


def patches(pairs, size: int, patch: int, rng: np.random.Generator):
    """A batch of ``size`` random patch³ crops whose first corner lies in the head: (noisy, clean, head) tensors."""
    import torch

    xs, ys, ms = [], [], []
    for _ in range(size):
        x, y, head = pairs[rng.integers(len(pairs))]
        corners = np.argwhere(head[tuple(slice(0, max(s - patch, 1)) for s in head.shape)])
        c = corners[rng.integers(len(corners))]
        sl = tuple(slice(int(a), int(a) + patch) for a in c)
        xs.append(x[sl])
        ys.append(y[sl])
        ms.append(head[sl])
    return tuple(torch.from_numpy(np.stack(a)[:, None].astype(np.float32)) for a in (xs, ys, ms))


def fit(pairs, *, steps: int, batch: int = 6, patch: int = 32, lr: float = 1e-3, channels: int = 16, seed: int = 0,
        progress=None):
    """Train a fresh network on ``pairs`` (``training_pairs``); returns (network in eval mode, loss per step)."""
    import torch

    from bidsharmony.image.denoiser import build

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build(channels)
    opt = torch.optim.Adam(net.parameters(), lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
    curve = []
    for step in range(steps):
        x, y, m = patches(pairs, batch, patch, rng)
        loss = ((x + net(x) - y) ** 2 * m).sum() / m.sum().clamp(min=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if progress is not None:
            progress(step, curve)
    return net.eval(), curve
