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

from edgeport.backends.tflite.fallback import _Selection, accuracy_fallback, choose_ranges
from edgeport.backends.tflite.litert import (
    _Progress,
    _stage,
    calibrate,
    check_scales,
    denylist,
    details,
    narrow_ranges,
    quantize,
)

SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


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






def _count_onnx2tf_ops() -> None:
    """Report onnx2tf's op counter as progress. onnx2tf prints "INFO: i / n" per op only at debug level, amid
    pages of tensor details (onnx2tf/utils/common_functions.py, print_node_info); its wrapper asks
    ``get_log_level`` and prints through ``debug``, both looked up in that module at call time, so the
    counter is taken there and the rest dropped, while every other onnx2tf message stays at the error level
    non_verbose sets. Without those names (another onnx2tf) there is simply no bar."""

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
    # tf.saved_model.save on the Keras model, whose metadata serialisation was most of onnx2tf's time
    # (docs/benchmarks/code-figures.md); the endpoint's outputs are output_0..n, renamed back in details().
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
        method = job["method"]
        calibrated, amax = calibrate(conv.convert(), calib[list(idx)], method)
        kept = denylist(calibrated, job["keep_float"]) if job.get("keep_float") else []  # names: any ranges
        selection = _Selection(job["fallback"]) if job.get("fallback") else None  # labelled data
        tried: dict[str, tuple[bytes, Any]] = {}
        if amax is not None:  # the recorded ranges are min/max: narrow them to the method's
            narrowed, ranges = narrow_ranges(calibrated, amax, method, n)
            if selection is not None:  # the selection half chooses between them
                chosen, ranges["held_on_selection"], tried, ranges["choice"] = choose_ranges(
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
