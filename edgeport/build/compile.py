"""Compiles: one per distinct artifact, then one host run of it on the reference samples.

Targets whose artifact would be byte-identical share one compile: the key is what determines the
artifact (the ONNX, backend, precision, the profile settings that backend's compile reads, the
calibration set and the [quantize] settings it reads, toolchain versions), not the target's name.
The four TFLite INT8 targets compile once; so do the three TensorRT INT8 profiles. Each target
still gets its own parity row (under its own tolerances, from the shared host outputs), its own
verdict, and its own bundle (edgeport.build.bundles).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport import __version__, intake
from edgeport.backends import get_backend
from edgeport.backends.base import Artifacts, Quantization, TensorInfo
from edgeport.cache import Stage, key_of, source_hash
from edgeport.preprocess import InputSpec, to_layout

if TYPE_CHECKING:
    from edgeport.build.validation import ValidationRef
    from edgeport.calibration import CalibrationSet
    from edgeport.config import ProjectConfig, QuantizeConfig
    from edgeport.target import Target

log = logging.getLogger("edgeport")
QUANTIZE = Path(__file__).resolve().parents[1] / "quantize"


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

def artifacts_to_dict(a: Artifacts, base: Path) -> dict[str, Any]:
    d = {"backend": a.backend, "target": a.target, "precision": a.precision,
         "files": {k: str(v.relative_to(base)) for k, v in a.files.items()},
         "inputs": [vars(i) for i in a.inputs], "outputs": [vars(o) for o in a.outputs],
         "spec": a.spec.to_dict(), "runtime": a.runtime, "info": a.info, "host_runnable": a.host_runnable}
    return d

def artifacts_from_dict(d: dict[str, Any], base: Path) -> Artifacts:
    return Artifacts(d["backend"], d["target"], d["precision"], {k: base / v for k, v in d["files"].items()},
                     [TensorInfo(**i) for i in d["inputs"]], [TensorInfo(**o) for o in d["outputs"]],
                     InputSpec.from_dict(d["spec"]), d["runtime"], d["info"], d["host_runnable"])

def dist_version(name: str) -> str:
    """The installed version of a distribution ("none" when it is not installed): provenance and cache keys."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"

# Bumped when what an artifact stage stores changes shape (outputs.npz, info keys), so old caches are not read.
STAGE_FORMAT = 6

def group_targets(cfg: ProjectConfig, chosen: list[tuple[Target, str]], onnx_sha256: str,
                  calib: CalibrationSet | None, val: ValidationRef | None, budget: float | None = None) -> list[Group]:
    """The selected (target, precision) pairs grouped by the artifact they need, in selection order; ``budget``:
    INT8's share of max_drop when pruning spent some of it."""
    groups: dict[str, Group] = {}
    for target, precision in chosen:
        backend = get_backend(target.backend)
        settings = artifact_settings(cfg, backend, target, precision, onnx_sha256, calib, val, budget)
        key = key_of(settings)
        groups.setdefault(key, Group(target.backend, precision, settings)).targets.append(target)
    return list(groups.values())

def quantize_settings(cfg: ProjectConfig) -> QuantizeConfig:
    """The [quantize] settings with ``int8_preset = "auto"`` made concrete: the model's own exporter's preset
    (mixed for Ultralytics models), else performance."""
    q = cfg.quantize
    if q.int8_preset != "auto":
        return q
    return dataclasses.replace(q, int8_preset=intake.int8_preset(cfg.model.model) or "performance")


def int8_budget(cfg: ProjectConfig, target: Target, precision: str, val: ValidationRef | None,
                budget: float | None) -> float | None:
    """What INT8's accuracy-aware choices may lose (None: max_drop). On a set without labels with accuracy control
    left to its default, the loop holds agreement with FP32 to the target's own gate: the points below 100 that its
    ``min_agreement`` allows (5 for INT8's 0.95), or ``budget`` (what pruning left) when that is less."""
    if val is None or val.data.labelled or cfg.quantize.accuracy_control is not None:
        return budget
    slack = gate_slack(cfg, target, precision)
    if slack is None:
        return budget
    return slack if budget is None else min(budget, slack)


def gate_slack(cfg: ProjectConfig, target: Target, precision: str) -> float | None:
    """The agreement points below 100 that the target's own gate allows (``min_agreement``: 5 for INT8's 0.95),
    or None when it has none."""
    from edgeport.tasks import get as get_task

    floor = get_task(cfg.input.task).tolerance(precision, target.tolerances(precision)).get("min_agreement")
    return None if floor is None else round(100.0 * (1.0 - float(floor)), 6)


def held_frames(calib: CalibrationSet | None, spec: InputSpec) -> Any:
    """The calibration frames held back from the ranges (``CalibrationSet.hold_back``) as an unlabelled set named
    in their order, or None."""
    from edgeport.evaluate import unlabelled

    if calib is None or calib.held is None:
        return None
    sha = hashlib.sha256(f"{calib.sha256}|held".encode()).hexdigest()
    return unlabelled(f"{calib.source} (held back from the ranges)", spec.task, calib.held, sha, spec, "calibration")


def artifact_settings(cfg: ProjectConfig, backend: Any, target: Target, precision: str, onnx_sha256: str,
                      calib: CalibrationSet | None, val: ValidationRef | None,
                      budget: float | None = None) -> dict[str, Any]:
    """What determines one artifact: the cache key of its compile."""
    needs_calib = backend.calibration_needed(precision)
    quant = Quantization(quantize_settings(cfg), val.selection if val is not None else None,
                         budget=int8_budget(cfg, target, precision, val, budget),
                         extra=held_frames(calib, cfg.input)) if needs_calib else None
    return {"onnx": onnx_sha256, "backend": backend.name, "precision": precision,
            "target": backend.artifact_settings(target, precision),
            "calib": calib.sha256 if needs_calib and calib is not None else None,
            "quant": quant.key(backend.int8_settings) if quant is not None else None,
            "versions": backend.versions_key(),
            # the backend's own code, the helpers and INT8 machinery every backend shares: a change compiles again
            "code": source_hash(*Path(backend.runner_part()).parent.glob("*.py"), *QUANTIZE.glob("*.py"),
                                Path(backend.runner_part()).parent.parent / "base.py"),
            "edgeport": __version__, "format": STAGE_FORMAT}

def compile_group(cfg: ProjectConfig, group: Group, onnx: Path, calib: CalibrationSet | None, spec: InputSpec,
                  build_dir: Path, val: ValidationRef | None, memo: Any,
                  budget: float | None = None) -> tuple[Stage, dict[str, Any], bool]:
    """Compile the group's artifact once (for its first target); cached by what determines the artifact."""
    backend = get_backend(group.backend)
    stage = Stage(build_dir, f"artifact/{group.backend}-{group.precision}", group.settings)
    needs_calib = backend.calibration_needed(group.precision)
    quant = Quantization(quantize_settings(cfg), val.selection if val is not None else None, memo,
                         int8_budget(cfg, group.targets[0], group.precision, val, budget),
                         held_frames(calib, spec)) if needs_calib else None

    def run(tmp: Path) -> dict[str, Any]:
        t0 = time.time()
        log.info("compiling (one artifact for %d target(s))", len(group.targets))
        art = backend.compile(onnx, group.targets[0], group.precision, calib if needs_calib else None, tmp, spec,
                              quant)
        return {"artifacts": artifacts_to_dict(art, tmp), "compile_seconds": time.time() - t0}

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
        art = artifacts_from_dict(info["artifacts"], stage.dir)
        with backend.open(art) as rt:
            got = rt.run_batches(to_layout(reference.inputs, spec.layout, art.spec.layout))
        np.savez(tmp / "outputs.npz", **got)
        return {"count": len(reference.inputs)}

    run_stage.run(run)
    with np.load(run_stage.dir / "outputs.npz") as z:
        return {k: z[k] for k in z.files}
