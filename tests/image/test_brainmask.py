"""The learned brain mask: its input ignores monotone changes of contrast, its cleaning keeps one solid piece, its
training finds the brain of a head it never saw, it maps back onto the pipeline's grid, and the workflow chooses it
only where the model holds one."""

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from bidsharmony.image.brainmask import brain_on_grid, clean, onto, probability, rank_input
from bidsharmony.train.brainmask import BrainMaskConfig, fit, training_inputs


def _head(shape=(48, 52, 44), seed=0):
    """A textured ellipsoidal 'brain' (the mask) inside a darker 'scalp' shell and a dark 'skull' gap, 2 mm voxels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0)) * rng.uniform(0.95, 1.05)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    brain = r < 0.62
    v = brain * (0.7 + 0.8 * texture) + ((r > 0.72) & (r < 0.85)) * (0.5 + 0.5 * texture) + 0.15 * ((r >= 0.62) & (r <= 0.72))
    return np.clip(v, 0.0, None).astype(np.float32), brain


def test_the_input_is_the_same_after_any_increasing_map_that_keeps_the_head():
    from bidsharmony.image.slices import solid_head_mask

    v, _ = _head()
    r = rank_input(v)
    assert r.min() == 0 and 0 < r.max() < 1 and np.count_nonzero(r) > 0.2 * r.size
    for f in (lambda x: 3.0 * x + 7.0, lambda x: np.expm1(x), lambda x: np.log1p(20 * x), lambda x: x**0.5):
        assert np.array_equal(solid_head_mask(f(v).astype(np.float32)), solid_head_mask(v))  # the premise: the same head
        # equal up to ties: float32 rounding merges a few neighbouring values, whose mid-ranks then move by a voxel or so
        np.testing.assert_allclose(rank_input(f(v).astype(np.float32)), r, rtol=0, atol=1e-4)


def test_cleaning_keeps_the_largest_piece_and_fills_its_holes():
    p = np.zeros((20, 20, 20), np.float32)
    p[2:12, 2:12, 2:12] = 0.9
    p[5:8, 5:8, 5:8] = 0.1  # a hole
    p[15:18, 15:18, 15:18] = 0.8  # a speck
    m = clean(p)
    assert m[5:8, 5:8, 5:8].all() and not m[15:18, 15:18, 15:18].any() and m.sum() == 1000


def test_training_finds_the_brain_of_an_unseen_head_and_the_grid_gets_the_same_brain():
    cfg = BrainMaskConfig(steps=150, batch=2, patch=32, learning_rate=5e-3, channels=4, draws=2)
    items = training_inputs([_head(seed=s) for s in range(3)], cfg, np.random.default_rng(0))
    net, curve = fit(items, cfg)
    assert np.isfinite(curve).all() and np.mean(curve[-20:]) < np.mean(curve[:20])
    v, brain = _head(seed=9)
    found = clean(probability(net, v))
    dice = 2 * (found & brain).sum() / (found.sum() + brain.sum())
    assert dice > 0.9, dice
    assert np.array_equal(found, clean(probability(net, v)))  # the same input, the same mask
    # The same head acquired at 1.2 mm: the mask is found on its 2 mm resampling and brought back onto its grid.
    fine_affine = np.diag([1.2, 1.2, 1.2, 1.0])
    fine = ndimage.affine_transform(v, np.diag([1.2 / 2.0] * 3), output_shape=[int(n * 2.0 / 1.2) for n in v.shape], order=1)
    coarse, coarse_affine, found = brain_on_grid(net, fine, fine_affine)
    assert found.shape == coarse.shape and np.allclose(np.abs(np.diag(coarse_affine))[:3], 2.0)
    back = onto(found, coarse_affine, fine.shape, fine_affine)
    expected = ndimage.affine_transform(brain.astype(np.float32), np.diag([1.2 / 2.0] * 3), output_shape=fine.shape, order=1) > 0.5
    assert 2 * (back & expected).sum() / (back.sum() + expected.sum()) > 0.85
