"""Jetson: the host side of TensorRT (no GPU, no TensorRT here).

The bundle carries the ONNX at the profile's opset; for INT8 an explicit-quantization Q/DQ
ONNX and, for TensorRT 8.x, a native calibration cache, both from one set of activation
ranges (edgeport.backends.tensorrt.ranges); build_engine.py, which builds and caches the engine
on the device; and the runner's TensorRT part. On the host, INT8 is *emulated*: ONNX Runtime
runs the Q/DQ model, which predicts the engine's INT8 accuracy before anything is flashed. It
is reported as "tensorrt (emulated)", never as a TensorRT measurement. FP16/FP32 engines have
no host runtime here: their golden outputs are the FP32 reference's, checked on the device by
``runner.py --selftest`` under the precision's tolerances.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeport.backends.base import Artifacts, Availability, DeviceBackend, Quantization, Runtime, TensorInfo, probe
from edgeport.config import QuantizeConfig
from edgeport.errors import ConversionError

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.preprocess import InputSpec
    from edgeport.target import Target

log = logging.getLogger("edgeport")
BUILD_ENGINE = Path(__file__).with_name("build_engine.py")


def _onnx_io(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def info(v: Any) -> TensorInfo:
        dims = [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
        return TensorInfo(v.name, dims, "float32")

    return [info(i) for i in model.graph.input if i.name not in inits], [info(o) for o in model.graph.output]


class TensorRTBackend(DeviceBackend):
    """The Jetson backend: artifacts built here, engines built on the device."""

    name = "tensorrt"
    # The [quantize] keys ranges and Q/DQ reads (an INT8 flag no selected backend reads is an error).
    int8_settings = frozenset({"method", "subset_size", "ignored_names", "ignored_patterns", "ignored_types",
                               "accuracy_control", "max_drop"})

    def available(self) -> Availability:
        """Host side needs only onnx and onnxruntime; TensorRT itself lives on the device."""
        av = probe(self.name, "tensorrt", {"onnx": "onnx", "onnxruntime": "onnxruntime"})
        av.can_run = False
        if av.installed:
            av.versions["tensorrt"] = "on the device (engines build there; INT8 emulated here)"
        return av

    def versions_key(self) -> str:
        """The toolchain, plus the Q/DQ placement and range code's versions (a cached Q/DQ model of older rules
        is written again)."""
        from edgeport.backends.tensorrt import qdq, ranges

        return f"{super().versions_key()} qdq {qdq.PLACEMENT_VERSION} ranges {ranges.CODE_VERSION}"

    def compile(self, onnx: Path, target: Target, precision: str, calib: CalibrationSet | None,
                out: Path, spec: InputSpec, quant: Quantization | None = None) -> Artifacts:
        """ONNX (+ Q/DQ ONNX for INT8) and build_engine.py: the same for every Jetson profile (the profile's
        TensorRT version only shapes its calibration cache, which ``for_target`` writes)."""
        from edgeport.backends.tensorrt import qdq
        from edgeport.backends.tensorrt import ranges as rg
        from edgeport.model import file_sha256

        self.available().require()
        target.check_precision(precision)
        model = out / "model.onnx"
        shutil.copyfile(onnx, model)
        shutil.copyfile(BUILD_ENGINE, out / "build_engine.py")
        files = {"model": model, "build_engine": out / "build_engine.py"}
        info: dict[str, Any] = {"engine": "built on the device by build_engine.py"}
        if precision == "int8":
            if calib is None:
                raise ConversionError("TensorRT INT8 needs a calibration set (--calib)")
            quant = quant or Quantization(QuantizeConfig())
            settings = quant.settings
            method, n = settings.method, min(len(calib), settings.subset_size)
            key = {"onnx": file_sha256(onnx), "calib": calib.sha256, "method": method, "images": n,
                   "code": rg.CODE_VERSION}
            choosing = quant.accuracy_control and quant.val is not None and method != "max"

            def max_ranges() -> dict[str, float]:
                return quant.cached("ranges", {**key, "method": "max"}, lambda: largest or rg.collect_ranges(
                    onnx, calib.data[:n], "max", f"max activation ranges from {n} calibration images"))

            # The max ranges, when the range choice needs them, come with the method's pass: from the percentile
            # pass itself, or first, so that a histogram method takes its bins' ranges from them.
            largest: dict[str, float] = {}
            known = max_ranges() if choosing and method in ("entropy", "mse") else None
            amax = quant.cached("ranges", key, lambda: rg.collect_ranges(
                onnx, calib.data[:n], method, f"{method} activation ranges from {n} calibration images",
                largest=largest if method == "percentile" else None, known=known))
            keep = qdq.ignored_nodes(onnx, settings)
            ranges: dict[str, Any] = {"method": method, "images": n, "tensors": len(amax)}
            start = None  # the selection half's gauge and plain outputs, when the range choice measured them
            if choosing:  # the selection half chooses
                from edgeport.backends.tensorrt.fallback import choose_ranges

                candidates = {method: amax, "max": known if known is not None else max_ranges()}
                chosen, ranges["held_on_selection"], start = choose_ranges(
                    onnx, candidates, lambda a: qdq.write_qdq(onnx, a, out / "model_qdq.onnx", keep),
                    out / "model_qdq.onnx", quant.val, spec.layout)
                ranges["method"], amax = chosen, candidates[chosen]
            if quant.accuracy_control and quant.val is not None:  # the loop writes and measures its own models
                fb = self._fallback(onnx, amax, out / "model_qdq.onnx", keep, quant, spec, start)
                info["accuracy_fallback"] = fb
                keep = keep | set(fb["kept_float"])
            counts = qdq.write_qdq(onnx, amax, out / "model_qdq.onnx", keep)
            findings = qdq.lint(out / "model_qdq.onnx", keep)
            if findings:  # our own placement broke TensorRT's rules: a bug, never a bundle
                raise ConversionError(f"the Q/DQ model breaks TensorRT's placement rules: {findings[0]}"
                                      + (f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""))
            files["qdq"] = out / "model_qdq.onnx"
            info.update({"emulated": True, "ranges": ranges,
                         "qdq": counts, "qdq_lint": f"passed {len(qdq.RULES)} rules",
                         "kept_float": sorted(keep), "amax": amax})
        inputs, outputs = _onnx_io(model)
        for t in inputs:
            t.layout = spec.layout
        return Artifacts(self.name, target.name, precision, files, inputs, outputs, spec,
                         {"precision": precision}, info, host_runnable=precision == "int8")

    @staticmethod
    def _fallback(onnx: Path, amax: dict[str, float], out: Path, keep: set[str], quant: Quantization,
                  spec: InputSpec, start: Any = None) -> dict[str, Any]:
        """The accuracy-aware loop (fallback.py) on the selection half: the layers it keeps in float."""
        from edgeport.backends.tensorrt import qdq
        from edgeport.backends.tensorrt.fallback import accuracy_fallback
        from edgeport.tables import points

        weighted = qdq.weighted_nodes(onnx)

        def write(kept: set[str]) -> set[str]:
            qdq.write_qdq(onnx, amax, out, kept)
            return weighted - kept

        assert quant.val is not None
        fb = accuracy_fallback(onnx, write, out, keep, quant.val, spec.layout, quant.settings.max_drop, start)
        log.info("accuracy-aware INT8 (selection half, %d images): %s drop %s -> %s (max_drop %g); kept in float: "
                 "%s", fb["images"], fb["metric"], points(fb["drop_before"], fb["max_drop"]),
                 points(fb["drop_after"], fb["max_drop"]), fb["max_drop"], ", ".join(fb["kept_float"]) or "nothing")
        return fb

    def runtime_settings(self, target: Target, precision: str) -> dict[str, Any]:
        """Precision, the profile's TensorRT version, builder workspace and DLA core for build_engine.py."""
        return {"precision": precision, "tensorrt": str(target.runtime.get("tensorrt", "")),
                "workspace_mb": int(target.options.get("workspace_mb", 1024)),
                "dla_core": int(target.options.get("dla_core", -1))}

    def for_target(self, artifacts: Artifacts, target: Target, out: Path) -> Artifacts:
        """The profile's TensorRT version: for 8.x INT8 a calibration cache with that exact version in its header
        (a cache of another version may be silently ignored, NVIDIA/TensorRT#1378), and the INT8 form its
        build_engine.py picks by default."""
        import dataclasses

        from edgeport.backends.tensorrt import ranges as rg

        trt_version = str(target.runtime.get("tensorrt", ""))
        if not trt_version:
            raise ConversionError(f"profile {target.name} names no TensorRT version ([runtime] tensorrt = \"8.6.2\")")
        major_minor = tuple(int(p) for p in trt_version.split(".")[:2])
        files, info = dict(artifacts.files), dict(artifacts.info)
        amax = info.pop("amax", None)
        info["tensorrt_target"] = trt_version
        if artifacts.precision == "int8":
            if major_minor[0] == 8 and amax:
                rg.write_cache(amax, trt_version, out / "calib.cache")
                files["calib_cache"] = out / "calib.cache"
            info["int8_mode_default"] = "cache" if major_minor < (8, 5) else "qdq"
        return dataclasses.replace(artifacts, target=target.name, files=files, info=info,
                                   runtime=self.runtime_settings(target, artifacts.precision))

    def open(self, artifacts: Artifacts) -> Runtime:
        """INT8 emulation: ONNX Runtime on the Q/DQ model (FP16/FP32 have no host runtime)."""
        from edgeport.backends.onnxruntime.backend import BACKEND as ORT

        if "qdq" not in artifacts.files:
            raise ConversionError(f"{artifacts.precision} TensorRT engines run only on the device")
        return ORT.open_onnx(artifacts.files["qdq"])


BACKEND = TensorRTBackend()
