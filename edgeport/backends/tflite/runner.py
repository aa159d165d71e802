"""TFLite part of runner.py (Python 3.6 syntax; numpy, cv2 and one TFLite interpreter only).

Defines open_runtime(manifest, bundle_dir, device, threads), which the runner core calls. The interpreter is
ai-edge-litert, else tflite_runtime, else tf.lite. Integer inputs and outputs are quantised
and dequantised here with the scale and zero point the manifest copied from the model; the
host runtime (edgeport.backends.tflite.backend) calls these same functions.
"""
import os

import numpy as np

from edgeport.runner.manifest import RunnerError


def load_interpreter_class():
    """(Interpreter class, package name): ai-edge-litert, then tflite_runtime, then tensorflow."""
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite-runtime"
    except ImportError:
        pass
    try:
        import tensorflow as tf
        return tf.lite.Interpreter, "tensorflow"
    except ImportError:
        raise RunnerError("no TFLite interpreter: pip install ai-edge-litert (or tflite-runtime, or tensorflow)") \
            from None


_INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767)}


def quantize(x, info):
    """float32 -> the tensor's integer type: q = clip(round(x / scale) + zero_point)."""
    q = info.get("quant")
    if not q:
        return np.ascontiguousarray(x, np.float32)
    lo, hi = _INT_RANGE[info["dtype"]]
    return np.clip(np.round(x / q["scale"]) + q["zero_point"], lo, hi).astype(info["dtype"])


def dequantize(y, info):
    """The tensor's integer type -> float32: f = scale * (q - zero_point)."""
    q = info.get("quant")
    if not q:
        return np.asarray(y, np.float32)
    return ((y.astype(np.float32) - q["zero_point"]) * q["scale"]).astype(np.float32)


class TFLiteDeviceRuntime(object):
    """One interpreter with the profile's thread count; tensors addressed by the manifest's indices."""

    def __init__(self, manifest, bundle_dir, device=None, threads=None):
        cls, package = load_interpreter_class()
        rt = manifest.get("runtime") or {}
        default = int(rt.get("num_threads") or os.cpu_count() or 1)
        threads = int((threads(default) if callable(threads) else threads) or default)
        path = os.path.join(bundle_dir, manifest["files_by_role"]["model"])
        self.interpreter = cls(model_path=path, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]
        self.threads = threads
        self.name = "%s, %d thread%s" % (package, threads, "" if threads == 1 else "s")

    def infer(self, feeds):
        it = self.interpreter
        for info in self.inputs:
            it.set_tensor(info["index"], quantize(feeds[info["name"]], info))
        it.invoke()
        return dict((info["name"], dequantize(it.get_tensor(info["index"]), info)) for info in self.outputs)


RUNTIME_OPTIONS = ("threads",)  # the runner options this runtime honours (the core refuses the others)


def open_runtime(manifest, bundle_dir, device=None, threads=None):
    """The runtime for this bundle (``device`` is ignored: TFLite runs on the CPU here).

    ``threads``: interpreter threads, or a function from the profile's number to the number
    wanted (the core's policy that leaves a core to capture); None keeps the profile's.
    """
    return TFLiteDeviceRuntime(manifest, bundle_dir, device, threads)
