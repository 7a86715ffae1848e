"""Training the 3D velocity field: patches, a falling loss, exact resume, the model folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bidsharmony.bhdiff.train import (
    BHDiffTrainConfig,
    load_bhdiff_model,
    prepare_volume,
    sample_patch,
    save_bhdiff_model,
    train_bhdiff,
)
from bidsharmony.errors import ModelError

from .test_core import blob_volume


@pytest.fixture(scope="module")
def volumes():
    return [prepare_volume(blob_volume(seed) * 800 + 100) for seed in (0, 1)]


def test_patches_keep_true_coordinates_and_mirror_together(volumes):
    x, e = volumes[0]
    gen = torch.Generator().manual_seed(0)
    seen_stride = set()
    for _ in range(40):
        img, cond = sample_patch(x, e, 16, gen, strided_fraction=0.5)
        assert img.shape == (1, 16, 16, 16) and cond.shape == (4, 16, 16, 16)
        assert set(np.unique(cond[0])) <= {0.0, 1.0} and np.abs(cond[1:]).max() <= 1.0
        step = abs(float(cond[1, 1, 0, 0] - cond[1, 0, 0, 0])) * (x.shape[0] - 1) / 2
        seen_stride.add(round(step))
    assert seen_stride == {1, 2}  # contiguous and strided crops, positions in true voxel units


def test_training_lowers_the_loss_and_resumes_exactly(volumes, tmp_path):
    cfg = BHDiffTrainConfig(preset="tiny", steps=6, batch_size=2, learning_rate=2e-3, patch=16, checkpoint_every=3)
    full = train_bhdiff(volumes, cfg, tmp_path / "a")
    train_bhdiff(volumes, cfg, tmp_path / "b", stop_at=4)  # killed after step 4: the checkpoint is step 3
    resumed = train_bhdiff(volumes, cfg, tmp_path / "b")
    assert resumed["steps"] == 6 and resumed["losses"] == pytest.approx(full["losses"])
    for (k, a), b in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="other training settings"):
        train_bhdiff(volumes, BHDiffTrainConfig(preset="tiny", steps=7, patch=16, checkpoint_every=3), tmp_path / "b")


def test_loss_falls_over_a_short_run(volumes, tmp_path):
    cfg = BHDiffTrainConfig(preset="tiny", steps=80, batch_size=2, learning_rate=2e-3, patch=16, checkpoint_every=80)
    losses = train_bhdiff(volumes, cfg, tmp_path)["losses"]
    assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15])


def test_model_folder_round_trip_and_hash_check(volumes, tmp_path):
    cfg = BHDiffTrainConfig(preset="tiny", steps=2, batch_size=1, patch=16, checkpoint_every=2)
    ema = train_bhdiff(volumes, cfg, tmp_path / "train")["ema"]
    folder = save_bhdiff_model(tmp_path / "model", ema, {"name": "t"})
    unet, config = load_bhdiff_model(folder)
    for a, b in zip(ema.state_dict().values(), unet.state_dict().values()):
        assert torch.equal(a, b)
    assert config["architecture"]["base"] == 8
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="sha256 does not match"):
        load_bhdiff_model(folder)
