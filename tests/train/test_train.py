"""The train level: bits/dim falls, resume continues exactly, the model folder is complete."""

import json

import numpy as np
import pytest
import torch

from bidsharmony.train.data import SliceSet, mean_start_images, split_by_subject
from bidsharmony.train.loop import TrainConfig, evaluate_bpd, train_flow


@pytest.fixture(scope="module")
def slices():
    """Slice codes of the real example head (two 'subjects' from two simulated scanners)."""
    from bidsharmony.example import SCANNERS, simulate_scanner, source_head
    from bidsharmony.image.resample import canonical, resample_isotropic
    from bidsharmony.image.slices import cut

    data, aff = source_head()
    codes, subjects, bins = [], [], []
    for i, name in enumerate(SCANNERS):
        vol = simulate_scanner(data, *SCANNERS[name], rng=np.random.default_rng(i))
        s, rec = cut(resample_isotropic(*canonical(vol, aff), 1.2)[0])
        keep = rec.harmonize
        codes.append(np.round(s[keep] * 4095).astype(np.uint16))
        subjects += [name] * int(keep.sum())
        bins.append(rec.position_bin[keep])
    return SliceSet(np.concatenate(codes), np.array(subjects), np.concatenate(bins))


def test_split_is_by_subject(slices):
    train, val = split_by_subject(slices, 0.5, seed=0)
    assert set(train.subject).isdisjoint(set(val.subject)) and len(train) + len(val) == len(slices)


def test_mean_start_images_cover_every_position(slices):
    means = mean_start_images(slices)
    assert means.shape == (50, 144, 176) and means.min() >= 0 and means.max() <= 1
    assert all(means[b].max() > 0 for b in range(50))


def test_training_lowers_validation_bits_per_dim(slices, tmp_path):
    from bidsharmony.flow.checkpoint import load_model
    from bidsharmony.flow.model import build_flow

    train, val = split_by_subject(slices, 0.5, seed=0)
    untrained = build_flow("tiny")
    untrained.train()
    with torch.no_grad():
        untrained(torch.from_numpy(train.codes[:16].astype(np.float32))[:, None] / 4096 - 0.5)
    before = evaluate_bpd(untrained, val.codes, "cpu")
    cfg = TrainConfig(preset="tiny", steps=40, batch_size=16, learning_rate=2e-3, val_every=20, checkpoint_every=20)
    summary = train_flow(train, val, cfg, tmp_path / "m", extras={"x": torch.zeros(2)}, meta={"name": "m"}, progress=False)
    after = load_model(tmp_path / "m").config["validation_bpd"]
    assert after < before - 0.5, (before, after)
    assert summary["best_val_bpd"] == pytest.approx(after, abs=1e-4)
    for name in ("model.safetensors", "config.json", "samples.png", "training_curve.png", "checkpoint/state.json"):
        assert (tmp_path / "m" / name).is_file(), name


def test_resume_after_interruption_matches_an_uninterrupted_run(slices, tmp_path):
    from safetensors.torch import load_file

    train, val = split_by_subject(slices, 0.5, seed=0)
    cfg = TrainConfig(preset="tiny", steps=12, batch_size=8, val_every=6, checkpoint_every=6, augment=True, seed=3)
    train_flow(train, val, cfg, tmp_path / "full", progress=False)
    train_flow(train, val, cfg, tmp_path / "cut", progress=False, stop_at=6)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 6
    train_flow(train, val, cfg, tmp_path / "cut", progress=False)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_mixed_precision_touches_only_the_conditioners(slices, tmp_path):
    from bidsharmony.flow.checkpoint import load_model
    from bidsharmony.flow.scaling import to_flow

    train, val = split_by_subject(slices, 0.5, seed=0)
    cfg = TrainConfig(preset="tiny", steps=4, batch_size=8, val_every=4, checkpoint_every=4, amp=True)
    train_flow(train, val, cfg, tmp_path / "amp", progress=False)
    flow = load_model(tmp_path / "amp").flow
    x = to_flow(torch.from_numpy(val.codes[:4].astype(np.float32) / 4095)[:, None])
    with torch.no_grad():
        z, logdet = flow(x)
        assert z.dtype == torch.float32 and torch.isfinite(logdet).all()
        assert (flow.inverse(z) - x).abs().max() < 1e-4


def _small(slices):
    """A few slices of each subject: these tests are about the folder, not about learning."""
    train, val = split_by_subject(slices, 0.5, seed=0)
    return train.subset(np.arange(len(train)) < 6), val.subset(np.arange(len(val)) < 3)


def test_resume_needs_the_checkpoints_options_and_data(slices, tmp_path):
    """A checkpoint of other options or other data is refused, naming the difference; with
    overwrite it is discarded and training starts over."""
    from bidsharmony.errors import OutputError

    train, val = _small(slices)
    cfg = TrainConfig(preset="tiny", steps=2, batch_size=2, val_every=2, checkpoint_every=1)
    train_flow(train, val, cfg, tmp_path / "m", progress=False, stop_at=1)
    with pytest.raises(OutputError, match=r"checkpoint: holds an unfinished training with steps 2, this run has 3; .*--overwrite"):
        train_flow(train, val, TrainConfig(**{**cfg.to_dict(), "steps": 3}), tmp_path / "m", progress=False)
    with pytest.raises(OutputError, match=r"with subjects_train \[.*\], this run has \[.*\]"):
        train_flow(val, train, cfg, tmp_path / "m", progress=False)  # the subjects swapped
    with pytest.raises(OutputError, match=r"with slices_train 6, this run has 5"):
        train_flow(train.subset(np.arange(6) < 5), val, cfg, tmp_path / "m", progress=False)
    train_flow(val, train, cfg, tmp_path / "m", progress=False, overwrite=True, stop_at=1)
    state = json.loads((tmp_path / "m" / "checkpoint" / "state.json").read_text())
    assert state["training_data"]["subjects_train"] == sorted(set(val.subject.tolist()))  # started over on the new data


def test_checkpoint_files_get_the_mode_the_umask_gives(slices, tmp_path):
    import os
    import stat

    train, val = _small(slices)
    previous = os.umask(0o022)
    try:
        cfg = TrainConfig(preset="tiny", steps=2, batch_size=2, val_every=1, checkpoint_every=1)
        train_flow(train, val, cfg, tmp_path / "m", progress=False, stop_at=1)
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "config.json", "checkpoint/state.safetensors", "checkpoint/state.json"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644, name


def test_training_prep_hands_its_files_over_through_a_manifest(example_bids, tmp_path):
    """The prep workflow (real Nipype, real antspyx) ends in a node that writes one entry per run,
    in the runs' order, naming files that exist: the trainer reads that, not the executed graph."""
    import nibabel as nb

    from bidsharmony import bids
    from bidsharmony.workflows.train import init_train_prep_wf, read_manifest

    runs = bids.collect_t1w(example_bids)
    wf = init_train_prep_wf(runs=runs, manifest=tmp_path / "manifest.json")
    wf.base_dir = str(tmp_path / "work")
    wf.run()
    prepared = read_manifest(tmp_path / "manifest.json")
    assert [(p.subject, p.source) for p in prepared] == [(r["entities"]["subject"], str(r["path"])) for r in runs]
    for p in prepared:
        assert np.load(p.slices).ndim == 3 and np.load(p.record, allow_pickle=False).files
        assert nb.load(p.resampled).header.get_zooms()[:3] == pytest.approx((1.2, 1.2, 1.2))
    names = {p.resampled for p in prepared}
    assert len(names) == len(runs)  # each run its own files
