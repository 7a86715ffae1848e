import numpy as np
import pytest

from bidsharmony.metrics import HISTOGRAM_BINS, histogram_distance


def test_histogram_distance_is_the_earth_movers_distance_between_bins():
    """All the mass moved from bin 3 to bin 13 of 64 travels 10/64 of the intensity range."""
    p, q = np.zeros(HISTOGRAM_BINS), np.zeros(HISTOGRAM_BINS)
    p[3], q[13] = 2.0, 5.0  # densities need not sum to one
    assert histogram_distance(p, q) == pytest.approx(10 / HISTOGRAM_BINS)
    assert histogram_distance(p, p) == 0.0
    assert histogram_distance(p, np.zeros(HISTOGRAM_BINS)) == 1.0  # nothing to compare: the maximum
