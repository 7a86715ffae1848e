import numpy as np
import pytest
import torch

from bidsharmony.errors import ModelError
from bidsharmony.flow.checkpoint import load_model
from bidsharmony.harmonize.solvers import HarmonizeParams
from bidsharmony.harmonize.volume import START_IMAGES, check_grid, harmonize_volume
from bidsharmony.image.slices import cut


@pytest.fixture(scope="module")
def volume():
    from bidsharmony.example import source_head
    from bidsharmony.image.resample import canonical, resample_isotropic

    return resample_isotropic(*canonical(*source_head()), 1.2)[0]


def test_mean_start_uses_the_mean_target_slice_at_each_position(tiny_model, volume):
    model = load_model(tiny_model)
    slices, record = cut(volume)
    off = HarmonizeParams(iterations=2, alpha=0.0, beta_fidelity=0.0, beta_gradient=0.0, start="mean")
    out = harmonize_volume(slices, record, model, off)
    idx = np.flatnonzero(record.harmonize)
    expected = model.extras[START_IMAGES][torch.as_tensor(record.position_bin[idx])].numpy()
    # Rounding the mean image to 12 bits (0.5 code) plus float32 inversion crossing a floor (1 code).
    assert np.abs(out[idx] - expected).max() <= 2 / 4095
    # Slices without head are returned untouched.
    assert np.array_equal(out[~record.harmonize], slices[~record.harmonize])


def test_source_start_with_forces_changes_the_slices(tiny_model, volume):
    model = load_model(tiny_model)
    slices, record = cut(volume)
    out = harmonize_volume(slices, record, model, HarmonizeParams(iterations=2))
    idx = record.harmonize
    assert not np.allclose(out[idx], slices[idx], atol=1e-3)
    assert np.corrcoef(out[idx].ravel(), slices[idx].ravel())[0, 1] > 0.9


def test_model_for_another_slice_grid_is_refused(tiny_model, volume):
    model = load_model(tiny_model)
    _, record = cut(volume, grid_shape=(128, 160))
    with pytest.raises(ModelError, match=r"trained for \(144, 176\) slices, input cut to \(128, 160\)"):
        check_grid(model, record, "m")
