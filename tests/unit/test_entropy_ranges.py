"""Entropy ranges: the array search picks the threshold a plain per-candidate loop (MXNet's and TensorRT's
procedure, written out) picks, on dense, heavy-tailed, clipped and sparse histograms."""
from __future__ import annotations

import numpy as np

from edgeport.quantize.collectors import BINS, QUANT_LEVELS, entropy_amax


def _smooth(d: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zero = d == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0 or eps * n_zero / n_nonzero >= 1.0:
        return None
    return np.where(zero, eps, d - eps * n_zero / n_nonzero)


def _reference(hist: np.ndarray, amax: float) -> float:
    """One candidate at a time: P with the outliers in its last bin, Q its levels spread over P's nonzero bins."""
    hist = hist.astype(np.float64)
    best, best_i = np.inf, len(hist)
    for i in range(QUANT_LEVELS, len(hist) + 1):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p != 0
        q = np.zeros(i)
        m = i // QUANT_LEVELS
        for level in range(QUANT_LEVELS):
            lo, hi = level * m, (i if level == QUANT_LEVELS - 1 else (level + 1) * m)
            count = int(nonzero[lo:hi].sum())
            if count:
                q[lo:hi] = np.where(nonzero[lo:hi], hist[lo:hi].sum() / count, 0.0)
        if q.sum() <= 0:
            continue
        ps, qs = _smooth(p / p.sum()), _smooth(q / q.sum())
        if ps is None or qs is None:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = float((ps * np.log(ps / qs)).sum())
        if np.isfinite(kl) and kl < best:
            best, best_i = kl, i
    return (best_i + 0.5) * amax / len(hist)


def test_entropy_threshold_is_the_per_candidate_loops():
    rng = np.random.default_rng(0)
    samples = [np.abs(rng.normal(size=300_000)), np.abs(rng.laplace(size=300_000)),
               np.maximum(rng.normal(size=300_000) - 0.5, 0.0), np.abs(rng.standard_t(3, size=300_000)),
               np.abs(np.concatenate([rng.normal(size=200_000), rng.normal(size=20) * 30]))]
    hists = [np.histogram(x, bins=BINS, range=(0.0, float(x.max())))[0] for x in samples]
    sparse = np.zeros(BINS, np.int64)
    sparse[rng.integers(0, BINS, 60)] = rng.integers(1, 100, 60)
    tail_only = np.zeros(BINS, np.int64)  # a candidate's last bin filled only by the outliers
    tail_only[:200] = rng.integers(0, 3, 200)
    tail_only[1900] = 7
    hists += [sparse, tail_only]
    for hist in hists:
        assert entropy_amax(hist, 3.0) == _reference(hist, 3.0)
