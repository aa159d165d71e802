"""Jetson: the host side of TensorRT (no GPU, no TensorRT here).

The bundle carries the ONNX at the profile's opset; for INT8 an explicit-quantization Q/DQ
ONNX and, for TensorRT 8.x, a native calibration cache, both from one set of activation
ranges (edgeport.quantize.ranges); build_engine.py, which builds and caches the engine
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
from edgeport.config import QuantizeConfig, read_by
from edgeport.errors import ConversionError
from edgeport.flags import dashed

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
    int8_settings = read_by(name)  # as edgeport.config declares each setting's readers
    device_modules = ("tensorrt",)
    names_layers_as_onnx = True  # the Q/DQ model keeps them on the original nodes
    bench_note = ("tensorrt rows are timed in ONNX Runtime on this host (emulation), not TensorRT; "
                  "`runner.py --bench` measures the engine on the device.")

    def layer_outputs(self, bundle: Path, manifest: dict[str, Any], x: Any,
                      wanted: list[str]) -> tuple[dict[str, Any], str]:
        """The Q/DQ model's tensors (the ONNX's for FP16/FP32), run in ONNX Runtime."""
        from edgeport.localize import ort_tensors

        files = manifest["files_by_role"]
        got, _ = ort_tensors(bundle / files.get("qdq", files["model"]), x)
        return got, dashed("int8_ignore") + " '{name}' keeps it out of the Q/DQ model (TensorRT runs it in FP16)"

    def qdq_model(self, bundle: Path, manifest: dict[str, Any]) -> Path | None:
        """model_qdq.onnx of an INT8 bundle."""
        rel = manifest.get("files_by_role", {}).get("qdq")
        return bundle / rel if rel else None

    def host_check(self, art: Artifacts) -> tuple[Runtime, str, str] | None:
        """FP16/FP32: no host runtime has the engine; its model.onnx (what the engine is built from) runs in ONNX
        Runtime. INT8: the Q/DQ model, through ``open``."""
        if "qdq" in art.files:
            return None
        from edgeport.backends.onnxruntime.backend import BACKEND as ORT

        return (ORT.open_onnx(art.files["model"]), "tensorrt (onnx)",
                f"onnxruntime on model.onnx; the {art.precision} engine is checked on the device")

    def host_precision(self, art: Artifacts) -> str:
        """The Q/DQ model emulates INT8; without one, the ONNX runs in FP32 on the host."""
        return art.precision if "qdq" in art.files else "fp32"

    def bundle_checks(self, bundle: Path, manifest: dict[str, Any]) -> list[tuple[str, bool, dict[str, Any], str]]:
        """The Q/DQ model against TensorRT's placement rules (edgeport.backends.tensorrt.qdq)."""
        path = self.qdq_model(bundle, manifest)
        if path is None:
            return []
        from edgeport.backends.tensorrt.qdq import RULES, lint

        findings = lint(path, (manifest.get("provenance") or {}).get("kept_float"))
        msg = "; ".join(map(str, findings[:5])) + (f" (and {len(findings) - 5} more)" if len(findings) > 5 else "")
        return [("qdq lint", not findings, {"rules": len(RULES), "findings": [str(f) for f in findings]},
                 f"{path.name} breaks TensorRT's Q/DQ placement rules: {msg}" if findings else "")]

    def device_preflight(self, profile: dict[str, Any], facts: dict[str, str], python: str) -> list[str]:
        """A Jetson: L4T, the profile's TensorRT major version, and an OpenCV with GStreamer (csi://)."""
        problems = []
        want = str(profile.get("runtime", {}).get("tensorrt", ""))
        jp = profile.get("runtime", {}).get("jetpack", "?")
        if not facts.get("l4t"):
            problems.append(f"L4T: the bundle is for a Jetson (JetPack {jp}), the device has no /etc/nv_tegra_release")
        have = facts.get("tensorrt", "")
        if not have:
            problems.append(f"TensorRT: the bundle needs TensorRT {want} (JetPack {jp}); {python} on the device "
                            "cannot import tensorrt")
        elif want and have.split(".")[0] != want.split(".")[0]:
            problems.append(f"TensorRT: the bundle is for TensorRT {want} (JetPack {jp}), the device has {have}; "
                            f"rebuild for a profile with TensorRT {have.split('.')[0]}.x")
        if facts.get("l4t") and facts.get("gstreamer", "").upper() != "YES":
            problems.append(f"OpenCV: {python}'s cv2 has no GStreamer, so csi:// cameras cannot open; use JetPack's "
                            "python3-opencv, not a pip OpenCV")
        return problems

    def device_setup(self, python: str, forced: bool) -> list[tuple[str, str, float]]:
        """The engine is built on the device, for its GPU and TensorRT (build_engine.py caches it)."""
        import shlex

        return [("build engine", f"{shlex.quote(python)} build_engine.py{' --force' if forced else ''}", 3600.0)]

    def readme_run(self, target: Target, precision: str) -> list[str]:
        """Install pycuda only (TensorRT and OpenCV come with JetPack), build the engine, then run."""
        return ["## Run on the Jetson", "", "```", "python3 -m pip install -r requirements.txt   # pycuda; "
                "TensorRT and OpenCV come with JetPack", "python3 build_engine.py      # builds and caches the "
                "engine for this GPU (once; minutes)", "python3 runner.py --selftest",
                f"python3 runner.py {target.camera.get('source', 'csi://0')}",
                "python3 runner.py synthetic:// --headless --max-frames 30 --jsonl -", "```", "",
                "`python3 build_engine.py --print-trtexec` shows the equivalent trtexec command. INT8: "
                "model_qdq.onnx (explicit Q/DQ) or model.onnx + calib.cache (TensorRT 8.x), `--mode`.", ""]

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
        from edgeport.backends.tensorrt import gap, qdq
        from edgeport.quantize import ranges

        return (f"{super().versions_key()} qdq {qdq.PLACEMENT_VERSION} ranges {ranges.CODE_VERSION} "
                f"gap {gap.CODE_VERSION}")

    def compile(self, onnx: Path, target: Target, precision: str, calib: CalibrationSet | None,
                out: Path, spec: InputSpec, quant: Quantization | None = None) -> Artifacts:
        """ONNX (+ Q/DQ ONNX for INT8) and build_engine.py: the same for every Jetson profile (the profile's
        TensorRT version only shapes its calibration cache, which ``for_target`` writes)."""
        from edgeport.backends.tensorrt import qdq
        from edgeport.model import file_sha256
        from edgeport.quantize import ranges as rg

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
            method, n = settings.calib_method, min(len(calib), settings.int8_subset)
            key = {"onnx": file_sha256(onnx), "calib": calib.sha256, "method": method, "images": n,
                   "code": rg.CODE_VERSION}
            sel, frames = quant.selection, quant.frames  # the drop's set; every frame agreement is measured on
            choosing = quant.accuracy_control and sel is not None and method != "max"

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
            # the user's float layers, and the task's: a detector's decoding and class-logit convolutions (FP16)
            weighted = qdq.weighted_nodes(onnx)
            tail = qdq.float_tail(onnx, spec) & weighted
            keep = qdq.ignored_nodes(onnx, settings) | tail
            ranges: dict[str, Any] = {"method": method, "images": n, "tensors": len(amax)}
            start = None  # the selection half's gauge and plain outputs, when the range choice measured them
            if choosing:  # the selection half chooses
                from edgeport.backends.tensorrt.fallback import choose_ranges

                candidates = {method: amax, "max": known if known is not None else max_ranges()}
                chosen, ranges["held_on_selection"], start, ranges["choice"] = choose_ranges(
                    onnx, candidates, lambda a: qdq.write_qdq(onnx, a, out / "model_qdq.onnx", keep),
                    out / "model_qdq.onnx", sel, spec.layout, frames)
                ranges["method"], amax = chosen, candidates[chosen]
            if quant.accuracy_control and sel is not None:  # the loop writes and measures its own models
                from edgeport.backends.tensorrt.fallback import choose_edges, plain_start

                def write(kept: set[str]) -> None:
                    qdq.write_qdq(onnx, amax, out / "model_qdq.onnx", kept)

                # TensorRT's known-good FP16 layers first, each taken only on a clear interval
                gauge, plain = start or plain_start(onnx, lambda: write(keep), out / "model_qdq.onnx", sel,
                                                    spec.layout, frames)
                edges, plain, ranges["fp16_edges"] = choose_edges(onnx, write, out / "model_qdq.onnx", keep,
                                                                  weighted - keep, sel, gauge, plain)
                keep, start = keep | set(edges), (gauge, plain)
                fb, agree = self._fallback(onnx, amax, out / "model_qdq.onnx", keep, weighted, quant, spec, start)
                info["accuracy_fallback"] = fb
                keep = keep | set(fb["kept_float"])
                from edgeport.tasks import get as get_task

                if get_task(spec.task).choice_by_agreement:  # held to its unsigned twin's agreement with FP32
                    from edgeport.backends.tensorrt.gap import close_gap

                    gap_layers, ranges["symmetric_gap"] = close_gap(onnx, write, out / "model_qdq.onnx", keep,
                                                                    weighted - keep, gauge, agree)
                    keep = keep | set(gap_layers)
            counts = qdq.write_qdq(onnx, amax, out / "model_qdq.onnx", keep)
            findings = qdq.lint(out / "model_qdq.onnx", keep)
            if findings:  # our own placement broke TensorRT's rules: a bug, never a bundle
                raise ConversionError(f"the Q/DQ model breaks TensorRT's placement rules: {findings[0]}"
                                      + (f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""))
            files["qdq"] = out / "model_qdq.onnx"
            info.update({"emulated": True, "ranges": ranges,
                         "qdq": counts, "qdq_lint": f"passed {len(qdq.RULES)} rules",
                         "kept_float": sorted(keep), "float_tail": sorted(tail), "amax": amax})
        inputs, outputs = _onnx_io(model)
        for t in inputs:
            t.layout = spec.layout
        return Artifacts(self.name, target.name, precision, files, inputs, outputs, spec,
                         {"precision": precision}, info, host_runnable=precision == "int8")

    @staticmethod
    def _fallback(onnx: Path, amax: dict[str, float], out: Path, keep: set[str], weighted: set[str],
                  quant: Quantization, spec: InputSpec, start: Any = None) -> tuple[dict[str, Any], Any]:
        """The accuracy-aware loop (fallback.py) on the selection half: its report (the layers it keeps in float, of
        the model's ``weighted`` nodes) and the per-frame agreement with FP32 of the model it leaves."""
        from edgeport.backends.tensorrt import qdq
        from edgeport.backends.tensorrt.fallback import accuracy_fallback
        from edgeport.tables import points

        def write(kept: set[str]) -> set[str]:
            qdq.write_qdq(onnx, amax, out, kept)
            return weighted - kept

        assert quant.selection is not None
        fb, agree = accuracy_fallback(onnx, write, out, keep, quant.selection, spec.layout, quant.max_drop, start,
                                      quant.frames)
        log.info("accuracy-aware INT8 (selection half, %d images): %s drop %s -> %s (max_drop %g); kept in float: "
                 "%s", fb["images"], fb["metric"], points(fb["drop_before"], fb["max_drop"]),
                 points(fb["drop_after"], fb["max_drop"]), fb["max_drop"], ", ".join(fb["kept_float"]) or "nothing")
        return fb, agree

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

        from edgeport.backends.tensorrt.calib_cache import write_cache

        trt_version = str(target.runtime.get("tensorrt", ""))
        if not trt_version:
            raise ConversionError(f"profile {target.name} names no TensorRT version ([runtime] tensorrt = \"8.6.2\")")
        major_minor = tuple(int(p) for p in trt_version.split(".")[:2])
        files, info = dict(artifacts.files), dict(artifacts.info)
        amax = info.pop("amax", None)
        info["tensorrt_target"] = trt_version
        if artifacts.precision == "int8":
            if major_minor[0] == 8 and amax:
                write_cache(amax, trt_version, out / "calib.cache")
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
