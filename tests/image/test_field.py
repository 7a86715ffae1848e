"""The bias-field stage (``bidsharmony.image.field``): on a real IXI-HH head (where present), judged
against the shipped model's typical field, a foreign smooth field is largely undone while the head's
own is left nearly alone, and without a correction the stage is exactly the first standardisation;
the answer does not depend on the voxel order; the weight rises continuously from the gate; the
typical field travels through a model folder unchanged, and a folder whose entry and weights
disagree is refused."""

from __future__ import annotations

import nibabel as nb
import numpy as np
import pytest
import torch

from bidsharmony.errors import ModelError
from bidsharmony.flow.checkpoint import has_field, model_field, model_landmarks, read_folder
from bidsharmony.image import field
from bidsharmony.image.resample import resample_isotropic
from bidsharmony.image.standardise import PERCENTILES, landmark_region, standardise, volume_landmarks
from bidsharmony.models import default_model
from bidsharmony.simulation import smooth_field
from bidsharmony.workflows.harmonize import resolve_field
from tests.conftest import SHARED_DATA

IXI = SHARED_DATA / "ixi-hh"


def _head(sub: str):
    img = nb.as_closest_canonical(nb.load(str(IXI / sub / "anat" / f"{sub}_T1w.nii.gz")))
    return np.asarray(img.dataobj, np.float32), img.affine


@pytest.fixture(scope="module")
def target():
    """(the shipped model's typical field and landmarks, one of its validation heads and its affine): the field's 30
    TRAIN heads' N4 runs are the model's, so the tests run N4 only on the head they judge."""
    if not (IXI / "splits.json").is_file():
        pytest.skip(f"real data not available at {IXI}")
    folder = default_model()
    read = read_folder(folder)
    held_out = "sub-" + read[0]["training_data"]["subjects_validation"][0]
    assert held_out[4:] not in read[0]["preprocessing"]["field"]["subjects"]
    return model_field(folder, read), model_landmarks(folder, read)[0], *_head(held_out)


def _undo(source, affine, typical, landmarks):
    """(the source standardised as the pipeline does, then through the field stage; the record)."""
    grid, grid_affine = resample_isotropic(source, affine, 1.2)
    std = standardise(source, landmarks, source_landmarks=volume_landmarks(grid))
    out, rec = field.undo(source, affine, std, typical, landmarks, PERCENTILES, (grid.shape, grid_affine), landmark_region(grid))
    return std, out, rec


def _rms_log(a, b, where):
    return float(np.sqrt(np.mean((np.log(np.maximum(a[where], 1e-3)) - np.log(np.maximum(b[where], 1e-3))) ** 2)))


def test_a_foreign_field_is_undone_and_the_targets_own_head_kept(target):
    typical, landmarks, head, affine = target
    clean, own, rec = _undo(head, affine, typical, landmarks)
    region = landmark_region(clean, nb.affines.voxel_sizes(affine))
    assert _rms_log(own, clean, region) < 0.03  # a target head: a small change at most
    biased = head * smooth_field(head.shape, np.random.default_rng(1), 2.0)  # clearly beyond a target head's own
    before, fixed, rec = _undo(biased, affine, typical, landmarks)
    assert rec["Weight"] > 0.3 and len(rec["LandmarksAfter"]) == len(PERCENTILES) + 1
    assert _rms_log(fixed, clean, region) < 0.7 * _rms_log(before, clean, region)


def test_without_a_correction_the_stage_is_the_first_standardisation(target):
    typical, landmarks, head, affine = target
    flat = field.TypicalField(typical.n4_mean, 1e9, 4, 1e9, typical.n4_basis)  # a huge typical spread: weight 0
    std, out, rec = _undo(head, affine, flat, landmarks)
    assert rec["Weight"] == 0 and "LandmarksAfter" not in rec
    np.testing.assert_array_equal(out, std)


def test_the_voxel_order_does_not_change_the_correction(target):
    typical, _, head, affine = target
    biased = head * smooth_field(head.shape, np.random.default_rng(2), 1.4)
    ras, _ = field.correction(biased, affine, typical)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS voxel order: the first two axes reversed
    flip[:2, 3] = [s - 1 for s in head.shape[:2]]
    lps, _ = field.correction(biased[::-1, ::-1].copy(), affine @ flip, typical)
    np.testing.assert_allclose(lps[::-1, ::-1], ras, atol=1e-3)


def test_the_typical_field_travels_through_a_model_folder():
    rng = np.random.default_rng(0)
    typical = field.fit_from_grids(rng.normal(size=(7, *(field.GRID,) * 3)).astype(np.float32), components=3)
    tensors = {f"extra.{k}": torch.as_tensor(v) for k, v in typical.to_extras().items()}
    cfg = {"preprocessing": {"field": typical.model_entry()}}
    assert has_field(cfg) and cfg["preprocessing"]["field"]["components"] == 3
    back = model_field(None, (cfg, tensors))
    np.testing.assert_array_equal(back.n4_mean, typical.n4_mean)
    np.testing.assert_array_equal(back.n4_basis, typical.n4_basis)
    assert (back.n4_var, back.n4_gate, back.volumes) == (pytest.approx(typical.n4_var), pytest.approx(typical.n4_gate), 7)
    with pytest.raises(ModelError, match="field_n4_mean"):
        model_field("folder", (cfg, {}))
    with pytest.raises(ModelError, match="3 components"):
        model_field("folder", (cfg, {k: v for k, v in tensors.items() if k != f"extra.{field.BASIS}"} | {
            f"extra.{field.BASIS}": tensors[f"extra.{field.BASIS}"][:2]}))


def test_own_fields_are_told_from_foreign_ones_by_their_shape_not_their_size():
    """Heads whose own fields vary along a few directions (here: ramps along two axes) and a little
    noise: a new head far along those directions is the target's own (weight 0: its leftover is
    within the gate), while a foreign field of the same size in another shape is left over (weight
    near 1). Without components (K = 0) the size alone decides and the own head is 'corrected' too."""
    rng = np.random.default_rng(0)
    x = np.linspace(-1, 1, field.GRID)
    ramps = np.stack([np.broadcast_to(x[:, None, None], (field.GRID,) * 3), np.broadcast_to(x[None, None, :], (field.GRID,) * 3)])
    mean = 0.05 * np.broadcast_to(x[None, :, None], (field.GRID,) * 3)

    def head(scale=0.1):
        return mean + np.tensordot(rng.normal(0, scale, 2), ramps, 1) + rng.normal(0, 0.01, ramps.shape[1:])

    heads = np.array([head() for _ in range(20)])
    typical = field.fit_from_grids(heads, components=2)
    assert typical.n4_basis.shape == (2, field.GRID**3)
    assert 1e-4 < typical.n4_var < 1.5e-4  # the noise (and the left-out fit's error): the ramps are explained
    own = mean + np.tensordot([0.2, -0.2], ramps, 1)  # twice a typical head's own departure
    foreign = mean + 0.2 * np.sqrt(2 * np.mean(ramps[0] ** 2)) * rng.standard_normal(own.shape)  # as large, another shape

    def weight(fitted, g):
        return fitted.weight(g)[1]

    assert weight(typical, own) == 0 and weight(typical, foreign) > 0.95  # the own head within the gate
    by_size = field.fit_from_grids(heads, components=0)
    assert weight(by_size, own) > 0  # the size alone: the own head, twice as far as is typical, passes the gate


def test_the_weight_rises_continuously_from_the_gate():
    """Past the gate the weight starts at 0 (a head at the gate's edge is barely touched: with 1 − σ₀²/d² past a hard
    gate it jumped to 0.45 there), and it is 1 − d²_max/d² beyond."""
    typical = field.TypicalField(np.zeros((field.GRID,) * 3, np.float32), n4_var=0.002, volumes=30, n4_gate=0.0035)

    def weight(d2):
        return typical.weight(np.full((field.GRID,) * 3, np.sqrt(d2), np.float32))

    assert weight(0.0030) == (pytest.approx(0.0030), 0.0)
    assert weight(0.0035 * 1.01)[1] < 0.011
    assert weight(0.0070)[1] == pytest.approx(0.5, abs=1e-4)
    ungated = field.TypicalField(typical.n4_mean, n4_var=0.002, volumes=30)  # a model fitted without a gate
    assert ungated.weight(np.full((field.GRID,) * 3, np.sqrt(0.004), np.float32))[1] == pytest.approx(0.5, abs=1e-4)


def test_the_field_option_resolves_against_the_model():
    with_field = {"preprocessing": {"field": {"method": "n4-typical"}}}
    assert resolve_field("auto", "match", with_field, "m") == "n4-typical"
    assert resolve_field("auto", "match", {}, "m") == "none"
    assert resolve_field("auto", "none", with_field, "m") == "none"
    assert resolve_field("none", "match", with_field, "m") == "none"
    with pytest.raises(ModelError, match="no typical field"):
        resolve_field("n4-typical", "match", {}, "m")
    with pytest.raises(ModelError, match="detail stage"):
        resolve_field("n4-typical", "none", with_field, "m")
