"""The training loop: NLL in bits/dim, Adam + cosine annealing, validation, best model, resume.

The model folder is written with ``flow.checkpoint.save_model`` each time validation improves;
``checkpoint/`` beside it holds the last training state (weights, optimiser, scheduler, RNG) as
safetensors + JSON, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bidsharmony.errors import OutputError
from bidsharmony.train.data import SliceSet

LOG = logging.getLogger("bidsharmony")
STATE_DIR = "checkpoint"


@dataclass
class TrainConfig:
    preset: str = "fast"
    steps: int = 10000
    batch_size: int = 256
    learning_rate: float = 5e-4
    grad_clip: float = 10.0
    val_every: int = 500
    checkpoint_every: int = 250
    augment: bool = False  # random left-right flips
    seed: int = 0
    amp: bool = False  # bf16 autocast for the conditioners (the spline arithmetic stays float32)

    def to_dict(self) -> dict:
        return asdict(self)


def _batch(codes, idx, gen, flip, device):
    import torch

    from bidsharmony.flow.scaling import LEVELS

    q = torch.from_numpy(codes[np.sort(idx)].astype(np.float32))[:, None].to(device)
    u = torch.rand(q.shape, generator=gen, device="cpu").to(device)
    x = (q + u) / LEVELS - 0.5
    if flip is not None:
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(2), x)
    return x


def evaluate_bpd(flow, codes: np.ndarray, device, batch_size: int = 64, seed: int = 12345) -> float:
    """Mean bits/dim of slices (12-bit codes) with fixed dequantisation noise."""
    import torch

    from bidsharmony.flow.scaling import bits_per_dim

    was_training = flow.training
    flow.eval()
    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(codes), batch_size):
            x = _batch(codes, np.arange(i, min(i + batch_size, len(codes))), gen, None, device)
            total += bits_per_dim(flow.log_prob(x), flow.num_dims).sum().item()
            n += x.shape[0]
    flow.train(was_training)
    return total / max(n, 1)


def data_record(train: SliceSet, val: SliceSet) -> dict:
    """What identifies the training data: the subjects, the slice counts, a hash of the slices."""
    h = hashlib.sha256()
    for part in (train, val):
        h.update(np.ascontiguousarray(part.codes).data)
        h.update("\0".join(map(str, part.subject.tolist())).encode())
    return {"subjects_train": sorted(set(map(str, train.subject.tolist()))), "slices_train": len(train),
            "subjects_validation": sorted(set(map(str, val.subject.tolist()))), "slices_validation": len(val),
            "data_sha256": h.hexdigest()}  # fmt: skip


def resume_conflict(state_dir: Path, saved: dict, current: dict) -> str | None:
    """Why the checkpoint in ``state_dir`` cannot be continued by this run (None if it can): other
    data or options would mix two trainings into one model. Names the first difference."""
    def short(v):
        text = json.dumps(v)
        return text if len(text) <= 80 else text[:77] + "..."

    for key in [*current, *(k for k in saved if k not in current)]:
        if saved.get(key) != current.get(key):
            return (f"{state_dir}: holds an unfinished training with {key} {short(saved.get(key))}, this run has "
                    f"{short(current.get(key))}; rerun with its data and options to resume it, pass --overwrite to "
                    "start over, or choose another folder")
    return None


def progress_line(step: int, steps: int, first: int, train_bpd: list, val_bpd: float | None, seconds: float) -> str:
    """``training 25% (500/2000 steps), loss 3.412, val 3.501 bits/dim, 3.2 min elapsed, ~9.6 min left``:
    the loss is the mean of the last 5 % of steps; the time left is extrapolated from this run's steps."""
    recent = train_bpd[-max(1, steps // 20):]
    parts = [f"training {100 * step // steps}% ({step}/{steps} steps)",
             f"loss {sum(recent) / len(recent):.3f}" if recent else "loss -",
             f"val {val_bpd:.3f} bits/dim" if val_bpd is not None else "val - (not yet)",
             f"{seconds / 60:.1f} min elapsed"]
    done = step - first
    if step < steps and done > 0:
        parts.append(f"~{seconds / done * (steps - step) / 60:.1f} min left")
    return ", ".join(parts)


def optimizer_tensors(opt) -> tuple[dict, list]:
    """An optimiser's per-parameter state as tensors for a safetensors file (``opt.<param>.<name>``),
    and its parameter groups (JSON): a resume point without pickle."""
    import torch

    state = opt.state_dict()
    tensors = {f"opt.{pid}.{name}": torch.as_tensor(value).detach().cpu().contiguous()
               for pid, st in state["state"].items() for name, value in st.items()}
    return tensors, state["param_groups"]


def restore_optimizer(opt, tensors: dict, param_groups: list) -> None:
    """The inverse of ``optimizer_tensors`` (other keys of ``tensors`` are ignored)."""
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def _save_state(folder: Path, flow, opt, sched, gen, step: int, history: dict, best: float, cfg: TrainConfig, data: dict) -> None:
    from bidsharmony.modelfolder import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"flow.{k}": v.detach().cpu().contiguous() for k, v in flow.state_dict().items()}
    opt_tensors, param_groups = optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng.batches"] = gen.get_state()
    tmp = folder / "state.safetensors.tmp"
    write_safetensors(tensors, tmp)
    os.replace(tmp, folder / "state.safetensors")
    meta = {
        "step": step,
        "best_val_bpd": best,
        "history": history,
        "param_groups": param_groups,
        "scheduler": sched.state_dict(),
        "train_config": cfg.to_dict(),  # a resume needs the same options and data
        "training_data": data,
    }
    (folder / "state.json.tmp").write_text(json.dumps(meta))
    os.replace(folder / "state.json.tmp", folder / "state.json")


def _load_state(folder: Path, flow, opt, sched, gen):
    import torch
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    flow.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("flow.")})
    restore_optimizer(opt, tensors, meta["param_groups"])
    sched.load_state_dict(meta["scheduler"])
    gen.set_state(tensors["rng.batches"].to(torch.uint8))
    return meta["step"], meta["history"], meta["best_val_bpd"]


def train_flow(train: SliceSet, val: SliceSet, cfg: TrainConfig, out_dir, device="cpu", extras=None, meta=None, progress=True,
               stop_at: int | None = None, overwrite: bool = False, tensors: dict | None = None) -> dict:
    """Fit a flow of preset ``cfg.preset`` on ``train``; keeps the best-validation model in ``out_dir``.

    ``stop_at`` ends this call early at that step, after a checkpoint (a job's time limit); calling
    again with the same config and data resumes; other ones are refused (OutputError), or with
    ``overwrite`` start over. ``extras``/``tensors``: what else the model folder holds
    (``save_model``). Returns a summary (steps, best validation bits/dim, seconds).
    """
    import torch

    from bidsharmony.flow.checkpoint import save_model
    from bidsharmony.flow.model import build_flow
    from bidsharmony.flow.scaling import bits_per_dim
    from bidsharmony.train.figures import save_figures

    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    flow = build_flow(cfg.preset, slice_shape=tuple(train.codes.shape[1:]), seed=cfg.seed).to(device)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1), eta_min=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    state_dir = out_dir / STATE_DIR
    step, best = 0, math.inf
    history: dict = {"step": [], "train_bpd": [], "val_step": [], "val_bpd": []}
    state_file = state_dir / "state.json"
    data = data_record(train, val)
    if state_file.is_file():
        saved = json.loads(state_file.read_text())
        recorded = {**saved.get("train_config", {}), **saved.get("training_data", {})}
        conflict = resume_conflict(state_dir, recorded, {**cfg.to_dict(), **data})
        if conflict and not overwrite:
            raise OutputError(conflict)
        if conflict:
            LOG.warning("%s: discarded (--overwrite)", conflict.split(";")[0])
            shutil.rmtree(state_dir)
    if state_file.is_file():
        step, history, best = _load_state(state_dir, flow, opt, sched, gen)
        LOG.info("resuming training from step %d (best validation %.4f bits/dim)", step, best)
    else:
        # Data-dependent ActNorm initialisation on a first batch, before any step.
        flow.train()
        with torch.no_grad():
            flow(_batch(train.codes, np.arange(min(len(train), cfg.batch_size)), gen, None, device))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="training", dynamic_ncols=True)
    t0 = time.perf_counter()
    if cfg.amp:
        from bidsharmony.flow.coupling import SplineCoupling

        for m in flow.modules():
            if isinstance(m, SplineCoupling):
                m.amp_dtype = torch.bfloat16
    flow.train()
    last = min(cfg.steps, stop_at or cfg.steps)
    first, every = step, max(1, math.ceil(cfg.steps / 20))  # a log line every 5 % of the steps
    last_val = history["val_bpd"][-1] if history["val_bpd"] else None
    while step < last:
        idx = torch.randint(len(train), (cfg.batch_size,), generator=gen).numpy()
        flip = torch.rand(cfg.batch_size, generator=gen) < 0.5 if cfg.augment else None
        x = _batch(train.codes, idx, gen, flip, device)
        loss = bits_per_dim(flow.log_prob(x), flow.num_dims).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        history["step"].append(step)
        history["train_bpd"].append(round(loss.item(), 5))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(bpd=f"{loss.item():.3f}", best=f"{best:.3f}" if best < math.inf else "-")
        if step % cfg.val_every == 0 or step == cfg.steps:
            val_bpd = evaluate_bpd(flow, val.codes, device)
            history["val_step"].append(step)
            history["val_bpd"].append(round(val_bpd, 5))
            last_val = val_bpd
            LOG.debug("step %d: validation %.4f bits/dim", step, val_bpd)
            if val_bpd < best:
                best = val_bpd
                card_meta = dict(meta or {})
                card_meta["training"] = {**card_meta.get("training", {}), **cfg.to_dict(), "best_step": step, "validation_bpd": round(best, 5), "device": str(device)}
                card_meta["validation_bpd"] = round(best, 5)
                save_model(out_dir, flow, card_meta, extras=extras, tensors=tensors)
        if step % cfg.checkpoint_every == 0 or step == last:
            _save_state(state_dir, flow, opt, sched, gen, step, history, best, cfg, data)
        if step % every == 0 or step == cfg.steps:
            LOG.info("%s", progress_line(step, cfg.steps, first, history["train_bpd"], last_val, time.perf_counter() - t0))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    from bidsharmony.flow.checkpoint import load_model

    if step == cfg.steps and (out_dir / "model.safetensors").is_file():
        save_figures(load_model(out_dir, device=device).flow, history, out_dir, seed=cfg.seed)
    return {"steps": step, "best_val_bpd": best, "seconds": seconds, "history": history}
