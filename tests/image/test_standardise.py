"""Blind landmark standardisation: exact at the landmarks, monotone, blind to monotone changes of
the input, deterministic, its landmark region mostly brain; on a synthetic head (always) and on
real IXI-HH heads (where present)."""

from __future__ import annotations

import json

import nibabel as nb
import numpy as np
import pytest
from scipy import ndimage

from bidsharmony.image.slices import head_mask
from bidsharmony.image.standardise import PERCENTILES, SCALE, fit_landmarks, landmark_region, standardise, volume_landmarks
from tests.conftest import SHARED_DATA

IXI = SHARED_DATA / "ixi-hh"
PHANTOM_MM = (4.0, 4.0, 4.0)  # 48 voxels of 4 mm: a head-sized phantom on a small grid


def phantom(seed: int, n: int = 48) -> np.ndarray:
    """A synthetic head: scalp, dark skull, CSF, grey and white matter shells with partial volume,
    background noise of about 1 % of white matter, a seed-dependent size, tissue brightness and
    arbitrary units."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.9, 0.85])[:, None, None, None] * rng.uniform(0.95, 1.05)) ** 2).sum(0))
    levels = [(1.0, 700), (0.9, 120), (0.82, 250), (0.75, 550), (0.55, 800)]  # (outer radius, intensity)
    v = np.zeros(r.shape, np.float32)
    for radius, value in levels:
        v[r <= radius] = value * rng.uniform(0.9, 1.1)
    v = ndimage.gaussian_filter(v, 1.0) + np.abs(rng.normal(0, 8, v.shape)).astype(np.float32)
    return (v * rng.uniform(0.5, 3.0)).astype(np.float32)


def _canonical(path) -> np.ndarray:
    return np.asarray(nb.as_closest_canonical(nb.load(str(path))).dataobj, np.float32)


def _real(split: str, count: int, labels: bool = False) -> list:
    if not (IXI / "splits.json").is_file():
        pytest.skip(f"real data not available at {IXI}")
    subjects = json.loads((IXI / "splits.json").read_text())[split][:count]
    if labels:
        return [_canonical(IXI / "derivatives" / "dlmuse" / s / "anat" / f"{s}_seg-dlmuse_dseg.nii.gz") > 0 for s in subjects]
    return [_canonical(IXI / s / "anat" / f"{s}_T1w.nii.gz") for s in subjects]


@pytest.fixture(params=["synthetic", "ixi"], scope="module")
def heads(request):
    """(training volumes, one unseen volume, voxel size in mm), canonical."""
    if request.param == "synthetic":
        return [phantom(s) for s in range(4)], phantom(10), PHANTOM_MM
    return _real("train", 4), _real("test", 1)[0], (2.0, 2.0, 2.0)


def test_landmarks_map_exactly_onto_the_standard_ones(heads):
    train, _, z = heads
    std = fit_landmarks(train, zooms=z)
    assert std[0] == 0 and std[-1] == pytest.approx(SCALE) and np.all(np.diff(std) > 0)
    for v in train:
        lm = volume_landmarks(v, zooms=z)
        np.testing.assert_allclose(standardise(lm, std, source_landmarks=lm), std, atol=1e-4)
    # one training volume: the map is affine, its landmarks land on the standard ones exactly
    one = fit_landmarks(train[:1], zooms=z)
    np.testing.assert_allclose(standardise(volume_landmarks(train[0], zooms=z), one, source_landmarks=volume_landmarks(train[0], zooms=z)), one, atol=1e-4)


def test_the_map_is_monotone_and_keeps_the_background(heads):
    train, v, z = heads
    std = fit_landmarks(train, zooms=z)
    out = standardise(v, std, zooms=z)
    order = np.argsort(v, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)
    assert out[v == v.min()].max() == 0 and out.min() == 0  # background stays background, the darkest
    lm = volume_landmarks(v, zooms=z)
    probe = np.linspace(lm[0], lm[-1] * 3, 2001)  # beyond the top landmark: the last slope, extended
    mapped = standardise(probe, std, source_landmarks=lm)
    assert np.all(np.diff(mapped) >= 0) and mapped[-1] > std[-1]
    top = probe > lm[-1]
    np.testing.assert_allclose(np.diff(mapped[top]), np.diff(mapped[top])[0], rtol=1e-3)


@pytest.mark.parametrize("change", ["gamma0.7", "gamma1.5", "exp", "affine"])
def test_a_monotone_change_of_the_input_gives_nearly_the_same_output(heads, change):
    train, v, z = heads
    std = fit_landmarks(train, zooms=z)
    ref = standardise(v, std, zooms=z)
    u = (v - v.min()) / (v.max() - v.min())
    changed = {"gamma0.7": 1000 * u**0.7, "gamma1.5": 1000 * u**1.5, "exp": 1000 * np.exp(u),
               "affine": 3.7 * v + 100.0}[change].astype(np.float32)
    out = standardise(changed, std, zooms=z)
    head = head_mask(v)
    if change == "affine":  # the same landmarks in other units: the same output
        np.testing.assert_allclose(out, ref, atol=1e-3 * SCALE)
    else:  # four linear pieces follow a curved change closely, not exactly
        diff = np.abs(out - ref)[head]
        assert np.median(diff) < 0.06 * SCALE
        assert np.corrcoef(out[head], ref[head])[0, 1] > 0.995
        untreated = np.abs(changed / np.percentile(changed[head], 99) - v / np.percentile(v[head], 99))[head]
        assert np.median(diff / SCALE) < np.median(untreated)  # and much closer than the changed input was


def test_deterministic(heads):
    train, v, z = heads
    std = fit_landmarks(train, zooms=z)
    assert np.array_equal(std, fit_landmarks(list(train), zooms=z))
    assert np.array_equal(standardise(v, std, zooms=z), standardise(v.copy(), std, zooms=z))


def test_refuses_an_empty_head_and_mismatched_landmarks():
    with pytest.raises(ValueError, match="no head"):
        volume_landmarks(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="at least one"):
        fit_landmarks([])
    with pytest.raises(ValueError, match="no landmark region"):  # a head of 16 voxels of 1.2 mm: none 15 mm deep
        volume_landmarks(phantom(0, n=16))
    v = phantom(0)
    with pytest.raises(ValueError, match="same percentiles"):
        standardise(v, fit_landmarks([v], percentiles=(10, 50, 90), zooms=PHANTOM_MM), zooms=PHANTOM_MM)
    assert len(fit_landmarks([v], zooms=PHANTOM_MM)) == len(PERCENTILES) + 1


def test_the_landmark_region_is_mostly_brain_and_blind_to_monotone_changes():
    v, brain = _real("test", 2), _real("test", 2, labels=True)
    for vol, b in zip(v, brain):
        region = landmark_region(vol, (2.0, 2.0, 2.0))
        assert (region & b).sum() / region.sum() > 0.85  # brain, for the most part
        assert (region & b).sum() / b.sum() > 0.4  # and a good share of it
        u = (vol - vol.min()) / (vol.max() - vol.min())
        for changed in (u**0.7, u**1.5, np.exp(u)):
            other = landmark_region(changed.astype(np.float32), (2.0, 2.0, 2.0))
            assert 2 * (other & region).sum() / (other.sum() + region.sum()) > 0.95


def test_background_noise_does_not_move_the_landmark_region():
    """Rician noise lifts single background voxels over the head threshold all over the field of view;
    the region (its head's top, its depth) must not follow them: isolated voxels are no head."""
    v = phantom(3)
    rng = np.random.default_rng(0)
    away = ndimage.distance_transform_edt(~head_mask(v)) > 2  # background not touching the head
    specks = away & (rng.random(v.shape) < 0.01)  # 1 % of it, as bright as the head
    noisy = np.where(specks, np.percentile(v, 99), v).astype(np.float32)
    assert specks.sum() > 100
    assert np.array_equal(landmark_region(noisy, PHANTOM_MM), landmark_region(v, PHANTOM_MM))


def test_a_noisy_real_head_keeps_its_landmark_region():
    from bidsharmony.simulation import rician, unit

    clean = _real("test", 1)[0]
    u = unit(clean)
    noisy = rician(u, np.random.default_rng(0), 0.04 * float(np.percentile(u[head_mask(u)], 99)))  # the benchmark's noise scanner
    a, b = landmark_region(clean, (2.0, 2.0, 2.0)), landmark_region(noisy, (2.0, 2.0, 2.0))
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95  # 0.89 when the specks counted as head


def test_grid_landmarks_do_not_depend_on_the_voxel_order():
    """IXI stores PSR volumes: the region's "top" must be the head's top, not its right ear, whichever
    order the caller's voxels are in."""
    from bidsharmony.image.standardise import grid_landmarks

    if not (IXI / "splits.json").is_file():
        pytest.skip(f"real data not available at {IXI}")
    sub = json.loads((IXI / "splits.json").read_text())["train"][0]
    native = nb.load(str(IXI / sub / "anat" / f"{sub}_T1w.nii.gz"))
    canon = nb.as_closest_canonical(native)
    assert nb.aff2axcodes(native.affine) != ("R", "A", "S")  # the case this guards
    got = grid_landmarks(np.asarray(native.dataobj, np.float32), native.affine)[0]
    want = grid_landmarks(np.asarray(canon.dataobj, np.float32), canon.affine)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
