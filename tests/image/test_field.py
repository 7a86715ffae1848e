"""The bias-field stage (``bidsharmony.image.field``): on real IXI-HH heads (where present), a foreign
smooth field is largely undone while a target head of its own is left nearly alone; the answer does
not depend on the voxel order; the typical field travels through a model folder unchanged, and a
folder whose entry and weights disagree is refused."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest
import torch

from bidsharmony.errors import ModelError
from bidsharmony.flow.checkpoint import has_field, model_field
from bidsharmony.image import field
from bidsharmony.image.standardise import fit_landmarks, landmark_region, standardise
from bidsharmony.simulation import smooth_field
from bidsharmony.workflows.harmonize import resolve_field
from tests.conftest import SHARED_DATA

IXI = SHARED_DATA / "ixi-hh"


def _head(sub: str):
    img = nb.as_closest_canonical(nb.load(str(IXI / sub / "anat" / f"{sub}_T1w.nii.gz")))
    return np.asarray(img.dataobj, np.float32), img.affine


@pytest.fixture(scope="module")
def target():
    """(typical field of 4 TRAIN heads, landmarks, a fifth TRAIN head standardised, its affine)."""
    if not (IXI / "splits.json").is_file():
        pytest.skip(f"real data not available at {IXI}")
    subjects = json.loads((IXI / "splits.json").read_text())["train"][:5]
    heads = [_head(s) for s in subjects]
    zooms = tuple(float(z) for z in nb.affines.voxel_sizes(heads[0][1]))
    landmarks = fit_landmarks([v for v, _ in heads[:4]], zooms=zooms)
    std = [(standardise(v, landmarks, zooms=zooms), a) for v, a in heads]
    return field.fit_typical(std[:4]), std[4][0], std[4][1]


def _rms_log(a, b, where):
    return float(np.sqrt(np.mean((np.log(np.maximum(a[where], 1e-3)) - np.log(np.maximum(b[where], 1e-3))) ** 2)))


def test_a_foreign_field_is_undone_and_the_targets_own_head_kept(target):
    typical, head, affine = target
    region = landmark_region(head, nb.affines.voxel_sizes(affine))
    own, rec = field.correct(head, affine, typical)
    assert rec["Weight"] == pytest.approx(rec["Shrinkage"] * rec["Kept"], abs=1e-3)
    assert _rms_log(own, head, region) < 0.02  # a target head: at most a small change
    biased = head * smooth_field(head.shape, np.random.default_rng(1), 1.4)
    fixed, rec = field.correct(biased, affine, typical)
    assert rec["Weight"] > 0.3
    before, after = _rms_log(biased, head, region), _rms_log(fixed, head, region)
    assert after < 0.7 * before  # up to the overall level, which the second standardisation sets


def test_the_voxel_order_does_not_change_the_correction(target):
    typical, head, affine = target
    biased = head * smooth_field(head.shape, np.random.default_rng(2), 1.4)
    ras, _ = field.correct(biased, affine, typical)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS voxel order: the first two axes reversed
    flip[:2, 3] = [s - 1 for s in head.shape[:2]]
    lps, _ = field.correct(biased[::-1, ::-1].copy(), affine @ flip, typical)
    np.testing.assert_allclose(lps[::-1, ::-1], ras, rtol=1e-4, atol=1e-3)


def test_the_typical_field_travels_through_a_model_folder():
    rng = np.random.default_rng(0)
    g = (field.GRID,) * 3
    typical = field.TypicalField(rng.normal(size=g).astype(np.float32), 0.004, rng.normal(size=g).astype(np.float32),
                                 rng.random(g) > 0.5, 7)
    tensors = {f"extra.{k}": torch.as_tensor(v) for k, v in typical.to_extras().items()}
    cfg = {"preprocessing": {"field": typical.model_entry()}}
    assert has_field(cfg)
    back = model_field(None, (cfg, tensors))
    np.testing.assert_array_equal(back.n4_mean, typical.n4_mean)
    np.testing.assert_array_equal(back.wm_mean, typical.wm_mean)
    np.testing.assert_array_equal(back.wm_keep, typical.wm_keep)
    assert (back.n4_var, back.volumes) == (pytest.approx(0.004), 7)
    del tensors["extra.field_wm_keep"]
    with pytest.raises(ModelError, match="field_wm_keep"):
        model_field("folder", (cfg, tensors))


def test_the_field_option_resolves_against_the_model():
    with_field = {"preprocessing": {"field": {"method": "n4-typical"}}}
    assert resolve_field("auto", "landmarks", with_field, "m") == "n4-typical"
    assert resolve_field("auto", "landmarks", {}, "m") == "none"
    assert resolve_field("auto", "none", with_field, "m") == "none"
    assert resolve_field("none", "landmarks", with_field, "m") == "none"
    with pytest.raises(ModelError, match="no typical field"):
        resolve_field("n4-typical", "landmarks", {}, "m")
    with pytest.raises(ModelError, match="standardisation"):
        resolve_field("n4-typical", "none", with_field, "m")
