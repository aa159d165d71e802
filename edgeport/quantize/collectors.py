"""What each range method keeps of a tensor's values as they stream past, one class per method: ``_Max`` (the
largest |x|), ``_Percentile`` (the 99.99th percentile of |x|, an exact order statistic), ``_Entropy`` (TensorRT's
KL-divergence threshold over a 2048-bin histogram into 128 levels: what IInt8EntropyCalibrator2 computes) and
``_Mse`` (the threshold of least expected squared quantisation error over the same histogram: rounding noise
step^2/12 on every non-zero value inside the range, (|x| - t)^2 on every value clipped). Values arrive in pieces
that stay in a core's cache; collectors of several workers merge into one.
"""
from __future__ import annotations

from typing import Any

import numpy as np

BINS = 2048


QUANT_LEVELS = 128


PERCENTILE = 99.99


CHUNK = 1 << 16  # values per piece: a piece's temporaries (|x|, bin indices, a mask) stay in a core's L2 cache


def _pieces(v: np.ndarray) -> Any:
    """``v`` (flat) in pieces of at most CHUNK values. Whole tensors went through memory once per temporary: a
    histogram of 4.8 million values took 28 ms whole and 9 ms in pieces."""
    return (v[s:s + CHUNK] for s in range(0, v.size, CHUNK))


def _accumulate(total: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``total`` + ``counts`` (bincounts of differing lengths)."""
    if counts.size > total.size:
        total = np.concatenate([total, np.zeros(counts.size - total.size, total.dtype)])
    total[:counts.size] += counts
    return total


class _Scratch:
    """One worker's reusable buffers for one piece (CHUNK values): |x| as float32, bin indices, a mask. Fresh
    temporaries for every tensor of every image cost more in page faults than the arithmetic."""

    def __init__(self) -> None:
        self._f = np.empty(CHUNK, np.float32)
        self._i = np.empty(CHUNK, np.intp)
        self._m = np.empty(CHUNK, bool)

    def absolute(self, v: np.ndarray) -> np.ndarray:
        """|v| (one piece) in the float buffer."""
        return np.abs(v, out=self._f[:v.size])

    def scaled(self, v: np.ndarray, scale: np.float32, absolute: bool = True) -> np.ndarray:
        """|v| * scale (or v * scale), one piece, in the float buffer."""
        return np.multiply(self.absolute(v) if absolute else v, scale, out=self._f[:v.size])

    def indices(self, a: np.ndarray) -> np.ndarray:
        """``a`` (one piece) truncated to integers, in the index buffer."""
        out = self._i[:a.size]
        np.copyto(out, a, casting="unsafe")
        return out

    def mask(self, n: int) -> np.ndarray:
        """A boolean buffer of ``n`` values (at most a piece)."""
        return self._m[:n]

    def above(self, a: np.ndarray, floor: float) -> np.ndarray:
        """The values of ``a`` (one piece) greater than ``floor`` (a copy)."""
        return a[np.greater(a, floor, out=self.mask(a.size))]


class _Max:
    """The smallest and the largest signed value seen (``span()``: what a converter's min/max calibration
    records); ``result()`` the largest |x| from the two (no |x| array is written), ``relu()`` the largest value
    of the tensor's Relu."""

    def __init__(self, nonnegative: bool = False) -> None:
        self.lo, self.hi = np.inf, -np.inf
        self.nonnegative = nonnegative  # only the maximum is read: span() is not asked for

    def add(self, v: np.ndarray, scratch: _Scratch) -> None:
        if v.size:
            self.hi = max(self.hi, float(v.max()))
            if not self.nonnegative:
                self.lo = min(self.lo, float(v.min()))

    def merge(self, other: _Max) -> None:
        """Take in what another worker saw."""
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def span(self) -> tuple[float, float]:
        return self.lo, self.hi

    def result(self) -> float:
        return max(self.hi, 0.0) if self.nonnegative else max(self.hi, -self.lo, 0.0)

    def relu(self) -> float:
        return max(self.hi, 0.0)


class _WithSpan:
    """Another collector and the tensor's signed extremes (``span()``), from the same read."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.extremes = inner, _Max()

    def add(self, v: np.ndarray, scratch: _Scratch) -> None:
        self.extremes.add(v, scratch)
        self.inner.add(v, scratch)

    def merge(self, other: _WithSpan) -> None:
        self.inner.merge(other.inner)
        self.extremes.merge(other.extremes)

    def span(self) -> tuple[float, float]:
        return self.extremes.span()

    def result(self) -> float:
        return self.inner.result()

    def relu(self) -> float:
        return self.inner.relu()


ROW = 4096  # values per row of the percentile's first read


def _above(v: np.ndarray, floor: float, absolute: bool) -> np.ndarray:
    """The values of ``v`` (flat; |v| when ``absolute``) greater than ``floor``. A first read takes each row of
    ROW values' maximum (and minimum, for |v|), writing nothing; only the rows that reach past ``floor`` are
    copied and compared. Once the floor has settled about 1 row in 12 does on the CamVid U-Net (the values
    above a 99.99th percentile sit together), so a value of a tensor that cannot be negative costs about
    one read, where |v|, a mask and a gather over every value wrote and read it three times."""
    n = v.size - v.size % ROW
    found = []
    if n:
        rows = v[:n].reshape(-1, ROW)
        hot = rows.max(axis=1) > floor
        if absolute:
            hot |= rows.min(axis=1) < -floor
        if hot.any():
            a = rows[hot].ravel()
            a = np.abs(a, out=a) if absolute else a
            found.append(a[a > floor])
    if n < v.size:
        a = np.abs(v[n:]) if absolute else v[n:]
        found.append(a[a > floor])
    return np.concatenate(found) if found else v[:0]


class _Percentile:
    """The q-th percentile of |x| (or, ``signed``, of x) over every value seen, exactly: the K largest values
    are kept (K is what lies above the percentile, 3,000 of 30 million at 99.99); once K are kept only the
    values above the K-th largest are taken (``_above``), and a first batch of millions is cut down through
    a threshold estimated on a sample of it (then checked) instead of being partitioned whole. Values taken
    wait until K of them have gathered before the K largest are chosen again: each choice then handles at
    most 2K values, instead of K for every few new ones (most images add a handful)."""

    def __init__(self, total: int, q: float = PERCENTILE, signed: bool = False) -> None:
        self.k = max(1, total - int(np.ceil(q / 100.0 * total)) + 1)
        self.top = np.empty(0, np.float32)
        self.floor = -np.inf  # the K-th largest value once K are kept
        self.signed = signed
        self.waiting: list[np.ndarray] = []  # values above the floor, not yet chosen among
        self.waiting_n = 0

    @property
    def full(self) -> bool:
        return self.top.size >= self.k

    def add(self, v: np.ndarray, scratch: _Scratch) -> None:
        if not v.size:
            return
        if self.full:
            self.offer(_above(v, self.floor, not self.signed))
            return
        a = v if self.signed else np.abs(v)
        if a.size > 8 * self.k:  # keep ~4K candidates: the (1 - 4K/n) quantile of every 64th value
            sample = a[::64].copy()
            cut = int(sample.size * (1.0 - 4.0 * self.k / a.size))
            if 0 < cut < sample.size:
                candidates = a[a > float(np.partition(sample, cut)[cut])]
                if candidates.size + self.top.size >= self.k:  # enough above the estimate: still exact
                    a = candidates
        self.take(a)

    def take(self, a: np.ndarray) -> None:
        """Keep the K largest of those kept and ``a``."""
        if not a.size:
            return
        both = np.concatenate([self.top, a])
        cut = both.size - self.k
        self.top = np.partition(both, cut)[cut:] if cut > 0 else both
        if self.full:
            self.floor = float(self.top.min())

    def offer(self, found: np.ndarray) -> None:
        """Values above the floor, to be chosen among once K have gathered."""
        if found.size:
            self.waiting.append(found)
            self.waiting_n += found.size
            if self.waiting_n >= self.k:
                self.settle()

    def settle(self) -> None:
        """Choose the K largest again, among those kept and those waiting."""
        if self.waiting:
            waiting, self.waiting, self.waiting_n = self.waiting, [], 0
            self.take(np.concatenate(waiting))

    def merge(self, other: _Percentile) -> None:
        """Take in what another worker kept (the K largest of both are the K largest of all they saw)."""
        self.settle()
        other.settle()
        self.take(other.top)

    def largest(self) -> float:
        """The largest value kept: the largest seen (|x|, or x clipped at 0 when ``signed``), as ``max`` gives."""
        self.settle()
        return max(float(self.top.max()), 0.0) + 0.0 if self.top.size else 0.0

    def result(self) -> float:
        self.settle()
        return max(float(self.top.min()), 0.0) + 0.0 if self.top.size else 0.0  # + 0.0: never -0.0


class _WithRelu:
    """A tensor's percentile and its Relu's, from one read: the Relu's K largest values are the tensor's K
    largest signed values (or 0)."""

    def __init__(self, total: int) -> None:
        self.own, self.positive = _Percentile(total), _Percentile(total, signed=True)

    def add(self, v: np.ndarray, scratch: _Scratch) -> None:
        if not v.size:
            return
        if not (self.own.full and self.positive.full):
            self.own.add(v, scratch)
            self.positive.add(v, scratch)
            return
        self.own.offer(_above(v, self.own.floor, True))
        self.positive.offer(_above(v, self.positive.floor, False))

    def merge(self, other: _WithRelu) -> None:
        self.own.merge(other.own)
        self.positive.merge(other.positive)

    def result(self) -> float:
        return self.own.result()

    def relu(self) -> float:
        return self.positive.result()

    def largest(self) -> float:
        return self.own.largest()

    def relu_largest(self) -> float:
        return self.positive.largest()


class _Histogram:
    """The histogram methods' collector (``_Entropy``, ``_Mse`` each choose their threshold): a BINS-bin histogram
    of |x| over [0, amax], amax from a first pass (the bins TensorRT's calibrator uses; a range grown during a
    single pass moves entropy thresholds: docs/benchmarks/ranges.md). The scale is a hair under BINS / amax, so amax
    itself lands in the last bin; anything past it (a second pass that rounded differently) is counted there too.

    With ``relu_amax`` it also keeps the histogram of the tensor's Relu over [0, relu_amax]. When both ranges
    are the same (the positive side reaches further) one signed bincount gives both, since trunc(x * s) has
    the sign of x and the size of trunc(|x| * s); otherwise the positive values are binned again.
    ``nonnegative``: the tensor cannot be negative, so x * s is binned without taking |x| first."""

    counts_zeros = False  # whether the method needs the count of exact zeros

    def __init__(self, amax: float, relu_amax: float | None = None, nonnegative: bool = False) -> None:
        self.amax, self.nonnegative = amax, nonnegative
        self.hist, self.zeros = np.zeros(BINS, np.int64), 0
        self.scale = self._scale(amax)
        self.relu_amax = relu_amax
        self.relu_hist, self.relu_zeros = np.zeros(BINS, np.int64), 0

    @staticmethod
    def _scale(amax: float) -> np.float32:
        return np.float32((BINS - 1e-3) / amax) if amax > 0.0 else np.float32(0.0)

    @staticmethod
    def _fold(counts: np.ndarray, into: np.ndarray) -> None:
        into += counts[:BINS]
        into[-1] += counts[BINS:].sum()

    def add(self, v: np.ndarray, scratch: _Scratch) -> None:
        if self.amax <= 0.0:
            return
        if self.relu_amax == self.amax:
            self._signed(v, scratch)
        else:
            counts, positive = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
            relu_scale = self._scale(self.relu_amax or 0.0)
            for p in _pieces(v):
                a = scratch.scaled(p, self.scale, absolute=not self.nonnegative)
                counts = _accumulate(counts, np.bincount(scratch.indices(a), minlength=BINS))
                if self.relu_amax is not None and self.relu_amax > 0.0:
                    a = scratch.above(p, 0.0)
                    a *= relu_scale
                    c = np.bincount(scratch.indices(a), minlength=BINS)
                    c[0] += p.size - a.size
                    positive = _accumulate(positive, c)
            self._fold(counts, self.hist)
            if self.relu_amax is not None and self.relu_amax > 0.0:
                self._fold(positive, self.relu_hist)
        if self.counts_zeros:
            for p in _pieces(v):
                # exact zeros (after ReLU) quantise exactly; counted through a boolean mask, the fast way
                self.zeros += int(np.count_nonzero(np.equal(p, 0.0, out=scratch.mask(p.size))))
                if self.relu_amax is not None:
                    self.relu_zeros += p.size - int(np.count_nonzero(np.greater(p, 0.0, out=scratch.mask(p.size))))

    def _signed(self, v: np.ndarray, scratch: _Scratch) -> None:
        """Both histograms from one bincount of trunc(x * s) offset by 2 * BINS (room for any rounding)."""
        c = np.zeros(4 * BINS + 1, np.int64)
        for p in _pieces(v):
            a = np.multiply(p, self.scale, out=scratch.absolute(p))
            idx = scratch.indices(a)
            idx += 2 * BINS
            c = _accumulate(c, np.bincount(idx, minlength=4 * BINS + 1))
        mid = 2 * BINS
        positive = c[mid + 1:]  # bins 1, 2, ... of the positive values
        self._fold(np.concatenate([c[mid:mid + 1], positive + c[mid - 1::-1]]), self.hist)
        self._fold(np.concatenate([[v.size - positive.sum()], positive]), self.relu_hist)

    def merge(self, other: _Histogram) -> None:
        """Take in what another worker counted."""
        self.hist += other.hist
        self.relu_hist += other.relu_hist
        self.zeros += other.zeros
        self.relu_zeros += other.relu_zeros

    def result(self) -> float:
        return self._threshold(self.hist, self.amax, self.zeros)

    def relu(self) -> float:
        return self._threshold(self.relu_hist, self.relu_amax or 0.0, self.relu_zeros)

    def _threshold(self, hist: np.ndarray, amax: float, zeros: int) -> float:
        raise NotImplementedError


class _Entropy(_Histogram):
    """``entropy``: TensorRT's KL-divergence threshold (``entropy_amax``)."""

    def _threshold(self, hist: np.ndarray, amax: float, zeros: int) -> float:
        return entropy_amax(hist, amax) if amax > 0.0 else 0.0


class _Mse(_Histogram):
    """``mse``: the threshold of least expected squared error (``mse_amax``); exact zeros (after a Relu) are
    counted, since they quantise exactly."""

    counts_zeros = True

    def _threshold(self, hist: np.ndarray, amax: float, zeros: int) -> float:
        return mse_amax(hist, amax, zeros) if amax > 0.0 else 0.0


def mse_amax(hist: np.ndarray, amax: float, zeros: int = 0, levels: int = 127) -> float:
    """The clipping threshold t (a bin edge from 1/16 of the range up) minimising the expected squared error of
    symmetric int8 quantisation with scale t / ``levels`` over the histogram of |x| on [0, amax]: every non-zero
    value inside [0, t] carries rounding noise of (t / levels)^2 / 12, every value above t is clipped to t
    (error (|x| - t)^2, |x| at its bin's centre). ``zeros`` exact zeros are taken out of the first bin (they
    quantise exactly). All candidates at once, from suffix sums: no loop over bins."""
    hist = np.asarray(hist, np.float64).copy()
    n = len(hist)
    hist[0] = max(hist[0] - zeros, 0.0)
    if hist.sum() == 0 or amax <= 0:
        return amax
    width = amax / n
    centre = (np.arange(n) + 0.5) * width
    cand = np.arange(max(1, n // 16), n + 1)  # t = cand * width: bins [0, cand) inside, [cand, n) clipped
    t = cand * width
    inside = np.concatenate([[0.0], np.cumsum(hist)])[cand]
    # suffix sums over the clipped bins of count, count * c, count * c^2
    s0 = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])[cand]
    s1 = np.concatenate([np.cumsum((hist * centre)[::-1])[::-1], [0.0]])[cand]
    s2 = np.concatenate([np.cumsum((hist * centre ** 2)[::-1])[::-1], [0.0]])[cand]
    err = inside * (t / levels) ** 2 / 12.0 + (s2 - 2.0 * t * s1 + t ** 2 * s0)
    return float(t[int(np.argmin(err))])


def entropy_amax(hist: np.ndarray, amax: float, levels: int = QUANT_LEVELS, eps: float = 1e-4) -> float:
    """TensorRT's entropy calibration: the threshold minimising KL(P || Q) over bins [levels, len(hist)].

    For a candidate of i bins, P is the histogram up to it with the outliers folded into its last bin; Q is
    that histogram quantised into ``levels`` bins (i // levels bins each, the last taking the remainder) and
    spread back over P's nonzero bins; both are normalised and smoothed (empty bins get ``eps``, taken from
    the others, as MXNet and TensorRT do) before the divergence. The candidates that merge the same number
    m of bins are evaluated together, in arrays: no Python loop over bins or candidates. A bin empty in P is
    empty in Q, and smoothing makes its term eps * log(eps / eps) = 0, so only nonzero bins are summed.
    Within such a group the first ``levels`` - 1 levels span the same m bins for every candidate: their bins'
    P and Q differ between candidates only by the normalisation and the smoothing shift, so they are summed
    from one vector of nonzero bins (the same thresholds as a loop over candidates, tested); only
    the last level, which runs to the candidate and takes the outliers, is laid out per candidate.
    """
    hist = np.asarray(hist, np.float64)
    n, total = len(hist), float(hist.sum())
    if total == 0 or amax == 0:
        return amax
    csum = np.concatenate([[0.0], np.cumsum(hist)])
    cnz = np.concatenate([[0], np.cumsum(hist != 0)])
    p_all = hist / total
    best_kl, best_i = np.inf, n
    for m in range(1, n // levels + 1):  # candidates whose quantised bins merge m bins each
        cand = np.arange(levels * m, min(levels * (m + 1), n + 1))
        if not cand.size:
            continue
        rows, fixed = np.arange(len(cand)), (levels - 1) * m  # bins of the levels every candidate shares
        edges = np.arange(levels) * m
        level_sum, level_nz = np.diff(csum[edges]), np.diff(cnz[edges])
        nonzero = np.flatnonzero(hist[:fixed])
        p_fixed = p_all[nonzero]
        q_fixed = (level_sum / np.maximum(level_nz, 1))[nonzero // m]  # each nonzero bin's level average
        tail = total - csum[cand]
        last_nz = (hist[cand - 1] == 0) & (tail > 0)  # a last bin nonzero only through the outliers
        last_sum, last_count = csum[cand] - csum[fixed], cnz[cand] - cnz[fixed] + last_nz
        share = np.divide(last_sum, last_count, out=np.zeros_like(last_sum), where=last_count > 0)
        p_nz, q_nz = cnz[cand] + last_nz, cnz[cand] + (last_nz & (share > 0))
        qsum = csum[cand]  # Q's level averages, spread back, sum to the histogram up to the candidate
        with np.errstate(divide="ignore", invalid="ignore"):
            p_shift, q_shift = eps * (cand - p_nz) / p_nz, eps * (cand - q_nz) / q_nz
            ps = p_fixed[None, :] - p_shift[:, None]
            qs = q_fixed[None, :] / qsum[:, None] - q_shift[:, None]
            kl = (ps * np.log(ps / qs)).sum(1)
            cols = fixed + np.arange(int(cand[-1]) - fixed)  # the last level, up to the widest candidate
            p = np.where(cols[None, :] < cand[:, None], p_all[cols][None, :], 0.0)
            p[rows, cand - 1 - fixed] = (hist[cand - 1] + tail) / total
            p_in = p != 0
            ps = np.where(p_in, p - p_shift[:, None], eps)
            qs = np.where(p_in & (share > 0)[:, None], (share / qsum)[:, None] - q_shift[:, None], eps)
            kl += (ps * np.log(ps / qs)).sum(1)
        kl[~((p_nz > 0) & (p_shift < 1.0) & (q_nz > 0) & (q_shift < 1.0) & (qsum > 0) & np.isfinite(kl))] = np.inf
        k = int(np.argmin(kl))
        if kl[k] < best_kl:
            best_kl, best_i = float(kl[k]), int(cand[k])
    return float((best_i + 0.5) * amax / n)
