"""Training the 3D velocity field: patches, a falling loss, exact resume, the model folder."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from bidsharmony.bhdiff.checkpoint import load_bhdiff_model, save_bhdiff_model
from bidsharmony.bhdiff.train import BHDiffTrainConfig, prepare_volume, sample_patch, train_bhdiff
from bidsharmony.errors import ModelError, OutputError

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
    with pytest.raises(OutputError, match=r"checkpoint: holds an unfinished training with steps 6, this run has 7; .*--overwrite"):
        train_bhdiff(volumes, BHDiffTrainConfig(**{**asdict(cfg), "steps": 7}), tmp_path / "b")
    with pytest.raises(OutputError, match=r"with data_sha256 \"\w+\", this run has \"\w+\""):
        train_bhdiff(volumes[::-1], cfg, tmp_path / "b")  # other data, same options
    restarted = train_bhdiff(volumes[::-1], cfg, tmp_path / "b", stop_at=1, overwrite=True)
    assert restarted["steps"] == 1 and len(restarted["losses"]) == 1  # started over, not resumed at 6


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


def test_an_absurd_architecture_is_refused_by_its_shapes_before_anything_is_built(volumes, tmp_path):
    import json

    from bidsharmony.bhdiff.unet import build_unet

    folder = save_bhdiff_model(tmp_path / "model", build_unet("tiny"), {"name": "t"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architecture"]["base"] = 10**6  # terabytes of parameters
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"model.safetensors: weights do not match the architecture in config.json "
                                         r"\(unet\.time\.0\.weight: \[32, 8\] in the file, \[4000000, 1000000\] from the config\)"):
        load_bhdiff_model(folder)
    cfg["padding"] = "x" * (1 << 20)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="config.json: larger than 1 MB"):
        load_bhdiff_model(folder)


@pytest.mark.parametrize("preset", ["tiny", "small", "paper", "variant"])
def test_shapes_from_the_config_are_those_of_the_built_unet(preset):
    from bidsharmony.bhdiff.unet import PRESETS, UNetConfig, VelocityUNet, state_shapes

    cfg = PRESETS.get(preset) or UNetConfig(base=4, mults=(1, 3, 2), blocks=2, attention=False, heads=1, cond_channels=2, mid_blocks=3)
    assert dict(state_shapes(cfg)) == {k: tuple(v.shape) for k, v in VelocityUNet(cfg).state_dict().items()}
