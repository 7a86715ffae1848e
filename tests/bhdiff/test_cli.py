"""--method bhdiff through the real CLI: train a tiny 3D model on the example, harmonize with it."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest

from bidsharmony.cli.run import main
from bidsharmony.errors import EXIT_USAGE


@pytest.fixture(scope="module")
def bhdiff_model(example_bids, tmp_path_factory):
    out = tmp_path_factory.mktemp("bhdiff") / "tiny3d"
    code = main([str(example_bids), str(out), "train", "--method", "bhdiff", "--bhdiff-preset", "tiny", "--steps", "4",
                 "--train-batch-size", "1", "--train-patch", "16", "--checkpoint-every", "4", "--nprocs", "1",
                 "-w", str(tmp_path_factory.mktemp("bhdiff-work")), "--device", "cpu"])  # fmt: skip
    assert code == 0
    return out


def _participant(example_bids, model, out, work):
    return main([str(example_bids), str(out), "participant", "--method", "bhdiff", "--model", str(model), "--ode-steps", "2",
                 "--refine-steps", "2", "--participant-label", "01", "--session-label", "1", "--nprocs", "1", "-w", str(work),
                 "--device", "cpu"])  # fmt: skip


def test_train_writes_a_bhdiff_model_folder(bhdiff_model):
    cfg = json.loads((bhdiff_model / "config.json").read_text())
    assert cfg["format"] == "bidsharmony-bhdiff" and cfg["architecture"]["base"] == 8 and len(cfg["target_histogram"]) == 64
    assert (bhdiff_model / "model.safetensors").is_file() and (bhdiff_model / "checkpoint" / "state.pt").is_file()
    card = (bhdiff_model / "MODEL_CARD.md").read_text()
    assert "BlindHarmonyDiff" in card and cfg["weights_sha256"] in card and "steps 4" in card


def test_participant_with_bhdiff_is_native_deterministic_and_reported(example_bids, bhdiff_model, tmp_path):
    assert _participant(example_bids, bhdiff_model, tmp_path / "a", tmp_path / "wa") == 0
    assert _participant(example_bids, bhdiff_model, tmp_path / "b", tmp_path / "wb") == 0
    rel = "sub-01/ses-1/anat/sub-01_ses-1_desc-harmonized_T1w"
    src = nb.load(str(example_bids / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T1w.nii.gz"))
    a, b = nb.load(str(tmp_path / "a" / f"{rel}.nii.gz")), nb.load(str(tmp_path / "b" / f"{rel}.nii.gz"))
    assert a.shape == src.shape and np.allclose(a.affine, src.affine)
    assert np.isfinite(a.get_fdata()).all()
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())  # same seed, same output
    side = json.loads((tmp_path / "a" / f"{rel}.json").read_text())
    assert side["Method"].startswith("bhdiff") and "BlindHarmonyDiff" in side["Description"]
    assert side["Parameters"]["ode_steps"] == 2 and len(side["ConvergenceTrace"]["similarity"]) == 3
    assert side["ConvergenceTrace"]["similarity"][-1] >= side["ConvergenceTrace"]["similarity"][0]  # refinement raises r
    assert (tmp_path / "a" / "sub-01.html").is_file()


def test_bhdiff_without_a_model_is_a_usage_error(capsys, example_bids, tmp_path):
    code = main([str(example_bids), str(tmp_path / "o"), "participant", "--method", "bhdiff"])
    assert code == EXIT_USAGE and "--method bhdiff needs --model" in capsys.readouterr().err
