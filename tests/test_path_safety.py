"""Never touch what is not yours: bidsharmony writes only inside OUT_DIR (and the work directory),
never into the input dataset or another dataset, whatever the layout or the symbolic links.

Tests run as root here, so file permissions would not stop a wrong write: each test checks the
trees themselves (digests, listings), not that a write failed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bidsharmony import bids
from bidsharmony.cli.run import main
from bidsharmony.errors import EXIT_BUSY, EXIT_CANT_CREATE, OutputError, UsageError
from bidsharmony.outputs import participant_locks, remove_stale_partials

from .conftest import tree_digest


def _run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("bidsharmony: error")]
    assert len(errors) <= 1 and "Traceback" not in err, err
    return code, (errors or [""])[0]


@pytest.fixture
def writable_bids(example_bids, tmp_path):
    """A writable copy of the example: a wrong write would succeed here, so the tests can see it."""
    root = tmp_path / "p" / "bids"
    shutil.copytree(example_bids, root)
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_output_dir_that_contains_the_input_is_refused_and_its_partials_kept(capsys, writable_bids, tiny_model):
    """`bidsharmony P/bids P participant`: the old cleanup walked all of P and deleted partial-looking
    files inside the input dataset."""
    parent = writable_bids.parent
    planted = writable_bids / "sub-01" / f".notes.txt.{_dead_pid()}.partial.txt"
    planted.write_text("the user's file")
    before = tree_digest(writable_bids)
    code, err = _run(capsys, writable_bids, parent, "participant", "--model", tiny_model, "--device", "cpu")
    assert code == EXIT_CANT_CREATE and "contains the BIDS directory" in err
    assert tree_digest(writable_bids) == before and planted.exists()
    assert sorted(p.name for p in parent.iterdir()) == ["bids"]


def test_cleanup_touches_only_bidsharmonys_own_folders(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    pid = _dead_pid()
    ours = out / "sub-01" / "anat" / f".sub-01_desc-harmonized_T1w.nii.gz.{pid}.partial.nii.gz"
    foreign = out / "notes" / f".draft.txt.{pid}.partial.txt"  # not a folder bidsharmony writes
    linked = elsewhere / "anat" / f".x.nii.gz.{pid}.partial.nii.gz"  # reached only through a link
    for p in (ours, foreign, linked):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    (out / "sub-02").symlink_to(elsewhere, target_is_directory=True)
    assert remove_stale_partials(out) == [ours]
    assert foreign.exists() and linked.exists()


def test_a_link_from_the_output_into_the_input_is_refused_before_any_work(capsys, writable_bids, tiny_model, tmp_path):
    out = tmp_path / "out"
    _description(out, DatasetType="derivative", GeneratedBy=[{"Name": "bidsharmony"}])  # an earlier run's
    (out / "sub-01").symlink_to(writable_bids / "sub-01", target_is_directory=True)
    before = tree_digest(writable_bids)
    code, err = _run(capsys, writable_bids, out, "participant", "--model", tiny_model, "--device", "cpu",
                     "-w", tmp_path / "work")  # fmt: skip
    assert code == EXIT_CANT_CREATE and "outside the output directory" in err and "sub-01" in err
    assert tree_digest(writable_bids) == before
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.nii.gz"))


def test_every_writer_refuses_a_destination_outside_out_dir(tmp_path):
    """The sink, reports and group files check again when they write (a link can appear mid-run)."""
    from bidsharmony.outputs import atomic_write_text

    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir(), other.mkdir()
    (out / "sub-01").symlink_to(other, target_is_directory=True)
    with pytest.raises(OutputError, match="outside the output directory"):
        atomic_write_text(out / "sub-01" / "anat" / "x.json", "{}", root=out)
    assert not any(other.rglob("*"))
    atomic_write_text(out / "sub-02" / "anat" / "x.json", "{}", root=out)  # a real folder: fine


def test_work_dir_inside_the_input_is_refused(capsys, writable_bids, tiny_model, tmp_path):
    before = tree_digest(writable_bids)
    code, err = _run(capsys, writable_bids, tmp_path / "out", "participant", "--model", tiny_model, "--device", "cpu",
                     "-w", writable_bids / "code" / "work")  # fmt: skip
    assert code == EXIT_CANT_CREATE and "work directory is inside the BIDS directory" in err
    assert tree_digest(writable_bids) == before and not (writable_bids / "code").exists()


def _description(root: Path, **fields) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0", **fields}))


@pytest.mark.parametrize("case", ["raw", "raw-without-type", "other-derivatives", "sub-folders-only", "swapped"])
def test_another_dataset_as_output_dir_is_refused_untouched(capsys, writable_bids, example_bids, tiny_model, tmp_path, case):
    out = tmp_path / "other"
    if case == "raw":
        _description(out, DatasetType="raw")
        (out / "sub-07" / "anat").mkdir(parents=True)
    elif case == "raw-without-type":
        _description(out)
    elif case == "other-derivatives":
        _description(out, DatasetType="derivative", GeneratedBy=[{"Name": "fMRIPrep"}])
    elif case == "sub-folders-only":
        (out / "sub-07" / "anat").mkdir(parents=True)
    else:  # the two positional arguments swapped: OUT_DIR is the raw input of another run
        out = writable_bids
    before = tree_digest(out)
    source = example_bids if case == "swapped" else writable_bids
    code, err = _run(capsys, source, out, "participant", "--model", tiny_model, "--device", "cpu", "-w", tmp_path / "w")
    assert code == EXIT_CANT_CREATE, err
    assert {"raw": "is a raw BIDS dataset", "raw-without-type": "is a raw BIDS dataset", "swapped": "is a raw BIDS dataset",
            "other-derivatives": "written by fMRIPrep", "sub-folders-only": "no dataset_description.json"}[case] in err
    assert tree_digest(out) == before and not (out / "logs").exists() and not (tmp_path / "w").exists()


def test_bidsharmony_outputs_given_as_input_are_refused_other_derivatives_warned(tmp_path, caplog):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _description(ours, DatasetType="derivative", GeneratedBy=[{"Name": "bidsharmony"}])
    _description(theirs, DatasetType="derivative", GeneratedBy=[{"Name": "fMRIPrep"}])
    with pytest.raises(UsageError, match="swapped"):
        bids.check_input_kind(ours)
    with caplog.at_level(logging.WARNING, logger="bidsharmony"):
        bids.check_input_kind(theirs)
    assert "is a derivatives dataset (fMRIPrep)" in caplog.text


def test_inputs_differing_only_in_an_uncommon_entity_get_distinct_outputs(writable_bids, tiny_model, tmp_path):
    """echo-1/echo-2 (or any entity) once collapsed to one name: 'Duplicate node name'."""
    from bidsharmony.workflows.base import init_bidsharmony_wf

    anat = writable_bids / "sub-01" / "ses-1" / "anat"
    src = anat / "sub-01_ses-1_T1w.nii.gz"
    for echo in (1, 2):
        shutil.copy(src, anat / f"sub-01_ses-1_echo-{echo}_part-mag_T1w.nii.gz")
    src.unlink()
    runs = bids.collect_t1w(writable_bids, participants=["01"], sessions=["1"])
    names = [bids.derivative_name(r["entities"]) for r in runs]
    assert names == ["sub-01_ses-1_echo-1_part-mag_desc-harmonized_T1w.nii.gz",
                     "sub-01_ses-1_echo-2_part-mag_desc-harmonized_T1w.nii.gz"]  # fmt: skip
    wf = init_bidsharmony_wf(runs=runs, out_dir=tmp_path / "out", model=tiny_model, params={})  # raised 'Duplicate node name' before
    assert all(wf.get_node(f"sub_01_ses_1_echo_{e}_part_mag_{n}") for e in (1, 2) for n in ("wf", "ds", "report"))


def test_a_second_run_on_the_same_participant_waits_its_turn(capsys, example_bids, tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with participant_locks(out, ["02"]):  # held as another live run would hold it
        code, err = _run(capsys, example_bids, out, "participant", "--participant-label", "02", "--model", tiny_model,
                         "--device", "cpu", "-w", tmp_path / "w")  # fmt: skip
    assert code == EXIT_BUSY and f"sub-02 is being processed by bidsharmony pid {os.getpid()}" in err
    assert not list(out.rglob("*_T1w.nii.gz"))
    with participant_locks(out, ["02"]):  # released on exit, by the refused run as well
        pass


def test_an_unexpected_os_error_is_one_line_naming_the_file(capsys, example_bids, tiny_model, tmp_path):
    """Any OSError, not only a full disk, ends as one line naming the file (it was a traceback)."""
    out = tmp_path / "out"
    (out / ".bidsharmony-locks" / "sub-02.lock").mkdir(parents=True)  # a folder where a lock file goes
    code, err = _run(capsys, example_bids, out, "participant", "--participant-label", "02", "--model", tiny_model,
                     "--device", "cpu", "-w", tmp_path / "w", "--skip-bids-validation")  # fmt: skip
    assert code == 1 and "sub-02.lock" in err and "Is a directory" in err


def test_a_filesystem_without_locks_runs_without_them(tmp_path, monkeypatch, caplog):
    """Lustre without -o flock answers ENOLCK: warn and go on rather than refuse every run. (The
    filesystem's answer is simulated; the lock's real behaviour is tested above.)"""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="bidsharmony"), participant_locks(tmp_path, ["01", "02"]):
        pass
    assert "cannot lock files" in caplog.text


def test_inputs_that_would_share_one_output_are_refused_naming_both(writable_bids):
    anat = writable_bids / "sub-01" / "ses-1" / "anat"
    src = anat / "sub-01_ses-1_T1w.nii.gz"
    shutil.copy(src, anat / "sub-01_ses-1_T1w.nii")  # .nii beside .nii.gz: one output name
    with pytest.raises(UsageError, match="would be written to the same output as") as refused:
        bids.collect_t1w(writable_bids, participants=["01"])
    message = str(refused.value)  # names both files: the .nii and the .nii.gz
    assert message.count("sub-01_ses-1_T1w.nii") == 2 and message.count("sub-01_ses-1_T1w.nii.gz") == 1


def test_cleanup_keeps_partials_of_other_hosts_and_of_participants_it_does_not_hold(tmp_path):
    """A job array writes into one OUT_DIR from many hosts: a pid means nothing on another host, and
    another participant's folder belongs to another job."""
    out = tmp_path / "out"
    pid = _dead_pid()
    other_host = out / "sub-01" / "anat" / f".x_T1w.nii.gz.{pid}@node-17.partial.nii.gz"
    other_subject = out / "sub-02" / "anat" / f".y_T1w.nii.gz.{pid}.partial.nii.gz"
    ours = out / "sub-01" / "anat" / f".z_T1w.nii.gz.{pid}.partial.nii.gz"
    for p in (other_host, other_subject, ours):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert remove_stale_partials(out, subjects=["01"]) == [ours]
    assert other_host.exists() and other_subject.exists()
