"""Shared fixtures: a real-anatomy BIDS dataset, a tiny model trained by the real train level,
and one participant run of the real CLI whose outputs many tests inspect."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The harmonization options of participant_run: the flow loop on (the default runs none), short.
# A test that reruns that run, or compares with its outputs, passes the same.
RUN_OPTIONS = ("--iterations", "2")


def tree_digest(root: Path) -> dict:
    """{relative path: sha256} of every file under root (to prove a tree was not written)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def make_read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="session")
def example_bids(tmp_path_factory) -> Path:
    from bidsharmony.example import build_example

    root = build_example(tmp_path_factory.mktemp("data") / "bids")
    make_read_only(root)
    return root


@pytest.fixture(scope="session")
def tiny_model(example_bids, tmp_path_factory) -> Path:
    from bidsharmony.cli.run import main

    out = tmp_path_factory.mktemp("models") / "tiny"
    work = tmp_path_factory.mktemp("work-train")
    code = main([str(example_bids), str(out), "train", "--preset", "tiny", "--steps", "30", "--train-batch-size", "16",
                 "--val-every", "15", "--checkpoint-every", "15", "--nprocs", "1", "-w", str(work), "--device", "cpu",
                 "--denoiser-steps", "20"])  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="session")
def participant_run(example_bids, tiny_model, tmp_path_factory):
    """Runs `bidsharmony BIDS OUT participant` once (in-process, MultiProc with 2 workers), with the
    flow loop on (2 iterations; the default runs none), so that every stage is exercised."""
    from bidsharmony.cli.run import main

    before = tree_digest(example_bids)
    out = tmp_path_factory.mktemp("deriv") / "out"
    work = tmp_path_factory.mktemp("work-participant")
    code = main([str(example_bids), str(out), "participant", "--model", str(tiny_model), "--nprocs", "2",
                 "--omp-nthreads", "1", "-w", str(work), "--device", "cpu", *RUN_OPTIONS])  # fmt: skip
    return {"code": code, "out": out, "work": work, "bids": example_bids, "before": before}


@pytest.fixture(scope="session")
def real_slices():
    """Normalised axial slices of one real IXI head (skips where ../shared/data is absent)."""
    path = SHARED_DATA / "ixi-hh" / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
    if not path.is_file():
        pytest.skip(f"real data not available at {path}")
    from bidsharmony.image.io import load_t1w
    from bidsharmony.image.resample import canonical, resample_isotropic
    from bidsharmony.image.slices import cut

    img, data = load_t1w(path)
    vol, aff = resample_isotropic(*canonical(data, img.affine), 1.2)
    slices, record = cut(vol)
    return slices[record.harmonize]


@pytest.fixture(autouse=True, scope="session")
def _threads():
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    import torch

    torch.set_num_threads(2)
