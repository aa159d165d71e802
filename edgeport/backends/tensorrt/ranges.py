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
  quantised levels (what IInt8EntropyCalibrator2 computes).

From them come (1) an explicit-quantization Q/DQ ONNX in the form TensorRT 8.5+ and 10.x
consume: symmetric int8, zero points 0, per-tensor activation scales, per-channel weight
scales on axis 0 of Conv and Gemm(transB=1) weights and axis 1 of ConvTranspose; and (2) for
TensorRT 8.x a native calibration cache: a ``TRT-<version>-EntropyCalibration2`` header and
one ``tensor: hex`` line per tensor, the hex being the scale (amax / 127) as big-endian float32.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

BINS = 2048
QUANT_LEVELS = 128
PERCENTILE = 99.99
METHODS = ("max", "percentile", "entropy")
CODE_VERSION = 2  # bumped whenever a method's numbers change, so cached ranges are measured again
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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


def _instrumented(onnx_path: Path) -> tuple[Any, str, list[str], list[str]]:
    """(session, input name, exposed tensors, float tensors) for the FP32 ONNX with every float tensor exposed
    as an output and graph optimisations off (a fused pair would hide the tensor between them). One image
    per run: batches of 2 to 8 (a symbolic batch dimension) were no faster on this 2-core host."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    names = _float_tensors(model)
    existing = {o.name for o in model.graph.output}
    for n in names:
        if n not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = [o.name for o in sess.get_outputs() if o.name in set(names)]
    return sess, sess.get_inputs()[0].name, wanted, names


class _Max:
    """The largest |x| seen (from the maximum and the minimum: no |x| array is written)."""

    def __init__(self) -> None:
        self.amax = 0.0

    def add(self, v: np.ndarray) -> None:
        if v.size:
            self.amax = max(self.amax, float(v.max()), -float(v.min()))

    def result(self) -> float:
        return self.amax


class _Percentile:
    """The q-th percentile of |x| over every value seen, exactly: the K largest values are kept (K is what lies
    above the percentile, 3,000 of 30 million at 99.99); once K are kept a batch costs one comparison per
    value against the K-th largest, and a first batch of millions is cut down through a threshold estimated
    on a sample of it (then checked) instead of being partitioned whole."""

    def __init__(self, total: int, q: float = PERCENTILE) -> None:
        self.k = max(1, total - int(np.ceil(q / 100.0 * total)) + 1)
        self.top = np.empty(0, np.float32)
        self.floor = -np.inf  # the K-th largest value once K are kept

    def add(self, v: np.ndarray) -> None:
        if self.top.size >= self.k:
            a = np.abs(v[(v > self.floor) | (v < -self.floor)])
        else:
            a = None
            if v.size > 8 * self.k:  # keep ~4K candidates: the (1 - 4K/n) quantile of every 64th |x|
                sample = np.abs(v[::64])
                cut = int(sample.size * (1.0 - 4.0 * self.k / v.size))
                if 0 < cut < sample.size:
                    thr = np.partition(sample, cut)[cut]
                    candidates = np.abs(v[(v >= thr) | (v <= -thr)])
                    if candidates.size + self.top.size >= self.k:  # enough above the estimate: still exact
                        a = candidates
            if a is None:
                a = np.abs(v)
        if not a.size:
            return
        both = np.concatenate([self.top, a])
        cut = both.size - self.k
        self.top = np.partition(both, cut)[cut:] if cut > 0 else both
        if self.top.size >= self.k:
            self.floor = float(self.top.min())

    def result(self) -> float:
        return float(self.top.min()) if self.top.size else 0.0


class _Histogram:
    """A BINS-bin histogram of |x| over [0, amax], amax from a first pass (the bins TensorRT's calibrator
    uses; a range grown during a single pass moved entropy thresholds by 10 % and more on the CamVid model).
    The scale is a hair under BINS / amax, so amax itself lands in the last bin without a clip."""

    def __init__(self, amax: float) -> None:
        self.hist = np.zeros(BINS, np.int64)
        self.amax = amax
        self.scale = np.float32((BINS - 1e-3) / amax) if amax > 0.0 else np.float32(0.0)

    def add(self, v: np.ndarray) -> None:
        if self.amax > 0.0:
            self.hist += np.bincount(np.multiply(np.abs(v), self.scale).astype(np.intp), minlength=BINS)

    def result(self) -> float:
        return entropy_amax(self.hist, self.amax) if self.amax > 0.0 else 0.0


def collect_ranges(onnx_path: Path, data: np.ndarray, method: str = "max",
                   progress_desc: str = "measuring activation ranges") -> dict[str, float]:
    """{tensor name: amax} over ``data`` (N, ...) preprocessed inputs, by ``method``.

    ``max``: the largest |x| (one pass); ``percentile``: the 99.99th percentile of |x|, an exact order
    statistic (one pass); ``entropy``: TensorRT's KL-divergence threshold over a 2048-bin histogram of
    [0, max] (two passes: the maxima, then the histograms; the threshold searches run two at a time).
    """
    if method not in METHODS:
        raise ValueError(f"unknown range method {method!r}")
    session = _instrumented(onnx_path)
    names = session[3]
    if method == "max":
        found = _pass(session, data, {}, lambda name, per_image: _Max(), progress_desc)
    elif method == "percentile":
        found = _pass(session, data, {}, lambda name, per_image: _Percentile(per_image * len(data)), progress_desc)
    else:
        amax = _pass(session, data, {}, lambda name, per_image: _Max(), f"{progress_desc} (maxima)")
        hists = _pass(session, data, {}, lambda name, per_image: _Histogram(amax.get(name, 0.0)),
                      f"{progress_desc} (histograms)", results=False)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2) as pool:  # the KL searches are large array operations: no GIL
            found = dict(zip(hists, pool.map(lambda h: h.result(), hists.values())))
    return {n: float(found.get(n, 0.0)) for n in names}


def _pass(session: tuple[Any, str, list[str], list[str]], data: np.ndarray, collectors: dict[str, Any],
          make: Any, desc: str, results: bool = True) -> dict[str, Any]:
    """One ONNX Runtime pass over ``data``, every exposed tensor fed to its collector (made by
    ``make(name, values per image)``); {name: result} (or the collectors themselves)."""
    from edgeport.progress import progress

    sess, in_name, wanted, names = session
    for i in progress(range(len(data)), desc):
        x = np.ascontiguousarray(data[i:i + 1])
        outs = dict(zip(wanted, sess.run(wanted, {in_name: x})))
        if in_name in names:
            outs[in_name] = x
        for name, v in outs.items():
            if name not in collectors:
                collectors[name] = make(name, v.size)
            collectors[name].add(v.ravel())
    return {n: c.result() for n, c in collectors.items()} if results else collectors


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


# ---------------------------------------------------------------- explicit Q/DQ ONNX
def _weight_axis(node: Any) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return 0


def ignored_nodes(onnx_path: Path, names: Iterable[str], patterns: Iterable[str], types: Iterable[str]) -> set[str]:
    """Node names matched by [quantize] ignored_names / ignored_patterns (re.search) / ignored_types."""
    import re

    import onnx

    names, types = set(names), set(types)
    regexes = [re.compile(p) for p in patterns]
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {n.name for n in graph.node if n.name in names or n.op_type in types
            or any(r.search(n.name) for r in regexes)}


def write_qdq(onnx_path: Path, ranges: dict[str, float], out: Path,
              keep_float: set[str] | None = None) -> dict[str, int]:
    """The Q/DQ ONNX: activations per-tensor and weights per-channel, symmetric int8, zero points 0.

    Nodes named in ``keep_float`` get no Q/DQ: TensorRT runs them in FP16/FP32 (explicit mode).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    new_nodes: list[Any] = []
    done: dict[str, str] = {}  # tensor -> its dequantized name
    counts = {"activations": 0, "weights": 0, "kept_float": 0}
    keep_float = keep_float or set()

    def zp(name: str, n: int | None = None) -> str:
        arr = np.zeros(n, np.int8) if n else np.array(0, np.int8)
        graph.initializer.append(numpy_helper.from_array(arr, name))
        return name

    def qdq_activation(tensor: str) -> str:
        if tensor in done:
            return done[tensor]
        if tensor not in ranges:
            return tensor
        s = f"{tensor}_edgeport_scale"
        graph.initializer.append(numpy_helper.from_array(np.array(scale_of(ranges[tensor]), np.float32), s))
        z = zp(f"{tensor}_edgeport_zp")
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tensor}_q"], name=f"{tensor}_Q"))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", s, z], [f"{tensor}_dq"],
                                          name=f"{tensor}_DQ"))
        done[tensor] = f"{tensor}_dq"
        counts["activations"] += 1
        return done[tensor]

    def qdq_weight(name: str, axis: int) -> str:
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        reduce = tuple(d for d in range(w.ndim) if d != axis)
        amax = np.abs(w).max(axis=reduce) if reduce else np.abs(w)
        scales = (np.maximum(amax, 1e-8) / 127.0).astype(np.float32)
        s, z = f"{name}_edgeport_wscale", zp(f"{name}_edgeport_wzp", len(scales))
        graph.initializer.append(numpy_helper.from_array(scales, s))
        new_nodes.append(helper.make_node("QuantizeLinear", [name, s, z], [f"{name}_q"], name=f"{name}_Q", axis=axis))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"], name=f"{name}_DQ",
                                          axis=axis))
        counts["weights"] += 1
        return f"{name}_dq"

    for node in graph.node:
        if node.name in keep_float:
            counts["kept_float"] += 1
        elif node.op_type in QUANTIZED_OPS and len(node.input) >= 2 and node.input[1] in inits \
                and inits[node.input[1]].data_type == TensorProto.FLOAT:
            node.input[0] = qdq_activation(node.input[0])
            node.input[1] = qdq_weight(node.input[1], _weight_axis(node))
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(_toposort(new_nodes, [i.name for i in graph.input] + list(inits)))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return counts


def _toposort(nodes: list[Any], available: Iterable[str]) -> list[Any]:
    """Nodes ordered so every input is produced before it is used (Q/DQ pairs join late)."""
    ready = set(available) | {""}
    produced_by = {o: n for n in nodes for o in n.output}
    out, placed = [], set()

    def place(n: Any) -> None:
        if id(n) in placed:
            return
        for i in n.input:
            if i not in ready and i in produced_by:
                place(produced_by[i])
        placed.add(id(n))
        out.append(n)
        ready.update(n.output)

    for n in nodes:
        place(n)
    return out
