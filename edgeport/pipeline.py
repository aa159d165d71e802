"""The shared build pipeline: calibration -> export -> per-target compile, validate, bundle.

Every stage is cached in the build folder (edgeport.cache); a second identical build does
no work, and a change to one target rebuilds only that target.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeport import __version__
from edgeport import artifacts as art
from edgeport.artifacts import GOLDEN_CASES, StageTime
from edgeport.backends import get_backend
from edgeport.cache import Stage, source_hash
from edgeport.calibration import SYNTHETIC, CalibrationSet, load_calibration
from edgeport.config import ProjectConfig
from edgeport.errors import ConfigError, EdgeportError, ParityError, PruningError
from edgeport.evaluate import LabelledSet
from edgeport.model import default_name, file_sha256, source_fingerprint
from edgeport.preprocess import InputSpec
from edgeport.progress import working_on
from edgeport.tables import points
from edgeport.target import Target, get_target
from edgeport.tasks import get as get_task
from edgeport.tasks import metric_cell
from edgeport.zoo import embedded_calibration, embedded_name

ORIGINAL_ONNX = "original.onnx"  # the unpruned model, exported beside the pruned one when pruning
RECOVERY_CHART = "recovery.png"  # the distillation loss curve

log = logging.getLogger("edgeport")


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
    fallback: dict[str, Any] | None = None  # accuracy-aware INT8: layers kept in float, drop before and after
    compile_cached: bool = False  # its artifact came from the build cache (the bundle may still be rewritten)


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
    stages: list[StageTime] = field(default_factory=list)
    compiles: int = 0  # artifact compiles that ran (not from the cache)
    artifacts: int = 0  # distinct artifacts the selected targets need
    pruning: dict[str, Any] | None = None  # what pruning cost against the original (_pruning_check)
    recovery_chart: str | None = None  # the distillation loss curve (PNG), when recovery ran

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


def model_record(cfg: ProjectConfig) -> dict[str, Any]:
    """Where the model comes from, hashed once per build: the export's cache key and every manifest's record."""
    weights = cfg.resolve(cfg.model.weights) if cfg.model.weights else None
    return {"source": cfg.model.source, "seed": cfg.model.seed, "root": str(cfg.root),
            "source_fingerprint": source_fingerprint(cfg.model.source, cfg.root),
            "weights": {"path": str(weights), "sha256": file_sha256(weights)} if weights else None}


def recovery_images(cfg: ProjectConfig, source: str | None, calib: CalibrationSet | None, spec: InputSpec,
                    build_dir: Path) -> CalibrationSet | None:
    """The unlabelled images a pruned model is distilled on: ``[optimize] recover_images``, else the calibration
    set; None when there is no recovery to run. ConfigError when recovery has no images to use."""
    opt = cfg.optimize
    if not (opt.prune and opt.recover_steps and not opt.finetune):
        return None
    if opt.recover_images is None and calib is not None:
        return calib
    src = opt.recover_images if opt.recover_images is not None else source
    if src is None:
        raise ConfigError("recovering the pruned model needs unlabelled images of its domain: pass --calib DIR (or "
                          "[optimize] recover_images), or --recover-steps 0 for none")
    from edgeport.calibration import check_source as check_calibration

    src = src if "://" in src else str(cfg.resolve(src))
    check_calibration(src, cfg.root)
    images, cached = _calibration_stage(cfg, src, spec, build_dir, None)
    log.info("recovery images: %d from %s%s", len(images), src, " (cached)" if cached else "")
    return images


Supervised = tuple[np.ndarray, np.ndarray, str]  # (labelled inputs, targets in the output's space, their sha256)


def supervised_set(cfg: ProjectConfig, spec: InputSpec, val: LabelledSet | None) -> Supervised | None:
    """The labelled images recovery's supervised term trains on: ``[optimize] recover_labelled`` (+
    ``recover_labels``), a set apart from the validation set. None when ``recover_supervised`` is 0; ConfigError
    when an image of it is also a validation image (the gates would then score frames the model trained on)."""
    opt = cfg.optimize
    if not opt.recover_supervised:
        return None
    from edgeport.evaluate import load_labelled

    found = load_labelled(opt.recover_labelled, opt.recover_labels, spec, max_images=100_000, root=cfg.root)
    if not found.labelled:
        raise ConfigError(f"[optimize] recover_labelled {opt.recover_labelled}: no labels found "
                          f"({get_task(spec.task).labelled_how}; set recover_labels)")
    if val is not None and val.frames:
        seen = {hashlib.sha256(f.tobytes()).digest() for f in val.frames}
        shared = sum(hashlib.sha256(f.tobytes()).digest() in seen for f in found.frames)
        if shared:
            raise ConfigError(f"[optimize] recover_labelled: {shared} of its {len(found)} images are also validation "
                              "images; train the supervised term on a separate set (e.g. the training split)")
    log.info("recovery's supervised term: %d labelled images from %s, weight %g", len(found), found.source,
             opt.recover_supervised)
    return found.inputs, get_task(spec.task).model_targets(found), found.sha256


def _recover(cfg: ProjectConfig, spec: InputSpec, original: Any, images: CalibrationSet, folder: Path,
             recovered: tuple[dict[str, Any], dict[str, Any], list[float]] | None, supervised: Supervised | None,
             pruned: Any) -> dict[str, Any]:
    """Distil ``pruned`` from ``original`` (edgeport.recover); the loss curve goes to ``folder``/recovery.png.
    With ``recovered`` ((state_dict, record, losses) from --prune auto), its weights are loaded instead."""
    from edgeport.recover import loss_chart

    if recovered is not None:
        pruned.load_state_dict(recovered[0])
        log.info("the pruned model's weights come from --prune auto's recovery of this ratio")
        out, losses = {**recovered[1], "from": "prune auto"}, recovered[2]
    else:
        out, losses = _distill(cfg, spec, original, images, pruned, supervised)
    loss_chart(losses, folder / RECOVERY_CHART, f"recovery of the pruned model ({cfg.optimize.prune:.0%}): "
               f"distillation loss, {out['steps']} steps, {out['seconds']:.0f}s")
    out["chart"] = RECOVERY_CHART
    return out


def _distill(cfg: ProjectConfig, spec: InputSpec, original: Any, images: CalibrationSet, pruned: Any,
             supervised: Supervised | None = None) -> tuple[dict[str, Any], list[float]]:
    """(the recovery record, the loss per step) of distilling ``pruned`` from ``original`` on ``images``."""
    from edgeport.recover import distill

    budget = cfg.optimize.recover_seconds
    log.info("recovering the pruned model: distillation from the original on %d unlabelled images (%s), %d steps%s",
             len(images), images.source, cfg.optimize.recover_steps,
             f" or {budget:g}s, whichever ends first (recover_seconds)" if budget else "")
    rep = distill(original, pruned, images.data, spec.task, cfg.optimize, images.source, spec.layout,
                  supervised[:2] if supervised is not None else None)
    out = rep.to_dict()
    if supervised is not None:
        out["supervised"] = {"weight": cfg.optimize.recover_supervised, "images": len(supervised[0]),
                             "from": cfg.optimize.recover_labelled}
    log.info("recovered: %d steps in %.0fs, distillation loss %.4f -> %.4f", rep.steps, rep.seconds,
             out["loss_first"] or 0.0, out["loss_last"] or 0.0)
    if rep.stopped == "time":
        log.warning("recovery stopped at recover_seconds %g after %d of %d steps: this result depends on this "
                    "machine's speed and load (the manifest records the steps that ran); set recover_seconds = 0 to "
                    "run every step", budget, rep.steps, cfg.optimize.recover_steps)
    out["steps_asked"] = cfg.optimize.recover_steps
    out["seconds_budget"] = budget or None
    return out, rep.loss


def _export_stage(cfg: ProjectConfig, spec: InputSpec, samples: CalibrationSet, opset: int,
                  build_dir: Path, record: dict[str, Any] | None = None,
                  recover_images: CalibrationSet | None = None,
                  recovered: tuple[dict[str, Any], dict[str, Any], list[float]] | None = None,
                  supervised: Supervised | None = None) -> tuple[Stage, dict[str, Any], bool]:
    """Load, optimise (prune, recover: or load ``recovered``, (state_dict, record), weights --prune auto already
    recovered), export the ONNX (and the original's, when pruning) and check parity; cached by its settings."""
    record = record or model_record(cfg)
    settings = {
        "model": record["source_fingerprint"], "seed": cfg.model.seed,
        "weights": record["weights"]["sha256"] if record["weights"] else None,
        "spec": spec.to_dict(), "optimize": dataclasses.asdict(cfg.optimize),
        "export": dataclasses.asdict(cfg.export), "opset": opset, "samples": samples.sha256,
        "torch": _dist_version("torch"), "onnx": _dist_version("onnx"), "onnxslim": _dist_version("onnxslim"),
        "edgeport": __version__, "name": cfg.model.name or default_name(cfg.model.source),  # the ONNX carries it
        "recover_images": recover_images.sha256 if recover_images is not None else None,
        "supervised": supervised[2] if supervised is not None else None,
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
        first = first_forward(model, example)
        carried = getattr(model, "edgeport_task_options", None)  # what a wrapped head knows (anchors, coder)
        full = get_task(spec.task).with_model_options(spec, carried) if carried else spec
        _check_outputs(full, first)
        original = copy.deepcopy(model) if cfg.optimize.prune else None  # the reference every figure is held to
        recover = None
        if original is not None and cfg.optimize.recover_steps and not cfg.optimize.finetune:
            recover = functools.partial(_recover, cfg, spec, original, recover_images or samples, tmp, recovered,
                                        supervised)
        model, opt = optimize(model, example, fold=cfg.optimize.fold_bn, prune_ratio=cfg.optimize.prune,
                              finetune_hook=cfg.optimize.finetune, spec=spec, recover=recover,
                              prune_options={"ignore": cfg.optimize.prune_ignore,
                                             "type_ratios": cfg.optimize.prune_type_ratios})
        name = cfg.model.name or default_name(cfg.model.source)
        meta = {"model": name, "source": cfg.model.source, "preprocess": spec.to_dict(), "edgeport": __version__}
        log.info("exporting ONNX at opset %d", opset)
        onnx_path = tmp / "model.onnx"
        output_names = export_onnx(model, example, onnx_path, opset=opset, input_name=spec.name,
                                   dynamic_batch=cfg.export.dynamic_batch, simplify=cfg.export.simplify,
                                   metadata=meta)
        if original is not None:  # the unpruned model, for the accuracy reference (the validation stage scores it)
            export_onnx(original, example, tmp / ORIGINAL_ONNX, opset=opset, input_name=spec.name,
                        dynamic_batch=cfg.export.dynamic_batch, simplify=cfg.export.simplify, metadata=meta)
        x = samples.data[: max(cfg.export.parity_samples, GOLDEN_CASES)]
        ref = torch_outputs(model, x, output_names)
        _check_input_dependence(cfg, x, ref)
        with ORT.open_onnx(onnx_path) as rt:
            got = rt.run_batches(x)
        parity = check_parity(ref, got, cfg.export.tolerance, "ONNX Runtime vs PyTorch")
        np.savez(tmp / "reference.npz", inputs=x, **{f"out:{k}": v for k, v in ref.items()})
        return {"model": name, "outputs": output_names, "parity": parity, "optimize": opt.to_dict(),
                "onnx_sha256": file_sha256(onnx_path), "opset": opset,
                "task_options": full.task_options if carried else None}

    info, cached = stage.run(run)
    return stage, info, cached


def _pruning_check(cfg: ProjectConfig, val: ValidationRef | None, spec: InputSpec,
                   export_info: dict[str, Any]) -> dict[str, Any] | None:
    """What pruning cost against the original model (None when not pruning, or with nothing to measure it on);
    PruningError when it loses more than max_drop on the report half, before anything is compiled."""
    opt = export_info["optimize"]
    if not cfg.optimize.prune:
        return None
    if val is None or val.pruned is None:
        log.warning("pruning %.0f%% is not measured against the original model: pass --val-images (and labels) to "
                    "hold it to max_drop", cfg.optimize.prune * 100)
        return None
    report, selection = val.pruning_drop("report", spec.layout), val.pruning_drop("selection", spec.layout)
    if report is None or selection is None:
        return None
    key, original, pruned = report
    drop = original - pruned
    out = {"metric": key, "original": original, "pruned": pruned, "drop": drop,
           "selection_drop": selection[1] - selection[2], "max_drop": cfg.quantize.max_drop,
           "ratio": cfg.optimize.prune,
           "recovery": opt.get("recovery"), "finetuned": opt.get("finetuned"),
           "before": opt.get("before"), "after": opt.get("after")}
    how = ("recovered by distillation" if opt.get("recovery") else
           f"fine-tuned by {opt['finetuned']}" if opt.get("finetuned") else "no recovery")
    log.info("pruning %.0f%% (%s): %s %.2f -> %.2f on the report half, a drop of %s (max_drop %g)",
             cfg.optimize.prune * 100, how, key, out["original"], out["pruned"], points(drop, out["max_drop"]),
             out["max_drop"])
    if drop > cfg.quantize.max_drop:
        todo = ("recover it (--recover-steps 1500, the default)" if not opt.get("recovery") and not opt.get("finetuned")
                else "recover longer (--recover-steps)")
        raise PruningError(f"pruning {cfg.optimize.prune:.0%} ({how}) loses {points(drop, out['max_drop'])} {key} "
                           f"points against the original model on the report half of {val.data.source} "
                           f"({out['original']:.2f} -> {out['pruned']:.2f}), more than max_drop "
                           f"{cfg.quantize.max_drop:g}: {todo}, prune less, or raise --max-drop if you accept it")
    return out


def _check_outputs(spec: InputSpec, out: Any) -> None:
    """ConfigError when the model's outputs do not fit the task's settings (class names, decoder), before export."""
    from edgeport.export import named_outputs

    shapes = {name: list(getattr(v, "shape", ())) for name, v in named_outputs(out)}
    get_task(spec.task).check_outputs(spec, shapes)


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


@dataclass
class ValidationRef:
    """The labelled validation set with the FP32 reference's outputs and metrics on it.

    Honest selection: the set is split deterministically (edgeport.evaluate.halves: by default the first half
    of each folder in sorted order selects and the second half reports, so a video's neighbouring frames stay on
    one side; ``[validation] split = "alternate"`` takes even and odd positions). Whatever is tuned (accuracy
    control, the float fallback) sees only the selection half; the INT8 gate and the headline figures use the
    report half, which chose nothing. A set of one image is not split (both halves are that image, and the
    report says so)."""

    data: LabelledSet
    outputs: np.ndarray  # the reference's outputs as the task packs them: the exported ONNX's, or when pruning
    metrics: dict[str, float]  # the original (unpruned) model's; its metrics on the whole set
    pruned: np.ndarray | None = None  # when pruning: the pruned export's outputs (what every artifact converts)
    split: str = "blocks"  # [validation] split
    _memo: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def _halves(self) -> dict[str, list[int]]:
        from edgeport.evaluate import split_halves

        return split_halves(self.data, self.split)

    def halves(self) -> dict[str, list[int]]:
        """{"selection": indices, "report": indices} into the set (edgeport.evaluate.halves)."""
        return self._halves

    @functools.cached_property
    def selection(self) -> LabelledSet:
        """The half that tuning may look at (made once: every INT8 compile key and compile reads it)."""
        return self.data.subset(self.halves()["selection"])

    def half_metrics(self, half: str, layout: str) -> dict[str, float]:
        """The FP32 reference's metrics on one half (what each artifact's drop there is measured from), computed
        once per build."""
        from edgeport.evaluate import task_metrics

        if (half, layout) not in self._memo:
            idx = self.halves()[half]
            self._memo[half, layout] = task_metrics(self.outputs[idx], self.data.subset(idx), layout)
        return self._memo[half, layout]

    def pruned_metrics(self, half: str, layout: str) -> dict[str, float] | None:
        """The pruned FP32 export's metrics on one half (None when not pruning)."""
        from edgeport.evaluate import task_metrics

        if self.pruned is None:
            return None
        if (f"pruned-{half}", layout) not in self._memo:
            idx = self.halves()[half]
            self._memo[f"pruned-{half}", layout] = task_metrics(self.pruned[idx], self.data.subset(idx), layout)
        return self._memo[f"pruned-{half}", layout]

    def pruning_drop(self, half: str, layout: str) -> tuple[str, float, float] | None:
        """(metric key, the original's value, the pruned export's) on one half, or None when not pruning. Without
        labels the metric is agreement with the original, in percent."""
        from edgeport.evaluate import score

        if self.pruned is None:
            return None
        idx = self.halves()[half]
        key, value = score(self.pruned[idx], self.outputs[idx], self.data.subset(idx), layout)
        return key, 100.0 if key == "agreement" else float(self.half_metrics(half, layout)[key]), value

    def report_metrics(self, layout: str) -> dict[str, float]:
        """The FP32 reference's metrics on the report half (what the table's drops are measured from)."""
        return self.half_metrics("report", layout)


def _validation_stage(data: LabelledSet | None, spec: InputSpec, export_stage: Stage,
                      export_info: dict[str, Any], build_dir: Path, split: str = "blocks") -> ValidationRef | None:
    """Score the FP32 reference on the labelled set (cached by content)."""
    from edgeport.evaluate import task_metrics

    if data is None:
        return None
    original = export_stage.dir / ORIGINAL_ONNX
    stage = Stage(build_dir, "validation", {"val": data.sha256, "onnx": export_info["onnx_sha256"],
                                            "original": file_sha256(original) if original.is_file() else None,
                                            "v": __version__})

    def run(tmp: Path) -> dict[str, Any]:
        from edgeport.backends.onnxruntime.backend import BACKEND as ORT

        out = {}
        for key, path in (("reference", original), ("pruned", export_stage.dir / "model.onnx")):
            if path.is_file():
                with ORT.open_onnx(path) as rt:
                    out[key] = get_task(spec.task).pack(rt.run_batches(data.inputs), export_info["outputs"], spec)
                np.save(tmp / f"{key}.npy", out[key])
        if "reference" not in out:  # not pruned: the exported model is the reference
            out["reference"] = out.pop("pruned")
            (tmp / "pruned.npy").rename(tmp / "reference.npy")
        return {"metrics": task_metrics(out["reference"], data, spec.layout)}

    info, _ = stage.run(run)
    pruned = stage.dir / "pruned.npy"
    ref = ValidationRef(data, np.load(stage.dir / "reference.npy"), info["metrics"],
                        np.load(pruned) if pruned.is_file() else None, split)
    log.info("validation set: %d images from %s; %s", len(data), data.source,
             f"FP32 reference {_fmt_metrics(ref.metrics)}" if data.labelled else "no labels: agreement only")
    return ref


def _fmt_metrics(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "count")


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

    own_scenes = None
    if not cfg.validation.images and embedded_name(cfg.model.source):
        from edgeport.zoo import EMBEDDED

        # The embedded models come with their own labelled scenes: the build gates (and INT8's accuracy-aware
        # choice) use them, as `edgeport validate` does, so that what the build passes, validate passes.
        own_scenes = EMBEDDED[embedded_name(cfg.model.source)][2]
    if cfg.optimize.prune == "auto" and not (cfg.validation.images or own_scenes):
        raise ConfigError("--prune auto chooses a ratio by its accuracy: pass --val-images (labelled, or plain images "
                          "for agreement with the original), or give a ratio such as --prune 0.3")

    t_start = time.time()
    chosen = resolve_targets(targets, precision, cfg.root)
    check_build_flags(cfg, chosen, given or {}, own_scenes)
    if own_scenes:
        cfg.validation.images = own_scenes
        log.info("validation: %s (the embedded model's own labelled scenes)", own_scenes)
    check_source(cfg.model.source, cfg.model.weights, cfg.root)
    opset = choose_opset([t.opset_max for t, _ in chosen], cfg.export.opset)
    needs_calib = [f"{t.name}:{p}" for t, p in chosen if get_backend(t.backend).calibration_needed(p)]
    source = cfg.calibration.source
    if source is None and embedded_name(cfg.model.source):
        source = embedded_calibration(embedded_name(cfg.model.source))
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
            log.info("%s has no labels: accuracy-aware INT8 holds agreement with FP32 (top-1 or pixel, in percent) "
                     "within max_drop points", val_data.source)
    calib = None
    clock: list[StageTime] = []
    t0 = time.time()
    if source is not None:
        calib, cached = _calibration_stage(cfg, source, spec, build_dir, None if needs_calib else 1)
        log.info("calibration set: %d images from %s%s", len(calib), source, " (cached)" if cached else "")
        samples = calib
    else:
        n = max(cfg.export.parity_samples, GOLDEN_CASES)
        samples, cached = _calibration_stage(cfg, f"{SYNTHETIC}?n={n}", spec, build_dir, 1)
    clock.append(StageTime("calibration set", f"{len(samples)} images", time.time() - t0, cached))
    recover_images = recovery_images(cfg, source, calib, spec, build_dir)
    supervised = supervised_set(cfg, spec, val_data) if recover_images is not None else None
    auto, recovered = None, None
    if cfg.optimize.prune == "auto":
        from edgeport.prune_auto import auto_table, choose_ratio

        assert val_data is not None, "run_build requires validation data for --prune auto"
        t0 = time.time()
        ratio, auto, states = choose_ratio(cfg, recover_images or samples, val_data, opset, supervised)
        for line in auto_table(auto, ratio):
            log.info("--prune auto: %s", line)
        log.info("--prune auto: %.0f%% chosen (the largest within max_drop %g on the selection half)", ratio * 100,
                 cfg.quantize.max_drop)
        cfg.optimize = dataclasses.replace(cfg.optimize, prune=ratio)
        recovered = states.get(ratio)
        clock.append(StageTime("prune auto (recover and score each ratio)", f"{len(auto) - 1} ratios",
                               time.time() - t0, False))
    t0 = time.time()
    record = model_record(cfg)
    export_stage, export_info, export_cached = _export_stage(cfg, spec, samples, opset, build_dir, record,
                                                             recover_images, recovered, supervised)
    if export_info.get("task_options"):  # settings the model carries (a detector's anchors) join the spec
        spec = cfg.input = dataclasses.replace(spec, task_options=export_info["task_options"])
        if val_data is not None:
            val_data.spec = spec
    reference = art.Reference.load(export_stage.dir / "reference.npz")
    clock.append(StageTime("ONNX export + parity", f"opset {opset}", time.time() - t0, export_cached))
    t0 = time.time()
    val = _validation_stage(val_data, spec, export_stage, export_info, build_dir, cfg.validation.split)
    if val is not None:
        clock.append(StageTime("FP32 reference on the validation set", f"{len(val.data)} images",
                               time.time() - t0, False))
    max_drop = cfg.quantize.max_drop
    pruning = _pruning_check(cfg, val, spec, export_info)
    if pruning is not None and auto is not None:
        pruning["auto"] = auto  # every candidate of --prune auto, scored on the selection half
    if pruning and pruning["selection_drop"] > 0:  # INT8 gets what pruning left of the budget
        budget = round(max(max_drop - pruning["selection_drop"], 0.05), 2)
        log.info("INT8's accuracy-aware budget: max_drop %g less the pruning's %.2f on the selection half = %.2f",
                 max_drop, pruning["selection_drop"], budget)
        cfg = dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, max_drop=budget))
    par = export_info["parity"]
    worst = max(v["max_rel"] for v in par.values())
    log.info("ONNX export%s: opset %d, max error %.2e of output range vs PyTorch",
             " (cached)" if export_cached else "", opset, worst)
    # The output folder is made and locked only now, so a build that failed above leaves none behind.
    writable_folder(out_dir, "--out")
    locks.enter_context(folder_lock(out_dir))
    _sweep(out_dir)
    results: dict[tuple[str, str], TargetResult] = {}
    for target, prec in chosen:
        av = get_backend(target.backend).available()
        if not av.installed:
            results[target.name, prec] = TargetResult(target.name, target.backend, prec, "skipped",
                                                      message=f"{av.reason}; {av.install}")
    runnable = [(t, p) for t, p in chosen if (t.name, p) not in results]
    for backend in {get_backend(t.backend) for t, p in runnable if p == "int8"}:
        backend.check_quantization(export_stage.dir / "model.onnx", cfg.quantize)  # one line, before any compile
    groups = art.group_targets(cfg, runnable, export_info["onnx_sha256"], calib, val)
    memo = _memo(build_dir, clock)
    noise: dict[str, Any] = {}  # the FP32 model's noise floor, measured on the first INT8 metric failure
    compiles = 0
    for group in groups:
        t0 = time.time()
        mark = len(clock)  # shared sub-stages (ranges) the compile runs are listed under it
        try:
            with working_on(group.label):
                stage, info, cached = art.compile_group(cfg, group, export_stage.dir / "model.onnx", calib, spec,
                                                        build_dir, val, memo)
                host = art.host_outputs(group, stage, info, reference, spec, build_dir)
                accuracy = None
                if val is not None and info["artifacts"]["host_runnable"]:
                    accuracy, _ = art.evaluate_group(group, stage, info, spec, build_dir, val,
                                                     agreement_gate=cfg.quantize.accuracy_control is True)
        except EdgeportError as e:
            for target in group.targets:
                _drop_stale(out_dir, f"{target.name}-{group.precision}")
                results[target.name, group.precision] = TargetResult(
                    target.name, target.backend, group.precision, "failed", seconds=time.time() - t0, message=str(e))
            clock.insert(mark, StageTime(f"compile {group.backend} {group.precision}", group.names,
                                         time.time() - t0, False))
            continue
        compiles += not cached
        clock.insert(mark, StageTime(f"compile {group.backend} {group.precision}", group.names, time.time() - t0,
                                     cached))
        for i, target in enumerate(group.targets):
            t1 = time.time()
            name = f"{target.name}-{group.precision}"
            try:
                with working_on(f"{target.name} {group.precision}"):
                    tinfo = art.target_parity(cfg, target, group.precision, info, reference, host, spec)
                    tinfo["accuracy"] = dict(accuracy) if accuracy else None
                    if tinfo["accuracy"] and pruning:
                        tinfo["accuracy"]["pruning"] = pruning
                    verdict = art.verdict_of(tinfo, group.precision, max_drop, gate_all=pruning is not None)
                    if group.precision == "int8" and verdict["gates"]["metric"] == "failed" and val is not None:
                        verdict["reasons"].append(art.noise_reason(export_stage.dir / "model.onnx", val, spec,
                                                                   max_drop, noise))
                    dest, bundle_cached = art.write_target_bundle(cfg, target, group.precision, stage, tinfo,
                                                                  reference, host, record, export_info, calib,
                                                                  samples, spec, out_dir, build_dir, verdict)
            except EdgeportError as e:
                _drop_stale(out_dir, name)
                results[target.name, group.precision] = TargetResult(
                    target.name, target.backend, group.precision, "failed", seconds=time.time() - t1, message=str(e))
                continue
            clock.append(StageTime(f"bundle {name}", verdict["status"], time.time() - t1, bundle_cached))
            status = "failed" if verdict["status"] == "failed" else ("cached" if cached and bundle_cached else "built")
            art_info = info["artifacts"]["info"]
            label = f"{target.backend} (emulated)" if art_info.get("emulated") else target.backend
            if not info["artifacts"]["host_runnable"]:
                label = f"{target.backend} (device only)"
            spent = time.time() - t1 + (t1 - t0 if i == 0 else 0.0)  # the first target carries the compile
            results[target.name, group.precision] = TargetResult(
                target.name, label, group.precision, status, str(dest), tinfo["parity"], spent,
                "; ".join(verdict["reasons"]), tinfo.get("accuracy"), verdict["status"], art.fallback_summary(art_info),
                cached)
    ordered = [results[t.name, p] for t, p in chosen]
    chart = export_stage.dir / RECOVERY_CHART
    return BuildReport(export_info["model"], str(export_stage.dir / "model.onnx"), export_cached, par, ordered,
                       0.0, val.report_metrics(spec.layout) if val is not None else None,
                       f"{val.data.source} (report half)" if val is not None else None,
                       clock, compiles, len(groups), pruning, str(chart) if chart.is_file() else None)


def _drop_stale(out_dir: Path, name: str) -> None:
    """A target's build failed before its bundle was written: remove an earlier build's failed bundle of it, and
    keep an earlier bundle that passed (a good bundle leaves dist/ only for one that passed), saying so."""
    from edgeport.bundle import remove_bundle

    if remove_bundle(art.bundle_dest(out_dir, name, "failed")):
        log.info("%s: removed the failed bundle of an earlier build from %s", name, out_dir / art.FAILED_DIR)
    kept = art.bundle_dest(out_dir, name, "passed")
    if (kept / "manifest.json").is_file():
        log.warning("%s: this build of it failed; %s still holds an earlier build's bundle, which passed its gates",
                    name, kept)


def _memo(build_dir: Path, clock: list[StageTime]) -> Any:
    """The build cache for results compiles share (TensorRT's activation ranges): one stage per kind and key."""
    def memo(kind: str, key: dict[str, Any], compute: Any) -> Any:
        t0 = time.time()
        stage = Stage(build_dir, kind, key)
        info, cached = stage.run(lambda tmp: {"value": compute()})
        what = f"  of which {kind}" + (f" ({key['method']})" if "method" in key else "")
        clock.append(StageTime(what, f"{key['images']} images" if "images" in key else "", time.time() - t0, cached))
        return info["value"]
    return memo


def stage_table(report: BuildReport) -> str:
    """Where the build's time went: one row per stage, what it served, its seconds, cached or run."""
    from edgeport.tables import text_table

    rows = [[s.stage, s.serves, f"{s.seconds:.1f}s", "cached" if s.cached else "ran"] for s in report.stages]
    lines = text_table(["stage", "serves", "time", ""], rows)
    lines.append(f"{report.compiles} compile(s) run for {len(report.targets)} bundle(s) ({report.artifacts} distinct "
                 "artifact(s))")
    return "\n".join(lines)


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
    pr = report.pruning
    extra = ["-", _metric_cell(report.reference_metrics)] if has_acc else []
    if pr:  # the original is the reference; the export is the pruned model, with its drop
        rows.append(("original (unpruned)", "onnxruntime", "fp32", "-", "-", "-", *extra, "reference", ""))
        extra = ["-", f"{metric_cell({pr['metric']: pr['pruned']}) or pr['pruned']} "
                      f"({_signed_drop({'drop': pr['drop'], 'max_drop': pr['max_drop']})})"]
    rows.append(("onnx (export)" if not pr else f"onnx (pruned {pr['ratio']:.0%})", "onnxruntime", "fp32",
                 f"{ex['max_rel']:.1e}", f"{ex['cosine']:.6f}", "-", *extra,
                 "cached" if report.export_cached else "built", ""))
    for r in report.targets:
        m = next(iter(r.parity.values()), None)
        cells = [r.target, r.backend, r.precision, f"{m['max_rel']:.1e}" if m else "-",
                 f"{m['cosine']:.6f}" if m else "-", f"{100 * m['agreement']:.2f}%" if m else "-"]
        if has_acc:
            a = r.accuracy
            cells += [f"{100 * a['agreement']:.2f}%" if a else "-",
                      f"{_metric_cell(a['metrics'])} ({_signed_drop(a)})" if a and a["drop"] is not None else "-"]
        rows.append(tuple(cells + [r.status, f"{r.seconds:.1f}s"]))
    from edgeport.tables import text_table

    lines = text_table(list(rows[0]), [list(r) for r in rows[1:]])
    if has_acc and not pr:
        lines.append(f"metric on {report.validation_source}; onnx row = FP32 reference")
    if has_acc and pr:
        lines.append(f"metric on {report.validation_source}; every drop is against the original (unpruned) model; "
                     "max_rel, cosine and agreement compare each artifact with the pruned model it converts")
        lines.append(pruning_line(pr, report.recovery_chart))
        conv = [f"{r.target}-{r.precision} {_signed_drop({'drop': r.accuracy['drop_vs_pruned']})}"
                for r in report.targets if r.accuracy and r.accuracy.get("drop_vs_pruned") is not None]
        if conv:
            lines.append(f"against the pruned FP32 ({pr['metric']} {pr['pruned']:.2f}): " + ", ".join(conv))
    for r in report.targets:
        if r.fallback:
            lines.append(f"{r.target}-{r.precision}: {fallback_line(r.fallback)}")
    for r in report.targets:
        if r.message:
            lines.append(f"{r.target}-{r.precision}: {r.message}")
    return "\n".join(lines)


def pruning_line(pr: dict[str, Any], chart: str | None) -> str:
    """One line for what pruning did: ratio, size and MACs before and after, the recovery, the metric's path."""
    before, after = pr.get("before") or {}, pr.get("after") or {}
    size = ""
    if before and after:
        size = (f", params {before['params'] / 1e3:.0f}k -> {after['params'] / 1e3:.0f}k, MACs "
                f"{before['macs'] / 1e6:.1f}M -> {after['macs'] / 1e6:.1f}M")
    rec = pr.get("recovery")
    how = (f"recovered by distillation ({rec['steps']} steps, {rec['seconds']:.0f}s, {rec['images']} unlabelled "
           f"images{'; loss curve ' + chart if chart else ''})" if rec else
           f"fine-tuned by {pr['finetuned']}" if pr.get("finetuned") else "not recovered")
    return (f"pruning {pr['ratio']:.0%}{size}; {how}; {pr['metric']} {pr['original']:.2f} original -> "
            f"{pr['pruned']:.2f} pruned")


def fallback_line(fb: dict[str, Any]) -> str:
    """One line for an accuracy-aware INT8 result: what was kept in float and the drop before and after."""
    from edgeport.tables import points

    lim = fb["max_drop"]
    drops = (f"{fb['metric']} drop {points(fb['drop_before'], lim)} -> {points(fb['drop_after'], lim)}"
             if fb.get("drop_before") is not None and fb.get("drop_after") is not None else "drop not measured")
    if fb.get("held_after") is not None and fb["held_after"] > (fb.get("drop_after") or 0.0):
        drops += f" (worse of its halves {points(fb['held_after'], lim)})"
    kept = ", ".join(fb["kept_float"]) if fb["kept_float"] else "nothing"
    return (f"accuracy-aware INT8 ({fb['by']}) kept in float: {kept}; {drops} on the selection half "
            f"({fb['images']} images, max_drop {lim:g})" + ("" if fb.get("met", True) else ", NOT met"))


def _signed_drop(a: dict[str, Any]) -> str:
    """The change from FP32 (minus the drop), with the digits that tell it from -max_drop."""
    from edgeport.tables import points

    lim = a.get("max_drop")
    return points(-a["drop"], -lim if lim is not None else None, signed=True)


def _metric_cell(m: dict[str, float] | None) -> str:
    if not m:
        return "-"
    return metric_cell(m) or (f"agree {m['agreement']:.2f}" if "agreement" in m else "-")


def summary_line(report: BuildReport) -> str:
    """The build's last line: how many bundles were built, came from the cache, failed or were skipped.

    "nothing changed" only when nothing was built, failed or skipped.
    """
    counts = {k: sum(r.status == k for r in report.targets) for k in ("built", "cached", "failed", "skipped")}
    if report.export_cached and not (counts["built"] or counts["failed"] or counts["skipped"]):
        return f"nothing changed: {counts['cached']} bundle(s) from the cache ({report.seconds:.1f}s)"
    parts = [f"{counts[k]} {k}" for k in ("built", "cached", "failed")] + \
        ([f"{counts['skipped']} skipped"] if counts["skipped"] else [])
    rewritten = sum(r.status == "built" and r.compile_cached for r in report.targets)
    if rewritten:  # bundles written anew around an artifact that came from the cache (no compile ran for them)
        parts[0] += f" ({rewritten} of them from cached compiles)"
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


