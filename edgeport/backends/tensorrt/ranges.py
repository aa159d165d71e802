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


def collect_ranges(onnx_path: Path, data: np.ndarray, method: str = "max",
                   progress_desc: str = "measuring activation ranges") -> dict[str, float]:
    """{tensor name: amax} over ``data`` (N, ...) preprocessed inputs, by ``method``."""
    import onnx
    import onnxruntime as ort

    from edgeport.progress import progress

    model = onnx.load(str(onnx_path))
    names = _float_tensors(model)
    existing = {o.name for o in model.graph.output}
    for n in names:
        if n not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    wanted = [n for n in out_names if n in set(names)]

    def run(i: int) -> dict[str, np.ndarray]:
        outs = sess.run(wanted, {in_name: data[i:i + 1]})
        res = dict(zip(wanted, outs))
        if in_name in names:
            res[in_name] = data[i:i + 1]
        return res

    amax = {n: 0.0 for n in names}
    for i in progress(range(len(data)), progress_desc):
        for n, v in run(i).items():
            amax[n] = max(amax[n], float(np.abs(v).max()) if v.size else 0.0)
    if method == "max":
        return amax
    hists = {n: np.zeros(BINS, np.int64) for n in names}
    for i in progress(range(len(data)), f"{progress_desc} (histograms)"):
        for n, v in run(i).items():
            if amax[n] > 0:
                hists[n] += np.histogram(np.abs(v), bins=BINS, range=(0.0, amax[n]))[0]
    if method == "percentile":
        return {n: percentile_amax(hists[n], amax[n]) for n in names}
    if method == "entropy":
        return {n: entropy_amax(hists[n], amax[n]) for n in names}
    raise ValueError(f"unknown range method {method!r}")


def percentile_amax(hist: np.ndarray, amax: float, q: float = PERCENTILE) -> float:
    """The q-th percentile of |x| from its histogram over [0, amax]."""
    total = hist.sum()
    if total == 0 or amax == 0:
        return amax
    cdf = np.cumsum(hist) / total
    idx = int(np.searchsorted(cdf, q / 100.0))
    return float(min(idx + 1, len(hist)) * amax / len(hist))


def _smooth(dist: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Give empty bins a little mass taken from the others, so KL stays finite (as MXNet/TensorRT do)."""
    zero = dist == 0
    n_zero, n_nonzero = int(zero.sum()), int((~zero).sum())
    if n_nonzero == 0:
        return None
    eps1 = eps * n_zero / n_nonzero
    if eps1 >= 1.0:
        return None
    out = dist.astype(np.float64).copy()
    out[zero] = eps
    out[~zero] -= eps1
    return out


def entropy_amax(hist: np.ndarray, amax: float, levels: int = QUANT_LEVELS) -> float:
    """TensorRT's entropy calibration: the threshold minimising KL(P || Q) over bins [levels, BINS).

    P is the histogram up to the candidate threshold with the outliers folded into its last bin;
    Q is that histogram quantised into ``levels`` bins and spread back over the nonzero bins;
    both are normalised and smoothed before the divergence.
    """
    hist = hist.astype(np.float64)
    if hist.sum() == 0 or amax == 0:
        return amax
    n = len(hist)
    width = amax / n
    best_kl, best_i = np.inf, n
    for i in range(levels, n + 1):
        sliced = hist[:i]
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()  # clip outliers into the last bin
        nonzero = p != 0
        merged = i // levels  # each quantised bin merges this many bins; the last takes the remainder
        q = np.zeros(i)
        for k in range(levels):
            a = k * merged
            b = i if k == levels - 1 else a + merged
            nz = nonzero[a:b]
            if nz.any():
                q[a:b][nz] = sliced[a:b].sum() / nz.sum()
        q[~nonzero] = 0
        ps, qs = _smooth(p / p.sum()), _smooth(q / q.sum()) if q.sum() > 0 else None
        if ps is None or qs is None:
            continue
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float((best_i + 0.5) * width)


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
