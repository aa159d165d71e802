"""ONNX Runtime: the host reference for the exported ONNX (and, later, Q/DQ INT8 emulation)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeport.backends.base import Availability, Runtime, TensorInfo, probe

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}


class OnnxRuntime(Runtime):
    """ONNX Runtime CPU session on one .onnx file."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [TensorInfo(i.name, [d if isinstance(d, int) else 1 for d in i.shape],
                                  _ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()]
        self.outputs = [TensorInfo(o.name, [d if isinstance(d, int) else 1 for d in o.shape],
                                   _ORT_TYPES.get(o.type, o.type)) for o in self.session.get_outputs()]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        return {n: np.asarray(v, np.float32) for n, v in zip(names, self.session.run(names, feeds))}

    def close(self) -> None:
        self.session = None


class OnnxRuntimeBackend:
    """Host runtime only: runs ONNX files for parity; builds nothing for devices."""

    name = "onnxruntime"

    def available(self) -> Availability:
        """Installed or not, with versions."""
        return probe(self.name, "onnx", {"onnxruntime": "onnxruntime"})

    def open_onnx(self, path: Path, threads: int = 0) -> OnnxRuntime:
        """A runtime on an ONNX file."""
        self.available().require()
        return OnnxRuntime(path, threads)


BACKEND = OnnxRuntimeBackend()
