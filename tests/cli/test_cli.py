"""The CLI end to end: exit codes and one-line errors, and the outputs of a real participant run."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bidsharmony.cli.run import main
from bidsharmony.errors import (
    EXIT_BIDS_INVALID,
    EXIT_CANT_CREATE,
    EXIT_NO_FILES,
    EXIT_NO_INPUT,
    EXIT_UNKNOWN_LEVEL,
    EXIT_USAGE,
)
from tests.conftest import RUN_OPTIONS, tree_digest


def _run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def test_help_and_version_do_not_import_torch():
    code = "import sys; from bidsharmony.cli.parser import build_parser; build_parser().format_help(); print('torch' in sys.modules, 'ants' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
    proc = subprocess.run([sys.executable, "-m", "bidsharmony", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("bidsharmony ")


def test_unknown_analysis_level(capsys, example_bids, tmp_path):
    code, err = _run(capsys, example_bids, tmp_path / "out", "subject")
    assert code == EXIT_UNKNOWN_LEVEL and "unknown analysis level 'subject'" in err


@pytest.mark.parametrize("args", [["--mem", "8XB"], ["--device", "gpu"], ["--iterations", "-1"], ["--bogus"]])
def test_usage_errors_exit_64(example_bids, tmp_path, args):
    with pytest.raises(SystemExit) as e:
        main([str(example_bids), str(tmp_path / "out"), "participant", *args])
    assert e.value.code == EXIT_USAGE


def test_missing_bids_dir(capsys, tmp_path):
    code, err = _run(capsys, tmp_path / "nope", tmp_path / "out", "participant")
    assert code == EXIT_NO_INPUT and f"{tmp_path / 'nope'}: BIDS directory not found" in err


def test_missing_dataset_description(capsys, tmp_path):
    (tmp_path / "bids" / "sub-01" / "anat").mkdir(parents=True)
    code, err = _run(capsys, tmp_path / "bids", tmp_path / "out", "participant")
    assert code == EXIT_BIDS_INVALID and "dataset_description.json: missing" in err
    (tmp_path / "bids" / "dataset_description.json").write_text("")
    code, err = _run(capsys, tmp_path / "bids", tmp_path / "out", "participant")
    assert code == EXIT_BIDS_INVALID and "'Name' and 'BIDSVersion'" in err


def test_skip_bids_validation_accepts_a_dataset_without_description(capsys, example_bids, tmp_path, tiny_model):
    bids = tmp_path / "bids"
    src = example_bids / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    shutil.copyfile(src, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    args = [bids, tmp_path / "out", "participant", "--model", tiny_model, "--iterations", "1", "-w", tmp_path / "w", "--device", "cpu"]
    code, err = _run(capsys, *args)
    assert code == EXIT_BIDS_INVALID
    code, err = _run(capsys, *args, "--skip-bids-validation")
    assert code == 0 and "missing; continuing because of --skip-bids-validation" in err
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-harmonized_T1w.nii.gz").is_file()


def test_output_inside_input(capsys, example_bids):
    code, err = _run(capsys, example_bids, example_bids / "derivatives" / "x", "participant")
    assert code == EXIT_CANT_CREATE and "inside the BIDS directory" in err


def test_unknown_participant_and_no_t1w(capsys, example_bids, tmp_path, tiny_model):
    code, err = _run(capsys, example_bids, tmp_path / "o", "participant", "--participant-label", "sub-99", "--model", tiny_model)
    assert code == EXIT_NO_INPUT and "participant(s) not found: sub-99" in err
    code, err = _run(capsys, example_bids, tmp_path / "o", "participant", "--session-label", "9", "--model", tiny_model)
    assert code == EXIT_NO_FILES and "no T1w images found" in err
    code, err = _run(capsys, example_bids, tmp_path / "o", "participant", "--participant-label", "../x")
    assert code == EXIT_USAGE and "invalid sub label" in err


def test_unreadable_nifti_names_the_file(capsys, example_bids, tmp_path, tiny_model):
    bids = tmp_path / "bids"
    shutil.copytree(example_bids, bids)
    bids.chmod(0o755)
    bad = bids / "sub-02" / "anat" / "sub-02_run-1_T1w.nii.gz"
    bad.chmod(0o644)
    bad.write_bytes(bad.read_bytes()[:300])  # truncated gzip
    # bidsharmony's own reader, past the BIDS validator (which reports the file too: tests/test_validation.py)
    code, err = _run(capsys, bids, tmp_path / "out", "participant", "--model", tiny_model, "--skip-bids-validation")
    assert code == EXIT_NO_INPUT and f"{bad}: not a readable NIfTI" in err
    errors = [ln for ln in err.splitlines() if ln.startswith("bidsharmony: error")]
    assert len(errors) == 1 and "Traceback" not in err


def test_missing_model(capsys, example_bids, tmp_path):
    code, err = _run(capsys, example_bids, tmp_path / "o", "participant", "--model", tmp_path / "nomodel")
    assert code == EXIT_NO_INPUT and "model folder not found" in err


# --- a real participant run (fixture in conftest) -------------------------------------------


def _outputs(run):
    return sorted(Path(run["out"]).glob("sub-*/**/anat/*_desc-harmonized_T1w.nii.gz"))


def test_participant_run_succeeds_and_names_outputs(participant_run):
    assert participant_run["code"] == 0
    names = [p.relative_to(participant_run["out"]).as_posix() for p in _outputs(participant_run)]
    assert names == [
        "sub-01/ses-1/anat/sub-01_ses-1_desc-harmonized_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_desc-harmonized_T1w.nii.gz",
        "sub-02/anat/sub-02_run-1_desc-harmonized_T1w.nii.gz",
        "sub-02/anat/sub-02_run-2_desc-harmonized_T1w.nii.gz",
    ]
    assert not list(Path(participant_run["out"]).rglob("*.partial*"))


def test_native_outputs_keep_the_input_grid(participant_run):
    for out in _outputs(participant_run):
        rel = out.relative_to(participant_run["out"]).as_posix().replace("_desc-harmonized", "")
        src = nb.load(participant_run["bids"] / rel)
        img = nb.load(out)
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-6)
        assert nb.aff2axcodes(img.affine) == nb.aff2axcodes(src.affine)
        data = img.get_fdata()
        assert np.isfinite(data).all()
        # Harmonization changes the image, but keeps its anatomy.
        orig = src.get_fdata()
        assert not np.allclose(data, orig)
        assert np.corrcoef(data.ravel(), orig.ravel())[0, 1] > 0.9


def test_sidecars_record_provenance(participant_run, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    from bidsharmony import __version__

    for out in _outputs(participant_run):
        meta = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
        rel = out.relative_to(participant_run["out"]).as_posix().replace("_desc-harmonized", "")
        assert meta["Sources"] == [f"bids:raw:{rel}"]
        assert meta["Model"]["Sha256"] == config["weights_sha256"]
        assert meta["Model"]["Preset"] == "tiny"
        assert meta["Parameters"] == {
            "iterations": 2, "alpha": 0.001, "beta_fidelity": 1000.0, "beta_gradient": 0.001, "similarity": "cosine",
            "start": "source", "solver": "alternating", "latent_lr": 0.05, "batch_size": 8, "seed": 0,
            "standardise": "landmarks",  # auto, resolved: the model train wrote has landmarks
            "classes": "none",  # the class pass is opt-in
            "landmark_region": "head",  # the learned brain mask is opt-in
            "detail": "match",  # auto, resolved: and a detail band
            "denoiser": "learned",  # auto, resolved: and a learned denoiser
            "field": "n4-typical",  # auto, resolved: and a typical field
        }  # fmt: skip
        assert meta["SoftwareVersion"] == __version__ and meta["Device"] == "cpu"
        assert meta["HarmonizationSeconds"] > 0 and 0 < meta["SlicesHarmonized"] <= meta["SlicesTotal"]


def test_derivatives_dataset_is_indexed_by_pybids(participant_run):
    from bids import BIDSLayout

    desc = json.loads((participant_run["out"] / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "bidsharmony"
    assert desc["SourceDatasets"][0]["URL"] == participant_run["bids"].resolve().as_uri()
    layout = BIDSLayout(str(participant_run["out"]), validate=False, is_derivative=True)
    found = layout.get(desc="harmonized", suffix="T1w", extension=".nii.gz")
    assert len(found) == 4
    assert sorted(layout.get_subjects()) == ["01", "02"]


def test_input_dataset_is_not_written(participant_run):
    assert tree_digest(participant_run["bids"]) == participant_run["before"]


def _slice_jumps(data, mask):
    means = np.array([data[..., k][mask[..., k]].mean() for k in range(data.shape[2]) if mask[..., k].sum() > 50])
    return np.abs(np.diff(means)).mean()


def test_no_slice_to_slice_steps_are_introduced(participant_run):
    """Mean absolute jump of brain-slice means between neighbouring axial slices, output vs input."""
    for out in _outputs(participant_run):
        rel = out.relative_to(participant_run["out"]).as_posix().replace("_desc-harmonized", "")
        src = nb.as_closest_canonical(nb.load(participant_run["bids"] / rel))
        img = nb.as_closest_canonical(nb.load(out))
        orig, harm = src.get_fdata(), img.get_fdata()
        mask = orig > 0.2 * np.percentile(orig, 99)
        ratio = _slice_jumps(harm, mask) / _slice_jumps(orig, mask)
        assert ratio < 1.5, f"{out.name}: slice-to-slice jumps grew {ratio:.2f}x"


def test_rerun_reuses_finished_nodes(capsys, participant_run, tiny_model):
    """A rerun with the same work directory does not redo the harmonization (Nipype cache)."""
    from bidsharmony import __version__

    top = Path(participant_run["work"]) / f"bidsharmony_{__version__.replace('.', '_')}_wf"  # a new version never reuses these
    result = next(top.rglob("harmonize/result_harmonize.pklz"))
    before = result.stat().st_mtime_ns
    code = main([str(participant_run["bids"]), str(participant_run["out"]), "participant", "--model", str(tiny_model),
                 "--nprocs", "1", "-w", str(participant_run["work"]), "--device", "cpu", *RUN_OPTIONS])  # fmt: skip
    assert code == 0
    assert result.stat().st_mtime_ns == before
    n = len(list(Path(participant_run["out"]).rglob("*_desc-harmonized_T1w.nii.gz")))
    err = capsys.readouterr().err
    assert re.search(rf"harmonized {n}/{n}: sub_\w+ \((0 s|reused)\)", err)  # progress counts the cached runs too


def test_subprocess_run_in_harmonization_space(example_bids, tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bidsharmony", str(example_bids), str(out), "participant", "--participant-label", "02",
         "--bids-filter-file", str(_filter(tmp_path)), "--model", str(tiny_model), "--output-space", "harmonization",
         "--nprocs", "1", "-w", str(tmp_path / "w"), "--device", "cpu", "--iterations", "2"],  # fmt: skip
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"resampled 1/1: sub_02_run_2 \(\d+ s\)", proc.stderr)  # progress, in the main process
    assert re.search(r"harmonized 1/1: sub_02_run_2 \(\d+ s\)", proc.stderr)
    files = sorted(out.rglob("*_desc-harmonized_T1w.nii.gz"))
    assert [f.name for f in files] == ["sub-02_run-2_res-1p2_desc-harmonized_T1w.nii.gz"]
    img = nb.load(files[0])
    assert nb.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms()[:3], 1.2, atol=1e-5)
    meta = json.loads(files[0].with_name(files[0].name.replace(".nii.gz", ".json")).read_text())
    assert meta["Parameters"]["iterations"] == 2


def _filter(tmp_path):
    f = tmp_path / "filter.json"
    f.write_text(json.dumps({"t1w": {"run": 2}}))
    return f


def test_group_level_summarises_participant_outputs(participant_run):
    code = main([str(participant_run["bids"]), str(participant_run["out"]), "group"])
    assert code == 0
    rows = (participant_run["out"] / "group.tsv").read_text().strip().splitlines()
    header = rows[0].split("\t")
    assert header[0] == "file" and {"model", "model_sha256", "scanner", "slice_step_ratio"} <= set(header) and len(rows) == 5


def test_cuda_without_a_gpu_is_a_clear_error(capsys, example_bids, tmp_path, tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, err = _run(capsys, example_bids, tmp_path / "o", "participant", "--model", tiny_model, "--device", "cuda")
    assert code == 1 and "--device cuda: no CUDA GPU is available" in err


def test_plugin_file(capsys, example_bids, tmp_path, tiny_model):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\nplugin_args: {}\n")
    code, _ = _run(capsys, example_bids, tmp_path / "o", "participant", "--participant-label", "01", "--session-label", "1",
                   "--model", tiny_model, "--use-plugin", plugin, "--iterations", "1", "-w", tmp_path / "w", "--device", "cpu")  # fmt: skip
    assert code == 0 and (tmp_path / "o" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-harmonized_T1w.nii.gz").is_file()
    plugin.write_text("plugins: [Linear]\n")
    code, err = _run(capsys, example_bids, tmp_path / "o", "participant", "--model", tiny_model, "--use-plugin", plugin)
    assert code == 64 and "not a Nipype plugin YAML" in err
