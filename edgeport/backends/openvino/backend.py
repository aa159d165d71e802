"""Intel: ONNX -> OpenVINO IR at FP32, FP16 (compressed weights) or INT8 (NNCF PTQ)."""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.backends.base import (
    Artifacts,
    Availability,
    DeviceBackend,
    Quantization,
    Runtime,
    TensorInfo,
    probe,
)
from edgeport.config import QuantizeConfig, read_by
from edgeport.errors import ConversionError
from edgeport.flags import dashed

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.evaluate import LabelledSet
    from edgeport.preprocess import InputSpec
    from edgeport.target import Target

log = logging.getLogger("edgeport")
SHOWN_VERSION = 1  # bumped when what decides over NNCF's layers in float changes


def inference_precision(precision: str, device: str) -> str:
    """The INFERENCE_PRECISION_HINT the artifact is validated and run with.

    OpenVINO's CPU plugin runs "FP32" models in bf16 on CPUs with AVX-512 BF16 unless told
    otherwise (seen on this machine: maxvit_t went from 1e-6 to 1.3e-2 relative error), so
    f32 is pinned for FP32 and INT8; FP16 IRs run in f16 where the device computes in f16.
    """
    if precision == "fp16" and device in ("GPU", "NPU"):
        return "f16"
    return "f32"


def _keep_output_names(model: Any, onnx: Path) -> None:
    """Give each output tensor exactly its ONNX output name. The frontend keeps every name a tensor had, so an
    output that is also a node's named intermediate ('/Transpose_output_0' and 'scores') reported either
    through get_any_name(), and the host and the runner looked the output up by the wrong one."""
    import onnx as onnx_lib

    names = [o.name for o in onnx_lib.load(str(onnx), load_external_data=False).graph.output]
    if len(names) == len(model.outputs):
        for port, name in zip(model.outputs, names):
            port.get_tensor().set_names({name})


def convert(onnx: Path) -> Any:
    """ov.convert_model, with a failure turned into one line naming the operations it could not take."""
    import openvino as ov

    root_level = logging.getLogger().level
    try:
        model = ov.convert_model(str(onnx))
        _keep_output_names(model, onnx)
        return model
    except Exception as e:
        text = str(e)
        m = re.search(r"No conversion rule found for operations: ([^\n]+)", text)
        if m:
            ops = m.group(1).strip().rstrip(".")
            raise ConversionError(f"OpenVINO {ov.__version__.split('-')[0]} cannot convert {onnx.name}: no "
                                  f"conversion rule for {ops}; replace those ops in the model or keep this "
                                  "model off the intel-* targets") from None
        first = next((ln.strip() for ln in text.splitlines() if ln.strip() and "Check '" not in ln), text)
        raise ConversionError(f"OpenVINO cannot convert {onnx.name}: {first[:300]}") from None
    finally:
        logging.getLogger().setLevel(root_level)  # the ONNX frontend sets the root logger to ERROR


class OpenVINORuntime(Runtime):
    """Synchronous OpenVINO inference on the host CPU (or the target's device if present)."""

    def __init__(self, xml: Path, device: str, config: dict[str, str]) -> None:
        import openvino as ov

        core = ov.Core()
        if device not in core.available_devices:
            device = "CPU"
        self.device = device
        model = core.read_model(str(xml))
        # The IR's own output names, by position: compiling can merge a fused node's name into an output's
        # names, and get_any_name() on the compiled port may then give that one.
        self.names = [p.get_any_name() for p in model.outputs]
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [TensorInfo(p.get_any_name(), list(p.get_shape()), "float32") for p in self.compiled.inputs]
        self.outputs = [TensorInfo(n, list(p.get_shape()), "float32") for n, p in zip(self.names,
                                                                                      self.compiled.outputs)]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self.request.infer(feeds)
        return {n: np.asarray(res[p], np.float32) for n, p in zip(self.names, self.compiled.outputs)}

    def close(self) -> None:
        self.request = None
        self.compiled = None


def _cpu(model: Any) -> Any:
    """``model`` compiled for the CPU plugin in f32 (host-side scoring)."""
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def _outputs(compiled: Any, val: LabelledSet, idx: Any) -> np.ndarray:
    """The outputs of ``compiled`` for ``val.inputs[i]``, i in ``idx``, stacked and packed as the set's task reads
    them (by the IR's output names, in order)."""
    from edgeport.evaluate import pack

    names = [p.get_any_name() for p in compiled.outputs]
    runs = [compiled(val.inputs[i:i + 1]) for i in idx]
    return pack({n: np.concatenate([np.asarray(r[k], np.float32) for r in runs], 0) for k, n in enumerate(names)},
                val)


WEIGHTED = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData", "GroupConvolutionBackpropData")
PASS_THROUGH = ("Concat", "MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "StridedSlice", "Split",
                "VariadicSplit", "Interpolate", "Pad")


def float_layers(model: Any) -> list[str]:
    """The weighted layers of a quantized IR whose input is not quantized (walking back through layers FakeQuantize
    moves through, such as Concat and MaxPool): the layers NNCF left, or put back, in float. Names are the ONNX
    node names OpenVINO kept (its '/WithoutBiases' suffix dropped)."""
    memo: dict[int, bool] = {}

    def quantized(node: Any) -> bool:
        key = id(node)
        if key not in memo:
            kind = node.get_type_name()
            if kind == "FakeQuantize":
                memo[key] = True
            elif kind in PASS_THROUGH:
                data = [node.input_value(i).get_node() for i in range(node.get_input_size())]
                data = [d for d in data if d.get_type_name() != "Constant"]
                memo[key] = bool(data) and all(quantized(d) for d in data)
            else:
                memo[key] = False
        return memo[key]

    return [op.get_friendly_name().removesuffix("/WithoutBiases") for op in model.get_ordered_ops()
            if op.get_type_name() in WEIGHTED and not quantized(op.input_value(0).get_node())]


class OpenVINOBackend(DeviceBackend):
    """The Intel backend (CPU, integrated GPU, NPU)."""

    name = "openvino"
    int8_settings = read_by(name)  # as edgeport.config declares each setting's readers
    device_modules = ("openvino",)
    names_layers_as_onnx = True
    emulatable = True  # OpenVINO's aarch64 wheels run under qemu-user with the device's core (arm64-openvino)

    def layer_outputs(self, bundle: Path, manifest: dict[str, Any], x: Any,
                      wanted: list[str]) -> tuple[dict[str, Any], str]:
        """The IR's tensors named in ``wanted`` (ONNX tensor names survive conversion), as extra outputs, at the
        bundle's inference precision."""
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(bundle / manifest["files_by_role"]["model"]))
        ports: dict[str, Any] = {}
        for op in model.get_ordered_ops():
            if op.get_type_name() in ("Result", "Constant", "Parameter"):
                continue
            for out in op.outputs():
                for n in out.get_names():
                    ports.setdefault(n, out)
        chosen = [n for n in wanted if n in ports]
        model.add_outputs([ports[n] for n in chosen])
        config = {"INFERENCE_PRECISION_HINT": manifest.get("runtime", {}).get("inference_precision", "f32")}
        compiled = core.compile_model(model, "CPU", config)
        res = compiled({0: x})
        got: dict[str, Any] = {}
        for port in compiled.outputs:
            for n in port.get_names():
                if n in wanted:
                    got[n] = np.asarray(res[port])
        return got, dashed("int8_ignore") + " '{name}' (or [quantize] int8_ignore_names)"

    def available(self) -> Availability:
        """Installed or not, with versions (nncf is needed for INT8 only)."""
        av = probe(self.name, self.name, {"openvino": "openvino"})
        extra = probe(self.name, self.name, {"nncf": "nncf"})
        av.versions.update(extra.versions)
        if av.installed and not extra.installed:
            av.reason = "nncf not installed: INT8 unavailable"
        return av

    def versions_key(self) -> str:
        """The toolchain, plus the version of edgeport's own part in accuracy control (a cached artifact whose
        NNCF choice was not shown is compiled again)."""
        return f"{super().versions_key()} shown {SHOWN_VERSION}"

    def compile(self, onnx: Path, target: Target, precision: str, calib: CalibrationSet | None,
                out: Path, spec: InputSpec, quant: Quantization | None = None) -> Artifacts:
        """Convert and, for INT8, quantize with NNCF from the shared calibration set."""
        self.available().require()
        import openvino as ov

        target.check_precision(precision)
        model = convert(onnx)
        info: dict[str, Any] = {"openvino": ov.__version__.split("-")[0]}
        device = str(target.options.get("device", "CPU"))
        if precision == "int8":
            model, info["quantization"] = self._quantize(model, onnx, calib, spec, target, device,
                                                         quant or Quantization(QuantizeConfig()))
            info["nncf"] = self.available().versions.get("nncf", "")
        xml = out / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")
        runtime = self.runtime_settings(target, precision)
        inputs = [TensorInfo(p.get_any_name(), [int(d) for d in p.get_shape()], "float32", spec.layout)
                  for p in model.inputs]
        outputs = [TensorInfo(p.get_any_name(), [int(d) for d in p.get_shape()], "float32")
                   for p in model.outputs]
        return Artifacts(self.name, target.name, precision, {"model": xml, "weights": out / "model.bin"},
                         inputs, outputs, spec, runtime, info)

    def artifact_settings(self, target: Target, precision: str) -> dict[str, Any]:
        """INT8: NNCF's target device and preset come from the profile; every precision: the inference precision
        the host validates with (f16 on a GPU/NPU for FP16)."""
        device = str(target.options.get("device", "CPU"))
        settings: dict[str, Any] = {"inference_precision": inference_precision(precision, device)}
        if precision == "int8":
            settings.update(device=device, nncf_preset=target.options.get("nncf_preset"))
        return settings

    def runtime_settings(self, target: Target, precision: str) -> dict[str, Any]:
        """Device, performance hint, pinned inference precision and infer requests for the runner."""
        device = str(target.options.get("device", "CPU"))
        return {"device": device, "performance_hint": str(target.options.get("performance_hint", "LATENCY")),
                "inference_precision": inference_precision(precision, device),
                "async_requests": int(target.options.get("async_requests", 2))}

    def _quantize(self, model: Any, onnx: Path, calib: CalibrationSet | None, spec: InputSpec, target: Target,
                  device: str,
                  quant: Quantization) -> tuple[Any, dict[str, Any]]:
        if calib is None:
            raise ConversionError("INT8 needs a calibration set (--calib)")
        try:
            import nncf
        except ImportError:
            raise ConversionError("INT8 for OpenVINO needs nncf: pip install 'edgeport[openvino]'") from None
        if not log.isEnabledFor(logging.DEBUG):
            nncf.set_log_level(logging.WARNING)
        q = quant.settings
        name = model.inputs[0].get_any_name()
        calib_ds = nncf.Dataset([calib.data[i:i + 1] for i in range(len(calib))], lambda x: {name: x})
        preset = str(target.options.get("nncf_preset", q.int8_preset)).upper()
        preset = "PERFORMANCE" if preset == "AUTO" else preset  # the build resolves auto; the API may not
        kwargs: dict[str, Any] = {
            "subset_size": min(len(calib), q.int8_subset),
            "preset": getattr(nncf.QuantizationPreset, preset),
            "target_device": getattr(nncf.TargetDevice, device, nncf.TargetDevice.ANY),
            "fast_bias_correction": q.fast_bias_correction,
        }
        kept: list[str] = []
        from edgeport.backends.base import float_tail, ignored_nodes

        tail = sorted(float_tail(onnx, spec))
        if q.has_ignored or tail:
            # The settings name ONNX nodes (as for TensorRT and TFLite); the IR keeps those names, a convolution's
            # with a '/WithoutBiases' suffix: NNCF gets the IR's own op names, so nothing matched is dropped silently.
            kept = sorted(ignored_nodes(onnx, q)) if q.has_ignored else []
            wanted = set(kept) | set(tail)
            ov_names = [op.get_friendly_name() for op in model.get_ops()
                        if any(op.get_friendly_name() == n or op.get_friendly_name().startswith(n + "/")
                               for n in wanted)]
            kwargs["ignored_scope"] = nncf.IgnoredScope(names=ov_names, validate=False)
        report: dict[str, Any] = {"preset": preset.lower(), "subset_size": kwargs["subset_size"],
                                  "fast_bias_correction": q.fast_bias_correction,
                                  "target_device": kwargs["target_device"].value,
                                  "ignored": {"names": q.int8_ignore_names, "patterns": q.int8_ignore,
                                              "types": q.int8_ignore_types, "layers": kept},
                                  "float_tail": tail}
        try:
            # NNCF draws its progress bars with rich on sys.stdout; stdout carries the build's table and JSON.
            with contextlib.redirect_stdout(sys.stderr):
                qmodel = self._run_nncf(nncf, model, calib_ds, quant, spec, kwargs, report)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"NNCF quantization failed: {str(e).splitlines()[0]}") from e
        ops = [op.get_type_name() for op in qmodel.get_ops()]
        report["fake_quantize_nodes"] = ops.count("FakeQuantize")
        report["kept_float"] = float_layers(qmodel)
        ac = report.get("accuracy_control")
        if ac:
            from edgeport.tables import points

            log.info("accuracy-controlled INT8 (NNCF, selection half, %d images): drop %s -> %s (max_drop %g); "
                     "kept in float: %s", ac["validation"]["count"],
                     points(ac["drop_before"], ac["max_drop"]) if ac["drop_before"] is not None else "?",
                     points(ac["drop_after"], ac["max_drop"]) if ac["drop_after"] is not None else "?",
                     ac["max_drop"],
                     ", ".join(report["kept_float"]) or "nothing")
        if report["fake_quantize_nodes"] == 0:
            raise ConversionError("NNCF inserted no quantizers: nothing in this model was quantized to INT8 "
                                  f"(check {dashed('int8_ignore')})")
        return qmodel, report

    def _run_nncf(self, nncf: Any, model: Any, calib_ds: Any, quant: Quantization, spec: InputSpec,
                  kwargs: dict[str, Any], report: dict[str, Any]) -> Any:
        if quant.accuracy_control:
            sel = quant.selection
            if sel is None:
                raise ConversionError("accuracy-controlled INT8 needs validation data (--val-images) or a calibration "
                                      "set of 100 images or more (a quarter is held back to judge INT8 on)")
            scores: list[tuple[int, float]] = []
            fp32 = None if sel.labelled else _outputs(_cpu(model), sel, range(len(sel)))
            qmodel = self._accuracy_controlled(nncf, model, calib_ds, quant, spec, kwargs, scores, fp32)
            full = [m for n, m in scores if n == len(sel)]
            ac: dict[str, Any] = {
                "max_drop": quant.max_drop, "validation": sel.summary(),
                "half": "selection" if quant.val is not None else "held-back calibration frames",
                "reference": full[0] if full else None,
                "drop_before": full[0] - full[1] if len(full) > 1 else None}
            if ac["drop_before"] is not None and ac["drop_before"] > quant.max_drop:  # NNCF went on to revert
                qmodel = self._shown(nncf, model, qmodel, calib_ds, quant, kwargs, ac)
            key, after = self._metric_of(qmodel, quant, spec, fp32)
            ac.update({"metric": key, "drop_after": full[0] - after if full else None})
            report["accuracy_control"] = ac
            return qmodel
        return nncf.quantize(model, calib_ds, **kwargs)

    @staticmethod
    def _shown(nncf: Any, model: Any, qmodel: Any, calib_ds: Any, quant: Quantization, kwargs: dict[str, Any],
               ac: dict[str, Any]) -> Any:
        """NNCF's layers put back in float, kept only when shown: the NNCF model's per-frame agreement with FP32
        over the plainly quantized model's (the default, quantized again with the same settings), on every frame
        INT8's choices are judged on, needs a paired bootstrap interval above zero (edgeport.quantize.evidence);
        else the plain model. A task whose per-frame agreement is too coarse (``Task.choice_by_agreement`` False:
        detection) keeps NNCF's choice, made by the labelled metric, with the interval recorded. ``ac`` receives
        ``reverted``: the layers, the gain and its interval, whether taken."""
        from edgeport.quantize.evidence import frame_agreement, paired_gain
        from edgeport.tasks import get as get_task

        frames = quant.frames
        assert frames is not None
        plain = nncf.quantize(model, calib_ds, **kwargs)
        every = range(len(frames))
        fp32 = _outputs(_cpu(model), frames, every)
        agree = [frame_agreement(fp32, _outputs(_cpu(m), frames, every), frames) for m in (qmodel, plain)]
        gain = paired_gain(agree[0], agree[1], frames.names)
        by_agreement = get_task(frames.task).choice_by_agreement
        taken = gain.clears or not by_agreement
        layers = sorted(set(float_layers(qmodel)) - set(float_layers(plain)))
        ac["reverted"] = {"layers": layers, **gain.to_dict(), "frames": len(frames), "taken": taken,
                          "by": "agreement interval" if by_agreement else "metric drop held"}
        log.info("NNCF's %d layer(s) put back in float (%s): agreement with FP32 %s over plain INT8 on %d frames -> "
                 "%s", len(layers), ", ".join(layers) or "none by name", gain, len(frames),
                 "kept" if gain.clears else "kept (chosen by the labelled metric)" if taken else
                 "plain INT8 kept (its interval does not clear zero)")
        return qmodel if taken else plain

    @staticmethod
    def _metric_of(qmodel: Any, quant: Quantization, spec: InputSpec, fp32: np.ndarray | None) -> tuple[str, float]:
        """(name, points) of the task metric of ``qmodel`` on the validation data, compiled for the CPU (agreement
        with ``fp32``, the float model's outputs, on an unlabelled set)."""
        from edgeport.evaluate import score

        val = quant.selection
        assert val is not None
        got = _outputs(_cpu(qmodel), val, range(len(val)))
        return score(got, got if fp32 is None else fp32, val, spec.layout)

    def _accuracy_controlled(self, nncf: Any, model: Any, calib_ds: Any, quant: Quantization, spec: InputSpec,
                             kwargs: dict[str, Any], scores: list[tuple[int, float]],
                             fp32: np.ndarray | None) -> Any:
        """nncf.quantize_with_accuracy_control scored by the task metric on the labelled set (or, given the float
        model's outputs ``fp32`` for an unlabelled set, by agreement with them in percent); every score NNCF asks
        for lands in ``scores`` as (images, points): the first two on the whole set are the float model's and
        the plainly quantized model's."""
        from edgeport.evaluate import score

        val = quant.selection
        assert val is not None
        name = model.inputs[0].get_any_name()
        val_ds = nncf.Dataset(list(range(len(val))), lambda i: {name: val.inputs[i:i + 1]})

        def validate(compiled: Any, items: Any) -> float:
            idx = list(items)
            got = _outputs(compiled, val, idx)
            metric = score(got, got if fp32 is None else fp32[idx], val.subset(idx), spec.layout)[1]
            scores.append((len(idx), metric))
            return metric / 100.0

        log.info("accuracy-controlled INT8: max drop %.2f points of %s on %d images", quant.max_drop,
                 "agreement with FP32" if fp32 is not None else "the task metric", len(val))
        return nncf.quantize_with_accuracy_control(
            model, calib_ds, val_ds, validate, max_drop=quant.max_drop / 100.0,
            drop_type=nncf.DropType.ABSOLUTE, **kwargs)

    def open(self, artifacts: Artifacts) -> OpenVINORuntime:
        """Host runtime on the IR with the bundle's own inference precision."""
        self.available().require()
        rt = artifacts.runtime
        config = {"INFERENCE_PRECISION_HINT": rt["inference_precision"], "PERFORMANCE_HINT": "LATENCY"}
        return OpenVINORuntime(artifacts.files["model"], rt["device"], config)


BACKEND = OpenVINOBackend()
