"""The train level: preprocess the target dataset with the harmonization's own nodes, then fit the
prior (2D flow or 3D rectified flow) in a folder built aside and swapped in when finished."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from bidsharmony.cli.execution import clean_work_dir, execute
from bidsharmony.cli.selection import check_images, select_runs
from bidsharmony.errors import EXIT_OK, BidsHarmonyError

LOG = logging.getLogger("bidsharmony")


def train_params(opts, device: str) -> tuple[int, int]:
    """Steps and batch size of a training: the options, or defaults that fit the device (a CPU
    step on 256 slices takes seconds and gigabytes; 10 000 of them would run for hours)."""
    gpu = device.startswith("cuda")
    if opts.method == "bhdiff":
        defaults, why = (20000, 2), "bhdiff defaults"
    else:
        defaults, why = ((10000, 256), "defaults for a GPU") if gpu else ((2000, 32), "defaults for a CPU")
    steps = opts.steps or defaults[0]
    batch = opts.train_batch_size or defaults[1]
    chosen = [f"{what} {value} ({'--' + flag if given else why})" for what, value, flag, given in
              (("steps", steps, "steps", opts.steps), ("batch size", batch, "train-batch-size", opts.train_batch_size))]
    LOG.info("training on %s: %s", device, ", ".join(chosen))
    return steps, batch


def train_side_dirs(output_dir: Path, name: str) -> tuple[Path, Path]:
    """The train level's logs and work directory: beside the model folder, hidden, so that the
    published folder holds the model's files only."""
    parent = output_dir.parent
    return parent / f".{name}-logs", parent / f".{name}-work"


def run_train(opts, nprocs: int, omp: int, work_dir: Path, log_dir: Path) -> int:
    import torch

    from bidsharmony import __version__
    from bidsharmony.device import resolve_device
    from bidsharmony.flow.model import PRESETS
    from bidsharmony.image.standardise import LANDMARKS, model_entry
    from bidsharmony.image.slices import POSITION_BINS
    from bidsharmony.train import data as tdata
    from bidsharmony.train.loop import TrainConfig, train_flow
    from bidsharmony.workflows.train import collect_slices, init_train_prep_wf

    runs = select_runs(opts)
    check_images(runs)
    device = resolve_device(opts.device)
    torch.set_num_threads(omp)
    if opts.clean_workdir:
        clean_work_dir(work_dir, runs)
    if opts.method == "bhdiff":
        return _train_bhdiff(opts, runs, device, nprocs, work_dir, log_dir)
    grid = PRESETS[opts.preset].slice_shape
    wf = init_train_prep_wf(runs, voxel_size=1.2, grid_shape=grid, omp_nthreads=1)
    wf.base_dir = str(work_dir)
    LOG.info("preprocessing %d T1w run(s) for training", len(runs))
    graph = execute(wf, opts, nprocs, log_dir)
    prepared = collect_slices(graph, runs)
    slices = tdata.load_slice_set(item[:3] for item in prepared)
    if len(slices) < 2:
        raise BidsHarmonyError(f"{opts.bids_dir}: only {len(slices)} slice(s) with head found; cannot train")
    train, val = tdata.split_by_subject(slices, opts.validation_fraction, opts.random_seed)
    LOG.info("training on %d slices (%d subjects), validating on %d slices (%d subjects)",
             len(train), len(set(train.subject)), len(val), len(set(val.subject)))
    steps, batch = train_params(opts, device)
    cfg = TrainConfig(
        preset=opts.preset, steps=steps, batch_size=batch, learning_rate=opts.learning_rate,
        val_every=opts.val_every, checkpoint_every=opts.checkpoint_every, augment=opts.augment, seed=opts.random_seed, amp=opts.amp,
    )  # fmt: skip
    meta = {
        "name": opts.model_name or opts.output_dir.resolve().name,
        "preset": opts.preset,
        "software_version": __version__,
        "preprocessing": {
            "voxel_size": 1.2,
            "orientation": "RAS",
            "slice_axis": "axial (inferior-superior)",
            "slice_shape": list(grid),
            "normalisation": "per-slice min-max to [0, 1] inside the grid",
            "quantisation_bits": 12,
            "position_bins": POSITION_BINS,
        },
        "training_data": {
            "dataset": str(opts.bids_dir.resolve()),
            "subjects_train": sorted(set(train.subject.tolist())),
            "subjects_validation": sorted(set(val.subject.tolist())),
            "slices_train": len(train),
            "slices_validation": len(val),
        },
    }
    landmarks, volumes = tdata.target_landmarks(prepared, set(train.subject.tolist()))
    LOG.info("intensity landmarks of %d training volume(s): %s", volumes, ", ".join(f"{x:.1f}" for x in landmarks))
    meta["preprocessing"]["standardisation"] = model_entry(volumes)
    extras = {"start_images": tdata.mean_start_images(train), "target_histogram": tdata.intensity_histogram(train),
              LANDMARKS: landmarks}
    from bidsharmony.flow.checkpoint import new_stage, publish_training

    stage = new_stage(opts.output_dir, "training")  # built aside, resumable, swapped in when finished
    summary = train_flow(train, val, cfg, stage, device=device, extras=extras, meta=meta, progress=sys.stderr.isatty() or opts.verbose > 0,
                         overwrite=opts.overwrite)  # fmt: skip
    publish_training(stage, opts.output_dir)
    LOG.info("trained %d steps in %.0f s; best validation %.4f bits/dim; model in %s", summary["steps"], summary["seconds"], summary["best_val_bpd"], opts.output_dir)
    return EXIT_OK


def _train_bhdiff(opts, runs, device: str, nprocs: int, work_dir: Path, log_dir: Path) -> int:
    """--method bhdiff train: the resample node per run, then flow matching on the volumes."""
    from dataclasses import asdict

    import nibabel as nb
    import numpy as np

    from bidsharmony import __version__
    from bidsharmony.bhdiff.train import BHDiffTrainConfig, prepare_volume, save_bhdiff_model, train_bhdiff
    from bidsharmony.image.slices import cut
    from bidsharmony.metrics import slice_histogram
    from bidsharmony.workflows.train import init_train_prep_wf

    wf = init_train_prep_wf(runs, voxel_size=1.2, omp_nthreads=1)
    wf.base_dir = str(work_dir)
    LOG.info("preprocessing %d T1w run(s) for bhdiff training", len(runs))
    graph = execute(wf, opts, nprocs, log_dir)
    files = sorted(n.result.outputs.out_file for n in graph.nodes() if n.name == "resample")
    volumes = [np.asanyarray(nb.load(f).dataobj, dtype=np.float32) for f in files]
    LOG.info("edges and normalisation of %d volume(s)", len(volumes))
    prepared = [prepare_volume(v) for v in volumes]
    hist = slice_histogram(np.concatenate([s[r.harmonize.astype(bool)] for s, r in (cut(v) for v in volumes)]))
    steps, batch = train_params(opts, device)
    cfg = BHDiffTrainConfig(preset=opts.bhdiff_preset, steps=steps, batch_size=batch,
                            learning_rate=opts.learning_rate, patch=opts.train_patch,
                            checkpoint_every=opts.checkpoint_every, seed=opts.random_seed, amp=opts.amp)  # fmt: skip
    from bidsharmony.flow.checkpoint import new_stage, publish_training

    stage = new_stage(opts.output_dir, "training")  # built aside, resumable, swapped in when finished
    result = train_bhdiff(prepared, cfg, stage, device=device, progress=opts.verbose > 0, overwrite=opts.overwrite)
    meta = {"name": opts.model_name or opts.output_dir.resolve().name, "preset": opts.bhdiff_preset, "software_version": __version__,
            "method": "bhdiff", "target_histogram": [round(float(x), 5) for x in hist],
            "training": {**asdict(cfg), "device": device, "seconds_last_run": round(result["seconds"], 1),
                         "final_loss_mean_last_50": round(float(np.mean(result["losses"][-50:])), 5)},
            "training_data": {"dataset": str(opts.bids_dir.resolve()), "volumes": len(volumes),
                              "subjects": sorted({r["entities"]["subject"] for r in runs})},
            "preprocessing": {"voxel_size": 1.2, "orientation": "RAS", "intensity": "head 0.5/99.5 % to [-1, 1], clipped",
                              "edges": "3D Canny on the rank-transformed head (bidsharmony.bhdiff.edges)"}}  # fmt: skip
    save_bhdiff_model(stage, result["ema"], meta)
    publish_training(stage, opts.output_dir)
    LOG.info("trained %d steps in %.0f s; model in %s", result["steps"], result["seconds"], opts.output_dir)
    return EXIT_OK
