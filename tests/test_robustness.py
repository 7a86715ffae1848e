"""The robustness catalogue (docs/robustness.md): bad inputs, faults, kills, concurrency, a full disk.

Rows already covered elsewhere are named in the catalogue; this file holds the rest. Bad files are
generated here; every error is checked for its exit code and its one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bidsharmony.cli.run import main
from bidsharmony.errors import EXIT_BIDS_INVALID, EXIT_CANT_CREATE, EXIT_NO_FILES, EXIT_NO_INPUT, EXIT_USAGE, ImageError
from bidsharmony.image.io import load_t1w

from .conftest import RUN_OPTIONS, tree_digest


def _run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("bidsharmony: error")]
    assert len(errors) <= 1 and "Traceback" not in err
    return code, err


def _outputs(out: Path) -> dict:
    """{relative path: sha256 of the voxel data} of every harmonized image under out."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(np.asanyarray(nb.load(str(p)).dataobj).tobytes()).hexdigest()
            for p in sorted(out.rglob("*_desc-harmonized_T1w.nii.gz"))}


def _no_partials(out: Path) -> None:
    assert not [p for p in out.rglob("*") if ".partial" in p.name], "partial files left in OUT_DIR"


# -- dataset -----------------------------------------------------------------------------------

def test_empty_dataset_description(capsys, tmp_path):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text("{}")
    code, err = _run(capsys, tmp_path / "bids", tmp_path / "out", "participant")
    assert code == EXIT_BIDS_INVALID and "dataset_description.json: must be a JSON object with 'Name'" in err


def test_bids_dir_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "bids.txt"
    f.write_text("x")
    code, err = _run(capsys, f, tmp_path / "out", "participant")
    assert code == EXIT_NO_INPUT and f"{f}: not a directory" in err


@pytest.mark.parametrize("label", ["../x", "a/b"])
def test_labels_with_path_characters(capsys, example_bids, tmp_path, label):
    code, err = _run(capsys, example_bids, tmp_path / "out", "participant", "--participant-label", label)
    assert code == EXIT_USAGE and label in err


def test_unknown_session(capsys, example_bids, tmp_path, tiny_model):
    code, err = _run(capsys, example_bids, tmp_path / "out", "participant", "--session-label", "9", "--model", tiny_model)
    assert code == EXIT_NO_FILES and "no T1w images found" in err


def test_filter_file_that_selects_nothing(capsys, example_bids, tmp_path, tiny_model):
    f = tmp_path / "filters.json"
    f.write_text(json.dumps({"t1w": {"acquisition": "nonexistent"}}))
    code, err = _run(capsys, example_bids, tmp_path / "out", "participant", "--bids-filter-file", f, "--model", tiny_model)
    assert code == EXIT_NO_FILES and "no T1w images found" in err and str(example_bids) in err


def test_output_dir_that_is_a_file(capsys, example_bids, tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    code, err = _run(capsys, example_bids, f, "participant")
    assert code == EXIT_CANT_CREATE and str(f) in err


def test_read_only_output_dir(capsys, example_bids, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount is the real case
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(out)], capture_output=True).returncode:
            pytest.skip("running as root and cannot mount a read-only tmpfs to make OUT_DIR read-only")
        mounted = True
    else:
        out.chmod(0o555)
    try:
        code, err = _run(capsys, example_bids, out, "participant")
        assert code == EXIT_CANT_CREATE and f"{out}: output directory is not writable" in err
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)
        out.chmod(0o755)


# -- images ------------------------------------------------------------------------------------

def test_2d_image_is_refused(tmp_path):
    p = tmp_path / "sub-01_T1w.nii.gz"
    nb.save(nb.Nifti1Image(np.ones((20, 20), np.float32), np.eye(4)), str(p))
    with pytest.raises(ImageError, match="expected a 3D volume") as e:
        load_t1w(p)
    assert str(p) in str(e.value)


def test_integer_image_with_scale_factors_is_read_in_physical_units(tmp_path):
    p = tmp_path / "sub-01_T1w.nii.gz"
    raw = np.arange(30 * 40 * 6, dtype=np.int16).reshape(30, 40, 6)  # enough head in a slice to be harmonized
    img = nb.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.5, 10.0)
    nb.save(img, str(p))
    _, data = load_t1w(p)
    np.testing.assert_allclose(data, raw * 0.5 + 10.0)


def _head(shape, zooms, offset=0.0):
    """A smooth ellipsoidal 'head' with some inner structure, in mm."""
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * z for n, z in zip(shape, zooms)], indexing="ij")
    r = np.sqrt((grids[0] / 70) ** 2 + (grids[1] / 85) ** 2 + (grids[2] / 65) ** 2)
    v = np.where(r < 1, 600 + 400 * np.cos(grids[0] / 6) * (r < 0.7), 0).astype(np.float32)
    return v + offset


@pytest.mark.parametrize("case", ["negative values", "anisotropic 1x1x3 mm", "field of view smaller than the grid"])
def test_unusual_volumes_go_through_the_slice_path_and_back(tiny_model, case):
    from bidsharmony.flow.checkpoint import load_model
    from bidsharmony.harmonize.solvers import HarmonizeParams
    from bidsharmony.harmonize.volume import harmonize_volume
    from bidsharmony.image.resample import canonical, resample_isotropic
    from bidsharmony.image.slices import assemble, cut

    shape, zooms, offset = {"negative values": ((120, 140, 110), (1.5, 1.5, 1.5), -500.0),
                            "anisotropic 1x1x3 mm": ((150, 180, 50), (1.0, 1.0, 3.0), 0.0),
                            "field of view smaller than the grid": ((40, 40, 40), (1.0, 1.0, 1.0), 0.0)}[case]
    data = _head(shape, zooms, offset)
    affine = np.diag([*zooms, 1.0])
    vol, _ = resample_isotropic(*canonical(data, affine), 1.2)
    extent = np.array(shape) * np.array(zooms)
    np.testing.assert_allclose(np.array(vol.shape) * 1.2, extent, atol=2.5)  # same field of view
    slices, record = cut(vol)
    assert slices.shape[1:] == (144, 176) and np.isfinite(slices).all()
    np.testing.assert_allclose(assemble(slices, record, vol), vol, atol=1e-3 * np.ptp(vol))  # exact undo
    out = harmonize_volume(slices, record, load_model(tiny_model), HarmonizeParams(iterations=1).validate())
    back = assemble(out, record, vol)
    assert np.isfinite(back).all() and back.shape == vol.shape
    assert back.min() >= vol.min() - 0.05 * np.ptp(vol)  # stays in the volume's own units (negative too)


def test_a_large_volume_keeps_memory_bounded(tmp_path):
    """400 × 400 × 300 voxels at 0.6 mm (192 MB of float32) through load, resample and the slice
    grid in a fresh process: memory beyond the imports stays within 8× the volume (measured ≈ 6×:
    the data, its RAS copy, the ITK image and the resampled volume)."""
    p = tmp_path / "big.nii.gz"
    data = _head((400, 400, 300), (0.6, 0.6, 0.6))
    nb.save(nb.Nifti1Image(data, np.diag([0.6, 0.6, 0.6, 1.0])), str(p))
    code = ("import resource, ants, torch; from bidsharmony.image.io import load_t1w; "
            "from bidsharmony.image.resample import canonical, resample_isotropic; from bidsharmony.image.slices import cut; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"img, d = load_t1w({str(p)!r}); v, a = resample_isotropic(*canonical(d, img.affine), 1.2); s, r = cut(v); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, s.shape[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra_mib, n_slices = (int(v) for v in proc.stdout.split())
    assert n_slices == 150
    assert extra_mib < 8 * data.nbytes / 2**20, f"{extra_mib} MiB beyond the imports for a {data.nbytes / 2**20:.0f} MiB volume"


def test_device_auto_without_a_gpu_falls_back_to_the_cpu_with_a_warning(caplog):
    import torch

    from bidsharmony.device import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with caplog.at_level("WARNING", logger="bidsharmony"):
        assert resolve_device("auto") == "cpu"
    assert "no CUDA GPU found: running on the CPU" in caplog.text


# -- runtime: stale partials, a full disk, kills, concurrency ---------------------------------

def test_stale_partial_files_of_dead_writers_are_removed(tmp_path):
    from bidsharmony.outputs import remove_stale_partials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "sub-01" / "anat" / f".sub-01_T1w.nii.gz.{dead.pid}.partial.nii.gz"
    live = tmp_path / f".dataset_description.json.{os.getpid()}.partial.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("x")
    live.write_text("x")
    assert remove_stale_partials(tmp_path) == [stale]
    assert not stale.exists() and live.exists()


def _cli(bids, out, work, model, *extra):
    return [sys.executable, "-m", "bidsharmony", str(bids), str(out), "participant", "--model", str(model),
            "--nprocs", "1", "--omp-nthreads", "1", "-w", str(work), "--device", "cpu", *RUN_OPTIONS, *extra]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_a_clear_error_and_a_rerun_finishes(participant_run, tiny_model, tmp_path):
    """The kernel refuses writes past a file-size limit, as on a full disk: the run stops with exit
    73 and one line naming the file; nothing partial is left in OUT_DIR; with room again, the rerun
    finishes with the uninterrupted outputs."""
    out, work = tmp_path / "out", tmp_path / "work"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    proc = subprocess.run(_cli(participant_run["bids"], out, work, tiny_model), capture_output=True, text=True, preexec_fn=limit)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("bidsharmony: error")]
    assert proc.returncode == EXIT_CANT_CREATE, proc.stderr[-2000:]
    assert len(errors) == 1 and "cannot write" in errors[0] and "File too large" in errors[0] and str(tmp_path) in errors[0]
    _no_partials(out)
    assert not list(out.rglob("*_desc-harmonized_T1w.nii.gz"))
    rerun = subprocess.run(_cli(participant_run["bids"], out, work, tiny_model), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _outputs(out) == _outputs(participant_run["out"])


def test_a_full_disk_while_writing_an_output_leaves_no_partial_file(tmp_path):
    """The derivatives sink itself (a real Nipype interface run) hitting the limit mid-file."""
    src = tmp_path / "in.nii.gz"
    nb.save(nb.Nifti1Image(np.random.default_rng(0).random((40, 40, 40), dtype=np.float32), np.eye(4)), str(src))
    out = tmp_path / "out"
    code = ("import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "from bidsharmony.interfaces.derivatives import DerivativesSink; "
            f"DerivativesSink(in_file={str(src)!r}, out_dir={str(out)!r}, entities={{'subject': '01'}}, "
            "source_relpath='sub-01/anat/sub-01_T1w.nii.gz').run()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "OutputError" in proc.stderr and "sub-01_desc-harmonized_T1w.nii.gz: cannot write (File too large)" in proc.stderr
    assert not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_mid_run_then_rerun_gives_the_uninterrupted_outputs(participant_run, tiny_model, tmp_path, sig):
    """Killed once the first harmonization has finished (the test's chosen point), the rerun
    resumes from the work directory and its outputs match an uninterrupted run's bit for bit."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(_cli(participant_run["bids"], out, work, tiny_model), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not list(work.rglob("harmonize/result_harmonize.pklz")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -sig
    if sig == signal.SIGTERM:
        assert "terminated; rerun the same command to resume" in err
    finished = len(list(work.rglob("harmonize/result_harmonize.pklz")))
    assert finished < 4, "the run was not interrupted"
    rerun = subprocess.run(_cli(participant_run["bids"], out, work, tiny_model), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _outputs(out) == _outputs(participant_run["out"])
    _no_partials(out)


@pytest.mark.slow
def test_two_runs_on_different_participants_into_one_output_dir_at_once(participant_run, tiny_model, tmp_path):
    out = tmp_path / "out"
    before = tree_digest(participant_run["bids"])
    procs = [subprocess.Popen(_cli(participant_run["bids"], out, tmp_path / f"work-{s}", tiny_model, "--participant-label", s),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in ("01", "02")]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
    assert _outputs(out) == _outputs(participant_run["out"])
    json.loads((out / "dataset_description.json").read_text())  # written by both, intact
    _no_partials(out)
    assert tree_digest(participant_run["bids"]) == before
