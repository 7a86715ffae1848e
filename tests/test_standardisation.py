"""Blind intensity standardisation in the pipeline: the train level fits the target's landmarks on its
training volumes only, harmonization maps each volume onto them before slicing, the output is on
the standard scale (native grid: the input's own voxels through the same map), and the published
path (``standardise none``) is unchanged. Real Nipype, real antspyx resampling, the tiny model."""

from __future__ import annotations

import json
import logging

import nibabel as nb
import numpy as np
import pytest

from bidsharmony.errors import ModelError
from bidsharmony.flow.checkpoint import model_class_landmarks, model_landmarks, read_folder
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic
from bidsharmony.image.standardise import (
    CLASS_LANDMARKS,
    CLASS_POINTS,
    LANDMARKS,
    SCALE,
    apply_record,
    class_landmarks,
    fit_landmarks,
    fit_target_scale,
    landmark_region,
    piecewise_linear,
    volume_landmarks,
)
from bidsharmony.modelfolder import write_folder
from bidsharmony.workflows.harmonize import init_harmonize_wf


def _harmonize(model, t1w, tmp_path, output_space="native", **params):
    """(output path, sidecar info) of init_harmonize_wf on one T1w; 0 iterations unless given."""
    wf = init_harmonize_wf(model=model, params={"iterations": 0, **params}, device="cpu", output_space=output_space)
    wf.base_dir = str(tmp_path)
    wf.get_node("inputnode").inputs.t1w = str(t1w)
    graph = wf.run(plugin="Linear")
    outputs = {n.name: n.result.outputs for n in graph.nodes()}
    return outputs["reassemble"].out_file, outputs["harmonize"].info


def _t1w(bids, session: str):
    return bids / "sub-01" / f"ses-{session}" / "anat" / f"sub-01_ses-{session}_T1w.nii.gz"


def _without_landmarks(model, tmp_path):
    cfg, tensors = read_folder(model)
    del tensors[f"extra.{LANDMARKS}"], cfg["preprocessing"]["standardisation"], cfg["weights_sha256"]
    write_folder(tmp_path / "old", tensors, cfg)
    return tmp_path / "old"


def test_training_fits_the_landmarks_on_its_training_volumes_only(tiny_model, example_bids):
    cfg = json.loads((tiny_model / "config.json").read_text())
    standard, percentiles = model_landmarks(tiny_model)
    train = cfg["training_data"]["subjects_train"]
    assert train and set(train).isdisjoint(cfg["training_data"]["subjects_validation"])
    runs = sorted(p for s in train for p in (example_bids / f"sub-{s}").rglob("*_T1w.nii.gz"))
    assert cfg["preprocessing"]["standardisation"]["volumes"] == len(runs) > 0

    def volumes():
        for path in runs:
            img, data = load_t1w(path)
            yield resample_isotropic(*canonical(data, img.affine), 1.2)[0]

    np.testing.assert_allclose(standard, fit_landmarks(volumes(), percentiles), rtol=1e-5, atol=1e-5)
    assert standard[0] == 0 and standard[-1] == pytest.approx(SCALE) and np.all(np.diff(standard) > 0)
    classes = model_class_landmarks(tiny_model)
    both = fit_target_scale(volumes(), percentiles)
    np.testing.assert_allclose(both[0], standard, rtol=1e-5, atol=1e-5)  # the one pass gives fit_landmarks' landmarks too
    np.testing.assert_allclose(classes, both[1], rtol=1e-5, atol=1e-5)
    assert classes[0] == 0 and np.all(np.diff(classes) > 0)
    assert cfg["preprocessing"]["standardisation"]["class_pass"]["quantiles"] == [list(q) for q in CLASS_POINTS]


def test_the_output_lands_on_the_standard_landmarks(tiny_model, example_bids, tmp_path):
    """On the harmonization grid, with the loop and the class pass off, the output's own landmarks are the model's."""
    out, info = _harmonize(tiny_model, _t1w(example_bids, "2"), tmp_path, output_space="harmonization", detail="none")
    standard, percentiles = model_landmarks(tiny_model)
    img = nb.load(out)
    np.testing.assert_allclose(volume_landmarks(np.asanyarray(img.dataobj, np.float32), percentiles, img.header.get_zooms()[:3]),
                               standard, atol=1e-3 * SCALE)
    assert info["IntensityScale"] == "standard" and info["Parameters"]["standardise"] == "landmarks"
    np.testing.assert_allclose(info["Standardisation"]["StandardLandmarks"], standard)
    assert info["Parameters"]["classes"] == "none" and "ClassPass" not in info["Standardisation"]


def test_the_class_pass_lands_on_the_class_landmarks(tiny_model, example_bids, tmp_path):
    """With ``--classes tissue`` the class pass follows the percentile map: the output's class landmarks,
    measured again on the harmonization grid, are the model's (up to the k-means partition moving with
    the map), and the recorded map takes the source's class landmarks exactly onto them."""
    out, info = _harmonize(tiny_model, _t1w(example_bids, "2"), tmp_path, output_space="harmonization", detail="none",
                           classes="tissue")
    classes = model_class_landmarks(tiny_model)
    img = nb.load(out)
    v = np.asanyarray(img.dataobj, np.float32)
    assert info["Parameters"]["classes"] == "tissue"
    cp = info["Standardisation"]["ClassPass"]
    np.testing.assert_allclose(cp["StandardLandmarks"], classes)
    np.testing.assert_allclose(piecewise_linear(np.asarray(cp["SourceLandmarks"]), np.asarray(cp["SourceLandmarks"]), classes),
                               classes, atol=1e-4)
    np.testing.assert_allclose(class_landmarks(v, landmark_region(v, img.header.get_zooms()[:3])), classes, atol=0.03 * SCALE)


def test_the_class_pass_is_off_by_default_and_refused_where_it_cannot_run(tiny_model, example_bids, tmp_path):
    cfg, tensors = read_folder(tiny_model)
    del tensors[f"extra.{CLASS_LANDMARKS}"], cfg["weights_sha256"]
    write_folder(tmp_path / "old", tensors, cfg)
    with pytest.raises(ModelError, match="no class landmarks"):
        init_harmonize_wf(model=tmp_path / "old", params={"classes": "tissue"}, device="cpu")
    with pytest.raises(ModelError, match="--classes tissue needs the standardisation"):
        init_harmonize_wf(model=tiny_model, params={"classes": "tissue", "standardise": "none"}, device="cpu")
    _, info = _harmonize(tiny_model, _t1w(example_bids, "2"), tmp_path / "run", detail="none")
    assert info["Parameters"]["classes"] == "none" and "ClassPass" not in info["Standardisation"]


def test_native_output_is_the_input_through_the_recorded_map(tiny_model, example_bids, tmp_path):
    """On the native grid the input's own voxels go through the map (not a resampled copy): with the
    loop off the output is exactly the map of the input, a monotone function of it."""
    t1w = _t1w(example_bids, "1")
    out, info = _harmonize(tiny_model, t1w, tmp_path, detail="none")
    data = load_t1w(t1w)[1]
    got = np.asanyarray(nb.load(out).dataobj, np.float32)
    np.testing.assert_allclose(got, apply_record(data, info["Standardisation"]), atol=1e-3 * SCALE)
    order = np.argsort(data, axis=None, kind="stable")
    assert np.all(np.diff(got.ravel()[order]) >= -1e-3 * SCALE)


def test_the_published_path_is_unchanged_without_standardisation(tiny_model, example_bids, tmp_path):
    t1w = _t1w(example_bids, "1")
    out, info = _harmonize(tiny_model, t1w, tmp_path, standardise="none")
    np.testing.assert_allclose(np.asanyarray(nb.load(out).dataobj, np.float32), load_t1w(t1w)[1], rtol=1e-5, atol=1e-3)
    assert info["IntensityScale"] == "input" and "Standardisation" not in info


def test_two_scanners_of_one_head_agree_better_after_standardisation(tiny_model, tmp_path):
    """The example head on the example's scanners A and B (``bidsharmony.simulation.scan``: γ 0.8
    against 1.3, other units, light noise; no bias ramp, which a monotone map cannot undo): the two
    standardised outputs differ far less than the two inputs, each scaled the same way (by its own
    99th head percentile)."""
    from bidsharmony.example import SCANNERS, simulate_scanner, source_head

    data, affine = source_head()
    paths = []
    for i, name in enumerate("AB"):
        gamma, _, noise, scale = SCANNERS[name]
        paths.append(tmp_path / f"sub-01_acq-{name}_T1w.nii.gz")
        nb.save(nb.Nifti1Image(simulate_scanner(data, gamma, 0.0, noise, scale, rng=np.random.default_rng(i)), affine), paths[-1])
    outs = [np.asanyarray(nb.load(_harmonize(tiny_model, p, tmp_path / p.name[:12], detail="none")[0]).dataobj, np.float32)
            for p in paths]
    ins = [load_t1w(p)[1] for p in paths]
    head = ins[0] > np.percentile(ins[0], 50)

    def rmse(a, b):
        a, b = a / np.percentile(a[head], 99), b / np.percentile(b[head], 99)
        return float(np.sqrt(np.mean((a[head] - b[head]) ** 2)))

    assert rmse(*outs) < 0.5 * rmse(*ins)


def test_a_model_without_landmarks_is_named_or_run_without(tiny_model, tmp_path, caplog):
    old = _without_landmarks(tiny_model, tmp_path)
    with pytest.raises(ModelError, match="no intensity landmarks"):
        init_harmonize_wf(model=old, params={"standardise": "landmarks"})
    with caplog.at_level(logging.WARNING, logger="bidsharmony"):
        wf = init_harmonize_wf(model=old, params={})
    assert "no intensity landmarks" in caplog.text
    assert wf.get_node("harmonize").inputs.params["standardise"] == "none"
    assert model_landmarks(old) == (None, None)


def test_the_participant_sidecar_and_methods_name_the_standardisation(participant_run):
    from bidsharmony.reports.boilerplate import plain

    assert participant_run["code"] == 0
    sidecars = sorted(participant_run["out"].rglob("*_desc-harmonized_T1w.json"))
    assert sidecars
    for path in sidecars:
        meta = json.loads(path.read_text())
        assert meta["IntensityScale"] == "standard" and meta["Parameters"]["standardise"] == "landmarks"
        assert len(meta["Standardisation"]["SourceLandmarks"]) == len(meta["Standardisation"]["Percentiles"]) + 1
        assert "Nyúl" in plain(meta) and "standard scale" in plain(meta)
        assert "ClassPass" not in meta["Standardisation"] and "tissue composition" not in plain(meta)
    meta["Standardisation"]["ClassPass"] = {"SourceLandmarks": [0, 1], "StandardLandmarks": [0, 1]}  # as --classes tissue records it
    assert "1D k-means" in plain(meta) and "keeps its tissue composition" in plain(meta)


def _with_brain_mask(tiny_model, folder, landmarks):
    """The tiny model with a learned brain mask that finds brain everywhere (a zero last layer, bias +10) and
    ``landmarks`` as the landmarks measured in it: what the workflow does with a mask, not how good one is."""
    import torch

    from bidsharmony.image import brainmask as bm
    from bidsharmony.image.unet import build
    from bidsharmony.train.brainmask import to_tensors

    cfg, tensors = read_folder(tiny_model)
    net = build(4)
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.fill_(10.0)
    tensors |= to_tensors(net)
    tensors[f"extra.{bm.LANDMARKS}"] = torch.as_tensor(np.asarray(landmarks, np.float64))
    tensors[f"extra.{bm.CLASS_LANDMARKS}"] = tensors[f"extra.{CLASS_LANDMARKS}"].clone()
    cfg["preprocessing"]["standardisation"]["brain_mask"] = {"architecture": "unet3d", "channels": 4}
    del cfg["weights_sha256"]
    write_folder(folder, tensors, cfg)
    return folder


def test_landmarks_are_measured_in_the_learned_brain_mask_when_asked(tiny_model, example_bids, tmp_path):
    """``--landmark-region brain``: the landmarks measured in the learned mask on the native voxels brought to its 2 mm
    grid, mapped onto the model's landmarks measured in it; the blind region by default; ``brain`` refused without a
    mask or without the standardisation."""
    from bidsharmony.flow.checkpoint import model_brainmask
    from bidsharmony.image.brainmask import brain_on_grid

    standard = np.array([0.0, 20.0, 45.0, 60.0, 75.0, 100.0])
    model = _with_brain_mask(tiny_model, tmp_path / "brain", standard)
    t1w = _t1w(example_bids, "2")
    _, info = _harmonize(model, t1w, tmp_path / "brain-run", output_space="harmonization", detail="none", landmark_region="brain")
    std = info["Standardisation"]
    assert info["Parameters"]["landmark_region"] == "brain" and std["Region"] == "learned brain mask"
    np.testing.assert_allclose(std["StandardLandmarks"], standard)
    img, data = load_t1w(t1w)
    coarse, _, brain = brain_on_grid(model_brainmask(model)[0], data, img.affine)
    assert brain.all()  # this mask finds brain in every voxel, so the landmarks are the 2 mm volume's
    np.testing.assert_allclose(std["SourceLandmarks"], volume_landmarks(coarse, std["Percentiles"], region=lambda v, z: brain),
                               rtol=1e-5)
    _, head = _harmonize(model, t1w, tmp_path / "head", detail="none")
    assert head["Parameters"]["landmark_region"] == "head" and "Region" not in head["Standardisation"]
    np.testing.assert_allclose(head["Standardisation"]["StandardLandmarks"], model_landmarks(tiny_model)[0])
    with pytest.raises(ModelError, match="no learned brain mask"):
        init_harmonize_wf(model=tiny_model, params={"landmark_region": "brain"}, device="cpu")
    with pytest.raises(ModelError, match="--landmark-region brain needs the standardisation"):
        init_harmonize_wf(model=model, params={"landmark_region": "brain", "standardise": "none"}, device="cpu")
