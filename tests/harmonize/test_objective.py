import pytest
import torch

from bidsharmony.harmonize.objective import (
    EDGE_QUANTILE,
    FOREGROUND,
    SIMILARITIES,
    masked_gradient_l1,
    non_edge_mask,
    sobel,
    sobel_adjoint,
)


def _smooth(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1) + 0.1


def _fd_directional(fn, x, v, eps=1e-6):
    return (fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)


@pytest.mark.parametrize("name", ["cosine", "ncc"])
def test_similarity_gradient_matches_finite_differences(name):
    sim = SIMILARITIES[name]
    x, s = _smooth((3, 1, 12, 14), 0), _smooth((3, 1, 12, 14), 1)
    _, grad = sim(x, s)
    for seed in range(3):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        fd = _fd_directional(lambda t: sim(t, s)[0], x, v)
        torch.testing.assert_close((grad * v).flatten(1).sum(1), fd, rtol=1e-6, atol=1e-9)


def test_similarities_are_what_they_say():
    x = _smooth((2, 1, 8, 8), 3)
    cos, _ = SIMILARITIES["cosine"](x, 2.5 * x)
    torch.testing.assert_close(cos, torch.ones(2, dtype=torch.float64))
    # An offset changes the uncentred cosine but not the mean-removed NCC.
    ncc, _ = SIMILARITIES["ncc"](x, 2.5 * x + 7.0)
    cos_off, _ = SIMILARITIES["cosine"](x, 2.5 * x + 7.0)
    torch.testing.assert_close(ncc, torch.ones(2, dtype=torch.float64))
    assert (cos_off < 0.999).all()


def test_sobel_adjoint_is_exact():
    x = torch.randn(2, 1, 9, 11, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 11, dtype=torch.float64)
    torch.testing.assert_close((sobel(x) * v).sum(), (x * sobel_adjoint(v)).sum())


def test_masked_gradient_term_gradient_matches_finite_differences():
    x = _smooth((2, 1, 10, 12), 5)
    mask = torch.rand(2, 2, 10, 12, generator=torch.Generator().manual_seed(6)) > 0.4
    value, grad = masked_gradient_l1(x, mask)
    g = sobel(x)
    assert (g[mask].abs() > 1e-4).all()  # away from the kinks of |.|, where the FD is valid
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fd = _fd_directional(lambda t: masked_gradient_l1(t, mask)[0], x, v, eps=1e-8)
    torch.testing.assert_close((grad * v).flatten(1).sum(1), fd, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(value, (g.abs() * mask).flatten(1).sum(1))


def test_non_edge_mask_on_a_real_slice(real_slices):
    s = torch.from_numpy(real_slices[len(real_slices) // 2].copy())[None, None]
    mask = non_edge_mask(s)
    g = sobel(s).abs()
    assert mask.shape == (1, 2, *s.shape[2:])
    # Only flat foreground: below the 30th percentile of |G s| of the slice, and s > 0.05.
    for d in range(2):
        thr = torch.quantile(g[0, d].flatten(), EDGE_QUANTILE)
        assert (g[0, d][mask[0, d]] < thr).all()
        assert (s[0, 0][mask[0, d]] > FOREGROUND).all()
        assert 0.005 < mask[0, d].float().mean() <= EDGE_QUANTILE
    # Edges of the anatomy are excluded: the strongest 10% of gradients are never in M.
    strong = g > torch.quantile(g.flatten(2), 0.9, dim=2)[..., None, None]
    assert not (mask & strong).any()
