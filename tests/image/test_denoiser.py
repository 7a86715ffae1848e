"""The learned denoiser: any shape and orientation, chunked as a whole, deterministic; its training lowers the noise
of a head it never saw, and resumes to the same network."""

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from bidsharmony.errors import OutputError
from bidsharmony.image import unet
from bidsharmony.image.denoiser import SCALE, build, denoise
from bidsharmony.train.denoiser import DenoiserConfig, fit, training_pairs


def _head(shape=(40, 44, 36), seed=0):
    """A smooth ellipsoidal 'head' with some structure inside, on 2 mm voxels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    v = (r < 0.85) * (0.6 + 0.3 * (r < 0.6) + 2.0 * texture)
    return np.clip(v, 0, None).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])


def test_any_shape_and_same_output_twice():
    torch.manual_seed(0)
    net = build(4).eval()
    v = np.random.default_rng(1).random((13, 17, 10)).astype(np.float32) * SCALE
    a, b = denoise(net, v), denoise(net, v)
    assert a.shape == v.shape and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b)


def test_training_lowers_the_noise_of_an_unseen_head():
    landmarks = np.array([0.0, 26.4, 54.0, 70.3, 85.0, 100.0])
    rng = np.random.default_rng(0)
    pairs = training_pairs([_head(seed=s) for s in range(3)], landmarks, draws=2, rng=rng, max_sigma=0.1)
    net, curve = fit(pairs, DenoiserConfig(steps=400, batch=4, patch=16, learning_rate=3e-3, channels=8))
    assert np.isfinite(curve).all()
    (noisy, clean, head), = training_pairs([_head(seed=9)], landmarks, draws=1, rng=np.random.default_rng(5), max_sigma=0.1)
    before = np.mean((noisy - clean)[head] ** 2)
    after = np.mean((denoise(net, noisy * SCALE) / SCALE - clean)[head] ** 2)
    assert after < 0.8 * before


def test_any_orientation_gives_the_ras_result_and_chunks_compute_the_whole(monkeypatch):
    import nibabel as nb

    torch.manual_seed(0)
    net = build(4).eval()
    ras = np.random.default_rng(2).random((20, 24, 30)).astype(np.float32) * SCALE
    whole = denoise(net, ras)
    monkeypatch.setattr(unet, "CHUNK", 8)  # four chunks of the last axis, each with its margin
    np.testing.assert_allclose(denoise(net, ras), whole, rtol=0, atol=1e-4)
    pir = np.array([[0, 0, -2.0, 0], [-2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])  # posterior, inferior, right
    to_pir = nb.orientations.ornt_transform(nb.orientations.axcodes2ornt("RAS"), nb.orientations.io_orientation(pir))
    src = nb.orientations.apply_orientation(ras, to_pir)
    back = nb.orientations.apply_orientation(denoise(net, src, pir), nb.orientations.io_orientation(pir))
    np.testing.assert_allclose(back, whole, rtol=0, atol=1e-4)
    assert not np.allclose(denoise(net, src), denoise(net, src, pir), atol=1e-3)  # the orientation matters


def test_an_interrupted_training_resumes_to_the_same_network(tmp_path):
    landmarks = np.array([0.0, 26.4, 54.0, 70.3, 85.0, 100.0])
    pairs = training_pairs([_head(seed=s) for s in range(2)], landmarks, draws=1, rng=np.random.default_rng(0))
    cfg = DenoiserConfig(steps=12, batch=2, patch=16, channels=4, checkpoint_every=4)
    whole, curve = fit(pairs, cfg)
    _, first = fit(pairs, cfg, tmp_path, data={"v": 1}, stop_at=6)  # saves at 4 and at 6, where it stops
    assert len(first) == 6
    resumed, rest = fit(pairs, cfg, tmp_path, data={"v": 1})
    assert rest == curve
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(OutputError, match="unfinished training"):
        fit(pairs, DenoiserConfig(steps=12, batch=2, patch=16, channels=4, learning_rate=5e-3), tmp_path, data={"v": 1})
    with pytest.raises(OutputError, match="unfinished training"):
        fit(pairs, cfg, tmp_path, data={"v": 2})


def test_the_training_volumes_are_bounded_by_memory_and_chosen_with_the_seed(tmp_path):
    import nibabel as nb

    from bidsharmony.train.denoiser import within_memory

    files = []
    for i in range(6):
        files.append(tmp_path / f"v{i}.nii.gz")
        nb.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)).to_filename(files[-1])
    cfg = DenoiserConfig(draws=2)
    assert within_memory(files, cfg, budget=12000) == files
    kept = within_memory(files, cfg, budget=4000)
    assert len(kept) == 2 and set(kept) <= set(files) and kept == within_memory(files, cfg, budget=4000)
