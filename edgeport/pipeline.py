"""The shared build pipeline: calibration -> export -> per-target compile, validate, bundle.

Every stage is cached in the build folder (edgeport.cache); a second identical build does
no work, and a change to one target rebuilds only that target.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeport import __version__
from edgeport.backends import get_backend
from edgeport.backends.base import Artifacts, Quantization, TensorInfo
from edgeport.cache import Stage, source_hash
from edgeport.calibration import SYNTHETIC, CalibrationSet, load_calibration
from edgeport.config import DEFAULT_MODEL, ProjectConfig
from edgeport.errors import ConfigError, EdgeportError, ParityError
from edgeport.evaluate import LabelledSet
from edgeport.model import default_name, file_sha256, source_fingerprint
from edgeport.preprocess import InputSpec
from edgeport.progress import working_on
from edgeport.runner.metrics import compare
from edgeport.target import Target, get_target

log = logging.getLogger("edgeport")
GOLDEN_CASES = 4
FAILED_DIR = "failed"  # dist/failed/<bundle>: bundles that failed their gates, kept apart and never archived
DEFAULT_CALIB = Path(__file__).resolve().parents[1] / "calibration" / "road-synth"


@dataclass
class TargetResult:
    """One target's outcome, for the parity table and the API."""

    target: str
    backend: str
    precision: str
    status: str  # built | cached | failed | skipped
    bundle: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    accuracy: dict[str, Any] | None = None  # task metric on labelled data, drop and agreement vs FP32
    verdict: str | None = None  # passed | failed | device-only (the manifest's verdict.status)


@dataclass
class BuildReport:
    """What a build did."""

    model: str
    onnx: str
    export_cached: bool
    export_parity: dict[str, Any]
    targets: list[TargetResult]
    seconds: float
    reference_metrics: dict[str, float] | None = None
    validation_source: str | None = None

    @property
    def ok(self) -> bool:
        """True when every target built and passed parity."""
        return all(t.status in ("built", "cached") for t in self.targets)


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def resolve_targets(names: list[str], precision: str | None, root: Path) -> list[tuple[Target, str]]:
    """[(target, precision)] from 'name' or 'name:precision' strings; every installed one when empty.

    ``precision`` (--precision, or [build] precision) applies to the targets named without one; a
    target that names another precision, or does not support it, is a ConfigError. With no target
    named, ``precision`` selects the installed targets that support it.
    """
    from edgeport.backends import availability
    from edgeport.target import all_targets

    if not names:
        installed = [t for t in all_targets(root).values() if availability(t.backend).installed]
        if not installed:
            raise ConfigError("no backend is installed, so there is nothing to build for; "
                              "pip install 'edgeport[openvino]' (see `edgeport doctor`)")
        if precision:
            left = [t.name for t in installed if precision not in t.precisions]
            installed = [t for t in installed if precision in t.precisions]
            if not installed:
                raise ConfigError(f"--precision {precision}: no installed target supports it (see `edgeport targets`)")
            if left:
                log.info("--precision %s: left out %s (not supported there)", precision, ", ".join(left))
        names = [t.name for t in installed]
    out = []
    for spec in names:
        name, _, prec = spec.partition(":")
        t = get_target(name, root)
        if prec and precision and prec != precision:
            raise ConfigError(f"--target {spec} and --precision {precision} conflict; name the precision once "
                              f"(--target {name}:{precision}, or drop --precision)")
        p = prec or precision or t.default_precision
        t.check_precision(p)
        out.append((t, p))
    dup = sorted({f"{t.name}:{p}" for t, p in out if sum(1 for u, q in out if (u.name, q) == (t.name, p)) > 1})
    if dup:
        raise ConfigError(f"target {', '.join(dup)} is selected twice")
    return out


def _calibration_stage(cfg: ProjectConfig, source: str, spec: InputSpec, build_dir: Path,
                       minimum: int | None) -> tuple[CalibrationSet, bool]:
    from edgeport.calibration import MINIMUM, fingerprint

    fp = fingerprint(source, cfg.root)
    from edgeport.runner import preprocess as pre_code

    stage = Stage(build_dir, "calibration", {"source": fp, "spec": spec.to_dict(), "code": source_hash(
        Path(pre_code.__file__)), "max": cfg.calibration.max_images, "v": __version__})

    def run(tmp: Path) -> dict[str, Any]:
        cs = load_calibration(source, spec, max_images=cfg.calibration.max_images,
                              minimum=MINIMUM if minimum is None else minimum, root=cfg.root)
        np.save(tmp / "data.npy", cs.data)
        np.savez(tmp / "frames.npz", *cs.frames)
        return {"source": cs.source, "sha256": cs.sha256, "skipped": cs.skipped, "names": cs.names}

    info, cached = stage.run(run)
    with np.load(stage.dir / "frames.npz") as z:
        frames = [z[f"arr_{i}"] for i in range(len(z.files))]
    cs = CalibrationSet(info["source"], np.load(stage.dir / "data.npy"), info["sha256"], info["skipped"],
                        frames, info["names"])
    return cs, cached


def _export_stage(cfg: ProjectConfig, spec: InputSpec, samples: CalibrationSet, opset: int,
                  build_dir: Path) -> tuple[Stage, dict[str, Any], bool]:
    weights = cfg.model.weights
    settings = {
        "model": source_fingerprint(cfg.model.source, cfg.root), "seed": cfg.model.seed,
        "weights": file_sha256(cfg.resolve(weights)) if weights and cfg.resolve(weights).is_file() else weights,
        "spec": spec.to_dict(), "optimize": dataclasses.asdict(cfg.optimize),
        "export": dataclasses.asdict(cfg.export), "opset": opset, "samples": samples.sha256,
        "torch": _dist_version("torch"), "onnx": _dist_version("onnx"), "onnxslim": _dist_version("onnxslim"),
        "edgeport": __version__,
    }
    stage = Stage(build_dir, "export", settings)

    def run(tmp: Path) -> dict[str, Any]:
        import torch

        from edgeport.backends.onnxruntime.backend import BACKEND as ORT
        from edgeport.export import check_parity, export_onnx, torch_outputs
        from edgeport.model import first_forward, load_model
        from edgeport.optimize import optimize

        log.info("loading model %s", cfg.model.source)
        model = load_model(cfg.model.source, cfg.model.weights, cfg.root, seed=cfg.model.seed)
        example = torch.from_numpy(samples.data[:1].copy())
        _check_class_names(spec, first_forward(model, example))
        model, opt = optimize(model, example, fold=cfg.optimize.fold_bn, prune_ratio=cfg.optimize.prune,
                              finetune_hook=cfg.optimize.finetune, spec=spec)
        name = cfg.model.name or default_name(cfg.model.source)
        meta = {"model": name, "source": cfg.model.source, "preprocess": spec.to_dict(), "edgeport": __version__}
        log.info("exporting ONNX at opset %d", opset)
        onnx_path = tmp / "model.onnx"
        output_names = export_onnx(model, example, onnx_path, opset=opset, input_name=spec.name,
                                   dynamic_batch=cfg.export.dynamic_batch, simplify=cfg.export.simplify,
                                   metadata=meta)
        x = samples.data[: max(cfg.export.parity_samples, GOLDEN_CASES)]
        ref = torch_outputs(model, x, output_names)
        _check_input_dependence(cfg, x, ref)
        with ORT.open_onnx(onnx_path) as rt:
            got = rt.run_batches(x)
        parity = check_parity(ref, got, cfg.export.tolerance, "ONNX Runtime vs PyTorch")
        np.savez(tmp / "reference.npz", inputs=x, **{f"out:{k}": v for k, v in ref.items()})
        return {"model": name, "outputs": output_names, "parity": parity, "optimize": opt.to_dict(),
                "onnx_sha256": file_sha256(onnx_path), "opset": opset}

    info, cached = stage.run(run)
    return stage, info, cached


def _check_class_names(spec: InputSpec, out: Any) -> None:
    """ConfigError when the class names do not match the classes of the model's first output."""
    first = out[0] if isinstance(out, (list, tuple)) else next(iter(out.values())) if isinstance(out, dict) else out
    if not spec.labels or getattr(first, "ndim", 0) < 2:
        return
    classes = int(first.shape[1] if spec.layout == "NCHW" or first.ndim == 2 else first.shape[-1])
    if len(spec.labels) != classes:
        raise ConfigError(f"{len(spec.labels)} class name(s) are given (--class-names / [task] labels), but the "
                          f"model's output has {classes} classes; give one name per class, in class order")


def _check_input_dependence(cfg: ProjectConfig, x: np.ndarray, ref: dict[str, np.ndarray]) -> None:
    """ModelError when no output can serve as a reference (tiny, or independent of the input)."""
    from edgeport.errors import ModelError
    from edgeport.export import input_dependence

    problems = input_dependence(x, ref)
    if not problems:
        return
    if len(problems) < len(ref):  # e.g. a constant anchors output beside real ones
        for why in problems.values():
            log.warning("%s; its parity figures mean little", why)
        return
    if cfg.model.weights:
        todo = (f"check that --weights {cfg.model.weights} holds the trained weights and that --input, --mean, "
                "--std and --color match how the model was trained")
    else:
        todo = (f"{cfg.model.source} has no trained weights here (random init, seed {cfg.model.seed}); pass them "
                "with --weights FILE (a state_dict or training checkpoint)")
    raise ModelError(f"{'; '.join(problems.values())}: parity and INT8 cannot be judged against such a "
                     f"reference; {todo}")


def _artifacts_to_dict(a: Artifacts, base: Path) -> dict[str, Any]:
    d = {"backend": a.backend, "target": a.target, "precision": a.precision,
         "files": {k: str(v.relative_to(base)) for k, v in a.files.items()},
         "inputs": [vars(i) for i in a.inputs], "outputs": [vars(o) for o in a.outputs],
         "spec": a.spec.to_dict(), "runtime": a.runtime, "info": a.info, "host_runnable": a.host_runnable}
    return d


def _artifacts_from_dict(d: dict[str, Any], base: Path) -> Artifacts:
    return Artifacts(d["backend"], d["target"], d["precision"], {k: base / v for k, v in d["files"].items()},
                     [TensorInfo(**i) for i in d["inputs"]], [TensorInfo(**o) for o in d["outputs"]],
                     InputSpec.from_dict(d["spec"]), d["runtime"], d["info"], d["host_runnable"])


def to_layout(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """A 4-D array from layout ``src`` (NCHW or NHWC) to ``dst``; other ranks pass through."""
    if src == dst or arr.ndim != 4:
        return arr
    return arr.transpose(0, 2, 3, 1) if dst == "NHWC" else arr.transpose(0, 3, 1, 2)


# Bumped when what a target stage stores changes shape (golden.npz, info keys), so old caches are not read.
STAGE_FORMAT = 2


def _tolerances(cfg: ProjectConfig, target: Target, precision: str, outputs: list[str],
                host: bool = False) -> dict[str, dict[str, Any]]:
    """Per output: the target's tolerance for ``precision`` (vs PyTorch, or vs the host artifact when
    ``host``), overridden by the project's [validation.tolerance] entries (the same as `edgeport validate`)."""
    if host:
        return {name: target.host_tolerances(precision) for name in outputs}
    return {name: cfg.validation.tolerance_for(name, precision, target.tolerances(precision)) for name in outputs}


def _target_stage(cfg: ProjectConfig, target: Target, precision: str, export_stage: Stage,
                  export_info: dict[str, Any], calib: CalibrationSet | None, spec: InputSpec,
                  build_dir: Path, val: ValidationRef | None) -> tuple[Stage, dict[str, Any], bool]:
    backend = get_backend(target.backend)
    from edgeport.bundle import RUNNER_PARTS

    code = source_hash(*Path(backend.runner_part()).parent.glob("*.py"), *RUNNER_PARTS)
    quant = Quantization(cfg.quantize, val.data if val is not None else None) if calib is not None else None
    tol = _tolerances(cfg, target, precision, export_info["outputs"])
    settings = {"onnx": export_info["onnx_sha256"], "target": target.fingerprint(), "precision": precision,
                "calib": calib.sha256 if calib is not None else None, "backend": backend.versions_key(),
                "quant": quant.key() if quant is not None else None,
                "val": val.data.sha256 if val is not None else None, "tolerance": tol,
                "code": code, "edgeport": __version__, "format": STAGE_FORMAT}
    stage = Stage(build_dir, f"target/{target.name}-{precision}", settings)

    def run(tmp: Path) -> dict[str, Any]:
        t0 = time.time()
        art = backend.compile(export_stage.dir / "model.onnx", target, precision, calib, tmp, spec, quant)
        with np.load(export_stage.dir / "reference.npz") as z:
            inputs = z["inputs"]
            ref = {k[4:]: z[k] for k in z.files if k.startswith("out:")}
        parity: dict[str, Any] = {}
        accuracy = None
        host = None
        if art.host_runnable:
            with backend.open(art) as rt:
                got = rt.run_batches(to_layout(inputs, spec.layout, art.spec.layout))
                if val is not None:
                    accuracy = _val_accuracy(rt, art, spec, val)
            for name, r in ref.items():
                g = to_layout(got[name], art.spec.layout, spec.layout) if got[name].ndim == 4 and \
                    got[name].shape != r.shape else got[name]
                parity[name] = compare(r, g, spec.task, tol[name])
            if not art.info.get("emulated"):
                host = got
        # Golden outputs are PyTorch's, so a divergent artifact can never agree with itself on the device;
        # where the host ran the real runtime its outputs go beside them, for a tight device-vs-host check.
        golden = {f"ref:{k}": to_layout(v, spec.layout, art.spec.layout)[:GOLDEN_CASES] for k, v in ref.items()}
        if host is not None:
            golden.update({f"host:{k}": v[:GOLDEN_CASES] for k, v in host.items()})
        np.savez(tmp / "golden.npz", **golden)
        return {"artifacts": _artifacts_to_dict(art, tmp), "parity": parity, "compile_seconds": time.time() - t0,
                "tolerance": tol, "host_tolerance": _tolerances(cfg, target, precision, list(ref), host=True)
                if host is not None else None, "accuracy": accuracy}

    info, cached = stage.run(run)
    return stage, info, cached


def verdict_of(info: dict[str, Any], precision: str, max_drop: float) -> dict[str, Any]:
    """The build's verdict on one artifact: its gates (parity per output, the task metric) and where they ran.

    ``status`` is "passed", "failed" (with ``reasons``) or "device-only" (nothing could run on the build
    host; the device's ``runner.py --selftest`` against PyTorch is the gate).
    """
    reasons = [f"output '{n}': {', '.join(m['failed'])} vs PyTorch" for n, m in info["parity"].items() if not m["ok"]]
    acc = info.get("accuracy")
    if acc and acc["drop"] is not None:
        acc["ok"] = not (precision == "int8" and acc["drop"] > max_drop)
        if not acc["ok"]:
            reasons.append(f"INT8 loses {acc['drop']:.2f} {acc['metric']} points on {acc['source']}, more than "
                           f"max_drop {max_drop:g}")
    art = info["artifacts"]
    if not art["host_runnable"]:
        checked = "nothing on the build host; runner.py --selftest checks the engine against PyTorch on the device"
    elif art["info"].get("emulated"):
        checked = ("INT8 emulated in ONNX Runtime (Q/DQ model) against PyTorch; runner.py --selftest checks the "
                   "engine on the device")
    else:
        checked = f"{art['backend']} on the build host against PyTorch"
    status = "failed" if reasons else ("passed" if art["host_runnable"] else "device-only")
    gates = {"parity": {n: "passed" if m["ok"] else "failed" for n, m in info["parity"].items()},
             "metric": None if not acc or acc["drop"] is None else ("passed" if acc["ok"] else "failed")}
    return {"status": status, "reasons": reasons, "checked": checked, "gates": gates}


@dataclass
class ValidationRef:
    """The labelled validation set with the FP32 reference's outputs and metrics on it."""

    data: LabelledSet
    outputs: np.ndarray  # first output of the exported ONNX (= PyTorch within export parity), (N, ...)
    metrics: dict[str, float]


def _validation_stage(data: LabelledSet | None, spec: InputSpec, export_stage: Stage,
                      export_info: dict[str, Any], build_dir: Path) -> ValidationRef | None:
    """Score the FP32 reference on the labelled set (cached by content)."""
    from edgeport.evaluate import task_metrics

    if data is None:
        return None
    stage = Stage(build_dir, "validation", {"val": data.sha256, "onnx": export_info["onnx_sha256"],
                                            "v": __version__})

    def run(tmp: Path) -> dict[str, Any]:
        from edgeport.backends.onnxruntime.backend import BACKEND as ORT

        with ORT.open_onnx(export_stage.dir / "model.onnx") as rt:
            out = rt.run_batches(data.inputs)[export_info["outputs"][0]]
        np.save(tmp / "reference.npy", out)
        return {"metrics": task_metrics(out, data, spec.layout)}

    info, _ = stage.run(run)
    ref = ValidationRef(data, np.load(stage.dir / "reference.npy"), info["metrics"])
    log.info("validation set: %d images from %s; %s", len(data), data.source,
             f"FP32 reference {_fmt_metrics(ref.metrics)}" if data.labelled else "no labels: agreement only")
    return ref


def _fmt_metrics(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "count")


def _val_accuracy(rt: Any, art: Artifacts, spec: InputSpec, val: ValidationRef) -> dict[str, Any]:
    """The artifact's task metric on the labelled set, its drop from FP32, and its agreement with FP32."""
    from edgeport.evaluate import primary, task_metrics
    from edgeport.runner.metrics import task_agreement

    got = rt.run_batches(to_layout(val.data.inputs, spec.layout, art.spec.layout))[art.outputs[0].name]
    got = to_layout(got, art.spec.layout, spec.layout) if got.shape != val.outputs.shape else got
    metrics = task_metrics(got, val.data, spec.layout)
    key, value = primary(metrics)
    drop = val.metrics[key] - value if value is not None else None
    return {"metrics": metrics, "reference": val.metrics, "metric": key, "drop": drop,
            "agreement": task_agreement(val.outputs, got, spec.task), "source": val.data.source,
            "count": len(val.data)}


def bundle_dest(out_dir: Path, name: str, status: str) -> Path:
    """Where a bundle goes: dist/<name>, or dist/failed/<name> when it failed its gates."""
    return out_dir / FAILED_DIR / name if status == "failed" else out_dir / name


def _bundle(cfg: ProjectConfig, target: Target, precision: str, stage: Stage, info: dict[str, Any],
            export_stage: Stage, export_info: dict[str, Any], calib: CalibrationSet | None,
            samples: CalibrationSet, spec: InputSpec, out_dir: Path, verdict: dict[str, Any]) -> tuple[Path, bool]:
    """Write the bundle unless it is already there intact (folder and archive); returns (folder, cached).

    A bundle that passed goes to dist/<target>-<precision> with its .tar.gz; one that failed goes to
    dist/failed/<target>-<precision>, without an archive, its manifest saying why; whatever the other
    place held for that name is removed, so dist/ only ever shows what this build proved.
    """
    from edgeport.bundle import archive_matches, assemble_runner, remove_bundle, write_archive, write_bundle

    name = f"{target.name}-{precision}"
    dest = bundle_dest(out_dir, name, verdict["status"])
    other = bundle_dest(out_dir, name, "passed" if verdict["status"] == "failed" else "failed")
    if remove_bundle(other):
        log.info("%s: removed the %s bundle of an earlier build from %s", name,
                 "shippable" if verdict["status"] == "failed" else "failed", other.parent)
    if _is_current(dest, stage.key, verdict):
        if verdict["status"] != "failed" and not archive_matches(dest):
            log.info("%s: the archive did not match its folder (an interrupted build); rewriting it", name)
            write_archive(dest)
        return dest, True
    backend = get_backend(target.backend)
    art = _artifacts_from_dict(info["artifacts"], stage.dir)
    with np.load(export_stage.dir / "reference.npz") as z:
        inputs = to_layout(z["inputs"][:GOLDEN_CASES], spec.layout, art.spec.layout)
    with np.load(stage.dir / "golden.npz") as z:
        reference = {k[4:]: z[k] for k in z.files if k.startswith("ref:")}
        host = {k[5:]: z[k] for k in z.files if k.startswith("host:")} or None
    weights = cfg.resolve(cfg.model.weights) if cfg.model.weights else None
    manifest = {
        "build_key": stage.key,
        "verdict": verdict,
        "model": {"name": export_info["model"], "source": cfg.model.source, "onnx_sha256": export_info["onnx_sha256"],
                  "seed": cfg.model.seed, "root": str(cfg.root),
                  "source_fingerprint": source_fingerprint(cfg.model.source, cfg.root),
                  "weights": {"path": str(weights), "sha256": file_sha256(weights)} if weights else None,
                  "spec": spec.to_dict(), "optimize": dataclasses.asdict(cfg.optimize),
                  "task": spec.task, "labels": spec.labels, "palette": [list(p) for p in spec.palette]},
        "target": target.name, "backend": target.backend, "precision": precision,
        "target_profile": target.to_dict(),
        "inputs": [i.to_dict() for i in art.inputs], "outputs": [o.to_dict() for o in art.outputs],
        "preprocess": art.spec.to_dict(), "runtime": art.runtime, "requires": target.runtime,
        "camera": target.camera,
        "provenance": {"edgeport": __version__, "torch": _dist_version("torch"), "onnx": _dist_version("onnx"),
                       "opset": export_info["opset"], "optimize": export_info["optimize"], **art.info,
                       "calibration": calib.summary() if calib is not None else None,
                       "samples": samples.summary()},
        "parity": {"reference": "pytorch", "export": export_info["parity"], "artifact": info["parity"],
                   "tolerance": info["tolerance"], "accuracy": info.get("accuracy")},
    }
    runner = assemble_runner(backend.runner_part()) if target.options.get("python_runner", True) else None
    reqs = list(target.requirements.get("pip", []))
    readme = _device_readme(target, precision, export_info["model"], runner is not None, verdict)
    extra = {"labels.txt": "\n".join(spec.labels) + "\n"} if spec.labels else None
    write_bundle(dest, files=art.files, runner=runner, manifest=manifest,
                 golden=(samples.frames[:GOLDEN_CASES], inputs, reference, host, info["tolerance"],
                         info.get("host_tolerance")),
                 readme=readme, requirements=reqs, extra=extra, archive=verdict["status"] != "failed")
    return dest, False


def _is_current(dest: Path, key: str, verdict: dict[str, Any]) -> bool:
    """Whether ``dest`` already holds this build's bundle, intact, with this verdict."""
    from edgeport.bundle import verify_bundle

    try:
        m = json.loads((dest / "manifest.json").read_text())
        return m.get("build_key") == key and m.get("verdict") == verdict and not verify_bundle(dest)
    except (OSError, ValueError, EdgeportError):  # absent or unreadable: rewritten
        return False


def _device_readme(target: Target, precision: str, model: str, runner: bool, verdict: dict[str, Any]) -> str:
    reqs = target.requirements
    lines = [f"# {model} for {target.name} ({precision})", "", target.description, ""]
    if verdict["status"] == "failed":
        lines += ["**This bundle FAILED its build gates and must not be deployed:**", "",
                  *[f"- {r}" for r in verdict["reasons"]], "",
                  "runner.py, `edgeport inspect` and `edgeport flash` refuse it unless forced (--force).", ""]
    lines += [
             "Built by edgeport. `manifest.json` describes the model, its inputs and outputs, the",
             "preprocessing, the runtime settings and the sha256 of every file.", ""]
    if reqs.get("system"):
        lines += ["## On the device", "", "System packages: " + ", ".join(reqs["system"]), ""]
    if runner and target.backend == "tensorrt":
        lines += ["## Run on the Jetson", "", "```", "python3 -m pip install -r requirements.txt   # pycuda; "
                  "TensorRT and OpenCV come with JetPack", "python3 build_engine.py      # builds and caches the "
                  "engine for this GPU (once; minutes)", "python3 runner.py --selftest",
                  f"python3 runner.py {target.camera.get('source', 'csi://0')}",
                  "python3 runner.py synthetic:// --headless --max-frames 100 --jsonl -", "```", "",
                  "`python3 build_engine.py --print-trtexec` shows the equivalent trtexec command. INT8: "
                  "model_qdq.onnx (explicit Q/DQ) or model.onnx + calib.cache (TensorRT 8.x), `--mode`.", ""]
    elif runner:
        lines += ["## Run", "", "```", "python3 -m pip install -r requirements.txt",
                  "python3 runner.py --selftest", f"python3 runner.py {target.camera.get('source', '0')}",
                  "python3 runner.py synthetic:// --headless --max-frames 100 --jsonl -", "```", "",
                  "`python3 runner.py --help` lists sources (camera, csi://, rtsp://, files, folders,",
                  "synthetic://) and outputs (--save, --jsonl, --headless).", ""]
    else:
        lines += ["## Use", "", "Load the model file named in manifest.json's files_by_role in your app and",
                  "apply the preprocessing in manifest.json exactly (`preprocess`: resize mode, colour order,",
                  "scale, mean, std, layout). Class names are in labels.txt. Where an input or output has",
                  "`quant` in the manifest it is integer: feed q = clip(round(x / scale) + zero_point) and read",
                  "f = scale * (q - zero_point). golden/ holds inputs and the outputs this model gave for them.",
                  ""]
    for note in target.notes:
        lines += [f"Note: {note}", ""]
    return "\n".join(lines)


def run_build(cfg: ProjectConfig, targets: list[str], precision: str | None,
              given: dict[str, Any] | None = None) -> BuildReport:
    """Build every selected target; per-target failures are recorded, not raised.

    Inputs are checked before any expensive stage runs (targets, flags that cannot take effect, the
    model and weights files, folders, calibration and validation data). The build folder, then the
    output folder, are locked for the build: a second build on them waits. What an interrupted build
    left there is removed first. ``given`` holds the flags set on the command line (for the checks).
    """
    from edgeport.cache import folder_lock, writable_folder
    from edgeport.calibration import check_source as check_calibration
    from edgeport.export import choose_opset
    from edgeport.flagcheck import check_build_flags
    from edgeport.model import check_source

    t_start = time.time()
    chosen = resolve_targets(targets, precision, cfg.root)
    check_build_flags(cfg, chosen, given or {})
    check_source(cfg.model.source, cfg.model.weights, cfg.root)
    opset = choose_opset([t.opset_max for t, _ in chosen], cfg.export.opset)
    needs_calib = [f"{t.name}:{p}" for t, p in chosen if get_backend(t.backend).calibration_needed(p)]
    source = cfg.calibration.source
    if source is None and cfg.model.source == DEFAULT_MODEL:
        source = default_calibration_source()
    if needs_calib and source is None:
        raise ConfigError(f"{', '.join(needs_calib)} need calibration data: pass --calib with an image folder, "
                          "a video, a .npy or synthetic://")
    if source is not None:
        check_calibration(source, cfg.root)
    build_dir = writable_folder(cfg.resolve(cfg.build.build_dir), "--build-dir")
    out_dir = writable_folder(cfg.resolve(cfg.build.out), "--out", create=False)
    with contextlib.ExitStack() as locks:
        locks.enter_context(folder_lock(build_dir))
        _sweep(build_dir)
        report = _build_locked(cfg, chosen, opset, source, needs_calib, build_dir, out_dir, given or {}, locks)
    report.seconds = time.time() - t_start
    return report


def _sweep(folder: Path) -> None:
    """Remove what an interrupted build left in ``folder`` (the caller holds its lock), and say so."""
    from edgeport.cache import sweep_stale

    swept = sweep_stale(folder)
    if swept:
        log.info("removed %d leftover(s) of an interrupted build from %s", swept, folder)


def _build_locked(cfg: ProjectConfig, chosen: list[tuple[Target, str]], opset: int, source: str | None,
                  needs_calib: list[str], build_dir: Path, out_dir: Path, given: dict[str, Any],
                  locks: contextlib.ExitStack) -> BuildReport:
    from edgeport.cache import folder_lock, writable_folder

    spec = cfg.input
    val_data = None
    if cfg.validation.images:  # read before the expensive stages, so a bad path fails at once
        from edgeport.evaluate import load_labelled

        val_data = load_labelled(cfg.validation.images, cfg.validation.labels, spec,
                                 max_images=cfg.validation.max_images, root=cfg.root)
        if given.get("accuracy_control") and not val_data.labelled:
            raise ConfigError(f"--accuracy-control needs labelled validation data; {val_data.source} has no labels "
                              "(segmentation: --val-labels DIR of label maps; classification: one sub-folder per "
                              "class)")
    calib = None
    if source is not None:
        calib, cached = _calibration_stage(cfg, source, spec, build_dir, None if needs_calib else 1)
        log.info("calibration set: %d images from %s%s", len(calib), source, " (cached)" if cached else "")
        samples = calib
    else:
        n = max(cfg.export.parity_samples, GOLDEN_CASES)
        samples, _ = _calibration_stage(cfg, f"{SYNTHETIC}?n={n}", spec, build_dir, 1)
    export_stage, export_info, export_cached = _export_stage(cfg, spec, samples, opset, build_dir)
    val = _validation_stage(val_data, spec, export_stage, export_info, build_dir)
    par = export_info["parity"]
    worst = max(v["max_rel"] for v in par.values())
    log.info("ONNX export%s: opset %d, max error %.2e of output range vs PyTorch",
             " (cached)" if export_cached else "", opset, worst)
    # The output folder is made and locked only now, so a build that failed above leaves none behind.
    writable_folder(out_dir, "--out")
    locks.enter_context(folder_lock(out_dir))
    _sweep(out_dir)
    results = []
    for target, prec in chosen:
        t0 = time.time()
        name = f"{target.name}-{prec}"
        backend = get_backend(target.backend)
        if not backend.available().installed:
            av = backend.available()
            results.append(TargetResult(target.name, target.backend, prec, "skipped",
                                        message=f"{av.reason}; {av.install}"))
            continue
        try:
            with working_on(f"{target.name} {prec}"):
                stage, info, cached = _target_stage(cfg, target, prec, export_stage, export_info,
                                                    calib if backend.calibration_needed(prec) else None, spec,
                                                    build_dir, val)
                verdict = verdict_of(info, prec, cfg.quantize.max_drop)
                dest, bundle_cached = _bundle(cfg, target, prec, stage, info, export_stage, export_info,
                                              calib, samples, spec, out_dir, verdict)
        except EdgeportError as e:
            from edgeport.bundle import remove_bundle

            for old in (bundle_dest(out_dir, name, "passed"), bundle_dest(out_dir, name, "failed")):
                if remove_bundle(old):
                    log.info("%s: removed the bundle of an earlier build from %s (this build of it failed)",
                             name, old.parent)
            results.append(TargetResult(target.name, target.backend, prec, "failed", seconds=time.time() - t0,
                                        message=str(e)))
            continue
        status = "failed" if verdict["status"] == "failed" else ("cached" if cached and bundle_cached else "built")
        art_info = info["artifacts"]["info"]
        label = f"{target.backend} (emulated)" if art_info.get("emulated") else target.backend
        if not info["artifacts"]["host_runnable"]:
            label = f"{target.backend} (device only)"
        results.append(TargetResult(target.name, label, prec, status, str(dest), info["parity"],
                                    time.time() - t0, "; ".join(verdict["reasons"]), info.get("accuracy"),
                                    verdict["status"]))
    return BuildReport(export_info["model"], str(export_stage.dir / "model.onnx"), export_cached, par, results,
                       0.0, val.metrics if val is not None else None, val.data.source if val is not None else None)


def parity_table(report: BuildReport) -> str:
    """The terminal table printed at the end of a build.

    max_rel, cosine and agreement compare each artifact with PyTorch on the sample frames;
    with labelled validation data, the task metric (mIoU or top-1) and its drop from FP32 follow.
    """
    has_acc = report.reference_metrics is not None
    head = ["target", "backend", "precision", "max_rel", "cosine", "agreement"]
    if has_acc:
        head += ["val agree", "metric (drop)"]
    rows = [tuple(head + ["status", "time"])]
    ex = next(iter(report.export_parity.values()))
    extra = ["-", _metric_cell(report.reference_metrics)] if has_acc else []
    rows.append(("onnx (export)", "onnxruntime", "fp32", f"{ex['max_rel']:.1e}", f"{ex['cosine']:.6f}", "-",
                 *extra, "cached" if report.export_cached else "built", ""))
    for r in report.targets:
        m = next(iter(r.parity.values()), None)
        cells = [r.target, r.backend, r.precision, f"{m['max_rel']:.1e}" if m else "-",
                 f"{m['cosine']:.6f}" if m else "-", f"{100 * m['agreement']:.2f}%" if m else "-"]
        if has_acc:
            a = r.accuracy
            cells += [f"{100 * a['agreement']:.2f}%" if a else "-",
                      f"{_metric_cell(a['metrics'])} ({-a['drop']:+.2f})" if a and a["drop"] is not None else "-"]
        rows.append(tuple(cells + [r.status, f"{r.seconds:.1f}s"]))
    from edgeport.tables import text_table

    lines = text_table(list(rows[0]), [list(r) for r in rows[1:]])
    if has_acc:
        lines.append(f"metric on {report.validation_source}; onnx row = FP32 reference")
    for r in report.targets:
        if r.message:
            lines.append(f"{r.target}-{r.precision}: {r.message}")
    return "\n".join(lines)


def _metric_cell(m: dict[str, float] | None) -> str:
    if not m:
        return "-"
    return f"mIoU {m['miou']:.2f}" if "miou" in m else f"top1 {m['top1']:.2f}"


def summary_line(report: BuildReport) -> str:
    """The build's last line: how many bundles were built, came from the cache, failed or were skipped.

    "nothing changed" only when nothing was built, failed or skipped.
    """
    counts = {k: sum(r.status == k for r in report.targets) for k in ("built", "cached", "failed", "skipped")}
    if report.export_cached and not (counts["built"] or counts["failed"] or counts["skipped"]):
        return f"nothing changed: {counts['cached']} bundle(s) from the cache ({report.seconds:.1f}s)"
    parts = [f"{counts[k]} {k}" for k in ("built", "cached", "failed")] + \
        ([f"{counts['skipped']} skipped"] if counts["skipped"] else [])
    line = f"{len(report.targets)} target(s): {', '.join(parts)} in {report.seconds:.1f}s"
    good = sorted({str(Path(r.bundle).parent) for r in report.targets if r.bundle and r.status != "failed"})
    bad = sorted({str(Path(r.bundle).parent) for r in report.targets if r.bundle and r.status == "failed"})
    if good:
        line += f"; bundles in {', '.join(good)}"
    if bad:
        line += f"; failed bundles (not shippable) in {', '.join(bad)}"
    return line


def raise_on_failure(report: BuildReport) -> None:
    """ParityError naming every failed target (after the table has been printed)."""
    bad = [f"{r.target}-{r.precision}" for r in report.targets if r.status == "failed"]
    if bad:
        raise ParityError(f"{len(bad)} target(s) failed: {', '.join(bad)} (see the table above); nothing of them "
                          "ships")


def default_calibration_source() -> str:
    """Where the default model's calibration comes from."""
    return str(DEFAULT_CALIB) if DEFAULT_CALIB.is_dir() else SYNTHETIC

