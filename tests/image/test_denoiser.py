"""The learned denoiser: any volume shape, deterministic, and its training lowers the noise of a head it never saw."""

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from bidsharmony.image.denoiser import SCALE, build, denoise
from bidsharmony.train.denoiser import fit, training_pairs


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
    net, curve = fit(pairs, steps=400, batch=4, patch=16, lr=3e-3, channels=8, seed=0)
    assert np.isfinite(curve).all()
    (noisy, clean, head), = training_pairs([_head(seed=9)], landmarks, draws=1, rng=np.random.default_rng(5), max_sigma=0.1)
    before = np.mean((noisy - clean)[head] ** 2)
    after = np.mean((denoise(net, noisy * SCALE) / SCALE - clean)[head] ** 2)
    assert after < 0.8 * before
