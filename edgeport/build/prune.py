"""Pruning's part of a build: recovery of the pruned model by distillation, and its check against the original."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeport.build.calibrate import Supervised
from edgeport.calibration import CalibrationSet
from edgeport.config import ProjectConfig
from edgeport.errors import PruningError
from edgeport.flags import dashed
from edgeport.preprocess import InputSpec
from edgeport.tables import points

if TYPE_CHECKING:
    from edgeport.build.validation import ValidationRef

RECOVERY_CHART = "recovery.png"  # the distillation loss curve
log = logging.getLogger("edgeport")


def recover_pruned(cfg: ProjectConfig, spec: InputSpec, original: Any, images: CalibrationSet, folder: Path,
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
        out, losses = distill_pruned(cfg, spec, original, images, pruned, supervised)
    loss_chart(losses, folder / RECOVERY_CHART, f"recovery of the pruned model ({cfg.optimize.prune:.0%}): "
               f"distillation loss, {out['steps']} steps, {out['seconds']:.0f}s")
    out["chart"] = RECOVERY_CHART
    return out

def distill_pruned(cfg: ProjectConfig, spec: InputSpec, original: Any, images: CalibrationSet, pruned: Any,
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

def pruning_check(cfg: ProjectConfig, val: ValidationRef | None, spec: InputSpec,
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
                           f"{cfg.quantize.max_drop:g}: {todo}, prune less, or raise {dashed('max_drop')} if you "
                           "accept it")
    return out
