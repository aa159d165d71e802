"""ARM: ONNX -> TFLite through onnx2tf, at FP32, FP16, dynamic-range or full-integer INT8.

The conversion runs in a child process (edgeport.backends.tflite.convert) inside a work
folder: TensorFlow stays out of the build process, onnx2tf finds its sample file there and
never reaches for the network. The model comes back NHWC; the manifest records that layout,
and int8 inputs and outputs carry the scale and zero point read from the model.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.backends.base import Artifacts, Availability, DeviceBackend, Quantization, Runtime, TensorInfo, probe
from edgeport.backends.tflite.litert import TF_CONV
from edgeport.backends.tflite.rewrite import rewrite_for_onnx2tf
from edgeport.cache import TMP_PREFIX
from edgeport.children import run_child
from edgeport.config import QuantizeConfig, read_by
from edgeport.errors import ConversionError
from edgeport.flags import dashed
from edgeport.progress import progress

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.config import QuantizeConfig
    from edgeport.preprocess import InputSpec
    from edgeport.target import Target

log = logging.getLogger("edgeport")
FILES = {"fp32": "model_fp32.tflite", "fp16": "model_fp16.tflite", "dynamic-range": "model_dynamic_range.tflite",
         "int8": "model_int8.tflite"}


def unsupported_ops(onnx_path: Path) -> list[tuple[str, str]]:
    """[(op_type, first node name)] for ops onnx2tf has no converter for (onnx2tf/ops/<Op>.py).

    Looks at onnx2tf's files without importing it: importing onnx2tf imports TensorFlow, which
    must stay out of this process (TensorFlow loaded before torch's triton crashes the process).
    """
    import onnx

    spec = importlib.util.find_spec("onnx2tf")
    if spec is None or spec.origin is None:
        return []
    ops_dir = Path(spec.origin).parent / "ops"
    model = onnx.load(str(onnx_path), load_external_data=False)
    missing: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in missing and not (ops_dir / f"{node.op_type}.py").is_file():
            missing[node.op_type] = node.name or "(unnamed)"
    return sorted(missing.items())


def _failure(output: str) -> str:
    """The useful line of a failed conversion: onnx2tf's op and node, or the converter's error."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", output)
    broke = re.search(r"INT8 quantization broke at [^\n]+", clean)
    if broke:
        return broke.group(0)
    op = re.search(r"onnx_op_type:\s*(\S+)", clean)
    name = re.search(r"onnx_op_name:\s*(\S+)", clean)
    if op:
        return (f"onnx2tf cannot convert op {op.group(1)} (node '{name.group(1) if name else '?'}'); replace that op "
                "in the model, or build it for an OpenVINO or TensorRT target, which take the ONNX as it is")
    flex = re.search(r"(?:Some ops are not supported by the native TFLite runtime|Flex)[^\n]*\n?[^\n]*", clean)
    if flex:
        listed = re.search(r"TF Select ops:\s*([\w, ]+)", clean)  # the converter's own list of the ops
        ops = ([o.strip() for o in listed.group(1).split(",") if o.strip()] if listed
               else re.findall(r"\btf\.([A-Z]\w*)\(", clean))  # else op calls (tf.Erf(...)), not tf.math, tf.float32
        return ("the model needs TensorFlow ops that TFLite's builtins lack (Flex" +
                (f": {', '.join(sorted(set(ops)))}" if ops else "") + "); LiteRT cannot run them: replace them in the "
                "model, or build it for an OpenVINO or TensorRT target")
    lines = [ln.strip() for ln in clean.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "ERROR" in ln]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:400]


class TFLiteRuntime(Runtime):
    """Host-side LiteRT interpreter, quantising exactly as the device runner does."""

    def __init__(self, path: Path, inputs: list[TensorInfo], outputs: list[TensorInfo], threads: int) -> None:
        from edgeport.backends.tflite.runner import TFLiteDeviceRuntime

        manifest = {"runtime": {"num_threads": threads}, "files_by_role": {"model": path.name},
                    "inputs": [i.to_dict() for i in inputs], "outputs": [o.to_dict() for o in outputs]}
        from edgeport.export import quiet_fds

        # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++ on every open.
        with quiet_fds() if not log.isEnabledFor(logging.DEBUG) else contextlib.nullcontext():
            self.device = TFLiteDeviceRuntime(manifest, str(path.parent))
        # Runtime.infer checks shapes against these; feeds are float32 in the model's layout.
        self.inputs = inputs
        self.outputs = outputs

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.device.infer(feeds)

    def close(self) -> None:
        self.device = None  # type: ignore[assignment]


def conv_numbering(onnx: Path) -> dict[str, tuple[str, int]]:
    """{ONNX Conv node: (kind, k)}: onnx2tf builds its TensorFlow ops in ONNX graph order and numbers each kind,
    so the k-th regular Conv becomes ``tf.nn.convolution_k`` and the k-th depthwise one ``depthwise_conv2d_k``
    (k = 0 unsuffixed) in the TFLite tensor names."""
    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    counts = {"tf.nn.convolution": 0, "depthwise_conv2d": 0}
    out = {}
    for n in graph.node:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = inits[n.input[1]]
        kind = "depthwise_conv2d" if group > 1 and len(w.dims) > 1 and w.dims[1] == 1 else "tf.nn.convolution"
        out[n.name] = (kind, counts[kind])
        counts[kind] += 1
    return out


def onnx_layer_names(onnx: Path, tf_names: list[str]) -> list[str]:
    """ONNX node names for onnx2tf's convolution names (``conv_numbering``); a name it cannot place stays."""
    back = {v: k for k, v in conv_numbering(onnx).items()}
    out = []
    for name in tf_names:
        m = TF_CONV.search(name)
        out.append(back.get((m.group(1), int(m.group(2) or 0)), name) if m else name)
    return out


class TFLiteBackend(DeviceBackend):
    """The ARM backend (Raspberry Pi, arm64 Linux, Android)."""

    name = "tflite"
    int8_settings = read_by(name)  # as edgeport.config declares each setting's readers
    device_modules = ("ai_edge_litert", "tflite_runtime", "tensorflow")  # the runner part tries them in this order
    emulatable = True  # LiteRT's aarch64 wheels run under qemu-user with the device's core (edgeport.emulate)

    def available(self) -> Availability:
        """onnx2tf and TensorFlow convert; ai-edge-litert runs on the host."""
        return probe(self.name, self.name, {"onnx2tf": "onnx2tf", "tensorflow": "tensorflow-cpu",
                                             "ai_edge_litert": "ai-edge-litert", "onnx": "onnx"})

    def compile(self, onnx: Path, target: Target, precision: str, calib: CalibrationSet | None,
                out: Path, spec: InputSpec, quant: Quantization | None = None) -> Artifacts:
        """Convert in a child process; INT8 is calibrated on the shared set (NHWC)."""
        self.available().require()
        target.check_precision(precision)
        if precision == "int8" and calib is None:
            raise ConversionError("full-integer INT8 needs a calibration set (--calib)")
        missing = unsupported_ops(onnx)
        if missing:
            raise ConversionError("onnx2tf {} cannot convert {}; replace those ops in the model or keep it off "
                                  "the TFLite targets".format(
                                      self.available().versions.get("onnx2tf", ""),
                                      ", ".join(f"op {op} (node '{node}')" for op, node in missing)))
        dest = out / FILES[precision]
        # The work folder lives inside the stage's own temporary folder, so whatever ends the build, it goes
        # with that folder (removed on an interruption, swept by the next build after a SIGKILL).
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}tflite-", dir=out) as tmp:
            work = Path(tmp)
            done = rewrite_for_onnx2tf(onnx, work / "model.onnx")  # a copy: onnx2tf rewrites its input in place
            if done["maxpool_pads"]:
                log.info("made %d MaxPool padding(s) explicit zeros for onnx2tf (exact after ReLU)",
                         done["maxpool_pads"])
            if done["gelu"]:
                log.info("%d exact GELU pattern(s) rewritten without Erf (TFLite has none)", done["gelu"])
            job: dict[str, Any] = {"work": str(work), "onnx": str(work / "model.onnx"), "precision": precision,
                                   "out": str(dest), **self._graph_facts(work / "model.onnx")}
            if calib is not None:
                np.save(work / "calib.npy", calib.nhwc().astype(np.float32))
                job["calib"] = str(work / "calib.npy")
                settings = quant.settings if quant is not None else QuantizeConfig()  # the defaults: one place
                job["subset_size"], job["method"] = settings.int8_subset, settings.calib_method
            if precision == "int8" and quant is not None and quant.settings.has_ignored:
                job["keep_float"] = self._keep_float(onnx, quant.settings)
            if precision == "int8" and quant is not None and quant.accuracy_control and quant.selection is not None:
                import dataclasses
                import pickle

                # the selection set (the drop) and every frame agreement is measured on, for the child's choices
                with open(work / "val.pkl", "wb") as f:
                    pickle.dump((dataclasses.replace(quant.selection, frames=[]),
                                 dataclasses.replace(quant.frames, frames=[])), f)
                job["fallback"] = {"val": str(work / "val.pkl"), "max_drop": quant.max_drop,
                                   "layout": spec.layout}
            frames = calib.frames if calib is not None and calib.frames else []
            if frames:
                np.save(work / "frames.npy", np.stack([f for f in frames if f.shape == frames[0].shape]))
                job["frames"] = str(work / "frames.npy")
            (work / "job.json").write_text(json.dumps(job))
            log.info("converting to TFLite %s with onnx2tf (a child process)", precision)
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"}
            bars: dict[str, list[Any]] = {}  # what -> [bar, done]

            def show(line: str) -> None:  # the child's progress, as it happens
                if line.startswith("[tflite]"):
                    log.info("%s", line[len("[tflite] "):])
                elif line.startswith("[tflite-progress] "):
                    done, total, what = line[len("[tflite-progress] "):].split(" ", 2)
                    if what not in bars:
                        bars[what] = [progress(None, what, total=int(total)), 0]
                    bar = bars[what]
                    bar[0].update(int(done) - bar[1])
                    bar[1] = int(done)
                    if done == total:
                        log.debug("%s: %s of %s", what, done, total)

            try:
                proc = run_child([sys.executable, "-m", "edgeport.backends.tflite.convert", str(work / "job.json")],
                                 cwd=work, env=env, on_line=show)
            finally:
                for bar, _ in bars.values():
                    bar.close()
            if proc.returncode != 0:
                log.debug("conversion output:\n%s\n%s", proc.stdout, proc.stderr)
                raise ConversionError(f"TFLite conversion failed: {_failure(proc.stdout + proc.stderr)}")
            result = json.loads((work / "result.json").read_text())
        nhwc = spec.with_layout("NHWC")
        inputs = [TensorInfo(d["name"], d["shape"], d["dtype"], "NHWC", d["quant"], d["index"])
                  for d in result["inputs"]]
        onnx_shapes = _onnx_output_shapes(onnx)
        outputs = [TensorInfo(d["name"], d["shape"], d["dtype"], _output_layout(d["shape"], onnx_shapes.get(d["name"])),
                              d["quant"], d["index"]) for d in result["outputs"]]
        self._check_io(inputs, spec, nhwc)
        info = {"onnx2tf": self.available().versions.get("onnx2tf", ""),
                "tensorflow": self.available().versions.get("tensorflow-cpu", ""),
                "layout_change": "NCHW -> NHWC (onnx2tf)", "size_mb": round(dest.stat().st_size / 1e6, 3)}
        if precision == "int8":
            info["quantization"] = {"kind": "full-integer", "io": "int8", "weights": "per-channel",
                                    "subset_size": min(len(calib), job["subset_size"]) if calib else 0,
                                    "ranges": result.get("ranges") or {"method": "max"}}
            if result.get("kept_float"):
                info["kept_float"] = [n for _, _, n in job["keep_float"]]
                info["quantization"]["kind"] = "full-integer, selective"
                info["quantization"]["ignored"] = info["kept_float"]
            if "fallback" in result:
                fb = result["fallback"]
                info["accuracy_fallback"] = fb
                info["quantization"]["kind"] = "full-integer, selective" if fb["kept_float"] else "full-integer"
                fb["kept_float"] = onnx_layer_names(onnx, fb["kept_float"])
                info["kept_float"] = sorted(set(info.get("kept_float", [])) | set(fb["kept_float"]))
                from edgeport.tables import points

                log.info("accuracy-aware INT8 (selection half, %d images): %s drop %s -> %s (max_drop %g); kept in "
                         "float: %s", fb["images"], fb["metric"], points(fb["drop_before"], fb["max_drop"]),
                         points(fb["drop_after"], fb["max_drop"]), fb["max_drop"],
                         ", ".join(fb["kept_float"]) or "nothing")
        return Artifacts(self.name, target.name, precision, {"model": dest}, inputs, outputs, nhwc,
                         self.runtime_settings(target, precision), info)

    def check_quantization(self, onnx: Path, quant: QuantizeConfig) -> None:
        """The ignored layers match something (``_keep_float`` through ``ignored_nodes``), and are convolutions:
        TFLite keeps only those in float."""
        from edgeport.errors import ConfigError

        try:
            self._keep_float(onnx, quant)
        except ConversionError as e:
            raise ConfigError(str(e)) from None

    @staticmethod
    def _keep_float(onnx: Path, quant: QuantizeConfig) -> list[list[Any]]:
        """[[kind, k, ONNX name]] of the layers [quantize] ignored_* keeps in float: TFLite keeps convolutions
        (the quantizer's denylist, by onnx2tf's names); any other matched layer is refused in one line."""
        from edgeport.backends.base import ignored_nodes

        if not quant.has_ignored:
            return []
        numbering = conv_numbering(onnx)
        keep = ignored_nodes(onnx, quant)
        other = sorted(n for n in keep if n not in numbering)
        if other:
            raise ConversionError(f"TFLite INT8 can keep only convolutions in float; {', '.join(other[:3])}"
                                  + (f" and {len(other) - 3} more" if len(other) > 3 else "")
                                  + f" matched [quantize] int8_ignore* / {dashed('int8_ignore')}: narrow the match to "
                                  "Conv layers")
        return [[*numbering[n], n] for n in sorted(keep)]

    def runtime_settings(self, target: Target, precision: str) -> dict[str, Any]:
        """The interpreter's thread count (the model file is the same for every ARM target)."""
        return {"num_threads": int(target.options.get("num_threads", 4))}

    @staticmethod
    def _graph_facts(onnx: Path) -> dict[str, Any]:
        """The job's view of the graph: its output names (the converter's signature numbers them), and the
        ops onnx2tf must replace: Erf (GELU in convnext, vit, swin, maxvit) has no TFLite builtin and would
        become FlexErf, which LiteRT refuses. onnx2tf matches these names in lower case; its command line
        lowers them, its Python API does not (onnx2tf 1.28 onnx2tf.py, ops/Erf.py: ``"erf" in
        replace_to_pseudo_operators``), so "Erf" from Python silently replaced nothing."""
        import onnx as onnx_lib

        graph = onnx_lib.load(str(onnx), load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        return {"pseudo_ops": [op.lower() for op in ("Erf", "Gelu") if op in ops],
                "outputs": [o.name for o in graph.output]}

    @staticmethod
    def _check_io(inputs: list[TensorInfo], spec: InputSpec, nhwc: InputSpec) -> None:
        if len(inputs) != 1:
            raise ConversionError(f"the TFLite model has {len(inputs)} inputs; edgeport handles one image input")
        if list(inputs[0].shape) != list(nhwc.shape):
            raise ConversionError(f"onnx2tf produced input shape {inputs[0].shape}, expected NHWC "
                                  f"{list(nhwc.shape)} for the spec's {list(spec.shape)}")

    def open(self, artifacts: Artifacts) -> TFLiteRuntime:
        """Host runtime with the profile's thread count."""
        self.available().require()
        return TFLiteRuntime(artifacts.files["model"], artifacts.inputs, artifacts.outputs,
                             int(artifacts.runtime.get("num_threads", 4)))


BACKEND = TFLiteBackend()


def _onnx_output_shapes(onnx: Path) -> dict[str, list[int]]:
    """{output name: dims} of the ONNX graph (0 for a symbolic dimension)."""
    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx), load_external_data=False).graph
    return {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}


def _output_layout(shape: list[int], onnx_shape: list[int] | None) -> str | None:
    """A 4-D TFLite output's layout: NHWC where onnx2tf transposed it, NCHW where it kept the ONNX shape (it does
    for grids built by Reshape or Stack rather than a convolution, such as a CenterNet head's sizes); NHWC when the
    shapes cannot tell."""
    if len(shape) != 4:
        return None
    if onnx_shape is None or len(onnx_shape) != 4:
        return "NHWC"
    n, c, h, w = onnx_shape
    kept = list(shape[1:]) == [c, h, w]
    return "NCHW" if kept and list(shape[1:]) != [h, w, c] else "NHWC"
