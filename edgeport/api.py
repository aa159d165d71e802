"""The Python API: every CLI command is one of these functions, with the same parameters."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from edgeport.config import DEFAULT_MODEL, ProjectConfig, load_config, make_spec, parse_shape, read_labels
from edgeport.errors import ConfigError


def _configure(config: str | None, model: str | None, weights: str | None, input: str | None,
               task: str | None, labels: str | None, calib: str | None, prune: float | None,
               finetune: str | None, opset: int | None, dynamic_batch: bool | None, out: str | None,
               build_dir: str | None, resize: str | None, mean: list[float] | None, std: list[float] | None,
               color: str | None, name: str | None) -> ProjectConfig:
    """edgeport.toml with flag overrides applied (flags win)."""
    cfg = load_config(Path(config) if config else None)
    if model and model != cfg.model.source:
        cfg.model = dataclasses.replace(cfg.model, source=model, weights=None, name=None)
        if cfg.input == ProjectConfig().input:  # the default model's spec does not carry over
            cfg.input = make_spec({"name": "input"})
    if weights is not None:
        cfg.model.weights = weights
    if name is not None:
        cfg.model.name = name
    overrides: dict[str, Any] = {}
    if input:
        overrides["shape"] = parse_shape(input)
    for key, value in (("task", task), ("resize", resize), ("color", color), ("mean", mean), ("std", std)):
        if value is not None:
            overrides[key] = value
    if labels:
        overrides["labels"] = read_labels(Path(labels))
    if overrides:
        cfg.input = make_spec(overrides, base=cfg.input, where="flags")
    if calib is not None:
        cfg.calibration.source = calib
    if prune is not None:
        cfg.optimize.prune = prune
    if finetune is not None:
        cfg.optimize.finetune = finetune
    if opset is not None:
        cfg.export.opset = opset
    if dynamic_batch is not None:
        cfg.export.dynamic_batch = dynamic_batch
    if out is not None:
        cfg.build.out = out
    if build_dir is not None:
        cfg.build.build_dir = build_dir
    return cfg


def _configure_quant(cfg: ProjectConfig, int8_preset: str | None, int8_subset: int | None,
                     int8_ignore: list[str] | None, accuracy_control: bool | None, max_drop: float | None,
                     calib_method: str | None, val_images: str | None, val_labels: str | None) -> None:
    """Apply the INT8 and validation flags to ``cfg`` (flags win over edgeport.toml)."""
    q = cfg.quantize
    if int8_preset is not None:
        q.preset = int8_preset
    if int8_subset is not None:
        q.subset_size = int8_subset
    if int8_ignore:
        q.ignored_patterns = [*q.ignored_patterns, *int8_ignore]
    if accuracy_control is not None:
        q.accuracy_control = accuracy_control
    if max_drop is not None:
        q.max_drop = max_drop
    if calib_method is not None:
        q.method = calib_method
    q.validate("flags")
    if val_images is not None:
        cfg.validation.images = val_images
    if val_labels is not None:
        cfg.validation.labels = val_labels


def build(model: str | None = None, *, weights: str | None = None, input: str | None = None,
          task: str | None = None, labels: str | None = None, calib: str | None = None,
          target: list[str] | None = None, precision: str | None = None, prune: float | None = None,
          finetune: str | None = None, opset: int | None = None, dynamic_batch: bool | None = None,
          out: str | None = None, build_dir: str | None = None, config: str | None = None,
          resize: str | None = None, mean: list[float] | None = None, std: list[float] | None = None,
          color: str | None = None, name: str | None = None, int8_preset: str | None = None,
          int8_subset: int | None = None, int8_ignore: list[str] | None = None,
          accuracy_control: bool | None = None, max_drop: float | None = None, calib_method: str | None = None,
          val_images: str | None = None, val_labels: str | None = None) -> Any:
    """Build bundles for targets (all installed ones when none is given); returns a BuildReport.

    With labelled validation data (``val_images`` [+ ``val_labels``]) every artifact's task metric
    (mIoU or top-1) is measured beside the reference's, and INT8 uses accuracy control.
    Example: build("torchvision:mobilenet_v3_small", input="1x3x224x224", task="classification",
    calib="images/", target=["intel-cpu"], precision="int8")
    """
    from edgeport.pipeline import run_build

    cfg = _configure(config, model, weights, input, task, labels, calib, prune, finetune, opset, dynamic_batch,
                     out, build_dir, resize, mean, std, color, name)
    _configure_quant(cfg, int8_preset, int8_subset, int8_ignore, accuracy_control, max_drop, calib_method,
                     val_images, val_labels)
    return run_build(cfg, list(target or cfg.build.targets), precision or cfg.build.precision)


def export(model: str | None = None, *, weights: str | None = None, input: str | None = None,
           task: str | None = None, labels: str | None = None, calib: str | None = None,
           target: list[str] | None = None, prune: float | None = None, finetune: str | None = None,
           opset: int | None = None, dynamic_batch: bool | None = None, out: str | None = None,
           build_dir: str | None = None, config: str | None = None, resize: str | None = None,
           mean: list[float] | None = None, std: list[float] | None = None, color: str | None = None,
           name: str | None = None) -> dict[str, Any]:
    """Export the model to a checked, simplified ONNX (parity-tested against PyTorch).

    The opset is the strictest ceiling of ``target`` (17 when none is given).
    Example: export("torchvision:resnet18?num_classes=10", input="1x3x224x224", out="resnet18.onnx")
    """
    import shutil

    from edgeport.calibration import SYNTHETIC
    from edgeport.export import choose_opset
    from edgeport.pipeline import GOLDEN_CASES, _calibration_stage, _export_stage, default_calibration_source
    from edgeport.target import get_target

    cfg = _configure(config, model, weights, input, task, labels, calib, prune, finetune, opset, dynamic_batch,
                     None, build_dir, resize, mean, std, color, name)
    ceilings = [get_target(t.split(":")[0], cfg.root).opset_max for t in (target or [])]
    chosen = choose_opset(ceilings, cfg.export.opset)
    source = cfg.calibration.source
    if source is None:
        source = default_calibration_source() if cfg.model.source == DEFAULT_MODEL else \
            f"{SYNTHETIC}?n={max(cfg.export.parity_samples, GOLDEN_CASES)}"
    build_path = cfg.resolve(cfg.build.build_dir)
    samples, _ = _calibration_stage(cfg, source, cfg.input, build_path, 1)
    stage, info, cached = _export_stage(cfg, cfg.input, samples, chosen, build_path)
    dest = Path(out) if out else Path(f"{info['model']}.onnx")
    if dest.suffix != ".onnx":
        raise ConfigError(f"--out {dest}: an ONNX file name must end in .onnx")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(stage.dir / "model.onnx", dest)
    return {"onnx": str(dest), "opset": chosen, "parity": info["parity"], "cached": cached}


def validate(paths: list[str] | None = None, *, config: str | None = None, model: str | None = None,
             weights: str | None = None, input: str | None = None, task: str | None = None,
             labels: str | None = None, resize: str | None = None, mean: list[float] | None = None,
             std: list[float] | None = None, color: str | None = None, name: str | None = None,
             build_dir: str | None = None, images: str | None = None, image_labels: str | None = None,
             max_images: int | None = None, max_drop: float | None = None, localize: bool = False,
             bench: bool = False, bench_iters: int = 200) -> Any:
    """Validate bundles (default: the project's dist folder) against the PyTorch model; a ValidateReport.

    Each bundle runs on its golden frames and, when given, on ``images`` (+ ``image_labels`` label
    maps for mIoU, or class sub-folders for top-1), preprocessed with its own manifest.
    Example: validate(["dist"], images="camvid/val", image_labels="camvid/valannot", bench=True)
    """
    from edgeport.validate import run_validate

    cfg = _configure(config, model, weights, input, task, labels, None, None, None, None, None, None,
                     build_dir, resize, mean, std, color, name)
    return run_validate(cfg, list(paths or []), images=images, labels=image_labels, max_images=max_images,
                        max_drop=max_drop, localize=localize, bench=bench, bench_iters=bench_iters)


def targets() -> list[dict[str, Any]]:
    """Every device profile as a dict (name, backend, precisions, runtime, opset ceiling...)."""
    from edgeport.target import all_targets

    return [{"name": n, **t.to_dict()} for n, t in sorted(all_targets().items())]


def doctor() -> list[dict[str, Any]]:
    """Each backend and tool: installed or not, versions, why not, the install command."""
    from edgeport.backends import HOST_RUNTIMES, REGISTRY, availability
    from edgeport.backends.base import probe

    rows = []
    for name in [*REGISTRY, *HOST_RUNTIMES]:
        av = availability(name)
        rows.append({"name": name, "installed": av.installed, "versions": av.versions, "reason": av.reason,
                     "install": av.install})
    for name, mods, extra in (("pytorch", {"torch": "torch", "torchvision": "torchvision"}, "torch"),
                              ("onnx", {"onnx": "onnx", "onnxslim": "onnxslim"}, "onnx"),
                              ("pruning", {"torch_pruning": "torch-pruning"}, "prune")):
        av = probe(name, extra, mods)
        rows.append({"name": name, "installed": av.installed, "versions": av.versions, "reason": av.reason,
                     "install": av.install})
    return rows


def inspect(path: str) -> dict[str, Any]:
    """Describe a bundle folder (manifest, file check) or an ONNX file (I/O, opset, edgeport metadata)."""
    p = Path(path)
    if p.is_dir():
        from edgeport.bundle import read_manifest, verify_bundle

        m = read_manifest(p)
        return {"kind": "bundle", "path": str(p), "model": m["model"]["name"], "target": m["target"],
                "backend": m["backend"], "precision": m["precision"], "inputs": m["inputs"], "outputs": m["outputs"],
                "preprocess": m["preprocess"], "runtime": m["runtime"], "parity": m.get("parity"),
                "files": len(m["files"]), "problems": verify_bundle(p)}
    if p.suffix == ".onnx" and p.is_file():
        import onnx

        from edgeport.export import get_metadata

        proto = onnx.load(str(p), load_external_data=False)

        def dims(t: Any) -> list[Any]:
            return [d.dim_value or d.dim_param for d in t.type.tensor_type.shape.dim]

        inits = {i.name for i in proto.graph.initializer}
        return {"kind": "onnx", "path": str(p),
                "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
                "inputs": [{"name": i.name, "shape": dims(i)} for i in proto.graph.input if i.name not in inits],
                "outputs": [{"name": o.name, "shape": dims(o)} for o in proto.graph.output],
                "nodes": len(proto.graph.node), "ops": sorted({n.op_type for n in proto.graph.node}),
                "edgeport": get_metadata(p)}
    raise ConfigError(f"{path}: expected a bundle folder or an .onnx file")


def to_json(obj: Any) -> str:
    """JSON for --json outputs."""
    return json.dumps(obj, indent=2, default=str)
