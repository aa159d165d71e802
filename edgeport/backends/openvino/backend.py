"""Intel: ONNX -> OpenVINO IR at FP32, FP16 (compressed weights) or INT8 (NNCF PTQ)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.backends.base import Artifacts, Availability, Runtime, TensorInfo, probe, runner_part_of
from edgeport.errors import ConversionError

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.preprocess import InputSpec
    from edgeport.target import Target

log = logging.getLogger("edgeport")


def inference_precision(precision: str, device: str) -> str:
    """The INFERENCE_PRECISION_HINT the artifact is validated and run with.

    OpenVINO's CPU plugin runs "FP32" models in bf16 on CPUs with AVX-512 BF16 unless told
    otherwise (seen on this machine: maxvit_t went from 1e-6 to 1.3e-2 relative error), so
    f32 is pinned for FP32 and INT8; FP16 IRs run in f16 where the device computes in f16.
    """
    if precision == "fp16" and device in ("GPU", "NPU"):
        return "f16"
    return "f32"


class OpenVINORuntime(Runtime):
    """Synchronous OpenVINO inference on the host CPU (or the target's device if present)."""

    def __init__(self, xml: Path, device: str, config: dict[str, str]) -> None:
        import openvino as ov

        core = ov.Core()
        if device not in core.available_devices:
            device = "CPU"
        self.device = device
        self.compiled = core.compile_model(str(xml), device, config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [TensorInfo(p.get_any_name(), list(p.get_shape()), "float32") for p in self.compiled.inputs]
        self.outputs = [TensorInfo(p.get_any_name(), list(p.get_shape()), "float32") for p in self.compiled.outputs]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.request.infer(feeds)
        return {p.get_any_name(): np.asarray(res[p], np.float32) for p in self.compiled.outputs}

    def close(self) -> None:
        self.request = None
        self.compiled = None


class OpenVINOBackend:
    """The Intel backend (CPU, integrated GPU, NPU)."""

    name = "openvino"

    def available(self) -> Availability:
        """Installed or not, with versions (nncf is needed for INT8 only)."""
        av = probe(self.name, self.name, {"openvino": "openvino"})
        extra = probe(self.name, self.name, {"nncf": "nncf"})
        av.versions.update(extra.versions)
        if av.installed and not extra.installed:
            av.reason = "nncf not installed: INT8 unavailable"
        return av

    def versions_key(self) -> str:
        """Changes when the toolchain that compiles changes (cache key)."""
        return repr(sorted(self.available().versions.items()))

    def calibration_needed(self, precision: str) -> bool:
        """INT8 is the only precision that needs calibration data."""
        return precision == "int8"

    def runner_part(self) -> Path:
        """This backend's part of the assembled runner.py."""
        return runner_part_of(__file__)

    def compile(self, onnx: Path, target: Target, precision: str, calib: CalibrationSet | None,
                out: Path, spec: InputSpec) -> Artifacts:
        """Convert and, for INT8, quantize with NNCF from the shared calibration set."""
        self.available().require()
        import openvino as ov

        target.check_precision(precision)
        try:
            model = ov.convert_model(str(onnx))
        except Exception as e:
            raise ConversionError(f"OpenVINO cannot convert {onnx.name}: {str(e).splitlines()[0]}") from e
        info: dict[str, Any] = {"openvino": ov.__version__.split("-")[0]}
        if precision == "int8":
            model = self._quantize(model, calib, spec, target)
            info["nncf"] = self.available().versions.get("nncf", "")
            info["calibration"] = {"subset_size": min(len(calib), 300) if calib else 0,
                                   "preset": target.options.get("nncf_preset", "performance")}
        xml = out / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")
        device = str(target.options.get("device", "CPU"))
        runtime = {
            "device": device,
            "performance_hint": str(target.options.get("performance_hint", "LATENCY")),
            "inference_precision": inference_precision(precision, device),
        }
        inputs = [TensorInfo(p.get_any_name(), [int(d) for d in p.get_shape()], "float32", spec.layout)
                  for p in model.inputs]
        outputs = [TensorInfo(p.get_any_name(), [int(d) for d in p.get_shape()], "float32")
                   for p in model.outputs]
        return Artifacts(self.name, target.name, precision, {"model": xml, "weights": out / "model.bin"},
                         inputs, outputs, spec, runtime, info)

    def _quantize(self, model: Any, calib: CalibrationSet | None, spec: InputSpec, target: Target) -> Any:
        if calib is None:
            raise ConversionError("INT8 needs a calibration set (--calib)")
        try:
            import nncf
        except ImportError:
            raise ConversionError("INT8 for OpenVINO needs nncf: pip install 'edgeport[openvino]'") from None
        name = model.inputs[0].get_any_name()
        samples = [{name: calib.data[i:i + 1]} for i in range(len(calib))]
        preset = str(target.options.get("nncf_preset", "performance")).upper()
        try:
            return nncf.quantize(
                model, nncf.Dataset(samples), subset_size=min(len(samples), 300),
                preset=getattr(nncf.QuantizationPreset, preset),
                target_device=nncf.TargetDevice.ANY,
            )
        except Exception as e:
            raise ConversionError(f"NNCF quantization failed: {str(e).splitlines()[0]}") from e

    def open(self, artifacts: Artifacts) -> OpenVINORuntime:
        """Host runtime on the IR with the bundle's own inference precision."""
        self.available().require()
        rt = artifacts.runtime
        config = {"INFERENCE_PRECISION_HINT": rt["inference_precision"], "PERFORMANCE_HINT": "LATENCY"}
        return OpenVINORuntime(artifacts.files["model"], rt["device"], config)


BACKEND = OpenVINOBackend()
