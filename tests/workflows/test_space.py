"""The harmonization space: read from a model's config.json (defaults where it is silent), and what
the workflows build their resample and slice nodes from."""

from __future__ import annotations

from dataclasses import replace

from bidsharmony.flow.checkpoint import read_folder
from bidsharmony.modelfolder import write_folder
from bidsharmony.space import DEFAULT, Space
from bidsharmony.workflows.harmonize import init_harmonize_wf


def test_of_model_reads_the_config_and_falls_back_to_the_default():
    assert Space.of_model({}) == DEFAULT
    got = Space.of_model({"preprocessing": {"voxel_size": 1.5, "orientation": "RAS"}, "architecture": {"slice_shape": [96, 112]}})
    assert got == replace(DEFAULT, voxel_mm=1.5, slice_shape=(96, 112))
    assert got.zooms == (1.5, 1.5, 1.5) and got.slice_area_mm2 == 96 * 112 * 1.5**2
    assert Space.of_model({"preprocessing": {"slice_shape": [64, 80]}}).slice_shape == (64, 80)


def test_the_workflow_resamples_to_the_models_voxel_size(tiny_model, tmp_path):
    cfg, tensors = read_folder(tiny_model)
    assert Space.of_model(cfg) == DEFAULT  # what train writes
    cfg = {k: v for k, v in cfg.items() if k != "weights_sha256"}
    cfg["preprocessing"]["voxel_size"] = 1.5
    write_folder(tmp_path / "coarse", tensors, cfg)
    wf = init_harmonize_wf(model=tmp_path / "coarse", params={})
    assert wf.get_node("slices_wf.resample").inputs.voxel_size == 1.5
    assert tuple(wf.get_node("slices_wf.slice").inputs.grid_shape) == tuple(cfg["architecture"]["slice_shape"])
