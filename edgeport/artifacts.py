"""Artifacts: one compile per distinct artifact, then one bundle per target.

Targets whose artifact would be byte-identical share one compile: the key is what determines the
artifact (the ONNX, backend, precision, the profile settings that backend's compile reads, the
calibration set and the [quantize] settings it reads, toolchain versions), not the target's name.
The four TFLite INT8 targets compile once; so do the three TensorRT INT8 profiles. Each target
still gets its own parity row (under its own tolerances, from the shared host outputs), its own
verdict, and its own bundle: manifest, runtime settings, runner, and any file of its own (the
calibration cache of its TensorRT version), through the backend's ``for_target``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport import __version__
from edgeport.backends import get_backend
from edgeport.backends.base import Artifacts, Quantization, TensorInfo
from edgeport.cache import TMP_PREFIX, Stage, key_of, source_hash
from edgeport.errors import EdgeportError
from edgeport.preprocess import InputSpec
from edgeport.record import write_record
from edgeport.runner.metrics import compare
from edgeport.tables import points
from edgeport.tasks import get as get_task

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.config import ProjectConfig
    from edgeport.pipeline import ValidationRef
    from edgeport.target import Target

log = logging.getLogger("edgeport")
GOLDEN_CASES = 4
FAILED_DIR = "failed"  # dist/failed/<bundle>: bundles that failed their gates, kept apart and never archived


@dataclass
class Group:
    """Targets (with one precision) whose artifact is the same: one compile serves them all."""

    backend: str
    precision: str
    settings: dict[str, Any]  # the artifact stage's key settings
    targets: list[Target] = field(default_factory=list)

    @property
    def names(self) -> str:
        """'android-arm64, raspberry-pi-5': the targets it serves."""
        return ", ".join(t.name for t in self.targets)

    @property
    def label(self) -> str:
        """'tflite int8: android-arm64, raspberry-pi-5', for log lines."""
        return f"{self.backend} {self.precision}: {self.names}"


@dataclass
class Reference:
    """The export's samples and PyTorch's outputs for them (reference.npz), read once per build."""

    inputs: np.ndarray
    outputs: dict[str, np.ndarray]

    @classmethod
    def load(cls, path: Path) -> Reference:
        """From the export stage's reference.npz."""
        with np.load(path) as z:
            return cls(z["inputs"], {k[4:]: z[k] for k in z.files if k.startswith("out:")})

    @functools.cached_property
    def sha256(self) -> str:
        """A hash of the sample inputs (their shape, dtype and bytes): what host runs of an artifact are keyed by."""
        x = np.ascontiguousarray(self.inputs)
        return hashlib.sha256(f"{x.shape}{x.dtype}".encode() + x.tobytes()).hexdigest()[:16]


@dataclass
class StageTime:
    """One stage of a build, what it served and what it cost (the build's stage table)."""

    stage: str
    serves: str
    seconds: float
    cached: bool


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


# Bumped when what an artifact stage stores changes shape (outputs.npz, info keys), so old caches are not read.
STAGE_FORMAT = 6


def _tolerances(cfg: ProjectConfig, target: Target, precision: str, outputs: list[str],
                host: bool = False) -> dict[str, dict[str, Any]]:
    """Per output: the target's tolerance for ``precision`` (vs PyTorch, or vs the host artifact when
    ``host``), overridden by the project's [validation.tolerance] entries (the same as `edgeport validate`)."""
    if host:
        return {name: target.host_tolerances(precision) for name in outputs}
    base = get_task(cfg.input.task).tolerance(precision, target.tolerances(precision))
    return {name: cfg.validation.tolerance_for(name, precision, base) for name in outputs}


def group_targets(cfg: ProjectConfig, chosen: list[tuple[Target, str]], onnx_sha256: str,
                  calib: CalibrationSet | None, val: ValidationRef | None) -> list[Group]:
    """The selected (target, precision) pairs grouped by the artifact they need, in selection order."""
    groups: dict[str, Group] = {}
    for target, precision in chosen:
        backend = get_backend(target.backend)
        settings = artifact_settings(cfg, backend, target, precision, onnx_sha256, calib, val)
        key = key_of(settings)
        groups.setdefault(key, Group(target.backend, precision, settings)).targets.append(target)
    return list(groups.values())


def artifact_settings(cfg: ProjectConfig, backend: Any, target: Target, precision: str, onnx_sha256: str,
                      calib: CalibrationSet | None, val: ValidationRef | None) -> dict[str, Any]:
    """What determines one artifact: the cache key of its compile."""
    needs_calib = backend.calibration_needed(precision)
    quant = Quantization(cfg.quantize, val.selection if val is not None else None) if needs_calib else None
    return {"onnx": onnx_sha256, "backend": backend.name, "precision": precision,
            "target": backend.artifact_settings(target, precision),
            "calib": calib.sha256 if needs_calib and calib is not None else None,
            "quant": quant.key(backend.int8_settings) if quant is not None else None,
            "versions": backend.versions_key(),
            "code": source_hash(*Path(backend.runner_part()).parent.glob("*.py")),
            "edgeport": __version__, "format": STAGE_FORMAT}


def compile_group(cfg: ProjectConfig, group: Group, onnx: Path, calib: CalibrationSet | None, spec: InputSpec,
                  build_dir: Path, val: ValidationRef | None, memo: Any) -> tuple[Stage, dict[str, Any], bool]:
    """Compile the group's artifact once (for its first target); cached by what determines the artifact."""
    backend = get_backend(group.backend)
    stage = Stage(build_dir, f"artifact/{group.backend}-{group.precision}", group.settings)
    needs_calib = backend.calibration_needed(group.precision)
    quant = Quantization(cfg.quantize, val.selection if val is not None else None, memo) if needs_calib else None

    def run(tmp: Path) -> dict[str, Any]:
        t0 = time.time()
        log.info("compiling (one artifact for %d target(s))", len(group.targets))
        art = backend.compile(onnx, group.targets[0], group.precision, calib if needs_calib else None, tmp, spec,
                              quant)
        return {"artifacts": _artifacts_to_dict(art, tmp), "compile_seconds": time.time() - t0}

    info, cached = stage.run(run)
    return stage, info, cached


def host_outputs(group: Group, stage: Stage, info: dict[str, Any], reference: Reference, spec: InputSpec,
                 build_dir: Path) -> dict[str, np.ndarray] | None:
    """The artifact's outputs on the reference samples, as the build host ran it (None when it cannot).

    Cached apart from the compile, by the artifact and the samples' bytes: a build with other samples (another
    --calib) runs the same artifact again instead of comparing the new reference with the old samples' outputs,
    and does not recompile it."""
    if not info["artifacts"]["host_runnable"]:
        return None
    backend = get_backend(group.backend)
    run_stage = Stage(build_dir, f"hostrun/{group.backend}-{group.precision}",
                      {"artifact": stage.key, "inputs": reference.sha256, "format": STAGE_FORMAT})

    def run(tmp: Path) -> dict[str, Any]:
        art = _artifacts_from_dict(info["artifacts"], stage.dir)
        with backend.open(art) as rt:
            got = rt.run_batches(to_layout(reference.inputs, spec.layout, art.spec.layout))
        np.savez(tmp / "outputs.npz", **got)
        return {"count": len(reference.inputs)}

    run_stage.run(run)
    with np.load(run_stage.dir / "outputs.npz") as z:
        return {k: z[k] for k in z.files}


def fallback_summary(info: dict[str, Any]) -> dict[str, Any] | None:
    """What accuracy-aware INT8 did to an artifact, the same shape for every backend (None when it did not
    run): by whom, the layers kept in float, the drop before and after on the selection half."""
    fb = info.get("accuracy_fallback")
    if fb:
        return {"by": "edgeport", "kept_float": fb["kept_float"], "metric": fb["metric"], "images": fb["images"],
                "drop_before": fb["drop_before"], "drop_after": fb["drop_after"], "max_drop": fb["max_drop"],
                "held_after": fb.get("held_after"), "met": fb["met"]}
    q = info.get("quantization") or {}
    ac = q.get("accuracy_control")
    if ac:
        return {"by": "NNCF", "kept_float": q.get("kept_float", []), "metric": ac.get("metric", ""),
                "images": ac["validation"]["count"], "drop_before": ac.get("drop_before"),
                "drop_after": ac.get("drop_after"), "max_drop": ac["max_drop"],
                "met": ac.get("drop_after") is None or ac["drop_after"] <= ac["max_drop"]}
    return None


def evaluate_group(group: Group, stage: Stage, info: dict[str, Any], spec: InputSpec, build_dir: Path,
                   val: ValidationRef, agreement_gate: bool = False) -> tuple[dict[str, Any], bool]:
    """The artifact's task metric on the labelled set, its drop from FP32 and agreement with FP32 (cached by the
    artifact and the set: a new validation set does not recompile). On an unlabelled set with
    ``agreement_gate`` (accuracy control asked for), the metric is agreement with FP32 in percent and its drop
    from 100 is gated like a task metric's."""
    backend = get_backend(group.backend)
    ev = Stage(build_dir, f"evaluation/{group.backend}-{group.precision}",
               {"artifact": stage.key, "val": val.data.sha256, "split": val.split, "format": STAGE_FORMAT,
                "agreement_gate": agreement_gate and not val.data.labelled, "pruned": val.pruned is not None})

    def run(tmp: Path) -> dict[str, Any]:
        from edgeport.evaluate import SPLITS, primary, task_metrics

        art = _artifacts_from_dict(info["artifacts"], stage.dir)
        task = get_task(spec.task)
        with backend.open(art) as rt:
            outs = rt.run_batches(to_layout(val.data.inputs, spec.layout, art.spec.layout))
        got = task.pack(outs, [o.name for o in art.outputs], spec)
        got = to_layout(got, art.spec.layout, spec.layout) if got.shape != val.outputs.shape else got
        halves = {}
        for half, idx in val.halves().items():
            subset = val.data.subset(idx)
            agreement = task.agreement(val.outputs[idx], got[idx], spec)
            if agreement_gate and not val.data.labelled:
                metrics, reference = {"agreement": 100.0 * agreement}, {"agreement": 100.0}
            else:
                metrics = task_metrics(got[idx], subset, spec.layout)
                reference = val.half_metrics(half, spec.layout)
            key, value = primary(metrics)
            halves[half] = {"metrics": metrics, "reference": reference, "count": len(idx),
                            "drop": reference[key] - value if value is not None else None, "agreement": agreement}
            pruned = val.pruned_metrics(half, spec.layout) if "agreement" not in reference else None
            if pruned is not None and value is not None:  # the conversion's own drop, from the pruned FP32
                halves[half]["pruned_reference"] = pruned
                halves[half]["drop_vs_pruned"] = pruned[key] - value
        report = halves["report"]  # the gate's and the headline's: the half nothing was tuned on
        key = primary(report["metrics"])[0]
        return {"metrics": report["metrics"], "reference": report["reference"], "metric": key,
                "drop": report["drop"], "agreement": report["agreement"], "source": val.data.source,
                "frames_sha256": val.data.frames_digest() if val.data.frames else None, "split_by": val.split,
                "drop_vs_pruned": report.get("drop_vs_pruned"),
                "count": report["count"], "halves": halves,
                "split": SPLITS[val.split] if len(val.data) > 1 else "one image: no split",
                "whole": {"metrics": task_metrics(got, val.data, spec.layout), "reference": val.metrics,
                          "count": len(val.data)}}

    return ev.run(run)


def target_parity(cfg: ProjectConfig, target: Target, precision: str, info: dict[str, Any], reference: Reference,
                  host: dict[str, np.ndarray] | None, spec: InputSpec) -> dict[str, Any]:
    """One target's view of the shared artifact: parity per output under its own tolerances, the tolerances,
    and the host tolerance where the host ran the real runtime."""
    art = info["artifacts"]
    outputs = list(reference.outputs)
    tol = _tolerances(cfg, target, precision, outputs)
    parity: dict[str, Any] = {}
    fixed = {}
    for name, r in reference.outputs.items() if host is not None else ():
        g = host[name]
        fixed[name] = g = to_layout(g, art["spec"]["layout"], spec.layout) if g.ndim == 4 and g.shape != r.shape else g
        parity[name] = compare(r, g, spec.task, tol[name])
    if any("agreement" not in m for m in parity.values()):  # outputs without decisions of their own (detection)
        task = get_task(spec.task)
        agreement = task.agreement(task.pack(reference.outputs, outputs, spec), task.pack(fixed, outputs, spec), spec)
        for m in parity.values():
            m.setdefault("agreement", agreement)
    real = host is not None and not art["info"].get("emulated")
    return {"artifacts": art, "parity": parity, "tolerance": tol,
            "host_tolerance": _tolerances(cfg, target, precision, outputs, host=True) if real else None}


def verdict_of(info: dict[str, Any], precision: str, max_drop: float, gate_all: bool = False) -> dict[str, Any]:
    """The build's verdict on one artifact: its gates (parity per output, the task metric) and where they ran.
    The metric gates every precision, as `edgeport validate` does; with ``gate_all`` (pruning) each drop is against
    the original model, and FP32 carries the pruning's.

    ``status`` is "passed", "failed" (with ``reasons``) or "device-only" (nothing could run on the build
    host; the device's ``runner.py --selftest`` against PyTorch is the gate).
    """
    reasons = [f"output '{n}': {', '.join(m['failed'])} vs PyTorch" for n, m in info["parity"].items() if not m["ok"]]
    acc = info.get("accuracy")
    if acc and acc["drop"] is not None:
        acc["ok"] = not acc["drop"] > max_drop
        acc["max_drop"] = max_drop
        if not acc["ok"]:
            what = f"{precision.upper()} after pruning loses" if gate_all else f"{precision.upper()} loses"
            against = " against the original model" if gate_all else ""
            reasons.append(f"{what} {points(acc['drop'], max_drop)} {acc['metric']} points{against} on the report "
                           f"half of {acc['source']}, more than max_drop {max_drop:g}")
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


def noise_reason(onnx: Path, val: ValidationRef, spec: InputSpec, max_drop: float, memo: dict[str, Any]) -> str:
    """Why an INT8 gate failure may not be INT8's to fix: what the FP32 model itself loses on the report half with
    0.1 % input noise (edgeport.evaluate.noise_floor; measured once per build, on the first failure)."""
    from edgeport.evaluate import NOISE, noise_floor

    if "noise_floor" not in memo:
        idx = val.halves()["report"]
        fp32 = val.pruned if val.pruned is not None else val.outputs
        log.info("INT8 failed its metric gate: measuring what %.1f%% input noise costs the FP32 model on the "
                 "report half (%d images)", NOISE * 100, len(idx))
        memo["noise_floor"] = noise_floor(onnx, val.data.subset(idx), fp32[idx], spec.layout)
    key, drop = memo["noise_floor"]
    why = (": it amplifies small perturbations, and INT8 rounds every tensor ten times more coarsely; no choice "
           "of layers kept in float holds it (ship FP16, or train the weights)" if drop > max_drop else "")
    return f"with {NOISE:.1%} input noise the FP32 model itself loses {points(drop, max_drop)} {key} points{why}"


def bundle_dest(out_dir: Path, name: str, status: str) -> Path:
    """Where a bundle goes: dist/<name>, or dist/failed/<name> when it failed its gates."""
    return out_dir / FAILED_DIR / name if status == "failed" else out_dir / name


def write_target_bundle(cfg: ProjectConfig, target: Target, precision: str, stage: Stage, info: dict[str, Any],
                        reference: Reference, host: dict[str, np.ndarray] | None, record: dict[str, Any],
                        export_info: dict[str, Any], calib: CalibrationSet | None, samples: CalibrationSet,
                        spec: InputSpec, out_dir: Path, build_dir: Path,
                        verdict: dict[str, Any]) -> tuple[Path, bool]:
    """Write one target's bundle unless it is already there intact (folder and archive); (folder, cached).

    ``info`` is target_parity's result with the accuracy; ``record`` is pipeline.model_record. A bundle
    that passed goes to dist/<target>-<precision> with its .tar.gz; one that failed goes to
    dist/failed/<target>-<precision>, without an archive, its manifest saying why; whatever the other place
    held for that name is removed, so dist/ only ever shows what this build proved.
    """
    from edgeport.bundle import (
        archive_matches,
        assemble_runner,
        remove_bundle,
        runner_parts,
        write_archive,
        write_bundle,
    )
    from edgeport.pipeline import _dist_version

    backend = get_backend(target.backend)
    name = f"{target.name}-{precision}"
    key = key_of({"artifact": stage.key, "target": target.fingerprint(), "tolerance": info["tolerance"],
                  "host_tolerance": info["host_tolerance"], "accuracy": info.get("accuracy"), "verdict": verdict,
                  "runner": source_hash(*runner_parts(backend.runner_part(), spec.task)), "model": record,
                  "samples": samples.sha256, "edgeport": __version__})
    dest = bundle_dest(out_dir, name, verdict["status"])
    if verdict["status"] == "failed":  # a good bundle of an earlier build stays until one of this build passes
        kept = bundle_dest(out_dir, name, "passed")
        if (kept / "manifest.json").is_file():
            log.warning("%s: this build of it failed; %s still holds an earlier build's bundle, which passed its "
                        "gates (this build's failed bundle is in %s)", name, kept, dest)
    elif remove_bundle(bundle_dest(out_dir, name, "failed")):
        log.info("removed the failed bundle of an earlier build from %s", out_dir / FAILED_DIR)
    if _is_current(dest, key, verdict):
        if verdict["status"] != "failed" and not archive_matches(dest):
            log.info("the archive did not match its folder (an interrupted build); rewriting it")
            write_archive(dest)
        return dest, True
    shared = _artifacts_from_dict(info["artifacts"], stage.dir)
    layout = shared.spec.layout
    inputs = to_layout(reference.inputs[:GOLDEN_CASES], spec.layout, layout)
    # Golden outputs are PyTorch's, so a divergent artifact can never agree with itself on the device; where
    # the host ran the real runtime, its outputs go beside them for a tight device-vs-host check.
    out_layout = {o.name: o.layout or layout for o in shared.outputs}  # a backend may keep some outputs NCHW
    golden = {k: to_layout(v, spec.layout, out_layout.get(k, layout))[:GOLDEN_CASES]
              for k, v in reference.outputs.items()}
    host_golden = {k: v[:GOLDEN_CASES] for k, v in host.items()} if info["host_tolerance"] is not None else None
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{name}-", dir=build_dir) as own:
        art = backend.for_target(shared, target, Path(own))
        manifest = {
            "build_key": key,
            "verdict": verdict,
            "model": {"name": export_info["model"], "onnx_sha256": export_info["onnx_sha256"], **record,
                      "spec": spec.to_dict(), "optimize": dataclasses.asdict(cfg.optimize),
                      "task": spec.task, "labels": spec.labels, "palette": [list(p) for p in spec.palette]},
            "target": target.name, "backend": target.backend, "precision": precision,
            "target_profile": target.to_dict(),
            "inputs": [i.to_dict() for i in art.inputs], "outputs": [o.to_dict() for o in art.outputs],
            "preprocess": art.spec.to_dict(), "runtime": art.runtime, "requires": target.runtime,
            "camera": target.camera,
            "provenance": {"edgeport": __version__, "torch": _dist_version("torch"), "onnx": _dist_version("onnx"),
                           "opset": export_info["opset"], "optimize": export_info["optimize"], **art.info,
                           "artifact_key": stage.key,  # bundles with the same key hold the same compile
                           "build_dir": str(build_dir.resolve()),  # where validate finds the build's record
                           "calibration": calib.summary() if calib is not None else None,
                           "samples": samples.summary()},
            "parity": {"reference": "pytorch", "export": export_info["parity"], "artifact": info["parity"],
                       "tolerance": info["tolerance"], "accuracy": info.get("accuracy")},
        }
        python_runner = target.options.get("python_runner", True)
        runner = assemble_runner(backend.runner_part(), spec.task) if python_runner else None
        reqs = list(target.requirements.get("pip", []))
        readme = _device_readme(target, precision, export_info["model"], runner is not None, verdict)
        extra = {"labels.txt": "\n".join(spec.labels) + "\n"} if spec.labels else None
        write_record(build_dir, manifest)  # what validate's reference comes from (edgeport.record)
        write_bundle(dest, files=art.files, runner=runner, manifest=manifest,
                     golden=(samples.frames[:GOLDEN_CASES], inputs, golden, host_golden, info["tolerance"],
                             info["host_tolerance"]),
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


