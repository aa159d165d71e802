"""Typed project configuration: edgeport.toml, overridden by CLI flags.

Unknown keys and bad values are ConfigErrors naming the key, the file and a close match. A key with a flag has
the flag's name (``--int8-ignore`` is ``[quantize] int8_ignore``); earlier names are still read (edgeport.options).

    [model]        model, weights, name, seed
    [input]        name, shape, dtype, layout
    [preprocess]   resize, interpolation, pad_value, resize_size, color, scale, mean, std
    [task]         type, labels, labels_file, palette, ignore_index
    [optimize]     fold_bn, prune (a ratio or auto), prune_grid, prune_ignore, prune_type_ratios, finetune,
                   recover_steps, recover_seconds, recover_images, recover_batch, recover_lr, recover_seed,
                   recover_supervised, recover_labelled, recover_labels
    [export]       opset, dynamic_batch, simplify, tolerance, parity_samples
    [calibration]  calib, max_images
    [quantize]     int8_preset, int8_subset, fast_bias_correction, int8_ignore_names, int8_ignore,
                   int8_ignore_types, accuracy_control, max_drop, calib_method
    [validation]   val_images, val_labels, max_images, split, tolerance.<output>[@<precision>] (max_abs, max_rel,
                   min_cosine, min_sqnr_db, min_agreement)
    [build]        target, precision, out, build_dir
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edgeport.errors import ConfigError, close_match
from edgeport.flags import (
    ALL,
    BUILD,
    EXPORT,
    INT8_GROUP,
    MODEL_GROUP,
    OPTIMISE_GROUP,
    OUTPUT_GROUP,
    VALIDATE,
    Flag,
    dashed,
    opt,
    positive,
    ratio_or_auto,
    setting,
)
from edgeport.intake import carried_spec
from edgeport.preprocess import InputSpec, default_spec
from edgeport.target import PRECISIONS
from edgeport.tasks import all_option_keys
from edgeport.zoo import embedded_name, embedded_spec

CONFIG_NAME = "edgeport.toml"
DEFAULT_MODEL = "edgeport:roadseg"


@dataclass
class ModelConfig:
    """Where the model comes from (see edgeport.model.load_model for the forms)."""

    model: str = opt(DEFAULT_MODEL, flag=Flag(
        "edgeport:roadseg (default) | torchvision:NAME[?k=v] | file.py:factory | package.module:factory | model.pt | "
        "model.pt2", MODEL_GROUP, ALL, aliases=("source",)))
    weights: str | None = opt(None, flag=Flag("state_dict or training checkpoint to load", MODEL_GROUP, ALL, path=True))
    name: str | None = opt(None, flag=Flag("model name used in bundles", MODEL_GROUP, ALL))
    seed: int = setting(0, "torch.manual_seed while the model is built, so random-init weights are the same in "
                           "every process (the build's and validate's references agree)")


@dataclass
class OptimizeConfig:
    """Graph-level optimisation before export."""

    fold_bn: bool = setting(True, "fold batch-norm layers into the convolutions before export")
    # a ratio, or "auto": the largest of prune_grid within max_drop (edgeport.build.prune_auto)
    prune: float | str = opt(0.0, flag=Flag(
        "structured channel pruning ratio, e.g. 0.3, held to the original model; auto: the largest of [optimize] "
        "prune_grid (0.3, 0.5, 0.7) within max_drop after recovery", OPTIMISE_GROUP, (BUILD, EXPORT),
        type=ratio_or_auto, metavar="RATIO|auto"))
    prune_grid: list[float] = setting(doc="the ratios prune = \"auto\" tries", factory=lambda: [0.3, 0.5, 0.7])
    prune_ignore: list[str] = setting(doc="regular expressions of layer names pruning keeps whole", factory=list)
    prune_type_ratios: dict[str, float] = setting(doc="a ratio per layer type, e.g. {Linear = 0.1}", factory=dict)
    finetune: str | None = opt(None, flag=Flag("called as fn(model, spec) after pruning, instead of the distillation",
                                                OPTIMISE_GROUP, (BUILD, EXPORT), metavar="MODULE:FUNCTION"))
    # Recovery after pruning (edgeport.recover): distillation from the original, on by default when pruning.
    recover_steps: int = opt(1500, flag=Flag(
        "after --prune, distil the pruned model from the original for N steps on the calibration images, no labels "
        "(default 1500; 0: none)", OPTIMISE_GROUP, (BUILD, EXPORT), type=int, metavar="N"))  # 0: no recovery
    recover_seconds: float = setting(0.0, "a time budget that may stop recovery early (0: none; the steps are the "
                                          "contract)")
    recover_images: str | None = setting(None, "unlabelled images to distil on (default: the calibration set)")
    recover_batch: int = setting(8, "recovery's batch size")
    recover_lr: float = setting(1e-3, "recovery's learning rate (Adam, cosine schedule)")
    recover_seed: int = setting(0, "recovery's seed (flips, brightness and contrast moves, batch order)")
    recover_supervised: float = setting(0.0, "> 0: that weight on a supervised term, on recover_labelled")
    recover_labelled: str | None = setting(None, "labelled images apart from the validation set (e.g. the training "
                                                 "split) for the supervised term")
    recover_labels: str | None = setting(None, "their labels (a label-map folder), as --val-labels for validation")

    def validate(self, where: str = "optimize") -> None:
        """ConfigError for a pruning ratio outside [0, 1) or recovery settings out of range."""
        if self.prune != "auto" and (isinstance(self.prune, str) or not 0.0 <= self.prune < 1.0):
            raise ConfigError(f"{where}: prune {self.prune} must be a fraction in [0, 1), e.g. 0.3, or auto")
        if not self.prune_grid or any(not isinstance(r, (int, float)) or not 0.0 < r < 1.0 for r in self.prune_grid):
            raise ConfigError(f"{where}: prune_grid {self.prune_grid} must list fractions in (0, 1), e.g. [0.3, 0.5]")
        for kind, r in self.prune_type_ratios.items():
            if not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                raise ConfigError(f"{where}: prune_type_ratios.{kind} = {r!r} must be a fraction in [0, 1)")
        for pattern in self.prune_ignore:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{where}: prune_ignore {pattern!r} is not a regular expression ({e})") from None
        if self.recover_steps < 0 or self.recover_batch < 1 or self.recover_seconds < 0 or self.recover_lr <= 0 or \
                self.recover_supervised < 0:
            raise ConfigError(f"{where}: recover_steps, recover_seconds and recover_supervised must be >= 0 (0 "
                              "steps: no recovery), recover_batch >= 1 and recover_lr > 0")
        if self.recover_supervised and not self.recover_labelled:
            raise ConfigError(f"{where}: recover_supervised needs recover_labelled (and recover_labels): labelled "
                              "images apart from the validation set, e.g. the training split")
        if (self.recover_labelled or self.recover_labels) and not self.recover_supervised:
            raise ConfigError(f"{where}: recover_labelled has no effect while recover_supervised is 0; give the "
                              "supervised term a weight, e.g. recover_supervised = 1.0")


@dataclass
class ExportConfig:
    """ONNX export settings; opset None means the strictest selected target's ceiling."""

    opset: int | None = opt(None, flag=Flag("ONNX opset (default: the strictest target's ceiling)", OPTIMISE_GROUP,
                                            (BUILD, EXPORT), type=positive))
    dynamic_batch: bool = opt(False, flag=Flag("dynamic batch dimension", OPTIMISE_GROUP, (BUILD, EXPORT),
                                               action="store_true"))
    simplify: bool = setting(True, "simplify the ONNX (onnxslim) after export")
    tolerance: float = setting(1e-4, "the ONNX's largest error against PyTorch, as a share of the output's range")
    parity_samples: int = setting(8, "calibration frames the ONNX is compared with PyTorch on")


@dataclass
class CalibrationConfig:
    """Calibration source: image folder, video file, .npy, or synthetic:// (the default)."""

    calib: str | None = opt(None, flag=Flag("calibration/sample images: folder, video, .npy or synthetic://",
                                            MODEL_GROUP, (BUILD, EXPORT), path=True, aliases=("source",)))
    max_images: int = setting(300, "at most this many calibration images are read")


OV, TFL, TRT = "openvino", "tflite", "tensorrt"
PRESETS = ("auto", "mixed", "performance")
RANGE_METHODS = ("max", "percentile", "entropy", "mse")


@dataclass
class QuantizeConfig:
    """INT8 post-training quantization settings (NNCF for OpenVINO; edgeport's ranges for TFLite and TensorRT).

    Each field names the backends whose INT8 compile reads it (its flag's ``readers``, or ``readers`` in the
    metadata of a setting with no flag): a compile's cache key holds what it reads, and a flag that no selected
    backend reads is refused. ``accuracy_control`` None means "on when validation data is given" (without
    labels it holds agreement with FP32 to the target's agreement gate: edgeport.build.compile.int8_budget);
    ``max_drop`` is in points of the task metric (mIoU or top-1 %). The int8_ignore* lists keep matching layers
    in float.
    """

    int8_preset: str = opt("auto", flag=Flag(
        "NNCF preset (OpenVINO): performance (symmetric), mixed (asymmetric activations) or auto (default: the "
        "model's own recipe, mixed for Ultralytics models as their exporter does; else performance)", INT8_GROUP,
        choices=PRESETS, readers=(OV,), int8=True, aliases=("preset",)))
    int8_subset: int = opt(300, flag=Flag("calibration images used (default 300)", INT8_GROUP, type=positive,
                                          metavar="N", readers=(OV, TFL, TRT), int8=True, aliases=("subset_size",)))
    fast_bias_correction: bool = setting(True, "NNCF's fast bias correction (OpenVINO)", readers=(OV,))
    int8_ignore_names: list[str] = setting(doc="exact ONNX node names kept in float", factory=list,
                                           readers=(OV, TFL, TRT), every_target=True, aliases=("ignored_names",))
    int8_ignore: list[str] = opt(factory=list, flag=Flag(
        "keep layers whose name matches in float (OpenVINO, TensorRT, TFLite convolutions); repeatable", INT8_GROUP,
        action="append", metavar="REGEX", extend=True, readers=(OV, TFL, TRT), int8=True, every_target=True,
        aliases=("ignored_patterns",)))
    int8_ignore_types: list[str] = setting(doc="ONNX op types kept in float, e.g. [\"Softmax\"]", factory=list,
                                           readers=(OV, TFL, TRT), every_target=True, aliases=("ignored_types",))
    accuracy_control: bool | None = opt(None, flag=Flag(
        "keep the most harmful layers in float until the INT8 drop is within max_drop (default: on with "
        "--val-images; without labels it holds agreement with FP32 to the target's agreement gate; asked for "
        "without --val-images, it judges on a quarter of the calibration set held back)", INT8_GROUP,
        action="bool", readers=(OV, TFL, TRT), int8=True))
    max_drop: float = opt(1.0, flag=Flag(
        "largest task-metric drop from PyTorch in points (default [quantize] max_drop, 1.0)", INT8_GROUP,
        (BUILD, VALIDATE), type=float, readers=(OV, TFL, TRT)))
    calib_method: str = opt("percentile", flag=Flag(
        "activation-range method for TensorRT and TFLite INT8 (default percentile; max: TFLite's own min/max; mse: "
        "least squared error)", INT8_GROUP, choices=RANGE_METHODS, readers=(TFL, TRT),
        int8=True, aliases=("method",)))

    def validate(self, where: str = "quantize") -> None:
        """ConfigError for a value no backend accepts."""
        if self.int8_preset not in PRESETS:
            raise ConfigError(f"{where}: int8_preset {self.int8_preset!r} is not one of {', '.join(PRESETS)}")
        if self.calib_method not in RANGE_METHODS:
            raise ConfigError(f"{where}: calib_method {self.calib_method!r} is not one of {', '.join(RANGE_METHODS)}")
        if self.int8_subset < 1:
            raise ConfigError(f"{where}: int8_subset must be positive")
        if not 0 < self.max_drop <= 100:
            raise ConfigError(f"{where}: max_drop {self.max_drop} must be in (0, 100] metric points")
        for pattern in self.int8_ignore:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{where}: ignored pattern {pattern!r} ({dashed('int8_ignore')} / int8_ignore) is "
                                  f"not a regular expression: {e}") from None

    @property
    def has_ignored(self) -> bool:
        """True when some layers are to stay in float."""
        return bool(self.int8_ignore_names or self.int8_ignore or self.int8_ignore_types)


def read_by(backend: str) -> frozenset[str]:
    """The [quantize] settings ``backend``'s INT8 compile reads (what its compile's cache key holds): each field
    names its readers, in its flag or, for a setting with no flag, in its metadata."""
    return frozenset(name for name, readers, _, _ in quantize_settings() if backend in readers)


def quantize_settings() -> list[tuple[str, tuple[str, ...], bool, Flag | None]]:
    """(field, readers, every_target, flag or None) of each [quantize] setting."""
    out = []
    for f in dataclasses.fields(QuantizeConfig):
        flag = f.metadata.get("flag")
        if flag is not None:
            out.append((f.name, flag.readers, flag.every_target, flag))
        else:
            out.append((f.name, f.metadata.get("readers", ()), f.metadata.get("every_target", False), None))
    return out


TOLERANCE_KEYS = ("max_abs", "max_rel", "min_cosine", "min_sqnr_db", "min_agreement")
# How a labelled set is split into a selection half (tuning) and a report half (gates) (edgeport.evaluate.halves)
SPLITS = {"blocks": "the first half of each folder in sorted order selects, the second half reports",
          "alternate": "even positions select, odd positions report"}


@dataclass
class ValidationConfig:
    """Labelled validation data: images + label maps (segmentation), class folders, or synthetic://."""

    val_images: str | None = opt(None, flag=Flag(
        "validation images (or synthetic://): each artifact's mIoU / top-1 is measured beside PyTorch's, and INT8 uses "
        "accuracy control", INT8_GROUP, (BUILD, VALIDATE), metavar="DIR", path=True, aliases=("images",)))
    val_labels: str | None = opt(None, flag=Flag(
        "segmentation label maps matched to --val-images by file stem (classification: one sub-folder per class "
        "instead)", INT8_GROUP, (BUILD, VALIDATE), metavar="DIR", path=True, aliases=("labels",)))
    max_images: int = opt(500, flag=Flag("at most N dataset images (default 500)", INT8_GROUP, (VALIDATE,),
                                         type=positive, metavar="N"))
    split: str = setting("blocks", "how the set is split into a selection half (tuning) and a report half (gates, "
                                   "tables): blocks (the first half of each folder in sorted order selects, so a "
                                   "video's neighbouring frames stay on one side) or alternate (even positions "
                                   "select)")
    tolerance: dict[str, Any] = setting(doc="per-output tolerances (max_abs, max_rel, min_cosine, min_sqnr_db, "
                                            "min_agreement): [validation.tolerance.OUTPUT], \"*\" for every output, "
                                            "@PRECISION for one precision only", factory=dict)

    def validate(self, where: str = "validation") -> None:
        """ConfigError naming a bad tolerance entry or split."""
        if self.split not in SPLITS:
            raise ConfigError(f"{where}: 'validation.split' = {self.split!r}: one of {', '.join(SPLITS)}"
                              f"{close_match(str(self.split), SPLITS)}")
        for key, entry in self.tolerance.items():
            if not isinstance(entry, dict):
                raise ConfigError(f"{where}: 'validation.tolerance.{key}' must be a table, e.g. "
                                  f"[validation.tolerance.{key}] min_cosine = 0.99")
            _, _, prec = key.partition("@")
            if prec and prec not in PRECISIONS:
                raise ConfigError(f"{where}: 'validation.tolerance.{key}': unknown precision '{prec}'"
                                  f"{close_match(prec, PRECISIONS)}")
            for k, v in entry.items():
                if k not in TOLERANCE_KEYS:
                    raise ConfigError(f"{where}: unknown key 'validation.tolerance.{key}.{k}'"
                                      f"{close_match(k, TOLERANCE_KEYS)}")
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise ConfigError(f"{where}: 'validation.tolerance.{key}.{k}' = {v!r} should be a number")

    def tolerance_for(self, output: str, precision: str, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` (the target's defaults) overridden by "*", "*@prec", "output", "output@prec" in turn."""
        tol = dict(base)
        for key in ("*", f"*@{precision}", output, f"{output}@{precision}"):
            tol.update(self.tolerance.get(key, {}))
        return tol


@dataclass
class BuildSettings:
    """What to build and where. A target may carry its precision: 'intel-cpu:fp16'."""

    target: list[str] = opt(factory=list, flag=Flag(
        "target profile, repeatable; NAME or NAME:PRECISION (default: every target whose backend is installed)",
        OUTPUT_GROUP, action="append", aliases=("targets",)))
    precision: str | None = opt(None, flag=Flag(
        "for the targets named without one (with no --target: the installed targets that support it)", OUTPUT_GROUP,
        choices=PRECISIONS))
    out: str = opt("dist", flag=Flag("bundle folder (default: dist; bundles that fail their gates go to dist/failed)",
                                     OUTPUT_GROUP, path=True))
    build_dir: str = opt("build", flag=Flag("cache folder (default: build)", MODEL_GROUP, ALL, path=True))


@dataclass
class ProjectConfig:
    """Everything one build needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputSpec = field(default_factory=default_spec)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    build: BuildSettings = field(default_factory=BuildSettings)
    root: Path = field(default_factory=Path.cwd)

    def resolve(self, p: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return resolve_path(p, self.root)


def resolve_path(p: str, root: Path | None) -> Path:
    """``p`` with ~ expanded, relative to ``root`` when it is relative and a root is given, normalised."""
    path = Path(p).expanduser()
    return Path(os.path.normpath(root / path if root is not None and not path.is_absolute() else path))


# The [input], [preprocess] and [task] keys (the input spec's fields, edgeport.preprocess.InputSpec), with what
# each does: the configuration reference is generated from these.
INPUT_KEYS = {
    "name": "the ONNX input's name (default input)",
    "shape": "the input shape, [1, 3, H, W] or \"1x3xHxW\" (as --input)",
    "dtype": "the input's element type (float32)",
    "layout": "NCHW or NHWC",
}
PRE_KEYS = {
    "resize": "how a frame becomes the input size: stretch, letterbox (pad_value) or shorter-crop (resize_size)",
    "interpolation": "linear, nearest, area or cubic",
    "pad_value": "letterbox's border value (default 114)",
    "resize_size": "shorter-crop: the shorter side is resized to this, then the centre is cropped",
    "color": "the channel order the model was trained on: RGB or BGR",
    "scale": "pixels are multiplied by this first (default 1/255)",
    "mean": "per-channel mean, after scale",
    "std": "per-channel standard deviation, after scale",
}
TASK_KEYS = {
    "type": "classification, segmentation or detection (as --task)",
    "labels": "class names, as a list",
    "labels_file": "class names, one per line (as --class-names), relative to this file",
    "palette": "segmentation: a colour per class, [[R, G, B], ...], for the runner's overlay",
    "ignore_index": "segmentation: the label value metrics ignore (e.g. CamVid's void class)",
}
SECTIONS = {
    "model": ModelConfig, "optimize": OptimizeConfig, "export": ExportConfig,
    "calibration": CalibrationConfig, "quantize": QuantizeConfig, "validation": ValidationConfig,
    "build": BuildSettings,
}
_ALL_SECTIONS = list(SECTIONS) + ["input", "preprocess", "task"]


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits a dataclass field's annotation (as a string)."""
    hint = eval(annotation, {**typing.__dict__, "Path": Path}) if isinstance(annotation, str) else annotation
    return _fits(value, hint)


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if hint is Any:
        return True
    return isinstance(value, hint)


def aliases_of(f: dataclasses.Field) -> tuple[str, ...]:
    """The edgeport.toml keys a field had before (still read)."""
    flag = f.metadata.get("flag")
    return tuple(flag.aliases if flag is not None else f.metadata.get("aliases", ()))


def _section(cls: type, data: dict[str, Any], where: str, section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    older = {alias: name for name, f in fields.items() for alias in aliases_of(f)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = older.get(key, key)
        if name not in fields:
            raise ConfigError(f"{where}: unknown key '{section}.{key}'{close_match(key, fields)}")
        if name in values:
            raise ConfigError(f"{where}: '{section}.{name}' is set twice (also as '{key}', its earlier name); keep "
                              f"'{name}'")
        if not _type_ok(value, fields[name].type):
            raise ConfigError(f"{where}: '{section}.{key}' = {value!r} should be {fields[name].type}")
        values[name] = value
    return cls(**values)


def _check_keys(data: dict[str, Any], allowed: tuple[str, ...], where: str, section: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{section}.{key}'{close_match(key, allowed)}")


def load_config(path: Path | None = None, search: bool = True) -> ProjectConfig:
    """Read edgeport.toml (``path``, or ./edgeport.toml when ``search``); defaults when absent."""
    if path is None:
        candidate = Path.cwd() / CONFIG_NAME
        if not (search and candidate.is_file()):
            return ProjectConfig()
        path = candidate
    path = Path(path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    for key, value in data.items():
        if key not in _ALL_SECTIONS:
            raise ConfigError(f"{where}: unknown section '{key}'{close_match(key, _ALL_SECTIONS)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a [section] table")
    cfg = ProjectConfig(root=path.resolve().parent)
    for name, cls in SECTIONS.items():
        if name in data:
            setattr(cfg, name, _section(cls, data[name], where, name))
    cfg.quantize.validate(f"{where}: [quantize]")
    cfg.optimize.validate(f"{where}: [optimize]")
    cfg.validation.validate(where)
    spec_args: dict[str, Any] = {}
    _check_keys(data.get("input", {}), tuple(INPUT_KEYS), where, "input")
    _check_keys(data.get("preprocess", {}), tuple(PRE_KEYS), where, "preprocess")
    task = dict(data.get("task", {}))
    _check_keys(task, (*TASK_KEYS, *all_option_keys()), where, "task")
    spec_args.update(data.get("input", {}))
    if isinstance(spec_args.get("shape"), str):  # shape = "1x3x64x64", as --input takes it
        spec_args["shape"] = list(parse_shape(spec_args["shape"], f"{where}: [input] shape"))
    elif "shape" in spec_args and not (isinstance(spec_args["shape"], list) and
                                       all(isinstance(v, int) and not isinstance(v, bool) for v in spec_args["shape"])):
        raise ConfigError(f"{where}: [input] shape = {spec_args['shape']!r}: give four whole numbers, e.g. "
                          "shape = [1, 3, 224, 224] or shape = \"1x3x224x224\"")
    spec_args.update(data.get("preprocess", {}))
    if "type" in task:
        spec_args["task"] = task.pop("type")
    if "labels_file" in task:
        labels_path = cfg.resolve(task.pop("labels_file"))
        spec_args["labels"] = read_labels(labels_path)
    options = {k: task.pop(k) for k in list(task) if k not in TASK_KEYS}
    if options:
        spec_args["task_options"] = options
    spec_args.update(task)
    embedded = embedded_name(cfg.model.model)
    carried = carried_spec(cfg.model.model, cfg.root)  # what an Ultralytics, HF or timm model brings
    if embedded and cfg.model.model != DEFAULT_MODEL:
        cfg.input = embedded_spec(embedded)
    elif carried is not None:
        cfg.input = carried
    if spec_args:
        cfg.input = make_spec(spec_args, base=cfg.input if embedded or carried else None, where=where)
    return cfg


def make_spec(overrides: dict[str, Any], base: InputSpec | None = None, where: str = "input") -> InputSpec:
    """An InputSpec from ``base`` (or the generic defaults) with ``overrides`` applied."""
    d = (base or InputSpec()).to_dict()
    d.setdefault("task_options", {})
    for key, value in overrides.items():
        if key not in d:
            raise ConfigError(f"{where}: unknown input setting '{key}'{close_match(key, d)}")
        d[key] = value
    try:
        return InputSpec.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad input setting: {e}") from None


def read_labels(path: Path) -> list[str]:
    """Labels from a text file, one per line."""
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise ConfigError(f"cannot read labels file {path}: {e.strerror}") from None


def parse_shape(text: str, where: str = "--input") -> tuple[int, ...]:
    """'1x3x224x224' -> (1, 3, 224, 224); ConfigError naming ``where`` for anything else."""
    try:
        shape = tuple(int(p) for p in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise ConfigError(f"{where} {text!r}: expected a shape like 1x3x224x224") from None
    if len(shape) != 4 or min(shape) <= 0:
        raise ConfigError(f"{where} {text!r}: expected 4 positive sizes like 1x3x224x224")
    return shape
