"""The train level: the runs, the device and the work directory; the method (``methods/``)
preprocesses the target dataset with its own nodes and fits its model."""

from __future__ import annotations

import logging
from pathlib import Path

from bidsharmony import methods
from bidsharmony.cli.execution import clean_work_dir, execute
from bidsharmony.cli.selection import check_images, select_runs
from bidsharmony.errors import EXIT_OK

LOG = logging.getLogger("bidsharmony")


def train_params(opts, device: str) -> tuple[int, int]:
    """Steps and batch size of a training: the options, or the method's defaults for the device (a
    CPU step on 256 slices takes seconds and gigabytes; 10 000 of them would run for hours)."""
    defaults, why = methods.get(opts.method).train_defaults(device.startswith("cuda"))
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

    from bidsharmony.device import resolve_device

    method = methods.get(opts.method)
    runs = select_runs(opts)
    check_images(runs)
    device = resolve_device(opts.device)
    torch.set_num_threads(omp)
    if opts.clean_workdir:
        clean_work_dir(work_dir, runs)

    def run_workflow(wf):
        wf.base_dir = str(work_dir)
        return execute(wf, opts, nprocs, log_dir)

    steps, batch = train_params(opts, device)
    method.train(opts, runs, device=device, steps=steps, batch=batch, run_workflow=run_workflow)
    return EXIT_OK
