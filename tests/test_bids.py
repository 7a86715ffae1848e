import json

import pytest

from bidsharmony import bids
from bidsharmony.errors import MissingInputError, NoFilesError, UsageError


@pytest.mark.parametrize("given, expected", [("sub-01", "01"), ("01", "01"), ("IXI012", "IXI012")])
def test_labels_with_or_without_prefix(given, expected):
    assert bids.clean_label(given, "sub") == expected


@pytest.mark.parametrize("bad", ["../x", "a/b", "sub-0*", "", "sub-"])
def test_labels_with_path_characters_are_refused(bad):
    with pytest.raises(UsageError, match="invalid sub label"):
        bids.clean_label(bad, "sub")


def test_derivative_names_carry_every_entity_in_bids_order(tmp_path):
    ents = {"run": 2, "subject": "01", "acquisition": "mprage", "session": "A", "reconstruction": "norm", "ceagent": "gd"}
    assert bids.derivative_name(ents) == "sub-01_ses-A_acq-mprage_ce-gd_rec-norm_run-2_desc-harmonized_T1w.nii.gz"
    path = bids.derivative_path(tmp_path, {"subject": "01"}, res="1p2")
    assert path == tmp_path / "sub-01" / "anat" / "sub-01_res-1p2_desc-harmonized_T1w.nii.gz"


def test_collect_t1w_finds_every_run_with_its_entities(example_bids):
    runs = bids.collect_t1w(example_bids)
    assert [r["relpath"] for r in runs] == [
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
        "sub-02/anat/sub-02_run-1_T1w.nii.gz",
        "sub-02/anat/sub-02_run-2_T1w.nii.gz",
    ]
    assert runs[0]["entities"] == {"subject": "01", "session": "1"}
    assert runs[3]["entities"] == {"subject": "02", "run": 2}


def test_selection_by_participant_session_and_filter(example_bids, tmp_path):
    assert len(bids.collect_t1w(example_bids, participants=["02"])) == 2
    assert len(bids.collect_t1w(example_bids, sessions=["2"])) == 1
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"t1w": {"run": 2}, "bold": {"task": "rest"}}))
    runs = bids.collect_t1w(example_bids, filters=bids.load_filters(filt))
    assert [r["entities"] for r in runs] == [{"subject": "02", "run": 2}]


def test_unknown_participant_and_empty_selection(example_bids):
    with pytest.raises(MissingInputError, match="participant\\(s\\) not found: sub-99"):
        bids.collect_t1w(example_bids, participants=["99"])
    with pytest.raises(NoFilesError, match="no T1w images found for sessions 7"):
        bids.collect_t1w(example_bids, sessions=["7"])


def test_invalid_filter_file(tmp_path):
    bad = tmp_path / "f.json"
    bad.write_text("{oops")
    with pytest.raises(UsageError, match="not valid JSON"):
        bids.load_filters(bad)
    bad.write_text('{"t1w": 3}')
    with pytest.raises(UsageError, match="must map query names"):
        bids.load_filters(bad)
