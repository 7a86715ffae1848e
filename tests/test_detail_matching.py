"""Detail matching in the pipeline: the train level fits the target's detail band on its training
volumes only; harmonization does to the native voxels exactly what the sidecar records; a model
without a band, or a run without the standardisation, is refused or runs without it as asked. Real
Nipype, real antspyx, the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from bidsharmony.errors import ModelError
from bidsharmony.flow.checkpoint import (
    model_denoiser,
    model_detail_band,
    model_detail_voxel,
    model_field,
    model_landmarks,
    read_folder,
)
from bidsharmony.image.detail import BAND, at_resolution, detail_level, fit_band, match_detail, ras_voxel_mm
from bidsharmony.image import field
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.standardise import apply_record, landmark_region, standardise
from bidsharmony.modelfolder import write_folder
from bidsharmony.workflows.harmonize import init_harmonize_wf
from tests.test_standardisation import _harmonize, _t1w


def test_training_fits_the_band_on_its_training_volumes_only(tiny_model, example_bids):
    cfg = json.loads((tiny_model / "config.json").read_text())
    standard, _ = model_landmarks(tiny_model)
    train = cfg["training_data"]["subjects_train"]
    runs = sorted(p for s in train for p in (example_bids / f"sub-{s}").rglob("*_T1w.nii.gz"))
    assert cfg["preprocessing"]["detail"]["volumes"] == len(runs) > 0
    target = model_detail_voxel(tiny_model)
    acquired = [ras_voxel_mm(nb.load(path).affine) for path in runs]
    np.testing.assert_allclose(target, np.median(acquired, axis=0))
    levels = []
    for path, voxel in zip(runs, acquired):
        img, data = load_t1w(path)
        v, affine = resample_isotropic(*canonical(data, img.affine), 1.2)
        levels.append(detail_level(at_resolution(standardise(v, standard), affine, voxel, target), (1.2, 1.2, 1.2)))
    band = model_detail_band(tiny_model)
    np.testing.assert_allclose(band, fit_band(levels), rtol=1e-5)
    assert band[0] <= band[1] <= band[2]


@pytest.mark.parametrize("session", ["1", "2"])
def test_the_native_output_is_what_the_record_says(tiny_model, example_bids, tmp_path, session):
    """With the loop off, the native output is the input through the recorded map, then match_detail
    with the model's band, then (the tiny model holds a typical field, and auto uses it) the field
    stage where the detail stage did nothing: recomputed here, the same voxels."""
    t1w = _t1w(example_bids, session)
    out, info = _harmonize(tiny_model, t1w, tmp_path, field="auto")
    rec = info["Standardisation"]
    detail = rec["Detail"]
    assert info["Parameters"]["detail"] == "match"
    np.testing.assert_allclose(detail["Band"], model_detail_band(tiny_model))
    img, data = load_t1w(t1w)
    grid = resample_isotropic(*canonical(data, img.affine), 1.2)
    native = apply_record(data, rec)
    assert info["Parameters"]["field"] == "n4-typical" and "Field" in rec
    expected, again = match_detail(native, img.affine, detail["Band"], (grid[0].shape, grid[1]),
                                   model_detail_voxel(tiny_model), model_denoiser(tiny_model))
    if detail["Action"] == "none":  # then the field stage, on the source's own intensities
        expected, fixed = field.undo(data, img.affine, native, model_field(tiny_model), model_landmarks(tiny_model)[0],
                                     rec["Percentiles"], (grid[0].shape, grid[1]), landmark_region(grid[0], (1.2, 1.2, 1.2)))
        assert fixed["Weight"] == pytest.approx(rec["Field"]["Weight"], abs=1e-3)
        if fixed["Weight"] > 0:
            np.testing.assert_allclose(fixed["LandmarksAfter"], rec["Field"]["LandmarksAfter"], rtol=1e-4, atol=1e-3)
    assert again["MeasuredAtVoxel"] == detail["MeasuredAtVoxel"] is not None
    # The learned denoiser's weight is linear in the level (bisection quantises non-local means' weight):
    # the level recomputed here from the float32 voxels differs in the 6th digit, the weight in the 4th.
    assert again["Action"] == detail["Action"] and again["Weight"] == pytest.approx(detail["Weight"], abs=1e-3)
    assert again.get("Denoiser") == detail.get("Denoiser")
    np.testing.assert_allclose(np.asanyarray(nb.load(out).dataobj, np.float32), expected, atol=1e-4 * 100)
    if detail["Action"] == "none" and not rec["Field"]["Weight"]:
        np.testing.assert_allclose(expected, native, atol=1e-4)


def test_detail_none_and_models_without_a_band(tiny_model, tmp_path):
    cfg, tensors = read_folder(tiny_model)
    del tensors[f"extra.{BAND}"], cfg["preprocessing"]["detail"], cfg["weights_sha256"]
    write_folder(tmp_path / "old", tensors, cfg)
    with pytest.raises(ModelError, match="no detail band"):
        init_harmonize_wf(model=tmp_path / "old", params={"detail": "match"})
    assert init_harmonize_wf(model=tmp_path / "old", params={}).get_node("harmonize").inputs.params["detail"] == "none"
    assert model_detail_band(tmp_path / "old") is None
    with pytest.raises(ModelError, match="needs the standardisation"):
        init_harmonize_wf(model=tiny_model, params={"detail": "match", "standardise": "none"})
    assert init_harmonize_wf(model=tiny_model, params={"standardise": "none"}).get_node("harmonize").inputs.params["detail"] == "none"
    assert init_harmonize_wf(model=tiny_model, params={}).get_node("harmonize").inputs.params["detail"] == "match"


def test_training_fits_a_learned_denoiser_on_its_training_subjects_and_auto_uses_it(tiny_model, example_bids, tmp_path):
    pytest.importorskip("torch")
    cfg, tensors = read_folder(tiny_model)
    entry = cfg["preprocessing"]["detail"]["learned_denoiser"]
    train = cfg["training_data"]["subjects_train"]
    runs = [p for s in train for p in (example_bids / f"sub-{s}").rglob("*_T1w.nii.gz")]
    assert entry["volumes"] == len(runs) > 0 and entry["trained_steps"] == entry["training"]["steps"] == 20
    assert model_denoiser(tiny_model) is not None

    def chosen(model, **params):
        return init_harmonize_wf(model=model, params=params).get_node("harmonize").inputs.params["denoiser"]

    assert chosen(tiny_model) == "learned" and chosen(tiny_model, denoiser="non-local-means") == "non-local-means"
    assert chosen(tiny_model, detail="none") == "none"
    del cfg["preprocessing"]["detail"]["learned_denoiser"], cfg["weights_sha256"]
    write_folder(tmp_path / "plain", {k: v for k, v in tensors.items() if not k.startswith("denoiser.")}, cfg)
    assert model_denoiser(tmp_path / "plain") is None and chosen(tmp_path / "plain") == "non-local-means"
    with pytest.raises(ModelError, match="no learned denoiser"):
        chosen(tmp_path / "plain", denoiser="learned")


def test_the_participant_sidecar_and_methods_name_the_detail_matching(participant_run):
    from bidsharmony.reports.boilerplate import plain

    sidecars = sorted(participant_run["out"].rglob("*_desc-harmonized_T1w.json"))
    assert sidecars
    for path in sidecars:
        meta = json.loads(path.read_text())
        detail = meta["Standardisation"]["Detail"]
        assert detail["Action"] in ("none", "denoise", "sharpen") and len(detail["Band"]) == 3
        text = plain(meta)
        assert "detail level" in text
        if detail["Action"] == "denoise" and detail["Denoiser"] == "learned":  # the tiny model's (auto)
            assert "3D U-Net trained on the target scanner's images alone" in text and "Çiçek" in text and "Manjón" not in text
        elif detail["Action"] == "denoise":
            assert "non-local-means" in text and "Manjón" in text


def test_a_scan_full_denoising_cannot_bring_into_the_band_is_named_in_the_log(tiny_model, example_bids, tmp_path, caplog):
    """Above a band it cannot reach (here a band far under any head's level), the node denoises fully
    and warns, naming the scan."""
    import logging

    from bidsharmony.interfaces.standardise import Standardise

    t1w = _t1w(example_bids, "1")
    img, data = load_t1w(t1w)
    v12, a12 = resample_isotropic(*canonical(data, img.affine), 1.2)
    nb.save(nb.Nifti1Image(v12, a12), str(tmp_path / "resampled.nii.gz"))
    standard, percentiles = model_landmarks(tiny_model)
    node = Standardise(in_file=str(tmp_path / "resampled.nii.gz"), source=str(t1w), standard=[float(x) for x in standard],
                       percentiles=percentiles, band=[0.001, 0.002, 0.003])
    with caplog.at_level(logging.WARNING, logger="bidsharmony"):
        result = node.run(cwd=str(tmp_path))
    detail = json.loads(Path(result.outputs.standardisation).read_text())["Detail"]
    assert detail["Action"] == "denoise" and detail["Weight"] == 1.0 and detail["LevelReached"] > 0.003
    assert "consider --detail none" in caplog.text and str(t1w) in caplog.text


def test_the_stages_in_one_function_are_the_nodes_and_say_which_stage_failed(tiny_model, example_bids, tmp_path):
    """``image.intensity.prepare`` is what the Standardise node runs: without a band or field it is the
    standardisation alone; a volume with no landmark region fails as a StageError the node turns into
    a one-line ImageError naming the source."""
    from bidsharmony.errors import ImageError
    from bidsharmony.image.intensity import StageError, prepare
    from bidsharmony.image.standardise import volume_landmarks
    from bidsharmony.interfaces.standardise import Standardise

    img, data = load_t1w(_t1w(example_bids, "1"))
    v12, a12 = resample_isotropic(*canonical(data, img.affine), 1.2)
    standard, percentiles = model_landmarks(tiny_model)
    done = prepare(v12, a12, standard, percentiles)
    assert done.native is None and set(done.record) == {"Method", "Percentiles", "SourceLandmarks", "StandardLandmarks"}
    np.testing.assert_array_equal(done.grid, standardise(v12, standard, percentiles, source_landmarks=volume_landmarks(v12, percentiles)))
    with pytest.raises(ValueError, match="native voxels"):
        prepare(v12, a12, standard, percentiles, band=[0.1, 0.2, 0.3])

    empty = np.zeros((20, 20, 20), np.float32)
    with pytest.raises(StageError, match="cannot standardise its intensities"):
        prepare(empty, np.diag([1.2, 1.2, 1.2, 1.0]), standard, percentiles)
    nb.save(nb.Nifti1Image(empty, np.diag([1.2, 1.2, 1.2, 1.0])), str(tmp_path / "empty.nii.gz"))
    node = Standardise(in_file=str(tmp_path / "empty.nii.gz"), source="sub-x_T1w.nii.gz",
                       standard=[float(x) for x in standard], percentiles=percentiles)
    with pytest.raises(ImageError, match=r"^sub-x_T1w.nii.gz: cannot standardise its intensities \(no landmark region"):
        node.run(cwd=str(tmp_path))
