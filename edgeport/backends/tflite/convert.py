"""The TFLite conversion job: ONNX -> (onnx2tf) saved_model -> (TFLiteConverter) .tflite.

Run as ``python -m edgeport.backends.tflite.convert JOB.json`` in a work folder by the backend,
so TensorFlow stays out of the build process and onnx2tf finds its sample file in the
current directory. Offline by construction:

* onnx2tf 1.x downloads ``calibration_image_sample_data_20x128x128x3_float32.npy`` from GitHub
  for its checks unless a file of that name is in the current directory; the job writes one
  (from the calibration frames) before onnx2tf is imported;
* every outbound socket connection in this process is refused, so a library that still tries
  fails at once with a message instead of hanging on a missing network.

onnx2tf only builds the TensorFlow graph (NCHW -> NHWC); every precision is then written by
TensorFlow's own converter from that saved_model, with builtin ops only (a Flex op would not
load in LiteRT): FP32, FP16 weights, dynamic-range, and full-integer INT8 with int8 input and
output calibrated on the shared calibration set (already preprocessed, in NHWC). This also
skips onnx2tf's int16-activation variants, minutes each, which it cannot be told not to write.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
# onnx2tf's convolution names in TFLite tensor names: the k-th regular / depthwise Conv (k = 0 unsuffixed).
TF_CONV = re.compile(r"(tf\.nn\.convolution|depthwise_conv2d)(?:_(\d+))?/")


def _block_network() -> None:
    def refuse(self: socket.socket, address: Any) -> None:
        raise OSError(f"edgeport: network access during TFLite conversion refused ({address})")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.socket.connect_ex = refuse  # type: ignore[method-assign,assignment]


def write_sample(data: Any, path: Path) -> None:
    """onnx2tf's sample file: 20 RGB images 128x128, float32 in 0..1 (from our calibration frames)."""
    import cv2
    import numpy as np

    imgs = []
    for frame in data[:20]:
        imgs.append(cv2.resize(frame, (128, 128))[:, :, ::-1].astype(np.float32) / 255.0)
    while len(imgs) < 20:
        imgs.append(imgs[len(imgs) % max(1, len(imgs))] if imgs else np.full((128, 128, 3), 0.5, np.float32))
    np.save(path, np.stack(imgs).astype(np.float32))


def _stage(msg: str) -> None:
    print(f"[tflite] {msg}", file=sys.stderr, flush=True)


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


def _count_onnx2tf_ops() -> None:
    """Report onnx2tf's op counter as progress. onnx2tf prints "INFO: i / n" per op only at debug level, amid
    pages of tensor details (onnx2tf/utils/common_functions.py, print_node_info); its wrapper asks
    ``get_log_level`` and prints through ``debug``, both looked up in that module at call time, so the
    counter is taken there and the rest dropped, while every other onnx2tf message stays at the error level
    non_verbose sets. Without those names (another onnx2tf) there is simply no bar."""
    import re

    try:
        from onnx2tf.utils import common_functions as cf
        from onnx2tf.utils.logging import LOG_LEVELS
    except ImportError:
        return
    if not (hasattr(cf, "debug") and hasattr(cf, "get_log_level")):
        return
    report = _Progress("onnx2tf: converting ops")
    counter = re.compile(r"(\d+) / (\d+)")

    def debug(*args: Any) -> None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(a) for a in args))
        m = counter.fullmatch(text.replace("INFO:", "").strip())
        if m:
            report(int(m.group(1)), int(m.group(2)))

    cf.debug = debug
    cf.get_log_level = lambda: LOG_LEVELS["debug"]


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Convert per ``job``; returns the tensor details of the written model."""
    import numpy as np

    work = Path(job["work"])
    frames = np.load(job["frames"]) if job.get("frames") else np.zeros((0, 128, 128, 3), np.uint8)
    write_sample(frames, work / SAMPLE)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t = time.time()
    _stage("onnx2tf: building the TensorFlow graph")
    import onnx2tf

    _count_onnx2tf_ops()
    # output_signaturedefs: onnx2tf then writes the saved_model through an ExportArchive endpoint instead of
    # tf.saved_model.save on the Keras model, whose metadata serialisation took 78 of the 84 s onnx2tf spent
    # on resnet18 here (5.5 s with it); the endpoint's outputs are output_0..n, renamed back in details().
    onnx2tf.convert(input_onnx_file_path=job["onnx"], output_folder_path=str(work / "saved_model"),
                    copy_onnx_input_output_names_to_tflite=True, non_verbose=True, output_signaturedefs=True,
                    replace_to_pseudo_operators=job.get("pseudo_ops") or [])
    _stage(f"onnx2tf done in {time.time() - t:.1f}s; writing {job['precision']} with the TFLite converter")
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(work / "saved_model"))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    precision = job["precision"]
    if precision == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic-range":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        calib = np.load(job["calib"], mmap_mode="r")
        n = min(len(calib), int(job.get("subset_size", 300)))
        idx = np.linspace(0, len(calib) - 1, n).round().astype(int) if n < len(calib) else range(len(calib))

        def representative() -> Any:  # one image: the recorded ranges are measured again, on all (calibrate)
            yield [np.ascontiguousarray(calib[idx[0]:idx[0] + 1], np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
        _stage(f"full-integer INT8 from {n} calibration images")
    fallback, kept, ranges = None, [], None
    if precision != "int8":
        blob = conv.convert()
    else:
        conv._experimental_calibrate_only = True  # noqa: SLF001 (the float model with its calibration)
        method = job.get("method", "max")
        calibrated, amax = calibrate(conv.convert(), calib[list(idx)], method)
        kept = denylist(calibrated, job["keep_float"]) if job.get("keep_float") else []  # names: any ranges
        selection = _Selection(job["fallback"]) if job.get("fallback") else None  # labelled data
        tried: dict[str, tuple[bytes, Any]] = {}
        if amax is not None:  # the recorded ranges are min/max: narrow them to the method's
            narrowed, ranges = narrow_ranges(calibrated, amax, method, n)
            if selection is not None:  # the selection half chooses between them
                chosen, ranges["held_on_selection"], tried = choose_ranges(
                    {method: narrowed, "max": calibrated}, selection, kept)
                ranges["method"] = chosen
            calibrated = narrowed if ranges["method"] == method else calibrated
        if ranges and ranges["method"] in tried:  # the range choice quantized and ran it already
            blob, plain_outputs = tried[ranges["method"]]
        else:
            blob, plain_outputs = quantize(calibrated, kept), None
        if kept:
            _stage(f"kept {len(kept)} convolution(s) in float ([quantize] ignored_*)")
        if selection is not None:
            blob, fallback = accuracy_fallback(blob, calibrated, selection, kept, plain_outputs)
    out = Path(job["out"])
    out.write_bytes(blob)
    _stage(f"wrote {out.name} ({len(blob) / 1e6:.2f} MB) in {time.time() - t:.1f}s")
    check_scales(out)
    result = details(out, job.get("outputs"))
    if fallback is not None:
        result["fallback"] = fallback
    result["kept_float"] = kept
    if ranges is not None:
        result["ranges"] = ranges
    return result


class _FloatTensors:
    """The converter's calibrated float model in the interpreter, every tensor kept: what
    edgeport.backends.tensorrt.ranges.measure reads (``run``, ``names``, ``derived``). Its tensors are those the
    converter records a min/max for: the activations, the input and the outputs."""

    def __init__(self, blob: bytes, index: dict[str, int] | None = None) -> None:
        from tensorflow.lite.tools import flatbuffer_utils

        if index is None:
            graph = flatbuffer_utils.read_model_from_bytearray(bytearray(blob)).subgraphs[0]
            index = {t.name.decode(): i for i, t in enumerate(graph.tensors) if _min_max(t)}
        self.blob, self.index = blob, index
        self.it = _interpreter(blob, True, threads=1)
        self.names = list(self.index)
        self.derived: dict[str, str] = {}

    def fork(self) -> _FloatTensors:
        """Another interpreter of the same model, for another worker thread (the interpreter releases the GIL
        while it runs)."""
        return _FloatTensors(self.blob, self.index)

    def run(self, x: Any) -> dict[str, Any]:
        _infer(self.it, x)
        return {n: self.it.get_tensor(i) for n, i in self.index.items()}


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
    the same pass, each tensor's amax by ``method`` for ``narrow_ranges`` (None for ``max``). The converter's
    own calibration loop took 16 s for 300 CamVid frames, this pass 3.8 s with percentile ranges (one
    interpreter per worker, builtin kernels); on the CamVid U-Net the INT8 model is byte-identical to the
    converter's."""
    import numpy as np
    from tensorflow.lite.tools import flatbuffer_utils

    from edgeport.backends.tensorrt.ranges import measure

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
    by ``method`` (``calibrate``) as TensorRT's ranges are (edgeport.backends.tensorrt.ranges: percentile,
    entropy or mse of |x|); a range is only ever narrowed, never widened. The quantizer then rounds to these.
    The model's input and outputs keep their min/max (in a trial with per-tail percentiles, narrowing them too
    chose worse on the CamVid selection half, 55.93 against 55.96); an output that a scale-keeping op (Resize,
    Reshape) produces still takes its input's narrowed range from the quantizer.

    On the CamVid U-Net (300 train frames; val split as the build splits it) the 99.99th percentile moved the
    selection half from -0.05 to +0.08 mIoU against FP32 and the report half from -0.22 to +0.19 (mse: +0.07 and
    +0.07; entropy lost 4.6 and 5.4)."""
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


def rank_ops(quantized: bytes, reference: list[dict[str, Any]], images: Any,
             exclude: set[str]) -> list[tuple[str, str, float]]:
    """[(output tensor name, op, error it adds)] for the ops that compute in int8 (convolutions, and also
    hard-swish, the multiplications of squeeze-excite, pooling...), worst first: the per-channel relative squared
    error of the op's output against the float model's tensor of the same name (``reference``: ``all_tensors``
    of the float model on the same ``images``), minus the largest of its inputs'."""
    import numpy as np

    from edgeport.runner.metrics import channel_error

    err: dict[str, float] = {}
    q_it = _interpreter(quantized, True)
    for x, ref in zip(images, reference):
        _infer(q_it, x[None])
        got = _tensors(q_it)
        for name, r in ref.items():
            if name in got and got[name].shape == r.shape:
                err[name] = err.get(name, 0.0) + channel_error(got[name], r, -1)  # NHWC
    details = {t["index"]: t for t in q_it.get_tensor_details()}
    names = {i: t["name"] for i, t in details.items()}
    ranked = []
    for op in q_it._get_ops_details():  # noqa: SLF001 (the public API has no op list)
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE") or not len(op["outputs"]) \
                or details[op["outputs"][0]]["dtype"] != np.int8:
            continue  # only ops that compute in int8 can be kept in float
        out = names[op["outputs"][0]]
        if out in exclude or out not in err:
            continue
        ins = [err.get(names[i], 0.0) for i in op["inputs"] if i >= 0 and i in names]
        ranked.append((out, op["op_name"], err[out] - max(ins, default=0.0)))
    return sorted(ranked, key=lambda r: -r[2])


class _Selection:
    """The selection half the child was given (``job`` is the fallback's), loaded once for the range choice and
    the accuracy loop: the set, its images in NHWC, and the float model's outputs on them (``gauge``)."""

    def __init__(self, job: dict[str, Any]) -> None:
        import pickle

        import numpy as np

        with open(job["val"], "rb") as f:
            self.val = pickle.load(f)
        images = self.val.inputs.transpose(0, 2, 3, 1) if job.get("layout", "NCHW") == "NCHW" else self.val.inputs
        self.images = np.ascontiguousarray(images, np.float32)  # the model takes NHWC
        self.job = job
        self._gauge: Any = None

    def outputs(self, blob: bytes) -> Any:
        """A model's packed outputs on the selection images."""
        import numpy as np

        from edgeport.evaluate import pack

        it = _interpreter(blob)
        runs = [_infer_all(it, self.images[i:i + 1], self.job.get("outputs")) for i in range(len(self.images))]
        return pack({n: np.concatenate([r[n] for r in runs]) for n in runs[0]}, self.val)

    def gauge(self, calibrated: bytes) -> Any:
        """The drop gauge against the float model (``calibrated`` run in float: its recorded ranges do not
        change that, so every candidate's calibrated model gives the same gauge, measured once)."""
        from edgeport.evaluate import DropGauge

        if self._gauge is None:
            self._gauge = DropGauge(self.outputs(calibrated), self.val, "NHWC")
        return self._gauge


def choose_ranges(candidates: dict[str, bytes], selection: _Selection,
                  given: list[str]) -> tuple[str, dict[str, float], dict[str, tuple[bytes, Any]]]:
    """Of calibrated models that differ only in their activation ranges ({method: model}, the configured method
    first), the one whose plain INT8 holds the smaller drop on the selection half (edgeport.evaluate.DropGauge;
    a tie keeps the first); (its method, {method: drop held}, {method: (its plain INT8, its outputs)}: the
    accuracy loop starts from the chosen one's).

    Chosen per model because no one method wins everywhere: on the CamVid U-Net the 99.99th percentile held
    0.03 mIoU against min/max's 0.07 (report half +0.19 against -0.22); on the CenterNet detector of
    tests/models/centernet.py it held 1.77 mAP against min/max's 1.15 (report half, after the loop, -1.36
    against -0.55): clipping the top 0.01 % cost the box regression there."""
    gauge = selection.gauge(next(iter(candidates.values())))
    tried, held = {}, {}
    for m, calibrated in candidates.items():
        blob = quantize(calibrated, given)
        tried[m] = (blob, selection.outputs(blob))
        held[m] = float(gauge(tried[m][1])[1])
    chosen = min(held, key=lambda m: held[m])
    _stage("activation ranges chosen on the selection half: " + ", ".join(
        f"{m} holds {d:.4f}" for m, d in held.items()) + f" ({gauge.key} drop): {chosen}")
    return chosen, held, tried


def accuracy_fallback(plain: bytes, calibrated: bytes, selection: _Selection, given: list[str],
                      plain_outputs: Any = None) -> tuple[bytes, dict[str, Any]]:
    """Keep the TFLite ops that add the most error in float (TensorFlow's selective quantization: the
    quantizer's denylisted nodes, with QUANTIZE/DEQUANTIZE around them) until the task metric's drop from
    the float model on the selection half, and on each of its halves (edgeport.evaluate.DropGauge), is within
    max_drop; at most a quarter of the weighted ops (12). ``plain_outputs``: ``plain``'s outputs on the
    selection half, when the range choice has measured them already."""
    from edgeport.evaluate import Tuning

    images, outputs = selection.images, selection.outputs
    max_drop = float(selection.job["max_drop"])
    gauge = selection.gauge(calibrated)  # the whole selection set and its halves: the worst held
    blob = plain
    tuning = Tuning(gauge, max_drop, outputs(blob) if plain_outputs is None else plain_outputs, len(images),
                    selection.val.labelled)
    n_weighted = sum(op["op_name"] in QUANTIZED_OPS for op in _interpreter(plain)._get_ops_details())  # noqa: SLF001
    limit = min(12, max(1, n_weighted // 4))
    kept: list[tuple[str, str]] = []
    _stage(f"accuracy-aware INT8: {gauge.key} drop {tuning.drop:.4f} on the selection half ({len(images)} images; "
           f"worse of its halves {tuning.held:.4f}), max_drop {max_drop:g}")
    tail = decode_tail(calibrated)
    if tuning.over and tail:  # the heads and what follows them (a detector's box decoding): as one step
        trial = quantize(calibrated, given + tail, float_outputs=True)
        if tuning.trial(tail, outputs(trial)):
            blob = trial
            kept += [(t, "decode tail") for t in tail]
            _stage(f"kept the last weighted layers and the {len(tail)} op(s) from them on in float: drop "
                   f"{tuning.drop:.4f}")
    reference = None  # the float model's tensors on the ranking images: the same at every step
    while tuning.over and len(kept) < limit + len(tail):
        reference = reference or all_tensors(calibrated, images[:RANK_IMAGES])
        ranked = rank_ops(blob, reference, images[:RANK_IMAGES], {k for k, _ in kept} | set(given))
        if not ranked:
            break
        name, op, added = ranked[0]
        kept.append((name, op))
        with_tail = any(op == "decode tail" for _, op in kept)
        blob = quantize(calibrated, given + [k for k, _ in kept], float_outputs=with_tail)
        tuning.step([k for k, _ in kept], outputs(blob))
        _stage(f"kept {op} {short_name(name)} in float (adds {added:.3g} relative error): drop {tuning.drop:.4f}")
    return blob, tuning.report(_kept_names(kept), kept_tensors=[k for k, _ in kept], ops=[op for _, op in kept])


def _kept_names(kept: list[tuple[str, str]]) -> list[str]:
    """What the report names as kept in float: the decode tail as one entry, then each op the loop chose."""
    tail = sum(op == "decode tail" for _, op in kept)
    return ([f"the heads and the {tail} op(s) from them on"] if tail else []) + \
        [short_name(k) for k, op in kept if op != "decode tail"]


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


def main(argv: list[str]) -> int:
    """Entry point of the job process; writes result.json beside the job file."""
    _block_network()
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    os.chdir(job["work"])
    result = run(job)
    (job_path.parent / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
