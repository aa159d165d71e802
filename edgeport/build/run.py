"""The build, start to end: inputs checked first, then calibration, export, the validation reference, one compile
per distinct artifact, gates and a bundle per target. Every stage is cached in the build folder (edgeport.cache):
a second identical build does no work, and a change to one target rebuilds only that target."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeport.backends import get_backend
from edgeport.build.bundles import drop_stale, write_target_bundle
from edgeport.build.calibrate import calibration_stage, recovery_images, supervised_set
from edgeport.build.compile import Reference, compile_group, group_targets, host_outputs
from edgeport.build.export import GOLDEN_CASES, model_record
from edgeport.build.export import export_stage as run_export
from edgeport.build.gates import evaluate_group, fallback_summary, noise_reason, target_parity, verdict_of
from edgeport.build.prune import RECOVERY_CHART, pruning_check
from edgeport.build.report import BuildReport, StageTime, TargetResult
from edgeport.build.retry import agreement_retry
from edgeport.build.validation import validation_stage
from edgeport.cache import Stage
from edgeport.calibration import SYNTHETIC
from edgeport.config import ProjectConfig
from edgeport.errors import ConfigError, EdgeportError
from edgeport.progress import working_on
from edgeport.target import Target, get_target
from edgeport.zoo import embedded_calibration, embedded_name

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.evaluate import LabelledSet

log = logging.getLogger("edgeport")


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
    if not cfg.validation.val_images and embedded_name(cfg.model.model):
        from edgeport.zoo import EMBEDDED

        # The embedded models come with their own labelled scenes: the build gates (and INT8's accuracy-aware
        # choice) use them, as `edgeport validate` does, so that what the build passes, validate passes.
        own_scenes = EMBEDDED[embedded_name(cfg.model.model)][2]
    if cfg.optimize.prune == "auto" and not (cfg.validation.val_images or own_scenes):
        raise ConfigError("--prune auto chooses a ratio by its accuracy: pass --val-images (labelled, or plain images "
                          "for agreement with the original), or give a ratio such as --prune 0.3")

    t_start = time.time()
    chosen = resolve_targets(targets, precision, cfg.root)
    check_build_flags(cfg, chosen, given or {}, own_scenes)
    if own_scenes:
        cfg.validation.val_images = own_scenes
        log.info("validation: %s (the embedded model's own labelled scenes)", own_scenes)
    check_source(cfg.model.model, cfg.model.weights, cfg.root)
    opset = choose_opset([t.opset_max for t, _ in chosen], cfg.export.opset)
    needs_calib = [f"{t.name}:{p}" for t, p in chosen if get_backend(t.backend).calibration_needed(p)]
    source = cfg.calibration.calib
    if source is None and embedded_name(cfg.model.model):
        source = embedded_calibration(embedded_name(cfg.model.model))
    if needs_calib and source is None:
        verb = "needs" if len(needs_calib) == 1 else "need"
        raise ConfigError(f"{', '.join(needs_calib)} {verb} calibration data: pass --calib with an image folder, "
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

def int8_calibration(cfg: ProjectConfig, calib: CalibrationSet | None, val: LabelledSet | None,
                     chosen: list[tuple[Target, str]]) -> CalibrationSet | None:
    """The calibration set INT8 compiles measure ranges on: when their accuracy-aware choices run (validation
    data, or --accuracy-control) and go by agreement with FP32 (``Task.choice_by_agreement``; without validation
    data always), less the quarter held back to judge those choices on frames the ranges did not see
    (``CalibrationSet.hold_back``)."""
    from edgeport.tasks import get as get_task

    q = cfg.quantize.accuracy_control
    if calib is None or not any(p == "int8" for _, p in chosen) or q is False or (val is None and not q):
        return calib
    if val is not None and not get_task(cfg.input.task).choice_by_agreement:
        return calib  # a detector's choices go by the labelled metric: unlabelled frames would not inform them
    held = calib.hold_back()
    if held.held is None and val is None:
        from edgeport.calibration import HELD_FROM

        raise ConfigError(f"--accuracy-control without --val-images judges INT8 on a quarter of the calibration set "
                          f"held back from the ranges, which needs {HELD_FROM} calibration images or more "
                          f"({len(calib)} given): pass --val-images DIR, or more calibration images")
    if held.held is not None:
        log.info("INT8: %d of the %d calibration images measure the activation ranges; %d held back to judge INT8's "
                 "choices on, beside %s", len(held), len(calib), len(held.held),
                 "the validation set's selection half" if val is not None else "nothing else (no validation data)")
    return held


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
    if cfg.validation.val_images:  # read before the expensive stages, so a bad path fails at once
        from edgeport.evaluate import load_labelled

        val_data = load_labelled(cfg.validation.val_images, cfg.validation.val_labels, spec,
                                 max_images=cfg.validation.max_images, root=cfg.root)
        if cfg.quantize.accuracy_control is not False and not val_data.labelled:
            log.info("%s has no labels: accuracy-aware INT8 holds agreement with FP32 (top-1, pixel or detection, "
                     "in percent) on its selection half within %s", val_data.source,
                     "max_drop points" if cfg.quantize.accuracy_control else "each target's agreement gate "
                     "(min_agreement: 5 points for INT8)")
    calib = None
    clock: list[StageTime] = []
    t0 = time.time()
    if source is not None:
        calib, cached = calibration_stage(cfg, source, spec, build_dir, None if needs_calib else 1)
        log.info("calibration set: %d images from %s%s", len(calib), source, " (cached)" if cached else "")
        samples = calib
    else:
        n = max(cfg.export.parity_samples, GOLDEN_CASES)
        samples, cached = calibration_stage(cfg, f"{SYNTHETIC}?n={n}", spec, build_dir, 1)
    clock.append(StageTime("calibration set", f"{len(samples)} images", time.time() - t0, cached))
    int8_calib = int8_calibration(cfg, calib, val_data, chosen)  # less the frames held back for INT8's choices
    recover_images = recovery_images(cfg, source, calib, spec, build_dir)
    supervised = supervised_set(cfg, spec, val_data) if recover_images is not None else None
    auto, recovered = None, None
    if cfg.optimize.prune == "auto":
        from edgeport.build.prune_auto import auto_table, choose_ratio

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
    export_stage, export_info, export_cached = run_export(cfg, spec, samples, opset, build_dir, record,
                                                             recover_images, recovered, supervised)
    if export_info.get("task_options"):  # settings the model carries (a detector's anchors) join the spec
        spec = cfg.input = dataclasses.replace(spec, task_options=export_info["task_options"])
        if val_data is not None:
            val_data.spec = spec
    reference = Reference.load(export_stage.dir / "reference.npz")
    clock.append(StageTime("ONNX export + parity", f"opset {opset}", time.time() - t0, export_cached))
    t0 = time.time()
    val = validation_stage(val_data, spec, export_stage, export_info, build_dir, cfg.validation.split)
    if val is not None:
        clock.append(StageTime("FP32 reference on the validation set", f"{len(val.data)} images",
                               time.time() - t0, False))
    max_drop = cfg.quantize.max_drop
    pruning = pruning_check(cfg, val, spec, export_info)
    if pruning is not None and auto is not None:
        pruning["auto"] = auto  # every candidate of --prune auto, scored on the selection half
    budget = None  # what INT8's accuracy-aware choices may lose: max_drop, less what pruning spent of it
    if pruning and pruning["selection_drop"] > 0:
        budget = round(max(max_drop - pruning["selection_drop"], 0.05), 2)
        log.info("INT8's accuracy-aware budget: max_drop %g less the pruning's %.2f on the selection half = %.2f",
                 max_drop, pruning["selection_drop"], budget)
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
    groups = group_targets(cfg, runnable, export_info["onnx_sha256"], int8_calib, val, budget)
    memo = _memo(build_dir, clock)
    noise: dict[str, Any] = {}  # the FP32 model's noise floor, measured on the first INT8 metric failure
    compiles = 0
    for group in groups:
        t0 = time.time()
        mark = len(clock)  # shared sub-stages (ranges) the compile runs are listed under it
        try:
            with working_on(group.label):
                gcfg, gcalib = cfg, int8_calib  # a second, accuracy-aware compile may change both (build/retry.py)
                stage, info, cached = compile_group(cfg, group, export_stage.dir / "model.onnx", int8_calib, spec,
                                                        build_dir, val, memo, budget)
                host = host_outputs(group, stage, info, reference, spec, build_dir)
                again = agreement_retry(cfg, group, int8_calib, val, target_parity(
                    cfg, group.targets[0], group.precision, info, reference, host, spec)) if host is not None else None
                if again is not None:
                    gcfg, gcalib, slack = again
                    group = group_targets(gcfg, [(t, group.precision) for t in group.targets],
                                          export_info["onnx_sha256"], gcalib, None, slack)[0]
                    stage, info, cached = compile_group(gcfg, group, export_stage.dir / "model.onnx", gcalib, spec,
                                                        build_dir, None, memo, slack)
                    host = host_outputs(group, stage, info, reference, spec, build_dir)
                accuracy = None
                if val is not None and info["artifacts"]["host_runnable"]:
                    accuracy, _ = evaluate_group(group, stage, info, spec, build_dir, val,
                                                     agreement_gate=cfg.quantize.accuracy_control is True)
        except EdgeportError as e:
            for target in group.targets:
                drop_stale(out_dir, f"{target.name}-{group.precision}")
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
                    tinfo = target_parity(gcfg, target, group.precision, info, reference, host, spec)
                    tinfo["accuracy"] = dict(accuracy) if accuracy else None
                    if tinfo["accuracy"] and pruning:
                        tinfo["accuracy"]["pruning"] = pruning
                    verdict = verdict_of(tinfo, group.precision, max_drop, gate_all=pruning is not None)
                    if group.precision == "int8" and verdict["gates"]["metric"] == "failed" and val is not None:
                        verdict["reasons"].append(noise_reason(export_stage.dir / "model.onnx", val, spec,
                                                                   max_drop, noise))
                    dest, bundle_cached = write_target_bundle(gcfg, target, group.precision, stage, tinfo,
                                                                  reference, host, record, export_info,
                                                                  gcalib if group.precision == "int8" else calib,
                                                                  samples, spec, out_dir, build_dir, verdict)
            except EdgeportError as e:
                drop_stale(out_dir, name)
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
                "; ".join(verdict["reasons"]), tinfo.get("accuracy"), verdict["status"], fallback_summary(art_info),
                cached)
    ordered = [results[t.name, p] for t, p in chosen]
    chart = export_stage.dir / RECOVERY_CHART
    return BuildReport(export_info["model"], str(export_stage.dir / "model.onnx"), export_cached, par, ordered,
                       0.0, val.report_metrics(spec.layout) if val is not None else None,
                       f"{val.data.source} (report half)" if val is not None else None,
                       clock, compiles, len(groups), pruning, str(chart) if chart.is_file() else None)

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
