import nibabel as nb
import numpy as np
import pytest

from bidsharmony.example import source_head
from bidsharmony.image.io import load_t1w
from bidsharmony.image.resample import canonical, resample_isotropic, resample_onto
from bidsharmony.image.slices import SliceRecord, assemble, cut


def _rotation(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def test_resample_isotropic_keeps_direction_and_extent_for_oblique_affines():
    data, _ = source_head()
    aff = np.eye(4)
    aff[:3, :3] = _rotation(20) @ np.diag([2.0, 2.0, 2.0])
    aff[:3, 3] = [-30, 40, 10]
    out, out_aff = resample_isotropic(data, aff, 1.2)
    np.testing.assert_allclose(np.linalg.norm(out_aff[:3, :3], axis=0), 1.2, atol=1e-5)
    np.testing.assert_allclose(out_aff[:3, :3] / 1.2, _rotation(20), atol=1e-6)
    np.testing.assert_allclose(out_aff[:3, 3], aff[:3, 3], atol=1e-4)  # same first voxel centre
    np.testing.assert_allclose(np.array(out.shape) * 1.2, np.array(data.shape) * 2.0, atol=1.2)


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("P", "S", "R"), ("R", "A", "S")])
def test_orientation_does_not_change_the_canonical_volume(codes):
    data, aff = source_head()
    ref, ref_aff = resample_isotropic(*canonical(data, aff), 1.2)
    img = nb.Nifti1Image(data, aff).as_reoriented(nb.orientations.ornt_transform(nb.io_orientation(aff), nb.orientations.axcodes2ornt(codes)))
    assert nb.aff2axcodes(img.affine) == codes
    vol, vol_aff = resample_isotropic(*canonical(np.asanyarray(img.dataobj, dtype=np.float32), img.affine), 1.2)
    assert nb.aff2axcodes(vol_aff) == ("R", "A", "S")
    np.testing.assert_allclose(vol_aff, ref_aff, atol=1e-4)
    np.testing.assert_allclose(vol, ref, atol=1e-3 * ref.max())


def test_resample_onto_own_grid_is_identity():
    data, aff = source_head()
    np.testing.assert_allclose(resample_onto(data, aff, data.shape, aff), data, atol=1e-3)


def test_cut_and_assemble_round_trip(tmp_path):
    data, aff = source_head()
    vol, _ = resample_isotropic(*canonical(data, aff), 1.2)
    slices, record = cut(vol)
    assert slices.shape == (vol.shape[2], 144, 176)
    assert slices.min() >= 0 and slices.max() <= 1
    assert np.allclose(slices[record.harmonize].max(axis=(1, 2)), 1.0)
    back = assemble(slices, record, vol)
    np.testing.assert_allclose(back, vol, atol=1e-4 * vol.max())
    record.save(tmp_path / "r.npz")
    loaded = SliceRecord.load(tmp_path / "r.npz")
    assert np.array_equal(loaded.offset, record.offset) and np.array_equal(loaded.harmonize, record.harmonize)


def test_assemble_touches_only_harmonized_slices_and_the_grid_window():
    rng = np.random.default_rng(0)
    vol = np.zeros((200, 220, 30), np.float32)  # larger than the 144 x 176 grid in-plane
    vol[20:180, 15:205, 5:25] = rng.uniform(50, 100, (160, 190, 20))
    slices, record = cut(vol)
    assert not record.harmonize[:5].any() and record.harmonize[5:25].all()
    out = assemble(np.ones_like(slices), record, vol)
    ox, oy = record.offset
    changed = out != vol
    assert not changed[:, :, :5].any() and not changed[:, :, 25:].any()
    assert not changed[: max(ox, 0)].any() and not changed[ox + 144 :].any()
    assert not changed[:, : max(oy, 0)].any() and not changed[:, oy + 176 :].any()
    # A harmonized slice of ones comes back as that slice's maximum.
    np.testing.assert_allclose(out[ox + 70, oy + 80, 10], record.slice_max[10])


def test_the_head_is_centred_in_the_grid():
    vol = np.zeros((120, 150, 10), np.float32)
    vol[10:50, 20:60, 2:8] = 1.0  # a small off-centre "head"
    slices, record = cut(vol)
    rows = np.flatnonzero(slices[5].any(axis=1))
    cols = np.flatnonzero(slices[5].any(axis=0))
    assert abs((rows[0] + rows[-1]) / 2 - 71.5) <= 1 and abs((cols[0] + cols[-1]) / 2 - 87.5) <= 1


@pytest.mark.parametrize(
    "content, message",
    [(b"not a nifti at all", "not a readable NIfTI"), (b"\x1f\x8b\x08\x00truncated", "not a readable NIfTI")],
)
def test_unreadable_images_give_one_line_errors(tmp_path, content, message):
    from bidsharmony.errors import ImageError

    path = tmp_path / "sub-01_T1w.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as e:
        load_t1w(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_4d_constant_and_nonfinite_images(tmp_path):
    from bidsharmony.errors import ImageError

    data, aff = source_head()
    nb.Nifti1Image(np.stack([data, data], -1), aff).to_filename(tmp_path / "4d.nii.gz")
    with pytest.raises(ImageError, match="4D image with 2 volumes"):
        load_t1w(tmp_path / "4d.nii.gz")
    nb.Nifti1Image(data[..., None], aff).to_filename(tmp_path / "4d1.nii.gz")
    assert load_t1w(tmp_path / "4d1.nii.gz")[1].shape == data.shape
    nb.Nifti1Image(np.zeros_like(data), aff).to_filename(tmp_path / "zero.nii.gz")
    with pytest.raises(ImageError, match="constant"):
        load_t1w(tmp_path / "zero.nii.gz")
    bad = data.copy()
    bad[0, 0, 0] = np.nan
    nb.Nifti1Image(bad, aff).to_filename(tmp_path / "nan.nii.gz")
    assert np.isfinite(load_t1w(tmp_path / "nan.nii.gz")[1]).all()
