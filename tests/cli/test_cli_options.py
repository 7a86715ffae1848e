"""fMRIPrep's options that users reach for: --bids-database-dir, --reports-only, --clean-workdir."""

from __future__ import annotations

import shutil

import pytest

from bidsharmony import bids
from bidsharmony.cli.execution import clean_work_dir
from bidsharmony.cli.run import main
from bidsharmony.errors import EXIT_CANT_CREATE, EXIT_NO_FILES, UsageError


def _run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_a_bids_database_is_written_once_reused_and_bound_to_its_dataset(example_bids, tmp_path):
    db = tmp_path / "db"
    first = bids.collect_t1w(example_bids, database_dir=db)
    index = next(db.iterdir())
    stamp = index.stat().st_mtime_ns
    assert bids.collect_t1w(example_bids, database_dir=db) == first
    assert index.stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = tmp_path / "other"
    shutil.copytree(example_bids, other)
    with pytest.raises(UsageError, match="indexes .* not "):  # pybids would silently answer for the old root
        bids.collect_t1w(other, database_dir=db)


def test_a_bids_database_inside_the_input_is_refused(capsys, example_bids, tmp_path, tiny_model):
    code, err = _run(capsys, example_bids, tmp_path / "out", "participant", "--model", tiny_model,
                     "--bids-database-dir", example_bids / "code" / "db")  # fmt: skip
    assert code == EXIT_CANT_CREATE and "database directory is inside the BIDS directory" in err
    assert not (example_bids / "code").exists()


def test_reports_only_rewrites_the_reports_from_existing_outputs(capsys, participant_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(participant_run["out"], out, ignore=shutil.ignore_patterns(".bidsharmony-locks"))
    images = {p: p.stat().st_mtime_ns for p in out.rglob("*_desc-harmonized_T1w.nii.gz")}
    (out / "sub-01.html").unlink()
    work = tmp_path / "work"
    code, err = _run(capsys, participant_run["bids"], out, "participant", "--reports-only", "--participant-label", "01",
                     "-w", work)  # fmt: skip
    assert code == 0, err
    assert "sub-01_ses-1" in (out / "sub-01.html").read_text()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_desc-harmonized_T1w.nii.gz")} == images
    assert not any(work.glob("*_wf"))  # nothing was run
    empty = tmp_path / "empty"
    code, err = _run(capsys, participant_run["bids"], empty, "participant", "--reports-only")
    assert code == EXIT_NO_FILES and "run without --reports-only first" in err


def test_clean_workdir_removes_only_the_selected_runs_nodes(example_bids, tmp_path):
    work = tmp_path / "work"
    keep = [work / "bidsharmony_0_1_0_wf" / "sub_02_run_1_wf", work / "bidsharmony_0_1_0_wf" / "sub_01_ses_1_notes",
            work / "nipype-config", work / "mine" / "sub_01_ses_1_wf"]  # fmt: skip
    gone = [work / "bidsharmony_0_1_0_wf" / "sub_01_ses_1_wf", work / "bidsharmony_0_1_0_wf" / "sub_01_ses_1_report",
            work / "bidsharmony_0_0_9_wf" / "sub_01_ses_2_ds", work / "train_prep_wf" / "sub_01_ses_1_wf"]  # fmt: skip
    for d in keep + gone:
        (d / "result").mkdir(parents=True)
    runs = bids.collect_t1w(example_bids, participants=["01"])
    clean_work_dir(work, runs)
    assert all(d.exists() for d in keep) and not any(d.exists() for d in gone)
