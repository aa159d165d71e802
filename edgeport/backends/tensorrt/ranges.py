"""Activation ranges for TensorRT INT8, and the two forms TensorRT consumes them in.

One set of per-tensor ranges (amax of |x|) is measured on the shared calibration set by
running the FP32 ONNX in ONNX Runtime with every intermediate tensor exposed, one image at
a time (histograms are streamed, never all activations at once). Three methods:

* ``max``: the largest |x| seen;
* ``percentile``: the 99.99th percentile of |x| (from a 2048-bin histogram): the default,
  chosen by emulated INT8 accuracy on real data. On the CamVid model (scripts/train_camvid.py,
  CamVid val, FP32 mIoU 54.08) percentile gave 54.14, max 53.65, entropy 44.86; on the
  default model (synthetic val, FP32 89.90) 89.99, 89.81 and 78.49;
* ``entropy``: TensorRT's KL-divergence threshold search over a 2048-bin histogram into 128
  quantised levels (what IInt8EntropyCalibrator2 computes);
* ``mse``: the clipping threshold that minimises the expected squared quantisation error over the
  same 2048-bin histogram (rounding noise step^2/12 on every non-zero value inside the range,
  (|x| - t)^2 on every value clipped), per tensor.

From them come (1) the explicit-quantization Q/DQ ONNX TensorRT 8.5+ and 10.x consume
(edgeport.backends.tensorrt.qdq, placed by TensorRT's rules); and (2) for TensorRT 8.x a
native calibration cache: a ``TRT-<version>-EntropyCalibration2`` header and
one ``tensor: hex`` line per tensor, the hex being the scale (amax / 127) as big-endian float32.
"""
from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

BINS = 2048
QUANT_LEVELS = 128
PERCENTILE = 99.99
METHODS = ("max", "percentile", "entropy", "mse")
CODE_VERSION = 5  # bumped whenever a method's numbers change, so cached ranges are measured again


def _float_tensors(model: Any) -> list[str]:
    """Graph inputs and every node output whose inferred type is float32."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for node in model.graph.node:
        if node.op_type in ("Constant", "Shape"):
            continue
        for out in node.output:
            if out and types.get(out) == onnx.TensorProto.FLOAT and out not in names:
                names.append(out)
    return names


class _Instrumented:
    """The FP32 ONNX in ONNX Runtime with its float tensors exposed as outputs, written into buffers that are
    reused from image to image (fresh output arrays cost a page fault per 4 KiB, as much as the model's own
    pass on the CamVid model).

    A Relu's output is not exposed when its input is: its statistics come from the input in the same read
    (``derived``: {Relu output: its input}), which halves what Conv-ReLU networks copy out and scan.
    ONNX Runtime's optimisations stay on: it fuses nothing whose intermediate is a graph output, and the rest
    (NCHWc convolutions) made the instrumented pass 1.1 to 1.3x faster on resnet18 than with them off; values
    differ from the unoptimised graph's by float rounding (5e-7 relative). One image per run: batches of 2 to
    8 (a symbolic batch dimension) were no faster on this 2-core host."""

    def __init__(self, onnx_path: Path) -> None:
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(onnx_path))
        self.names = _float_tensors(model)
        existing = {o.name for o in model.graph.output}
        self.derived: dict[str, str] = {}
        for node in model.graph.node:
            if (node.op_type == "Relu" and node.input[0] in self.names and node.input[0] not in self.derived
                    and node.output[0] in self.names and node.output[0] not in existing):
                self.derived[node.output[0]] = node.input[0]
        for n in self.names:
            if n not in existing and n not in self.derived:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.wanted = [o.name for o in self.session.get_outputs() if o.name in set(self.names)]
        self._binding: Any = None
        self._x = np.empty(0, np.float32)
        self._outs: dict[str, np.ndarray] = {}

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """{exposed tensor: value} for one input; the arrays are overwritten by the next call."""
        import onnxruntime as ort

        if self._binding is None:
            outs = dict(zip(self.wanted, self.session.run(self.wanted, {self.input: x})))
            self._x = np.empty_like(x)
            self._binding = self.session.io_binding()
            self._binding.bind_cpu_input(self.input, self._x)
            for name, v in outs.items():
                self._outs[name] = np.empty_like(v)
                self._binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(self._outs[name]))
        else:
            np.copyto(self._x, x)
            self.session.run_with_iobinding(self._binding)
            outs = dict(self._outs)
        if self.input in self.names:
            outs[self.input] = x
        return outs


class _Scratch:
    """One worker's reusable buffers: |x| as float32, bin indices, a mask. Fresh temporaries for every tensor
    of every image cost more in page faults than the arithmetic (a histogram 2.6x slower)."""

    def __init__(self) -> None:
        self._f = np.empty(0, np.float32)
        self._i = np.empty(0, np.intp)
        self._m = np.empty(0, bool)

    def absolute(self, v: np.ndarray) -> np.ndarray:
        """|v| in the float buffer."""
        if self._f.size < v.size:
            self._f = np.empty(v.size, np.float32)
        return np.abs(v, out=self._f[:v.size])

    def indices(self, a: np.ndarray) -> np.ndarray:
        """``a`` truncated to integers, in the index buffer."""
        if self._i.size < a.size:
            self._i = np.empty(a.size, np.intp)
        out = self._i[:a.size]
        np.copyto(out, a, casting="unsafe")
        return out

    def mask(self, n: int) -> np.ndarray:
        """A boolean buffer of ``n`` values."""
        if self._m.size < n:
            self._m = np.empty(n, bool)
        return self._m[:n]

    def above(self, a: np.ndarray, floor: float) -> np.ndarray:
        """The values of ``a`` greater than ``floor`` (a copy)."""
        return a[np.greater(a, floor, out=self.mask(a.size))]


class _Max:
    """The largest |x| seen, from the maximum and the minimum (no |x| array is written); ``relu()`` is the
    largest value of the tensor's Relu, from the same two."""

    def __init__(self) -> None:
        self.hi, self.lo = 0.0, 0.0

    def add(self, v: np.ndarray, scratch: _Scratch) -> None:
        if v.size:
            self.hi, self.lo = max(self.hi, float(v.max())), min(self.lo, float(v.min()))

    def result(self) -> float:
        return max(self.hi, -self.lo)

    def relu(self) -> float:
        return self.hi


class _Percentile:
    """The q-th percentile of |x| (or, ``signed``, of x) over every value seen, exactly: the K largest values
    are kept (K is what lies above the percentile, 3,000 of 30 million at 99.99); once K are kept a batch
    costs one comparison per value against the K-th largest, and a first batch of millions is cut down
    through a threshold estimated on a sample of it (then checked) instead of being partitioned whole."""

    def __init__(self, total: int, q: float = PERCENTILE, signed: bool = False) -> None:
        self.k = max(1, total - int(np.ceil(q / 100.0 * total)) + 1)
        self.top = np.empty(0, np.float32)
        self.floor = -np.inf  # the K-th largest value once K are kept
        self.signed = signed

    def add(self, v: np.ndarray, scratch: _Scratch) -> None:
        a = v if self.signed else scratch.absolute(v)
        if self.top.size >= self.k:
            a = scratch.above(a, self.floor)
        elif a.size > 8 * self.k:  # keep ~4K candidates: the (1 - 4K/n) quantile of every 64th value
            sample = a[::64].copy()
            cut = int(sample.size * (1.0 - 4.0 * self.k / a.size))
            if 0 < cut < sample.size:
                candidates = scratch.above(a, float(np.partition(sample, cut)[cut]))
                if candidates.size + self.top.size >= self.k:  # enough above the estimate: still exact
                    a = candidates
        if not a.size:
            return
        both = np.concatenate([self.top, a])
        cut = both.size - self.k
        self.top = np.partition(both, cut)[cut:] if cut > 0 else both
        if self.top.size >= self.k:
            self.floor = float(self.top.min())

    def result(self) -> float:
        return max(float(self.top.min()), 0.0) if self.top.size else 0.0


class _WithRelu:
    """A tensor's percentile and its Relu's, from one read: the Relu's K largest values are the tensor's K
    largest signed values (or 0)."""

    def __init__(self, total: int) -> None:
        self.own, self.positive = _Percentile(total), _Percentile(total, signed=True)

    def add(self, v: np.ndarray, scratch: _Scratch) -> None:
        self.own.add(v, scratch)
        self.positive.add(v, scratch)

    def result(self) -> float:
        return self.own.result()

    def relu(self) -> float:
        return self.positive.result()


class _Histogram:
    """A BINS-bin histogram of |x| over [0, amax], amax from a first pass (the bins TensorRT's calibrator
    uses; a range grown during a single pass moved entropy thresholds by 10 % and more on the CamVid model).
    The scale is a hair under BINS / amax, so amax itself lands in the last bin; anything past it (a second
    pass that rounded differently) is counted there too.

    With ``relu_amax`` it also keeps the histogram of the tensor's Relu over [0, relu_amax]. When both ranges
    are the same (the positive side reaches further) one signed bincount gives both, since trunc(x * s) has
    the sign of x and the size of trunc(|x| * s); otherwise the positive values are binned again."""

    def __init__(self, amax: float, method: str = "entropy", relu_amax: float | None = None) -> None:
        self.amax, self.method = amax, method
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
        if self.relu_amax is None:
            a = scratch.absolute(v)
            self._fold(np.bincount(scratch.indices(np.multiply(a, self.scale, out=a)), minlength=BINS), self.hist)
        elif self.relu_amax == self.amax:
            self._signed(v, scratch)
        else:
            a = scratch.absolute(v)
            self._fold(np.bincount(scratch.indices(np.multiply(a, self.scale, out=a)), minlength=BINS), self.hist)
            if self.relu_amax > 0.0:
                p = scratch.above(v, 0.0)
                p *= self._scale(self.relu_amax)
                counts = np.bincount(p.astype(np.intp), minlength=BINS)
                counts[0] += v.size - p.size
                self._fold(counts, self.relu_hist)
        if self.method == "mse":
            self.zeros += v.size - int(np.count_nonzero(v))  # exact zeros (after ReLU) quantise exactly
            if self.relu_amax is not None:
                self.relu_zeros += v.size - int(np.count_nonzero(np.greater(v, 0.0, out=scratch.mask(v.size))))

    def _signed(self, v: np.ndarray, scratch: _Scratch) -> None:
        """Both histograms from one bincount of trunc(x * s) offset by 2 * BINS (room for any rounding)."""
        a = scratch.absolute(v)
        np.multiply(v, self.scale, out=a)
        idx = scratch.indices(a)
        idx += 2 * BINS
        c = np.bincount(idx, minlength=4 * BINS + 1)
        mid = 2 * BINS
        positive = c[mid + 1:]  # bins 1, 2, ... of the positive values
        self._fold(np.concatenate([c[mid:mid + 1], positive + c[mid - 1::-1]]), self.hist)
        self._fold(np.concatenate([[v.size - positive.sum()], positive]), self.relu_hist)

    def result(self) -> float:
        return self._threshold(self.hist, self.amax, self.zeros)

    def relu(self) -> float:
        return self._threshold(self.relu_hist, self.relu_amax or 0.0, self.relu_zeros)

    def _threshold(self, hist: np.ndarray, amax: float, zeros: int) -> float:
        if amax <= 0.0:
            return 0.0
        if self.method == "mse":
            return mse_amax(hist, amax, zeros)
        return entropy_amax(hist, amax)


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def collect_ranges(onnx_path: Path, data: np.ndarray, method: str = "max",
                   progress_desc: str = "measuring activation ranges") -> dict[str, float]:
    """{tensor name: amax} over ``data`` (N, ...) preprocessed inputs, by ``method``.

    ``max``: the largest |x| (one pass); ``percentile``: the 99.99th percentile of |x|, an exact order
    statistic (one pass); ``entropy``: TensorRT's KL-divergence threshold over a 2048-bin histogram of
    [0, max] (two passes: the maxima, then the histograms; the threshold searches run in parallel);
    ``mse``: the threshold of least expected squared error over the same histograms (two passes).
    Each image's tensors are shared out to one worker thread per core (numpy's reductions, bincount and
    partitions release the GIL), each worker with its own buffers; every tensor always goes to the same
    worker, in image order, so the result does not depend on timing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown range method {method!r}")
    return measure(_Instrumented(onnx_path), data, method, progress_desc)


def measure(inst: Any, data: np.ndarray, method: str, progress_desc: str, steps: Any = None) -> dict[str, float]:
    """{tensor name: amax} by ``method`` (see ``collect_ranges``) from any model that shows its tensors:
    ``inst.run(x)`` gives {name: value} for one input, ``inst.names`` every tensor measured, ``inst.derived``
    {Relu output: its input} for outputs measured from their input's read (the TFLite converter's float model
    is read this way too). ``steps(range, desc)`` iterates the images, reporting progress (default: a bar)."""
    with_relu = set(inst.derived.values())
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        if method == "max":
            found = _results(inst, _pass(inst, data, pool, lambda name, per_image: _Max(), progress_desc, steps),
                             pool)
        elif method == "percentile":
            found = _results(inst, _pass(inst, data, pool, lambda name, per_image: (
                _WithRelu if name in with_relu else _Percentile)(per_image * len(data)), progress_desc, steps), pool)
        else:
            maxima = _pass(inst, data, pool, lambda name, per_image: _Max(), f"{progress_desc} (maxima)", steps)
            hists = _pass(inst, data, pool, lambda name, per_image: _Histogram(
                maxima[name].result(), method, maxima[name].relu() if name in with_relu else None),
                f"{progress_desc} (histograms)", steps)
            found = _results(inst, hists, pool)
    return {n: float(found.get(n, 0.0)) for n in inst.names}


def _results(inst: Any, collectors: dict[str, Any], pool: ThreadPoolExecutor) -> dict[str, float]:
    """{tensor: amax} from each exposed tensor's collector and, for a derived Relu output, from its input's
    (the threshold searches run in parallel)."""
    jobs = [(n, c.result) for n, c in collectors.items()]
    jobs += [(relu, collectors[src].relu) for relu, src in inst.derived.items() if src in collectors]
    return dict(zip([n for n, _ in jobs], pool.map(lambda job: job[1](), jobs)))


def _pass(inst: Any, data: np.ndarray, pool: ThreadPoolExecutor, make: Any, desc: str,
          steps: Any = None) -> dict[str, Any]:
    """One pass over ``data``, every exposed tensor fed to its collector (made by ``make(name, values per
    image)``); {name: collector}. The tensors are split into one share per worker, balanced by size, once, on
    the first image."""
    from edgeport.progress import progress

    steps = steps or progress
    collectors: dict[str, Any] = {}
    shares: list[list[str]] = []
    scratch = [_Scratch() for _ in range(_workers())]

    def work(k: int, outs: dict[str, np.ndarray]) -> None:
        for name in shares[k]:
            collectors[name].add(outs[name].ravel(), scratch[k])

    for i in steps(range(len(data)), desc):
        outs = inst.run(np.ascontiguousarray(data[i:i + 1], dtype=np.float32))
        if not shares:
            collectors.update({name: make(name, v.size) for name, v in outs.items()})
            shares = [[] for _ in scratch]
            load = [0] * len(scratch)
            for name in sorted(outs, key=lambda n: -outs[n].size):
                k = load.index(min(load))
                shares[k].append(name)
                load[k] += outs[name].size
        for f in [pool.submit(work, k, outs) for k in range(len(shares))]:
            f.result()
    return collectors


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
    of bins are evaluated together, in arrays: no Python loop over bins or candidates.
    """
    hist = np.asarray(hist, np.float64)
    n, total = len(hist), float(hist.sum())
    if total == 0 or amax == 0:
        return amax
    csum = np.concatenate([[0.0], np.cumsum(hist)])
    cnz = np.concatenate([[0], np.cumsum(hist != 0)])
    best_kl, best_i = np.inf, n
    for m in range(1, n // levels + 1):  # candidates whose quantised bins merge m bins each
        cand = np.arange(levels * m, min(levels * (m + 1), n + 1))
        if not cand.size:
            continue
        width = int(cand[-1])
        j = np.arange(width)
        inside = j[None, :] < cand[:, None]
        rows = np.arange(len(cand))
        tail = total - csum[cand]
        p = np.where(inside, hist[None, :width], 0.0)
        p[rows, cand - 1] += tail
        nonzero = p != 0
        level = np.minimum(j // m, levels - 1)
        starts = np.arange(levels) * m
        ends = np.broadcast_to(np.minimum(starts + m, width), (len(cand), levels)).copy()
        ends[:, -1] = cand  # the last level runs to the candidate
        level_sum = csum[ends] - csum[starts][None, :]
        level_nz = (cnz[ends] - cnz[starts][None, :]).astype(np.float64)
        level_nz[:, -1] += (hist[cand - 1] == 0) & (tail > 0)  # a last bin nonzero only through the outliers
        share = np.divide(level_sum, level_nz, out=np.zeros_like(level_sum), where=level_nz > 0)
        q = np.where(nonzero, share[:, level], 0.0)
        qsum = q.sum(1, keepdims=True)
        kl = _kl_rows(p / total, np.divide(q, qsum, out=np.zeros_like(q), where=qsum > 0), inside, cand, eps)
        kl[qsum[:, 0] <= 0] = np.inf
        k = int(np.argmin(kl))
        if kl[k] < best_kl:
            best_kl, best_i = float(kl[k]), int(cand[k])
    return float((best_i + 0.5) * amax / n)


def _kl_rows(p: np.ndarray, q: np.ndarray, inside: np.ndarray, lengths: np.ndarray, eps: float) -> np.ndarray:
    """KL(smooth(p) || smooth(q)) per row over each row's first ``lengths`` bins; inf where smoothing fails."""
    def smooth(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        zero = (d == 0) & inside
        n_zero = zero.sum(1)
        n_nonzero = lengths - n_zero
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = eps * n_zero / n_nonzero
        return np.where(zero, eps, d - shift[:, None]), (n_nonzero > 0) & (shift < 1.0)

    ps, ok_p = smooth(p)
    qs, ok_q = smooth(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(inside, ps * np.log(ps / qs), 0.0).sum(1)
    kl[~(ok_p & ok_q) | ~np.isfinite(kl)] = np.inf
    return kl


# ---------------------------------------------------------------- calibration cache (TensorRT 8.x)
def trt_version_tag(version: str) -> str:
    """'8.2.1' -> '8201', as TensorRT writes it in a cache header (major*1000 + minor*100 + patch)."""
    parts = [int(p) for p in (version.split(".") + ["0", "0"])[:3]]
    return str(parts[0] * 1000 + parts[1] * 100 + parts[2])


def scale_of(amax: float) -> float:
    """Symmetric int8 scale for a range; never zero (TensorRT requires positive scales)."""
    return max(float(amax), 1e-8) / 127.0


def write_cache(ranges: dict[str, float], trt_version: str, path: Path) -> None:
    """A TensorRT 8.x calibration cache (IInt8EntropyCalibrator2) for these ranges."""
    lines = [f"TRT-{trt_version_tag(trt_version)}-EntropyCalibration2"]
    for name, amax in ranges.items():
        lines.append(f"{name}: {struct.pack('>f', scale_of(amax)).hex()}")
    path.write_text("\n".join(lines) + "\n")


def read_cache(path: Path) -> tuple[str, str, dict[str, float]]:
    """(version tag, algorithm, {tensor: scale}) of a calibration cache."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    head = lines[0].split("-")
    if len(head) != 3 or head[0] != "TRT":
        raise ValueError(f"{path}: not a TensorRT calibration cache header: {lines[0]!r}")
    scales = {}
    for ln in lines[1:]:
        name, _, hexval = ln.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
    return head[1], head[2], scales
