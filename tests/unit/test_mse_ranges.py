"""MSE ranges: the chosen threshold's real int8 error is the least, within 2 %, on heavy and light tails."""
from __future__ import annotations

import numpy as np
import pytest

from edgeport.quantize.collectors import BINS, mse_amax


def _real_mse(x: np.ndarray, t: float) -> float:
    s = t / 127.0
    return float(np.mean((np.clip(np.round(x / s), -127, 127) * s - x) ** 2))


@pytest.mark.parametrize("kind", ["gauss", "laplace", "relu-laplace", "outlier"])
def test_mse_threshold_has_the_least_real_error(kind):
    rng = np.random.default_rng(0)
    x = {"gauss": rng.normal(size=200_000), "laplace": rng.laplace(size=200_000),
         "relu-laplace": np.maximum(rng.laplace(size=200_000), 0.0),
         "outlier": np.concatenate([rng.normal(size=200_000), [60.0]])}[kind].astype(np.float32)
    a = np.abs(x)
    amax = float(a.max())
    hist = np.histogram(a, bins=BINS, range=(0.0, amax))[0]
    t = mse_amax(hist, amax, int(np.count_nonzero(x == 0)))
    grid = np.linspace(amax / 16, amax, 400)
    best = min(_real_mse(x, g) for g in grid)
    assert _real_mse(x, t) <= 1.02 * best, (t, amax)
    assert _real_mse(x, t) < _real_mse(x, amax)  # clipping the tail pays where there is one
    if kind == "outlier":  # one value at 60 sigma among 200,000 costs more clipped than the rounding it saves
        assert t > amax / 4
    else:
        assert t < 0.9 * amax


def test_mse_of_an_empty_or_all_zero_histogram_is_the_range():
    assert mse_amax(np.zeros(BINS), 2.0) == 2.0
    h = np.zeros(BINS)
    h[0] = 10
    assert mse_amax(h, 2.0, zeros=10) == 2.0
