"""Guarded allocations and one-line errors (docs/robustness.md): headers that lie about their size,
corrupt extensions and affines, volumes without head, --mem, files where directories go, plugin
YAML, broken sidecars, repeated labels and filter files. Bad files are generated here; every error
is checked through the real CLI for its exit code and its one line naming the file."""

from __future__ import annotations

import gzip
import json
import struct
import tracemalloc
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bidsharmony.cli.run import main
from bidsharmony.errors import EXIT_CANT_CREATE, EXIT_NO_FILES, EXIT_NO_INPUT, EXIT_USAGE, ImageError
from bidsharmony.example import source_head
from bidsharmony.image.io import load_t1w

from .conftest import tree_digest


def _run(capsys, *args):
    """The real CLI in-process: (exit code, the one error line); never a traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("bidsharmony: error")]
    assert "Traceback" not in err and "warnings.warn" not in err, err
    assert len(errors) == (code != 0), err
    return code, errors[0] if errors else ""


def _dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A one-image BIDS dataset; returns (BIDS_DIR, the T1w path to write)."""
    bids = tmp_path / "bids"
    (bids / "sub-01" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "guards", "BIDSVersion": "1.10.0"}))
    return bids, bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"


def _header(shape, dtype=np.float32) -> bytes:
    h = nb.Nifti1Header()
    h.set_data_shape(shape)
    h.set_data_dtype(dtype)
    h["vox_offset"] = 352
    h.set_sform(np.eye(4), code=1)
    return h.binaryblock + b"\0" * 4


def _with_header_fields(path: Path, **fields) -> None:
    """A valid head image whose header fields are then overwritten (as a broken writer would)."""
    data, aff = source_head()
    hdr = nb.Nifti1Image(data, aff).header
    hdr["vox_offset"] = 352
    for k, v in fields.items():
        hdr[k] = v
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + data.astype(np.float32).tobytes(order="F")))


def _corrupt_extension(path: Path) -> None:
    """A comment extension whose declared size (16) is shorter than its content."""
    data, aff = source_head()
    img = nb.Nifti1Image(data, aff)
    img.header.extensions.append(nb.nifti1.Nifti1Extension(6, b"a comment of some length"))
    nb.save(img, str(path.with_suffix("")))  # .nii
    raw = bytearray(path.with_suffix("").read_bytes())
    path.with_suffix("").unlink()
    assert raw[348] == 1 and struct.unpack("<i", raw[356:360])[0] == 6
    raw[352:356] = struct.pack("<i", 16)
    path.write_bytes(gzip.compress(bytes(raw)))


# -- 1. a header that declares more than the file holds ------------------------------------------

def _huge(path):  # 32000³ floats: a MemoryError (or a killed machine) before
    path.write_bytes(gzip.compress(_header((32000, 32000, 32000)) + b"\1" * 1000))


def _lying_gzip(path):  # 600 MB declared in a few hundred bytes: beyond what deflate can hold
    path.write_bytes(gzip.compress(_header((600, 500, 500)) + b"\1" * 2000))


def _lying_trailer(path):  # 400 MB declared in 2 MB of incompressible gzip: only the trailer tells
    noise = np.random.default_rng(0).integers(0, 255, 2_000_000, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(_header((500, 500, 400)) + noise, compresslevel=1))


def _short_nii(path):
    path.write_bytes(_header((500, 500, 400)) + b"\1" * 2000)


@pytest.mark.parametrize("write, name", [(_huge, "sub-01_T1w.nii.gz"), (_lying_gzip, "sub-01_T1w.nii.gz"),
                                         (_lying_trailer, "sub-01_T1w.nii.gz"), (_short_nii, "sub-01_T1w.nii")],
                         ids=["32000 cubed", "600 MB in a tiny gzip", "400 MB in 2 MB of gzip", "short .nii"])  # fmt: skip
def test_a_header_declaring_more_than_the_file_holds_is_refused_before_allocating(tmp_path, write, name):
    path = tmp_path / name
    write(path)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=r"header declares shape \(") as e:
            load_t1w(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated before the header was refused"


def test_a_multi_member_gzip_whose_trailer_holds_only_the_last_member_still_loads(tmp_path):
    """The trailer check must not refuse a valid file: a mismatch is settled by counting."""
    data, aff = source_head()
    hdr = nb.Nifti1Image(data.astype(np.float32), aff).header
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + data.astype(np.float32).tobytes(order="F")
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(raw[:50_000]) + gzip.compress(raw[50_000:]))
    np.testing.assert_array_equal(load_t1w(path)[1], data)


# -- 1, 2, 8 through the CLI: one line naming the file, exit 66 ----------------------------------

def _zero_sform(path):
    _with_header_fields(path, srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0], sform_code=1, qform_code=0)


def _nan_qform(path):
    _with_header_fields(path, quatern_b=np.nan, sform_code=0, qform_code=1)


def _collinear_sform(path):
    _with_header_fields(path, srow_x=[1, 1, 0, 0], srow_y=[1, 1, 0, 0], srow_z=[0, 0, 1, 0], sform_code=1, qform_code=0)


def _two_cubed(path):
    nb.save(nb.Nifti1Image(np.arange(8, dtype=np.float32).reshape(2, 2, 2), np.eye(4)), str(path))


@pytest.mark.parametrize("write, cause", [
    (_huge, "header declares shape (32000, 32000, 32000)"),
    (_lying_gzip, "header declares shape (600, 500, 500) float32"),
    (_corrupt_extension, "not a readable NIfTI image (HeaderDataError"),
    (_zero_sform, "the affine (sform) is singular"),
    (_nan_qform, "the affine (qform) has non-finite values"),
    (_collinear_sform, "the affine (sform) is singular"),
    (_two_cubed, "no axial slice holds enough head to harmonize (shape (2, 2, 2)"),
], ids=["32000 cubed", "lying gzip", "corrupt extension", "zero sform", "NaN qform", "collinear sform", "2x2x2"])  # fmt: skip
def test_bad_images_are_one_line_naming_the_file(capsys, tmp_path, write, cause):
    bids, t1w = _dataset(tmp_path)
    write(t1w)
    code, line = _run(capsys, bids, tmp_path / "out", "participant", "--skip-bids-validation", "--device", "cpu")
    assert code == EXIT_NO_INPUT
    assert line.startswith(f"bidsharmony: error: {t1w}: ") and cause in line


def test_a_run_that_harmonized_nothing_fails_naming_the_file(tmp_path):
    """The backstop behind the up-front check: the reassembly refuses a cut without a harmonized
    slice (the real Nipype interface), instead of writing the input back as 'harmonized'."""
    from bidsharmony.image.slices import cut
    from bidsharmony.interfaces.slicing import Reassemble

    vol = np.zeros((40, 40, 40), np.float32)
    vol[20, 20, 20] = 1.0  # one voxel of 'head'
    slices, record = cut(vol)
    assert not record.harmonize.any()
    np.save(tmp_path / "s.npy", slices)
    record.save(tmp_path / "r.npz")
    nb.save(nb.Nifti1Image(vol, np.diag([1.2, 1.2, 1.2, 1])), str(tmp_path / "res.nii.gz"))
    t1w = tmp_path / "sub-01_T1w.nii.gz"
    nb.save(nb.Nifti1Image(vol, np.diag([1.2, 1.2, 1.2, 1])), str(t1w))
    node = Reassemble(slices=str(tmp_path / "s.npy"), record=str(tmp_path / "r.npz"), resampled=str(tmp_path / "res.nii.gz"),
                      in_file=str(t1w), output_space="harmonization")  # fmt: skip
    with pytest.raises(ImageError, match="no slice held enough head") as e:
        node.run(cwd=str(tmp_path))
    assert str(t1w) in str(e.value)


# -- 3. --mem ----------------------------------------------------------------------------------

def test_mem_in_plain_megabytes_as_fmriprep():
    from bidsharmony.cli.parser import memory_gb

    assert memory_gb("8000") == 8.0 and memory_gb("500MB") == 0.5 and memory_gb("8GB") == 8.0


def test_mem_below_one_node_is_refused_before_anything_is_written(capsys, example_bids, tmp_path):
    """--mem 5MB used to hang for ever: MultiProc never schedules a node when less is free."""
    out = tmp_path / "out"
    code, line = _run(capsys, example_bids, out, "participant", "--mem", "5MB", "--nprocs", "2", "--skip-bids-validation")
    assert code == EXIT_USAGE and line.startswith("bidsharmony: error: --mem: ") and "at least 1.5GB" in line
    assert not out.exists()


def test_mem_below_the_built_workflows_largest_node_is_refused_before_it_runs(capsys, example_bids, tmp_path):
    """A harmonize node can declare more than the fixed minimum (large batches): the built workflow
    is compared before Nipype starts."""
    out = tmp_path / "out"
    code, line = _run(capsys, example_bids, out, "participant", "--participant-label", "02", "--mem", "2GB",
                      "--batch-size", "512", "--nprocs", "2", "--device", "cpu", "-w", tmp_path / "w", "--skip-bids-validation")  # fmt: skip
    assert code == EXIT_USAGE and "the harmonize node needs" in line and "give at least" in line
    assert not list(out.rglob("*_desc-harmonized_T1w.nii.gz")) and not list((tmp_path / "w").glob("bidsharmony_*"))


def test_min_mem_is_the_largest_fixed_node_of_every_workflow(example_bids, tmp_path):
    """MIN_MEM_GB (checked before anything is written) is what the nodes declare, harmonize aside
    (its figure depends on the model and batch, and is checked on the built workflow)."""
    from bidsharmony import bids
    from bidsharmony.cli.execution import MIN_MEM_GB
    from bidsharmony.models import default_model
    from bidsharmony.workflows.base import init_bidsharmony_wf
    from bidsharmony.workflows.bhdiff import init_bhdiff_wf
    from bidsharmony.workflows.train import init_train_prep_wf

    runs = bids.collect_t1w(example_bids)
    (tmp_path / "bhdiff").mkdir()
    (tmp_path / "bhdiff" / "config.json").write_text(json.dumps({"architecture": {"base": 8}}))
    wfs = [init_bidsharmony_wf(runs=runs, out_dir=tmp_path / "out", model=default_model()),
           init_train_prep_wf(runs=runs, manifest=tmp_path / "manifest.json"), init_bhdiff_wf(model=tmp_path / "bhdiff")]
    fixed = [n.mem_gb for wf in wfs for n in wf._get_all_nodes() if n.name != "harmonize"]
    assert max(fixed) == MIN_MEM_GB


# -- 4. a file where a directory goes --------------------------------------------------------------

@pytest.mark.parametrize("where", ["logs", ".bidsharmony-work", "-w", "-w below"])
def test_a_file_where_a_directory_goes_is_one_line_and_writes_nothing(capsys, example_bids, tmp_path, where):
    out = tmp_path / "out"
    out.mkdir()
    blocker = {"logs": out / "logs", ".bidsharmony-work": out / ".bidsharmony-work"}.get(where, tmp_path / "work")
    blocker.write_text("x")
    extra = [] if not where.startswith("-w") else ["-w", blocker / "sub" if where == "-w below" else blocker]
    before = tree_digest(tmp_path)
    code, line = _run(capsys, example_bids, out, "participant", "--skip-bids-validation", *extra)
    assert code == EXIT_CANT_CREATE and line.startswith(f"bidsharmony: error: {blocker}: exists and is not a directory")
    assert tree_digest(tmp_path) == before


# -- 5. the plugin YAML --------------------------------------------------------------------------

@pytest.mark.parametrize("text, cause", [
    ("plugin: SLRUM\n", "unknown Nipype plugin 'SLRUM'; choose one of"),
    ("plugin: SLURM\nplugin_args: [max_jobs, 5]\n", "plugin_args must be a mapping"),
    ("plugin: SLURM\nplugin_args: {sbatch_args: [--partition=x]}\n", "plugin_args.sbatch_args must be a string"),
    ("plugin: MultiProc\nplugin_args: {n_procs: many}\n", "plugin_args.n_procs must be a positive integer"),
    ("plugin: SLURM\nnode_plugin_args: [harmonize]\n", "node_plugin_args must map node names"),
    ("plugin: SLURM\nnode_plugin_args: {harmonize: --gres=gpu:1}\n", "node_plugin_args.harmonize must be a mapping"),
    ("plugin: SLURM\nplugin_arg: {max_jobs: 5}\n", "unknown key(s) plugin_arg"),
    ("plugin: SLURM\nplugin_args: {max_jobs: 5\n", "not a readable YAML file"),
    ("plugin: MultiProc\nplugin_args: {memory_gb: 0.005}\n", "plugin_args.memory_gb: 0.005 GB is less than"),
], ids=["unknown plugin", "args a list", "sbatch_args a list", "n_procs a word", "node args a list",
        "node args a string", "misspelt key", "broken YAML", "memory_gb too small"])  # fmt: skip
def test_a_bad_plugin_yaml_is_refused_before_anything_is_written(capsys, example_bids, tmp_path, text, cause):
    plugin = tmp_path / "plugin.yml"
    plugin.write_text(text)
    out = tmp_path / "out"
    code, line = _run(capsys, example_bids, out, "participant", "--use-plugin", plugin, "--skip-bids-validation")
    assert code == EXIT_USAGE and line.startswith(f"bidsharmony: error: {plugin}: ") and cause in line
    assert not out.exists()


def test_every_plugin_name_nipype_provides_is_accepted(tmp_path):
    from bidsharmony.cli.execution import plugin_names, read_plugin_file

    assert {"Linear", "MultiProc", "SLURM", "SGE", "PBS", "LSF"} <= set(plugin_names())
    for name in plugin_names():
        (tmp_path / "p.yml").write_text(f"plugin: {name}\n")
        assert read_plugin_file(tmp_path / "p.yml")[0] == name


# -- 6. broken sidecars --------------------------------------------------------------------------

def _sidecars(out: Path, texts: dict) -> None:
    for stem, text in texts.items():
        p = out / stem.split("_")[0] / "anat" / f"{stem}_desc-harmonized_T1w.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "bidsharmony outputs", "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "bidsharmony"}]}))


_GOOD = json.dumps({"Model": {"Name": "m", "Sha256": "0" * 64}, "SlicesHarmonized": 90, "SourceScanner": {"Manufacturer": "X"},
                    "Quality": {"SimilarityToInput": 0.99, "HistogramDistanceBefore": 0.04, "HistogramDistanceAfter": 0.03,
                                "SliceStepRatio": 1.1}})  # fmt: skip


def test_the_group_level_skips_a_broken_sidecar_naming_it_and_summarises_the_rest(capsys, tmp_path):
    out = tmp_path / "out"
    _sidecars(out, {"sub-01": _GOOD, "sub-02": "{oops", "sub-03": "[1, 2]", "sub-04": '{"Quality": "high"}'})
    code = main([str(tmp_path / "bids"), str(out), "group"])
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err
    for sub in ("sub-02", "sub-03", "sub-04"):
        assert sum(f"{sub}_desc-harmonized_T1w.json: skipped: " in ln for ln in err.splitlines()) == 1
    rows = (out / "group.tsv").read_text().strip().splitlines()
    assert len(rows) == 2 and rows[1].startswith("sub-01/anat/")
    assert "sub-02/anat/sub-02_desc-harmonized_T1w.json: left out, not valid JSON" in (out / "group.html").read_text()


def test_the_group_level_with_only_broken_sidecars_says_so(capsys, tmp_path):
    out = tmp_path / "out"
    _sidecars(out, {"sub-02": "{oops"})
    code, line = _run(capsys, tmp_path / "bids", out, "group")
    assert code == EXIT_NO_FILES and "no readable harmonized outputs" in line and "sub-02_desc-harmonized_T1w.json" in line


def test_a_participant_report_leaves_out_a_broken_sidecar_with_a_warning(tmp_path, caplog):
    from bidsharmony.reports.html import write_participant_report

    _sidecars(tmp_path, {"sub-01": _GOOD})
    (tmp_path / "sub-01" / "anat" / "sub-01_run-2_desc-harmonized_T1w.json").write_text('"a string"')
    with caplog.at_level("WARNING", logger="bidsharmony"):
        html = write_participant_report(tmp_path, "01").read_text()
    assert "sub-01_run-2_desc-harmonized_T1w.json: left out of the report: not a JSON object" in caplog.text
    assert 'id="sub-01"' in html and "sub-01_run-2_desc-harmonized_T1w.json: left out" in html


# -- 7. repeated labels, filter files ------------------------------------------------------------

def test_repeated_label_options_add_up_as_in_fmriprep(capsys, example_bids, tmp_path):
    from bidsharmony.cli.parser import build_parser

    opts = build_parser().parse_args(["b", "o", "participant", "--participant-label", "01", "--participant-label", "02", "03",
                                      "--session-label", "1", "--session-label", "2"])  # fmt: skip
    assert opts.participant_label == ["01", "02", "03"] and opts.session_label == ["1", "2"]
    # The earlier label is no longer dropped: the unknown one is still looked for, and named.
    code, line = _run(capsys, example_bids, tmp_path / "out", "participant", "--participant-label", "99",
                      "--participant-label", "01", "--skip-bids-validation")  # fmt: skip
    assert code == EXIT_NO_INPUT and "participant(s) not found: sub-99" in line


def test_an_unknown_filter_entity_names_the_filter_file_and_the_entity(capsys, example_bids, tmp_path):
    f = tmp_path / "filters.json"
    f.write_text(json.dumps({"t1w": {"acq": "mprage"}}))
    code, line = _run(capsys, example_bids, tmp_path / "out", "participant", "--bids-filter-file", f, "--skip-bids-validation")
    assert code == EXIT_USAGE and line.startswith(f"bidsharmony: error: {f}: unknown entity 'acq'") and "acquisition" in line
