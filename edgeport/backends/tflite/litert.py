"""LiteRT and TensorFlow's converter as the TFLite job uses them: calibrated and quantized models (TensorFlow's
calibrator, edgeport's ranges), interpreters that read intermediate tensors, a model's inputs and outputs.
Imported by the conversion job's process only (edgeport.backends.tflite.convert): TensorFlow stays out of builds."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

# onnx2tf's convolution names in TFLite tensor names: the k-th regular / depthwise Conv (k = 0 unsuffixed).
TF_CONV = re.compile(r"(tf\.nn\.convolution|depthwise_conv2d)(?:_(\d+))?/")

class _Progress:
    """``[tflite-progress] DONE TOTAL WHAT`` lines for the parent's progress bar, at most five a second (and the
    last one always)."""

    def __init__(self, what: str) -> None:
        self.what, self.last = what, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if done >= total or now - self.last >= 0.2:
            self.last = now
            print(f"[tflite-progress] {done} {total} {self.what}", file=sys.stderr, flush=True)


class _FloatTensors:
    """The converter's calibrated float model in the interpreter, every tensor kept: what
    edgeport.quantize.ranges.measure reads (``run``, ``names``, ``derived``). Its tensors are those the
    converter records a min/max for: the activations, the input and the outputs."""

    def __init__(self, blob: bytes, index: dict[str, int] | None = None) -> None:
        import numpy as np
        from tensorflow.lite.tools import flatbuffer_utils

        if index is None:
            graph = flatbuffer_utils.read_model_from_bytearray(bytearray(blob)).subgraphs[0]
            index = {t.name.decode(): i for i, t in enumerate(graph.tensors) if _min_max(t)}
        self.blob, self.index = blob, index
        self.it = _interpreter(blob, True, threads=1)
        self.names = list(self.index)
        self.derived: dict[str, str] = {}
        # every tensor keeps its own buffer: what one more worker's interpreter costs
        self.footprint = sum(int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize
                             for d in self.it.get_tensor_details())

    def fork(self) -> _FloatTensors:
        """Another interpreter of the same model, for another worker thread (the interpreter releases the GIL
        while it runs)."""
        return _FloatTensors(self.blob, self.index)

    def run(self, x: Any) -> Any:
        """(name, value) of each recorded tensor for one image, one at a time: views into the interpreter's
        own buffers (each tensor keeps its own), valid until the next run. Copies of every tensor at once would
        hold a second copy of all the activations per worker (docs/benchmarks/ranges.md)."""
        _infer(self.it, x)
        for n, i in self.index.items():
            yield n, self.it.tensor(i)()


def _min_max(tensor: Any) -> bool:
    q = tensor.quantization
    return q is not None and q.min is not None and q.max is not None and len(q.min) == 1 == len(q.max)


def _steps(items: range, desc: str) -> Any:
    """``items`` with ``[tflite-progress]`` lines for the parent's bar."""
    report = _Progress(desc)
    for done, i in enumerate(items):
        report(done, len(items))
        yield i
    report(len(items), len(items))


def calibrate(recorded: bytes, images: Any, method: str = "max") -> tuple[bytes, dict[str, float] | None]:
    """The calibrated float model with every recorded [min, max] (activations, the input and the outputs)
    measured over ``images`` (NHWC) by edgeport: the converter recorded them from one image only; and, from
    the same pass, each tensor's amax by ``method`` for ``narrow_ranges`` (None for ``max``). One interpreter
    per worker, builtin kernels: faster than the converter's own calibration loop, and the same ranges (a test
    holds the two to float rounding; docs/benchmarks/ranges.md has the timings)."""
    import numpy as np
    from tensorflow.lite.tools import flatbuffer_utils

    from edgeport.quantize.ranges import measure

    t = time.time()
    source = _FloatTensors(recorded)
    spans: dict[str, tuple[float, float]] = {}
    what = "min/max" + ("" if method == "max" else f" and {method}")
    amax = measure(source, np.ascontiguousarray(images, np.float32), method,
                   f"calibrating activation ranges ({what}) on {len(images)} images", _steps, spans)
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(recorded))
    tensors = model.subgraphs[0].tensors
    for name, i in source.index.items():
        lo, hi = spans[name]
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise RuntimeError(f"no values seen for {name} in the calibration pass")
        tensors[i].quantization.min, tensors[i].quantization.max = [lo], [hi]
    _stage(f"{what} of {len(source.index)} tensors over {len(images)} calibration images ({time.time() - t:.1f}s)")
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), None if method == "max" else amax


def narrow_ranges(calibrated: bytes, amax: dict[str, float], method: str, images: int) -> tuple[bytes, dict[str, Any]]:
    """The calibrated model with each activation's recorded [min, max] narrowed to [-amax, amax], amax measured
    by ``method`` (``calibrate``) as TensorRT's ranges are (edgeport.quantize.ranges: percentile,
    entropy or mse of |x|); a range is only ever narrowed, never widened. The quantizer then rounds to these.
    The model's input and outputs keep their min/max (narrowing them too chose worse on the CamVid selection
    half); an output that a scale-keeping op (Resize, Reshape) produces still takes its input's narrowed range
    from the quantizer. What each method gives on the CamVid U-Net: docs/benchmarks/ranges.md."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(calibrated))
    graph = model.subgraphs[0]
    io = set(graph.inputs) | set(graph.outputs)
    activations = [t for i, t in enumerate(graph.tensors) if i not in io and _min_max(t)]
    narrowed = 0
    for tensor in activations:
        q, a = tensor.quantization, amax.get(tensor.name.decode(), 0.0)
        if a <= 0.0:
            continue
        lo, hi = max(float(q.min[0]), -a), min(float(q.max[0]), a)
        narrowed += int(lo > q.min[0] or hi < q.max[0])
        q.min, q.max = [lo], [hi]
    _stage(f"{method} ranges: {narrowed} of {len(activations)} activation ranges narrowed")
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), {
        "method": method, "images": images, "tensors": len(activations), "narrowed": narrowed}


def quantize(calibrated: bytes, deny: list[str], float_outputs: bool = False) -> bytes:
    """Full-integer INT8 (int8 input and output) from a calibrated model, the ``deny`` tensors' ops in float
    (TensorFlow's selective quantization; private API of the converter, as its quantization debugger uses);
    with ``float_outputs`` the outputs stay float32 (a head kept in float is not rounded to 256 levels at the
    very end: a box coordinate in [0, 1] would move by up to 1/510 of the frame)."""
    import tensorflow as tf
    from tensorflow.lite.python import convert as tfl_convert

    return tfl_convert.mlir_quantize(calibrated, False, input_data_type=tf.int8,
                                     output_data_type=tf.float32 if float_outputs else tf.int8,
                                     denylisted_nodes=deny or None)


def denylist(calibrated: bytes, convs: list[list[Any]]) -> list[str]:
    """The output tensor names of the convolutions ``[[kind, k, onnx name]]`` in the calibrated model."""
    want = {(kind, int(k)) for kind, k, _ in convs}
    it = _interpreter(calibrated)
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    found = []
    for op in it._get_ops_details():  # noqa: SLF001 (the public API has no op list)
        if op["op_name"] in QUANTIZED_OPS and len(op["outputs"]):
            name = names[op["outputs"][0]]
            m = TF_CONV.search(name)
            if m and (m.group(1), int(m.group(2) or 0)) in want:
                found.append(name)
    if len(found) != len(want):
        raise SystemExit(f"INT8 quantization broke: {len(want)} convolution(s) to keep in float, {len(found)} found "
                         "by onnx2tf's names (this onnx2tf names its layers differently)")
    return found


# ---------------------------------------------------------------- accuracy-aware INT8 (float fallback)
QUANTIZED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")

RANK_IMAGES = 4

def _interpreter(blob: bytes, keep_all: bool = False, threads: int | None = None) -> Any:
    """An interpreter of ``blob``. With ``keep_all`` every tensor keeps its value after a run, and the XNNPACK
    delegate is left out: inside a delegated partition the intermediate tensors are never written (on the CamVid
    detector a box decode's StridedSlice and Mul read back stale values, ranges off by up to 60x)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if keep_all else OpResolverType.AUTO
    it = Interpreter(model_content=blob, experimental_preserve_all_tensors=keep_all, num_threads=threads,
                     experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    return it


def _infer_all(it: Any, x: Any, onnx_outputs: list[str] | None) -> dict[str, Any]:
    """Every output of one NHWC float image through an interpreter, dequantized, by ONNX name in the ONNX order
    (the signature numbers them output_0..n in that order, see ``details``)."""
    import numpy as np

    d = it.get_input_details()[0]
    scale, zero = d["quantization"]
    feed = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8) if d["dtype"] == np.int8 else x
    it.set_tensor(d["index"], feed.astype(d["dtype"]))
    it.invoke()
    sig = it.get_signature_runner().get_output_details()
    ordered = sorted(sig, key=lambda n: int(n[7:]) if n.startswith("output_") and n[7:].isdigit() else 0)
    out = {}
    for k, name in enumerate(ordered):
        o = sig[name]
        y = it.get_tensor(o["index"])
        scale, zero = o["quantization"]
        y = (y.astype(np.float32) - zero) * scale if o["dtype"] == np.int8 else y.astype(np.float32)
        out[onnx_outputs[k] if onnx_outputs and k < len(onnx_outputs) else name] = y
    return out


def _infer(it: Any, x: Any) -> Any:
    """One NHWC float image through an interpreter whose input and output may be int8."""
    import numpy as np

    d = it.get_input_details()[0]
    scale, zero = d["quantization"]
    feed = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8) if d["dtype"] == np.int8 else x
    it.set_tensor(d["index"], feed.astype(d["dtype"]))
    it.invoke()
    o = it.get_output_details()[0]
    y = it.get_tensor(o["index"])
    scale, zero = o["quantization"]
    return (y.astype(np.float32) - zero) * scale if o["dtype"] == np.int8 else y.astype(np.float32)


def _tensors(it: Any) -> dict[str, Any]:
    """Every tensor of an interpreter run with preserve_all_tensors, dequantized, by name."""
    import numpy as np

    out = {}
    for t in it.get_tensor_details():
        try:
            v = it.get_tensor(t["index"])
        except ValueError:
            continue
        if v.dtype == np.int8:
            scale, zero = t["quantization"]
            if not scale:
                continue
            v = (v.astype(np.float32) - zero) * scale
        elif v.dtype != np.float32:
            continue
        out[t["name"]] = v
    return out


def all_tensors(blob: bytes, images: Any) -> list[dict[str, Any]]:
    """Every tensor of the model, dequantized, for each image (the float reference for ``rank_ops``)."""
    it = _interpreter(blob, True)
    out = []
    for x in images:
        _infer(it, x[None])
        out.append(_tensors(it))
    return out


def decode_tail(blob: bytes) -> list[str]:
    """The output tensor names of the last weighted layers (the heads) and the ops after them: no convolution or
    fully-connected op reads anything they compute (a detector's box decoding and score activation, a
    segmenter's last resize).
    Full-integer INT8 gives them one scale per tensor, which a box decode (exp, multiplications, coordinates
    in one tensor) does not survive."""
    it = _interpreter(blob)
    ops = it._get_ops_details()  # noqa: SLF001 (the public API has no op list)
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    readers: dict[int, list[int]] = {}
    for k, op in enumerate(ops):
        for t in op["inputs"]:
            readers.setdefault(int(t), []).append(k)
    memo: dict[int, bool] = {}

    def feeds_weighted(k: int) -> bool:
        if k not in memo:
            memo[k] = False  # no cycles in a TFLite graph; guards re-entry
            memo[k] = any(ops[r]["op_name"] in QUANTIZED_OPS or feeds_weighted(r)
                          for t in ops[k]["outputs"] for r in readers.get(int(t), []))
        return memo[k]

    tail = []
    for k, op in enumerate(ops):
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE") or not len(op["outputs"]):
            continue
        if not feeds_weighted(k):  # the last weighted layers themselves (the heads) too
            tail.append(names[int(op["outputs"][0])])
    return tail


def short_name(tensor: str) -> str:
    """The TensorFlow op a fused TFLite tensor name ends in (``model/tf.nn.convolution_1/convolution``)."""
    parts = [p for p in tensor.split(";") if "/" in p]
    conv = [p for p in parts if "convolution" in p or "depthwise" in p or "MatMul" in p or "conv2d" in p]
    return (conv or parts or [tensor])[-1]


def check_scales(path: Path, limit: float = 1e6) -> None:
    """Refuse a quantized model with an absurd scale (an infinite range upstream), naming the op.

    Such a model makes XNNPACK refuse to prepare and the reference kernels abort, on the device too.
    """
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    for op in it._get_ops_details():  # noqa: SLF001 (the public API has no op list)
        for t in list(op["inputs"]) + list(op["outputs"]):
            scale = tensors[t]["quantization"][0] if t >= 0 and t in tensors else 0.0
            if scale > limit or scale != scale:
                raise SystemExit(f"INT8 quantization broke at op {op['index']} {op['op_name']} (tensor "
                                 f"'{tensors[t]['name']}' has scale {scale:.3g}): an unbounded value (an -inf "
                                 "padding, a huge constant) reaches a quantized tensor")


def details(path: Path, onnx_outputs: list[str] | None = None) -> dict[str, Any]:
    """Inputs and outputs of a .tflite by the ONNX names its signature carries (an ExportArchive signature
    names outputs output_0..n, in the ONNX graph's output order: ``onnx_outputs`` names them back)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    sig = it.get_signature_runner()

    def one(name: str, d: dict[str, Any]) -> dict[str, Any]:
        scale, zp = d["quantization"]
        return {"name": name, "shape": [int(s) for s in d["shape"]], "dtype": d["dtype"].__name__,
                "index": int(d["index"]), "quant": {"scale": float(scale), "zero_point": int(zp)} if scale else None}

    outputs = sig.get_output_details()

    def onnx_name(name: str) -> str:
        index = name[len("output_"):]
        if onnx_outputs and name.startswith("output_") and index.isdigit() and int(index) < len(onnx_outputs):
            return onnx_outputs[int(index)]
        return name

    ordered = sorted(outputs, key=lambda n: int(n[7:]) if n.startswith("output_") and n[7:].isdigit() else 0)
    return {"inputs": [one(n, d) for n, d in sig.get_input_details().items()],
            "outputs": [one(onnx_name(n), outputs[n]) for n in ordered]}


def _stage(msg: str) -> None:
    print(f"[tflite] {msg}", file=sys.stderr, flush=True)

