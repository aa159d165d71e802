"""Bundles: one per target, written whole or not at all; a failed one kept apart, a good one kept until a build of
it passes."""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport import __version__
from edgeport.backends import get_backend
from edgeport.build.compile import Reference, artifacts_from_dict, dist_version
from edgeport.build.export import GOLDEN_CASES
from edgeport.cache import TMP_PREFIX, Stage, key_of, source_hash
from edgeport.errors import EdgeportError
from edgeport.preprocess import InputSpec, to_layout
from edgeport.record import write_record

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.config import ProjectConfig
    from edgeport.target import Target

log = logging.getLogger("edgeport")
FAILED_DIR = "failed"  # dist/failed/<bundle>: bundles that failed their gates, kept apart and never archived


def bundle_dest(out_dir: Path, name: str, status: str) -> Path:
    """Where a bundle goes: dist/<name>, or dist/failed/<name> when it failed its gates."""
    return out_dir / FAILED_DIR / name if status == "failed" else out_dir / name

def write_target_bundle(cfg: ProjectConfig, target: Target, precision: str, stage: Stage, info: dict[str, Any],
                        reference: Reference, host: dict[str, np.ndarray] | None, record: dict[str, Any],
                        export_info: dict[str, Any], calib: CalibrationSet | None, samples: CalibrationSet,
                        spec: InputSpec, out_dir: Path, build_dir: Path,
                        verdict: dict[str, Any]) -> tuple[Path, bool]:
    """Write one target's bundle unless it is already there intact (folder and archive); (folder, cached).

    ``info`` is target_parity's result with the accuracy; ``record`` is edgeport.build.export.model_record. A bundle
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
    shared = artifacts_from_dict(info["artifacts"], stage.dir)
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
            "provenance": {"edgeport": __version__, "torch": dist_version("torch"), "onnx": dist_version("onnx"),
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
    if runner:
        lines += get_backend(target.backend).readme_run(target, precision)
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


def drop_stale(out_dir: Path, name: str) -> None:
    """A target's build failed before its bundle was written: remove an earlier build's failed bundle of it, and
    keep an earlier bundle that passed (a good bundle leaves dist/ only for one that passed), saying so."""
    from edgeport.bundle import remove_bundle

    if remove_bundle(bundle_dest(out_dir, name, "failed")):
        log.info("%s: removed the failed bundle of an earlier build from %s", name, out_dir / FAILED_DIR)
    kept = bundle_dest(out_dir, name, "passed")
    if (kept / "manifest.json").is_file():
        log.warning("%s: this build of it failed; %s still holds an earlier build's bundle, which passed its gates",
                    name, kept)
