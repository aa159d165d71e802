"""A second, accuracy-aware INT8 compile for an artifact that fails its agreement gate when the build had nothing
to judge INT8 on: no validation data, and accuracy control left to its default (neither ``--accuracy-control`` nor
``--no-accuracy-control``).

Such a build quantizes plainly on every calibration image, which costs nothing when INT8 holds. When an INT8
artifact's agreement with PyTorch on the golden frames falls below the target's ``min_agreement``, the build
compiles it again with accuracy control on: the last quarter of the calibration set (``CalibrationSet.hold_back``)
is held back from the ranges, and each backend's accuracy-aware choices (ranges, layers kept in float) hold
agreement with FP32 on those frames within the points the gate allows (5 for INT8's 0.95). The second artifact
is gated as the first was; the log says which ran. A failure of another kind (cosine, max_rel under a tolerance
the user tightened) is not retried: agreement is what the loop holds.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeport.build.compile import Group
    from edgeport.calibration import CalibrationSet
    from edgeport.config import ProjectConfig

log = logging.getLogger("edgeport")


def agreement_retry(cfg: ProjectConfig, group: Group, calib: CalibrationSet | None, val: Any,
                    parity: dict[str, Any]) -> tuple[ProjectConfig, CalibrationSet, float] | None:
    """(the settings with accuracy control on, the calibration set with its held-back quarter, the agreement points
    the loop may lose) for a second compile of ``group`` whose first target's ``parity`` (``target_parity``)
    failed on agreement (module docstring), or None when no second compile applies."""
    if group.precision != "int8" or val is not None or calib is None or cfg.quantize.accuracy_control is not None:
        return None
    from edgeport.build.compile import gate_slack

    tol = parity.get("tolerance") or {}
    failed = {name: m["agreement"] for name, m in parity["parity"].items() if m.get("agreement") is not None
              and (tol.get(name) or {}).get("min_agreement") is not None
              and m["agreement"] < tol[name]["min_agreement"]}
    if not failed:
        return None
    held = calib.hold_back()
    if held.held is None:
        return None  # too few calibration images to hold a quarter back
    slack = gate_slack(cfg, group.targets[0], group.precision)
    slack = cfg.quantize.max_drop if slack is None else slack
    name = min(failed, key=lambda n: failed[n])
    log.info("INT8 agrees %.4f < %.4f with PyTorch on the golden frames: compiling again with accuracy-aware INT8, "
             "%d of the %d calibration images for the ranges, agreement with FP32 held within %g points on the %d "
             "held back", failed[name], tol[name]["min_agreement"], len(held), len(calib), slack, len(held.held))
    again = dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, accuracy_control=True))
    return again, held, slack
