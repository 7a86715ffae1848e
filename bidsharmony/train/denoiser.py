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
import json
import logging
import os
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


def _save_state(folder: Path, net, opt, sched, rng, step: int, curve: list, record: dict) -> None:
    from bidsharmony.modelfolder import write_safetensors
    from bidsharmony.train.loop import optimizer_tensors

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    opt_tensors, param_groups = optimizer_tensors(opt)
    write_safetensors({**tensors, **opt_tensors}, folder / f"{STATE}.safetensors.tmp")
    os.replace(folder / f"{STATE}.safetensors.tmp", folder / f"{STATE}.safetensors")
    meta = {"step": step, "curve": curve, "param_groups": param_groups, "scheduler": sched.state_dict(),
            "rng": rng.bit_generator.state, **record}
    (folder / f"{STATE}.json.tmp").write_text(json.dumps(meta))
    os.replace(folder / f"{STATE}.json.tmp", folder / f"{STATE}.json")


def _load_state(folder: Path, net, opt, sched, rng) -> tuple[int, list]:
    from safetensors.torch import load_file

    from bidsharmony.train.loop import restore_optimizer

    meta = json.loads((folder / f"{STATE}.json").read_text())
    tensors = load_file(str(folder / f"{STATE}.safetensors"))  # load_state_dict moves them to the network's device
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    restore_optimizer(opt, tensors, meta["param_groups"])
    sched.load_state_dict(meta["scheduler"])
    rng.bit_generator.state = meta["rng"]
    return meta["step"], meta["curve"]


def fit(pairs, cfg: DenoiserConfig, state_dir=None, *, data: dict | None = None, stop_at: int | None = None,
        overwrite: bool = False, progress=None, device="cpu"):
    """Train a network on ``pairs`` (``training_pairs``); returns (network in eval mode, loss per step).

    With ``state_dir``, the training state (weights, Adam, schedule, patch sampler) is saved there
    every ``cfg.checkpoint_every`` steps and a later call with the same options and ``data`` (what
    identifies the pairs) continues from it, with the same result as one uninterrupted run; other
    options are refused (OutputError) unless ``overwrite``. ``stop_at`` ends this call at that step
    (a job's time limit). ``progress(step, curve)`` is called after each step."""
    import torch

    from bidsharmony.errors import OutputError
    from bidsharmony.image.denoiser import build
    from bidsharmony.train.loop import resume_conflict

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])  # the patch sampler; the pairs drew from their own
    net = build(cfg.channels).to(device)
    opt = torch.optim.Adam(net.parameters(), cfg.learning_rate)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=cfg.steps, pct_start=max(0.05, 2 / cfg.steps))
    record = {"config": cfg.to_dict(), "data": data or {}}
    step, curve = 0, []
    state = Path(state_dir) / f"{STATE}.json" if state_dir is not None else None
    if state is not None and state.is_file():
        saved = json.loads(state.read_text())
        conflict = resume_conflict(Path(state_dir), {"config": saved.get("config"), "data": saved.get("data")}, record)
        if conflict and not overwrite:
            raise OutputError(conflict)
        if not conflict:
            step, curve = _load_state(Path(state_dir), net, opt, sched, rng)
            LOG.info("resuming the denoiser's training from step %d", step)
    net.train()
    last = min(cfg.steps, stop_at or cfg.steps)
    while step < last:
        x, y, m = (t.to(device) for t in patches(pairs, cfg.batch, cfg.patch, rng, cfg.flip))
        loss = ((x + net(x) - y) ** 2 * m).sum() / m.sum().clamp(min=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        curve.append(round(float(loss.detach()), 7))
        if state is not None and (step % cfg.checkpoint_every == 0 or step == last):
            _save_state(Path(state_dir), net, opt, sched, rng, step, curve, record)
        if progress is not None:
            progress(step, curve)
    return net.cpu().eval(), curve


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
    files = within_memory([Path(f) for f in files], cfg)
    data = pairs_record(files)
    pairs = []  # a finished training's state needs no pairs (a rerun after the flow's training stopped)
    if not _finished(state_dir, cfg, data):
        pairs = training_pairs(canonical_volumes(files), landmarks, cfg.draws, np.random.default_rng([cfg.seed, 0]), cfg.max_sigma)
    return fit(pairs, cfg, state_dir, data=data, stop_at=stop_at, overwrite=overwrite, progress=progress, device=device)


def within_memory(files: list, cfg: DenoiserConfig, budget: float = PAIR_VOXELS) -> list:
    """``files``, or a seeded subset of them whose pairs (``cfg.draws`` each; two float32 volumes and
    a mask per pair) hold at most ``budget`` voxels: all pairs stay in memory, and 150 volumes at
    1 mm would need 90 GB."""
    import nibabel as nb

    sizes = [int(np.prod(nb.load(f).shape[:3])) * cfg.draws for f in files]
    if sum(sizes) <= budget:
        return files
    order = np.random.default_rng([cfg.seed, 2]).permutation(len(files))
    kept = sorted(int(i) for i in order[np.cumsum(np.asarray(sizes)[order]) <= budget])
    if not kept:
        kept = [int(order[0])]
    LOG.warning("the denoiser trains on %d of %d volumes (chosen with the seed): their training pairs would need %.0f GB",
                len(kept), len(files), sum(sizes) * 9 / 1e9)
    return [files[i] for i in kept]


def _finished(state_dir, cfg: DenoiserConfig, data: dict) -> bool:
    state = Path(state_dir) / f"{STATE}.json" if state_dir is not None else None
    if state is None or not state.is_file():
        return False
    saved = json.loads(state.read_text())
    return saved.get("step") == cfg.steps and saved.get("config") == cfg.to_dict() and saved.get("data") == data


def log_progress(steps: int, every: int | None = None):
    """A ``progress`` callback that logs the mean loss and the time left every 5 % of ``steps``."""
    import time

    every = every or max(1, steps // 20)
    start: list = []  # (first step, its time): the clock starts with the training, not with the pairs

    def report(step: int, curve: list) -> None:
        if not start:
            start.extend((step - 1, time.perf_counter()))
        if step % every == 0 or step == steps:
            seconds = time.perf_counter() - start[1]
            left = seconds / max(step - start[0] - 1, 1) * (steps - step)
            LOG.info("denoiser step %d/%d: loss %.4g (mean of the last %d), %.1f min elapsed, ~%.1f min left",
                     step, steps, float(np.mean(curve[-every:])), min(every, len(curve)), seconds / 60, left / 60)
    return report


def model_entry(cfg: DenoiserConfig, volumes: int, steps: int) -> dict:
    """The denoiser's entry in a model's config (``preprocessing.detail.learned_denoiser``)."""
    return {"architecture": "unet3d", "channels": cfg.channels, "orientation": "RAS", "volumes": volumes,
            "trained_steps": steps, "training": cfg.to_dict(),
            "noise": f"Rician, sigma uniform in [0, {cfg.max_sigma}] x the head's 99th percentile"}


def to_tensors(net) -> dict:
    """The network's tensors under ``PREFIX``, for a model folder's weights file."""
    from bidsharmony.image.denoiser import PREFIX

    return {PREFIX + k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
