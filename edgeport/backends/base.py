"""The one seam between the shared pipeline and the device backends."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edgeport.errors import BackendUnavailableError, ConversionError, EdgeportError
from edgeport.flags import dashed

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.config import QuantizeConfig
    from edgeport.evaluate import LabelledSet
    from edgeport.preprocess import InputSpec
    from edgeport.target import Target


@dataclass
class Quantization:
    """What INT8 compiles get beyond the calibration set: settings, labelled validation data, and ``memo``,
    the build cache for intermediate results several compiles share (activation ranges):
    ``memo(kind, key, compute)`` returns ``compute()``'s JSON-able result, computed once per key."""

    settings: QuantizeConfig
    val: LabelledSet | None = None
    memo: Callable[[str, dict[str, Any], Callable[[], Any]], Any] | None = None
    budget: float | None = None  # what INT8 may lose, when pruning spent part of max_drop; None: max_drop
    extra: LabelledSet | None = None  # calibration frames held back from the ranges (CalibrationSet.hold_back)

    @property
    def selection(self) -> LabelledSet | None:
        """The set whose drop accuracy-aware INT8 holds within max_drop: the validation set's selection half,
        else (no validation data) the held-back calibration frames, by agreement with FP32."""
        return self.val if self.val is not None else self.extra

    @functools.cached_property
    def frames(self) -> LabelledSet | None:
        """Every frame INT8's choices measure agreement with FP32 on: the selection set's, then the held-back
        calibration frames (``LabelledSet.joined``)."""
        if self.val is not None and self.extra is not None:
            return self.val.joined(self.extra)
        return self.selection

    @property
    def max_drop(self) -> float:
        """The drop INT8's accuracy-aware choices hold within: the budget the build gives, else max_drop."""
        return self.settings.max_drop if self.budget is None else self.budget

    def cached(self, kind: str, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
        """``compute()`` through the build cache when there is one."""
        return self.memo(kind, key, compute) if self.memo is not None else compute()

    @property
    def accuracy_control(self) -> bool:
        """Accuracy control is on when asked for, or by default when validation data is given: with labels it
        holds the task metric within max_drop, without them agreement with FP32 within the budget the build gives
        (edgeport.build.compile.int8_budget: the target's agreement gate)."""
        on = self.settings.accuracy_control
        return self.selection is not None if on is None else bool(on)

    def key(self, fields: frozenset[str]) -> dict[str, Any]:
        """Cache-key form: the settings in ``fields`` (those a backend reads), and the validation data only
        when that backend's accuracy control uses it."""
        import dataclasses

        settings = {**dataclasses.asdict(self.settings), "max_drop": self.max_drop}
        uses_val = "accuracy_control" in fields and self.accuracy_control
        return {**{k: v for k, v in settings.items() if k in fields},
                "val": self.val.sha256 if uses_val and self.val is not None else None,
                "held": self.extra.sha256 if uses_val and self.extra is not None else None,
                "accuracy_control": self.accuracy_control if "accuracy_control" in fields else None}


@dataclass
class Availability:
    """Whether a backend can be used here, its versions, and how to install it."""

    name: str
    installed: bool
    versions: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    install: str = ""
    can_run: bool = True  # False: artifacts are built here but only run on the device (TensorRT)

    def require(self) -> None:
        """BackendUnavailableError with the install command unless installed."""
        if not self.installed:
            raise BackendUnavailableError(f"backend {self.name} is not available ({self.reason}); {self.install}")


WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def decoding_nodes(graph: Any) -> set[str]:
    """Weighted nodes that decode a distribution rather than learn a feature: a Conv or MatMul whose data input
    is a Softmax's output (through Reshape/Transpose), such as a DFL box head's fixed-bin convolution (the
    expected value over 16 bins). Rounding its bins to INT8 moves every box edge."""
    made_by = {o: n for n in graph.node for o in n.output}
    found: set[str] = set()
    for node in graph.node:
        if node.op_type not in WEIGHTED or not node.input:
            continue
        src = made_by.get(node.input[0])
        while src is not None and src.op_type in ("Reshape", "Transpose"):
            src = made_by.get(src.input[0]) if src.input else None
        if src is not None and src.op_type == "Softmax":
            found.add(node.name)
    return found


def _reach(graph: Any, skip: set[str]) -> Callable[[str], bool]:
    """reaches(tensor): whether a weighted node not in ``skip`` reads the tensor or anything computed from it."""
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    memo: dict[str, bool] = {}

    def reaches(tensor: str) -> bool:
        if tensor not in memo:
            memo[tensor] = False
            memo[tensor] = any((n.op_type in WEIGHTED and n.name not in skip) or any(reaches(o) for o in n.output)
                               for n in readers.get(tensor, []))
        return memo[tensor]

    return reaches


def weighted_reach(onnx_path: Path) -> tuple[Any, Callable[[str], bool]]:
    """(the ONNX graph, reaches(tensor): whether a weighted node (Conv, ConvTranspose, Gemm, MatMul) reads the
    tensor or anything computed from it)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return graph, _reach(graph, set())


def tail_nodes(onnx_path: Path, heads_of: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The nodes after a model's last learned layers, reaching none on the way to the outputs: a detector's box
    decoding (its DFL softmax and fixed-bin convolution included: ``decoding_nodes`` do not count as learned) and
    its score activation; with ``heads_of`` (output names), also the last learned layers that lead to those
    outputs only (a detector's class logits)."""
    import onnx

    return _tail(onnx.load(str(onnx_path), load_external_data=False).graph, heads_of)


def _tail(graph: Any, heads_of: list[str] | tuple[str, ...]) -> set[str]:
    skip = decoding_nodes(graph)
    reaches = _reach(graph, skip)
    last = {n.name for n in graph.node if n.name and not any(reaches(o) for o in n.output)}
    tail = {n.name for n in graph.node if n.name in last and (n.op_type not in WEIGHTED or n.name in skip)}
    if not heads_of:
        return tail
    made_by = {o: n for n in graph.node for o in n.output}
    wanted, outputs = set(heads_of), [o.name for o in graph.output]
    others: set[str] = set()  # every node on the way to an output not wanted
    stack = [o for o in outputs if o not in wanted]
    while stack:
        node = made_by.get(stack.pop())
        if node is not None and node.name not in others:
            others.add(node.name)
            stack.extend(node.input)
    heads = {n.name for n in graph.node if n.name in last and n.op_type in WEIGHTED and n.name not in skip
             and n.name not in others}
    return tail | heads


def float_tail(onnx_path: Path, spec: InputSpec) -> set[str]:
    """The nodes the task keeps in float in INT8 (``Task.float_tail``: a detector's decoding and class-logit
    layers, ``tail_nodes``); empty for a task that keeps none."""
    import onnx

    from edgeport.tasks import get as get_task

    task = get_task(spec.task)
    if not task.float_tail:
        return set()
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    shapes = {o.name: [int(d.dim_value) for d in o.type.tensor_type.shape.dim] for o in graph.output}
    return _tail(graph, task.float_outputs(spec, shapes))


def ignored_nodes(onnx_path: Path, quant: QuantizeConfig) -> set[str]:
    """ONNX node names matched by [quantize] int8_ignore_names / int8_ignore (re.search) / int8_ignore_types:
    the layers to keep in float. A setting that matches no node is an error, never
    silently nothing."""
    import re

    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    nodes = [(n.name, n.op_type) for n in graph.node]
    found: set[str] = set()
    for name in quant.int8_ignore_names:
        if not any(n == name for n, _ in nodes):
            raise ConversionError(f"[quantize] int8_ignore_names: no layer of the model is named {name!r}")
        found.add(name)
    for pattern in quant.int8_ignore:
        hits = {n for n, _ in nodes if re.search(pattern, n)}
        if not hits:
            raise ConversionError(f"{dashed('int8_ignore')} / [quantize] int8_ignore {pattern!r} matches no layer of "
                                  f"the model (the exported ONNX's node names, such as {nodes[0][0]!r})")
        found |= hits
    for kind in quant.int8_ignore_types:
        hits = {n for n, t in nodes if t == kind}
        if not hits:
            raise ConversionError(f"[quantize] int8_ignore_types: the model has no {kind!r} layer")
        found |= hits
    return found


def probe(name: str, extra: str, modules: dict[str, str]) -> Availability:
    """Availability from distribution versions, without importing the heavy modules.

    ``modules`` maps import name to distribution name (e.g. {"openvino": "openvino"}).
    """
    versions, missing = {}, []
    for mod, dist in modules.items():
        try:
            if importlib.util.find_spec(mod) is None:
                missing.append(dist)
                continue
        except (ImportError, ValueError):
            missing.append(dist)
            continue
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    install = f"pip install 'edgeport[{extra}]'"
    if missing:
        return Availability(name, False, versions, f"{', '.join(missing)} not installed", install)
    return Availability(name, True, versions, "", install)


@dataclass
class TensorInfo:
    """One model input or output as the artifact sees it."""

    name: str
    shape: list[int]
    dtype: str
    layout: str | None = None
    quant: dict[str, Any] | None = None  # {"scale": s, "zero_point": z} for integer tensors
    index: int | None = None  # the runtime's tensor index, where it addresses tensors by index (TFLite)

    def to_dict(self) -> dict[str, Any]:
        """Manifest form."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Artifacts:
    """What a backend's compile produced: files by role, plus what the runner needs."""

    backend: str
    target: str
    precision: str
    files: dict[str, Path]  # role -> path, e.g. {"model": model.xml, "weights": model.bin}
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    spec: InputSpec  # the spec as the artifact takes it (layout may differ from the ONNX)
    runtime: dict[str, Any] = field(default_factory=dict)  # runner settings (device, hints, threads)
    info: dict[str, Any] = field(default_factory=dict)  # provenance for the manifest
    host_runnable: bool = True


class Runtime:
    """Host-side inference on an artifact: a context manager with ``infer(dict) -> dict``.

    ``infer`` checks names, shapes and dtypes, then calls the backend's ``_infer``.
    Inputs are always float32 in the artifact's layout; integer quantisation of inputs and
    outputs is the runtime's job, as it is the runner's on the device.
    """

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the runtime's resources."""

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns float32 outputs by name."""
        for info in self.inputs:
            if info.name not in feeds:
                raise EdgeportError(f"input '{info.name}' missing; the model takes {[i.name for i in self.inputs]}")
            arr = feeds[info.name]
            if list(arr.shape[1:]) != list(info.shape[1:]):
                raise EdgeportError(f"input '{info.name}' has shape {list(arr.shape)}, the model takes {info.shape}")
        try:
            return self._infer({k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()})
        except EdgeportError:
            raise
        except Exception as e:  # the runtime refused the model at run time: that target fails, not the build
            first = " ".join(str(e).split())[:300] or type(e).__name__
            raise ConversionError(f"the model fails when run on the host ({type(self).__name__}): {first}; build "
                                  "this target at another precision, or the model for another target") from e

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run_batches(self, data: np.ndarray) -> dict[str, np.ndarray]:
        """Infer over (N, ...) one sample at a time (static batch 1) and stack per output."""
        name = self.inputs[0].name
        outs: dict[str, list[np.ndarray]] = {}
        for i in range(len(data)):
            for k, v in self.infer({name: data[i:i + 1]}).items():
                outs.setdefault(k, []).append(v)
        return {k: np.concatenate(v, 0) for k, v in outs.items()}


class Backend(Protocol):
    """What every backend implements (see DESIGN.md)."""

    name: str
    int8_settings: frozenset[str]

    def available(self) -> Availability: ...

    def check_quantization(self, onnx: Path, quant: QuantizeConfig) -> None: ...

    def calibration_needed(self, precision: str) -> bool: ...

    def artifact_settings(self, target: Target, precision: str) -> dict[str, Any]: ...

    def compile(self, onnx: Path, target: Target, precision: str, calib: CalibrationSet | None,
                out: Path, spec: InputSpec, quant: Quantization | None = None) -> Artifacts: ...

    def for_target(self, artifacts: Artifacts, target: Target, out: Path) -> Artifacts: ...

    def open(self, artifacts: Artifacts) -> Runtime: ...

    def runner_part(self) -> Path: ...

    def versions_key(self) -> str: ...


def runner_part_of(module_file: str) -> Path:
    """The runner.py beside a backend's backend.py."""
    return Path(module_file).with_name("runner.py")


class DeviceBackend:
    """What the device backends share; each defines name, available, compile and open."""

    name: str
    int8_settings: frozenset[str] = frozenset()  # the [quantize] settings its INT8 compile reads (config.read_by)

    def available(self) -> Availability:
        raise NotImplementedError

    def versions_key(self) -> str:
        """Changes when the toolchain that compiles changes (part of the cache key)."""
        return repr(sorted(self.available().versions.items()))

    def check_quantization(self, onnx: Path, quant: QuantizeConfig) -> None:
        """ConfigError, before any compile, for INT8 settings this backend cannot honour on this model (by
        default: ignored_* layers that match nothing)."""
        from edgeport.errors import ConfigError

        if quant.has_ignored and "int8_ignore" in self.int8_settings:
            try:
                ignored_nodes(onnx, quant)
            except EdgeportError as e:
                raise ConfigError(str(e)) from None

    def calibration_needed(self, precision: str) -> bool:
        """Only INT8 needs calibration data (dynamic-range quantises weights alone)."""
        return precision == "int8"

    def artifact_settings(self, target: Target, precision: str) -> dict[str, Any]:
        """The profile settings ``compile`` reads, i.e. all that can make two targets' artifacts differ (and
        their host outputs): targets that agree on them share one compile. None by default."""
        return {}

    def runtime_settings(self, target: Target, precision: str) -> dict[str, Any]:
        """What the target's runner is told in the manifest's ``runtime`` (device, threads, hints)."""
        return {}

    def for_target(self, artifacts: Artifacts, target: Target, out: Path) -> Artifacts:
        """The shared artifact as one target's bundle takes it: that target's runtime settings, plus any file of
        its own, written into ``out`` (TensorRT: the calibration cache for the target's TensorRT version)."""
        import dataclasses

        return dataclasses.replace(artifacts, target=target.name,
                                   runtime=self.runtime_settings(target, artifacts.precision))

    # ---- the device side (edgeport.deploy asks these; it never names a backend)
    device_modules: tuple[str, ...] = ()  # any one of these importable on the device is its runtime

    def device_import_check(self, python: str) -> str:
        """A shell command that succeeds when the device's python imports numpy, OpenCV and this runtime."""
        import shlex

        py = shlex.quote(python)
        alternatives = " || ".join(f"{py} -c 'import {m}'" for m in self.device_modules or (self.name,))
        return f"{py} -c 'import numpy, cv2' && ({alternatives})"

    def device_preflight(self, profile: dict[str, Any], facts: dict[str, str], python: str) -> list[str]:
        """What on the device (``facts``, from edgeport.deploy.preflight) does not fit a bundle of ``profile``,
        beyond architecture, Python and disk, which every bundle needs; one phrase each."""
        return []

    def device_setup(self, python: str, forced: bool) -> list[tuple[str, str, float]]:
        """(step, shell command run in the version's folder, timeout in seconds) after the runtime imports: what
        the device does before the selftest (TensorRT: build the engine)."""
        return []

    # ---- what `edgeport validate` asks of a bundle
    names_layers_as_onnx = False  # its artifact's tensors keep the ONNX graph's names (validate --localize)
    emulatable = False  # its device runtime installs and runs under qemu-user (validate --emulate aarch64)

    def layer_outputs(self, bundle: Path, manifest: dict[str, Any], x: Any,
                      wanted: list[str]) -> tuple[dict[str, Any], str]:
        """(the artifact's tensors named in ``wanted``, for the input ``x``; how to keep a layer {name} in float):
        --localize compares them with the FP32 ONNX's. Only where ``names_layers_as_onnx``."""
        raise NotImplementedError(f"{self.name} artifacts do not keep the ONNX graph's tensor names")

    def qdq_model(self, bundle: Path, manifest: dict[str, Any]) -> Path | None:
        """The bundle's Q/DQ ONNX, where it has one (a layer can be taken out of INT8 without a rebuild)."""
        return None

    def host_check(self, art: Artifacts) -> tuple[Runtime, str, str] | None:
        """(runtime, label, what runs it) where validate checks this artifact with something else than
        ``open`` (TensorRT FP16: its ONNX in ONNX Runtime); None: ``open`` it."""
        return None

    def host_precision(self, art: Artifacts) -> str:
        """The precision the build host computes this artifact in (the tolerance validate holds it to)."""
        return art.precision

    def bundle_checks(self, bundle: Path, manifest: dict[str, Any]) -> list[tuple[str, bool, dict[str, Any], str]]:
        """Checks of the bundle's own files beyond their hashes: (check, passed, metrics, message) each."""
        return []

    bench_note: str | None = None  # said under validate --bench when one of its bundles was timed

    def readme_run(self, target: Target, precision: str) -> list[str]:
        """The device README's "run" section for a bundle with a runner (Markdown lines)."""
        camera = target.camera.get("source", "0")
        return ["## Run", "", "```",
                "python3 -m venv --system-site-packages .venv   # pip installs into a venv (PEP 668)",
                ".venv/bin/python -m pip install -r requirements.txt",
                ".venv/bin/python runner.py --selftest", f".venv/bin/python runner.py {camera}",
                ".venv/bin/python runner.py synthetic:// --headless --max-frames 30 --jsonl -", "```", "",
                "Debian 12, Raspberry Pi OS 12 and Ubuntu 24.04 refuse `pip install` outside a venv; where",
                "`python3 -m venv` says ensurepip is missing, `sudo apt install python3-venv` first.",
                "`.venv/bin/python runner.py --help` lists sources (camera, csi://, rtsp://, files, folders,",
                "synthetic://) and outputs (--save, --jsonl, --headless).", ""]

    def runner_part(self) -> Path:
        """This backend's part of the assembled runner.py: runner.py beside its backend module."""
        import sys

        return runner_part_of(sys.modules[type(self).__module__].__file__ or "")
