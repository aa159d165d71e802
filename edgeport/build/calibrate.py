"""The build's images: the calibration set (cached by its content), recovery's images and its labelled set."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgeport import __version__
from edgeport.cache import Stage, source_hash
from edgeport.calibration import CalibrationSet, load_calibration
from edgeport.config import ProjectConfig
from edgeport.errors import ConfigError
from edgeport.evaluate import LabelledSet
from edgeport.preprocess import InputSpec
from edgeport.tasks import get as get_task

log = logging.getLogger("edgeport")


def calibration_stage(cfg: ProjectConfig, source: str, spec: InputSpec, build_dir: Path,
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
    images, cached = calibration_stage(cfg, src, spec, build_dir, None)
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
