"""The bias-field stage in the pipeline: the train level fits the target's typical field on its
training volumes only, as harmonization standardises them; the default runs the stage where the
model holds a typical field, ``--field none`` and models without one run without it; the sidecar
states what the stage did. Real Nipype, real antspyx N4, the tiny model."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest

from bidsharmony.errors import ModelError
from bidsharmony.flow.checkpoint import model_field, model_landmarks, read_folder
from bidsharmony.image.field import EXTRAS, fit_typical
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.standardise import standardise, volume_landmarks
from bidsharmony.modelfolder import write_folder
from bidsharmony.workflows.harmonize import init_harmonize_wf
from tests.test_standardisation import _harmonize, _t1w


def test_training_fits_the_typical_field_on_its_training_volumes_only(tiny_model, example_bids):
    cfg = json.loads((tiny_model / "config.json").read_text())
    train = cfg["training_data"]["subjects_train"]
    runs = sorted(p for s in train for p in (example_bids / f"sub-{s}").rglob("*_T1w.nii.gz"))
    entry = cfg["preprocessing"]["field"]
    assert entry["method"] == "n4-typical" and entry["volumes"] == len(runs) >= 2
    standard, _ = model_landmarks(tiny_model)
    volumes = []
    for path in runs:
        img, data = load_t1w(path)
        grid, _ = resample_isotropic(*canonical(data, img.affine), 1.2)
        volumes.append((standardise(data, standard, source_landmarks=volume_landmarks(grid, zooms=(1.2, 1.2, 1.2))), img.affine))
    again, stored = fit_typical(volumes), model_field(tiny_model)
    np.testing.assert_allclose(stored.n4_mean, again.n4_mean, atol=1e-4)
    assert stored.n4_var == pytest.approx(again.n4_var, rel=1e-3)


def test_field_none_and_models_without_a_typical_field(tiny_model, example_bids, tmp_path):
    t1w = _t1w(example_bids, "1")
    out, info = _harmonize(tiny_model, t1w, tmp_path / "none", field="none")
    assert info["Parameters"]["field"] == "none" and "Field" not in info["Standardisation"]
    cfg, tensors = read_folder(tiny_model)
    for k in EXTRAS:
        del tensors[f"extra.{k}"]
    del cfg["preprocessing"]["field"], cfg["weights_sha256"]
    write_folder(tmp_path / "old", tensors, cfg)
    with pytest.raises(ModelError, match="no typical field"):
        init_harmonize_wf(model=tmp_path / "old", params={"field": "n4-typical"})
    assert init_harmonize_wf(model=tmp_path / "old", params={"field": "auto"}).get_node("harmonize").inputs.params["field"] == "none"
    assert init_harmonize_wf(model=tiny_model, params={}).get_node("harmonize").inputs.params["field"] == "n4-typical"  # the default
    old_out, old = _harmonize(tmp_path / "old", t1w, tmp_path / "old-run")
    assert "Field" not in old["Standardisation"]  # a model without a typical field: as --field none
    np.testing.assert_allclose(np.asanyarray(nb.load(old_out).dataobj), np.asanyarray(nb.load(out).dataobj), atol=1e-5)


@pytest.mark.parametrize("session", ["1", "2"])
def test_the_sidecar_states_what_the_field_stage_did(tiny_model, example_bids, tmp_path, session):
    """The field runs only where the detail stage left the volume alone (N4 is misled where it acts)."""
    _, info = _harmonize(tiny_model, _t1w(example_bids, session), tmp_path, field="auto")
    rec = info["Standardisation"]
    field = rec["Field"]
    assert field["Method"] == "n4-typical" and 0 <= field["Weight"] <= 1
    if rec["Detail"]["Action"] != "none":
        assert field["Weight"] == 0 and field["Skipped"]
    else:
        assert ("LandmarksAfter" in field) == (field["Weight"] > 0)
