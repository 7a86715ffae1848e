"""A resumable training loop for the pipeline's helper networks (today the learned denoiser).

The flow has its own loop (``bidsharmony.train.loop``); helper networks share this one: Adam under a
one-cycle schedule, a batch drawn from a seeded numpy generator each step, and the whole state
(weights, Adam, schedule, the generator) saved every ``checkpoint_every`` steps, so that an
interrupted run continues to the same network as one uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

LOG = logging.getLogger("bidsharmony")


def _save_state(folder: Path, name: str, net, opt, sched, rng, step: int, curve: list, record: dict) -> None:
    from bidsharmony.modelfolder import write_safetensors
    from bidsharmony.train.loop import optimizer_tensors

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    opt_tensors, param_groups = optimizer_tensors(opt)
    write_safetensors({**tensors, **opt_tensors}, folder / f"{name}.safetensors.tmp")
    os.replace(folder / f"{name}.safetensors.tmp", folder / f"{name}.safetensors")
    meta = {"step": step, "curve": curve, "param_groups": param_groups, "scheduler": sched.state_dict(),
            "rng": rng.bit_generator.state, **record}
    (folder / f"{name}.json.tmp").write_text(json.dumps(meta))
    os.replace(folder / f"{name}.json.tmp", folder / f"{name}.json")


def _load_state(folder: Path, name: str, net, opt, sched, rng) -> tuple[int, list]:
    from safetensors.torch import load_file

    from bidsharmony.train.loop import restore_optimizer

    meta = json.loads((folder / f"{name}.json").read_text())
    tensors = load_file(str(folder / f"{name}.safetensors"))  # load_state_dict moves them to the network's device
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    restore_optimizer(opt, tensors, meta["param_groups"])
    sched.load_state_dict(meta["scheduler"])
    rng.bit_generator.state = meta["rng"]
    return meta["step"], meta["curve"]


def finished(state_dir, name: str, cfg, data: dict) -> bool:
    """Whether ``state_dir`` holds this training (``cfg``, ``data``) run to its last step."""
    state = Path(state_dir) / f"{name}.json" if state_dir is not None else None
    if state is None or not state.is_file():
        return False
    saved = json.loads(state.read_text())
    return saved.get("step") == cfg.steps and saved.get("config") == cfg.to_dict() and saved.get("data") == data


def fit(build, draw, loss_of, cfg, state_dir=None, name: str = "state", *, data: dict | None = None,
        stop_at: int | None = None, overwrite: bool = False, progress=None, device="cpu", what: str = "network"):
    """Train ``build()`` (called after torch is seeded with ``cfg.seed``); returns (network in eval
    mode, loss per step). Each step takes ``batch = draw(rng)`` (tensors; ``rng``: numpy, seeded
    from ``cfg.seed``) and minimises ``loss_of(net, batch)``. ``cfg``: ``steps``, ``learning_rate``
    (the one-cycle schedule's peak), ``seed``, ``checkpoint_every``, ``to_dict()``.

    With ``state_dir``, the state is saved there as ``name.*`` every ``cfg.checkpoint_every`` steps
    and a later call with the same options and ``data`` (what identifies the training data)
    continues from it, with the same result as one uninterrupted run; other options are refused
    (OutputError) unless ``overwrite``. ``stop_at`` ends this call at that step (a job's time
    limit). ``progress(step, curve)`` is called after each step."""
    import torch

    from bidsharmony.errors import OutputError
    from bidsharmony.train.loop import resume_conflict

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])  # the batch sampler; the data drew from their own
    net = build().to(device)
    opt = torch.optim.Adam(net.parameters(), cfg.learning_rate)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.learning_rate, total_steps=cfg.steps, pct_start=max(0.05, 2 / cfg.steps))
    record = {"config": cfg.to_dict(), "data": data or {}}
    step, curve = 0, []
    state = Path(state_dir) / f"{name}.json" if state_dir is not None else None
    if state is not None and state.is_file():
        saved = json.loads(state.read_text())
        conflict = resume_conflict(Path(state_dir), {"config": saved.get("config"), "data": saved.get("data")}, record)
        if conflict and not overwrite:
            raise OutputError(conflict)
        if not conflict:
            step, curve = _load_state(Path(state_dir), name, net, opt, sched, rng)
            LOG.info("resuming the %s's training from step %d", what, step)
    net.train()
    last = min(cfg.steps, stop_at or cfg.steps)
    while step < last:
        loss = loss_of(net, tuple(t.to(device) for t in draw(rng)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        curve.append(round(float(loss.detach()), 7))
        if state is not None and (step % cfg.checkpoint_every == 0 or step == last):
            _save_state(Path(state_dir), name, net, opt, sched, rng, step, curve, record)
        if progress is not None:
            progress(step, curve)
    return net.cpu().eval(), curve


def within_memory(files: list, copies: int, seed: int, budget: float, what: str, bytes_per_voxel: int = 9) -> list:
    """``files``, or a seeded subset of them whose training data (``copies`` volumes of each file's
    size) hold at most ``budget`` voxels: all of it stays in memory, and 150 volumes at 1 mm, three
    copies each, would need 90 GB. ``bytes_per_voxel`` (for the log): 9 for the denoiser's pairs
    (two float32 volumes and a mask)."""
    import nibabel as nb

    sizes = [int(np.prod(nb.load(f).shape[:3])) * copies for f in files]
    if sum(sizes) <= budget:
        return files
    order = np.random.default_rng([seed, 2]).permutation(len(files))
    kept = sorted(int(i) for i in order[np.cumsum(np.asarray(sizes)[order]) <= budget])
    if not kept:
        kept = [int(order[0])]
    LOG.warning("the %s trains on %d of %d volumes (chosen with the seed): all of them would need %.0f GB",
                what, len(kept), len(files), sum(sizes) * bytes_per_voxel / 1e9)
    return [files[i] for i in kept]


def log_progress(steps: int, what: str, every: int | None = None):
    """A ``progress`` callback that logs the mean loss and the time left every 5 % of ``steps``."""
    import time

    every = every or max(1, steps // 20)
    start: list = []  # (first step, its time): the clock starts with the training, not with the data

    def report(step: int, curve: list) -> None:
        if not start:
            start.extend((step - 1, time.perf_counter()))
        if step % every == 0 or step == steps:
            seconds = time.perf_counter() - start[1]
            left = seconds / max(step - start[0] - 1, 1) * (steps - step)
            LOG.info("%s step %d/%d: loss %.4g (mean of the last %d), %.1f min elapsed, ~%.1f min left",
                     what, step, steps, float(np.mean(curve[-every:])), min(every, len(curve)), seconds / 60, left / 60)
    return report
