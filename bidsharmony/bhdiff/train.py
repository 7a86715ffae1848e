"""Training the BlindHarmonyDiff velocity field on target-domain volumes (flow matching).

Multi-stride patch training (docs/method.md §5): most patches are contiguous crops; the rest are
crops twice as large subsampled with stride 2, so a patch sees more of the head; every patch
carries the true coordinates of its voxels. Random left-right flips mirror image, edges and
coordinates together. An exponential moving average of the weights is what gets saved. The state
(weights, EMA, optimiser, random generator) is checkpointed with ``torch.save`` and read back with
``weights_only=True`` (no unpickling), so an interrupted run resumes exactly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bidsharmony.bhdiff.edges import edge_map, head_region
from bidsharmony.bhdiff.rectified import coordinates, flow_matching_loss, normalise
from bidsharmony.bhdiff.unet import build_unet

LOG = logging.getLogger("bidsharmony")


@dataclass(frozen=True)
class BHDiffTrainConfig:
    preset: str = "small"
    steps: int = 20000
    batch_size: int = 2
    learning_rate: float = 1e-4
    patch: int = 64
    strided_fraction: float = 0.2  # share of patches that are 2× crops subsampled by stride 2
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    seed: int = 0
    amp: bool = False  # bf16 autocast on CUDA


def prepare_volume(vol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A RAS 1.2 mm volume -> (image winsorised to [−1, 1], binary edges)."""
    x, _ = normalise(vol, head_region(vol))
    return x, edge_map(vol)


def sample_patch(x: np.ndarray, e: np.ndarray, size: int, gen: torch.Generator, strided_fraction: float = 0.2):
    """(image (1, s, s, s), condition (4, s, s, s)) of one random patch: edges + coordinates."""
    stride = 2 if float(torch.rand((), generator=gen)) < strided_fraction and min(x.shape) >= 2 * size else 1
    span = size * stride
    pads = [(0, max(0, span - n)) for n in x.shape]
    if any(p[1] for p in pads):  # a volume smaller than the patch: pad with the background value
        x, e = np.pad(x, pads, constant_values=-1.0), np.pad(e, pads)
    origin = [int(torch.randint(0, n - span + 1, (), generator=gen)) for n in x.shape]
    sl = tuple(slice(o, o + span, stride) for o in origin)
    img, edges = x[sl], e[sl]
    coords = coordinates(img.shape, origin=origin, stride=(stride,) * 3, full_shape=x.shape)
    cond = np.concatenate([edges[None], coords])
    if float(torch.rand((), generator=gen)) < 0.5:  # left-right mirror: image, edges and coordinates together
        img, cond = img[::-1], cond[:, ::-1]
    return np.ascontiguousarray(img[None]), np.ascontiguousarray(cond)


def _batch(volumes, cfg: BHDiffTrainConfig, gen: torch.Generator, device):
    xs, cs = [], []
    for _ in range(cfg.batch_size):
        x, e = volumes[int(torch.randint(0, len(volumes), (), generator=gen))]
        img, cond = sample_patch(x, e, cfg.patch, gen, cfg.strided_fraction)
        xs.append(img)
        cs.append(cond)
    return torch.from_numpy(np.stack(xs)).to(device), torch.from_numpy(np.stack(cs)).to(device)


def _ema(model, decay: float):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def data_record(volumes) -> dict:
    """What identifies the training data: the number of volumes and a hash of them, prepared."""
    h = hashlib.sha256()
    for x, e in volumes:
        for a in (x, e):
            h.update(str((a.dtype, a.shape)).encode())
            h.update(np.ascontiguousarray(a).data)
    return {"volumes": len(volumes), "data_sha256": h.hexdigest()}


def _save_state(folder: Path, model, ema, opt, gen, step: int, losses: list[float], cfg: BHDiffTrainConfig, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "state.pt.tmp"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                "step": step, "losses": losses, "config": asdict(cfg), "data": data}, tmp)  # fmt: skip
    os.replace(tmp, folder / "state.pt")


def train_bhdiff(volumes: list[tuple[np.ndarray, np.ndarray]], cfg: BHDiffTrainConfig, out_dir, device="cpu",
                 stop_at: int | None = None, progress: bool = False, overwrite: bool = False) -> dict:
    """Train on prepared volumes; checkpoints in out_dir/checkpoint, resumes from there when the
    settings and data are the same (else OutputError, or with ``overwrite`` a fresh start). Returns
    {'steps', 'losses', 'model', 'ema', 'seconds'} (``stop_at`` ends early without saving, as a
    kill would: the next call resumes from the last checkpoint)."""
    from bidsharmony.errors import OutputError
    from bidsharmony.train.loop import resume_conflict

    out_dir = Path(out_dir)
    state_dir = out_dir / "checkpoint"
    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.preset).to(device)
    ema = _ema(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses = 0, []
    data = data_record(volumes)
    if (state_dir / "state.pt").is_file():
        state = torch.load(state_dir / "state.pt", map_location=device, weights_only=True)
        conflict = resume_conflict(state_dir, {**state["config"], **state.get("data", {})}, {**asdict(cfg), **data})
        if conflict and not overwrite:
            raise OutputError(conflict)
        if conflict:
            LOG.warning("%s: discarded (--overwrite)", conflict.split(";")[0])
            shutil.rmtree(state_dir)
    if (state_dir / "state.pt").is_file():
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, losses = int(state["step"]), list(state["losses"])
        LOG.info("resuming training at step %d", step)
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1 + step)
    t0 = time.perf_counter()
    end = min(cfg.steps, stop_at or cfg.steps)
    use_amp = cfg.amp and str(device).startswith("cuda")
    while step < end:
        x, cond = _batch(volumes, cfg, gen, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = flow_matching_loss(model, x, cond, generator=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
        step += 1
        losses.append(float(loss.detach()))
        if progress and step % 10 == 0:
            LOG.info("step %d/%d: loss %.4f", step, cfg.steps, float(np.mean(losses[-10:])))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:  # a kill resumes from the last of these
            noise = torch.Generator(device=device).manual_seed(cfg.seed + 1 + step)  # resumable noise stream
            _save_state(state_dir, model, ema, opt, gen, step, losses, cfg, data)
    return {"steps": step, "losses": losses, "model": model, "ema": ema.module, "seconds": time.perf_counter() - t0}
