"""The BIDS validator (bids-validator-deno), for real: on the input before any work, and on every
dataset bidsharmony writes or ships (the example, the participant and group outputs)."""

import json
import re
import shutil
import subprocess

import pytest

from bidsharmony.cli.run import main
from bidsharmony.errors import EXIT_BIDS_INVALID, EXIT_NO_INPUT
from bidsharmony.validation import find_validator, run_validator

from .conftest import SHARED_DATA


@pytest.fixture(scope="session")
def validator():
    exe = find_validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"bids-validator-deno cannot run here: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return exe


def _errors(root):
    return [(i["code"], i.get("location")) for i in run_validator(root)["issues"]["issues"] if i["severity"] == "error"]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("bidsharmony: error")]
    assert len(errors) <= 1 and "Traceback" not in err, err
    return code, err, (errors or [""])[0]


@pytest.fixture
def invalid_bids(example_bids, tmp_path):
    """A writable copy of the example with two things BIDS forbids: a stray file at the root and a
    truncated NIfTI."""
    root = tmp_path / "bids"
    shutil.copytree(example_bids, root)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (root / "notes.txt").write_text("not part of BIDS\n")
    bad = root / "sub-02" / "anat" / "sub-02_run-1_T1w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])
    return root


def test_the_example_dataset_is_valid_bids(validator, example_bids):
    issues = run_validator(example_bids)["issues"]["issues"]
    assert [i for i in issues if i["severity"] == "error"] == []
    # It documents itself: a README and the meaning of its participants.tsv column.
    assert not {"README_FILE_MISSING", "TSV_ADDITIONAL_COLUMNS_UNDEFINED"} & {i["code"] for i in issues}


def test_invalid_input_stops_before_any_work_with_one_line_and_a_log(validator, capsys, invalid_bids, tmp_path):
    # A model folder that does not exist: without validation the run would stop there (exit 66).
    out = tmp_path / "out"
    code, err, line = _run(capsys, invalid_bids, out, "participant", "--model", tmp_path / "nomodel")
    assert code == EXIT_BIDS_INVALID, err
    m = re.fullmatch(rf"bidsharmony: error: {re.escape(str(invalid_bids))}: BIDS validation failed: (\d+) errors "
                     r"\(first: (\S+) at (\S+)\); full report in (\S+)", line)  # fmt: skip
    assert m, line
    n, first, where, log = int(m[1]), m[2], m[3], m[4]
    assert n == 2 and first in {"NOT_INCLUDED", "NIFTI_HEADER_UNREADABLE"}
    assert where in {"/notes.txt", "/sub-02/anat/sub-02_run-1_T1w.nii.gz"}
    report = (out / "logs" / log.rsplit("/", 1)[-1]).read_text()
    assert log.startswith(str(out / "logs"))
    assert re.search(r"^ERROR +NOT_INCLUDED at /notes\.txt", report, re.M)
    assert re.search(r"^ERROR +NIFTI_HEADER_UNREADABLE at /sub-02/anat/sub-02_run-1_T1w\.nii\.gz", report, re.M)
    assert re.search(r"^WARNING ", report, re.M)  # warnings are in the report too
    assert not list(out.rglob("*_desc-harmonized_T1w.nii.gz"))


def test_skip_bids_validation_runs_no_validator(validator, capsys, invalid_bids, tmp_path):
    out = tmp_path / "out"
    code, err, line = _run(capsys, invalid_bids, out, "participant", "--model", tmp_path / "nomodel", "--skip-bids-validation")
    assert code == EXIT_NO_INPUT and "not a readable NIfTI" in line  # bidsharmony's own reader found it
    assert "BIDS validation" not in err and not list((out / "logs").glob("bids-validation-*.log"))


def test_warnings_are_only_logged(validator, capsys, example_bids, tmp_path):
    out = tmp_path / "out"
    code, err, line = _run(capsys, example_bids, out, "participant", "--model", tmp_path / "nomodel")
    assert code == EXIT_NO_INPUT and "model folder not found" in line  # validation passed; the run went on
    assert re.search(r"BIDS validation passed with \d+ warning\(s\)", err)
    (log,) = (out / "logs").glob("bids-validation-*.log")
    assert "ERROR" not in log.read_text() and "WARNING" in log.read_text()


def test_without_a_validator_the_run_goes_on_with_a_warning(capsys, example_bids, tmp_path, monkeypatch):
    monkeypatch.setattr("bidsharmony.validation.VALIDATOR", "bids-validator-that-is-not-installed")
    code, err, line = _run(capsys, example_bids, tmp_path / "out", "participant", "--model", tmp_path / "nomodel")
    assert code == EXIT_NO_INPUT and "model folder not found" in line
    assert "BIDS validator not run: bids-validator-that-is-not-installed not found" in err


def test_participant_and_group_outputs_are_valid_bids_derivatives(validator, participant_run):
    out = participant_run["out"]
    assert participant_run["code"] == 0
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert _errors(out) == []
    assert main([str(participant_run["bids"]), str(out), "group"]) == 0
    assert (out / "group.tsv").is_file() and (out / "group.html").is_file()
    assert _errors(out) == []


def test_real_target_dataset_is_judged(validator):
    """ixi-hh (../shared/data) carries a non-BIDS splits.json at its root and no .bidsignore: the
    validator's only errors, which is why its training command needs --skip-bids-validation."""
    root = SHARED_DATA / "ixi-hh"
    if not root.is_dir():
        pytest.skip(f"real data not available at {root}")
    assert set(_errors(root)) <= {("NOT_INCLUDED", "/splits.json"), ("SIDECAR_WITHOUT_DATAFILE", "/splits.json")}


def test_bidsignore_keeps_the_users_lines_and_lists_a_work_dir_inside_out_dir(tmp_path):
    from bidsharmony.validation import BIDSIGNORE, write_bidsignore

    out = tmp_path / "out"
    out.mkdir()
    (out / ".bidsignore").write_text("mynotes.txt\n")
    write_bidsignore(out, out / "work")
    write_bidsignore(out, tmp_path / "elsewhere")  # a second run: nothing repeated
    lines = (out / ".bidsignore").read_text().splitlines()
    assert lines == ["mynotes.txt", *BIDSIGNORE, "work"]


def test_a_validator_that_runs_too_long_counts_as_not_run(validator, example_bids):
    """A stalled validator must not stall the BIDS-App: past its timeout it is 'not run' (a warning)."""
    from bidsharmony.validation import VALIDATOR_TIMEOUT_S, ValidatorUnavailable

    with pytest.raises(ValidatorUnavailable, match="could not run"):
        run_validator(example_bids, timeout=0.01)
    assert 60 <= VALIDATOR_TIMEOUT_S <= 3600
