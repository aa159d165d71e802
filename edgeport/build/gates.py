"""The gates of each artifact: parity per output under the target's tolerances, the task metric on the report half,
and the verdict; why an INT8 metric failure may not be INT8's to fix."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.backends import get_backend
from edgeport.build.compile import STAGE_FORMAT, Group, Reference, artifacts_from_dict
from edgeport.cache import Stage
from edgeport.preprocess import InputSpec, to_layout
from edgeport.runner.metrics import compare
from edgeport.tables import points
from edgeport.tasks import get as get_task

if TYPE_CHECKING:
    from edgeport.build.validation import ValidationRef
    from edgeport.config import ProjectConfig
    from edgeport.target import Target

log = logging.getLogger("edgeport")


def tolerances(cfg: ProjectConfig, target: Target, precision: str, outputs: list[str],
                host: bool = False) -> dict[str, dict[str, Any]]:
    """Per output: the target's tolerance for ``precision`` (vs PyTorch, or vs the host artifact when
    ``host``), overridden by the project's [validation.tolerance] entries (the same as `edgeport validate`)."""
    if host:
        return {name: target.host_tolerances(precision) for name in outputs}
    base = get_task(cfg.input.task).tolerance(precision, target.tolerances(precision))
    return {name: cfg.validation.tolerance_for(name, precision, base) for name in outputs}

def fallback_summary(info: dict[str, Any]) -> dict[str, Any] | None:
    """What accuracy-aware INT8 did to an artifact, the same shape for every backend (None when it did not
    run): by whom, the layers kept in float, the drop before and after on the selection half."""
    fb = info.get("accuracy_fallback")
    q = info.get("quantization") or {}
    ranges = info.get("ranges") or q.get("ranges") or {}
    if fb:
        return {"by": "edgeport", "kept_float": fb["kept_float"], "metric": fb["metric"], "images": fb["images"],
                "drop_before": fb["drop_before"], "drop_after": fb["drop_after"], "max_drop": fb["max_drop"],
                "held_after": fb.get("held_after"), "met": fb["met"], "ranges": ranges.get("choice"),
                "symmetric_gap": ranges.get("symmetric_gap")}
    ac = q.get("accuracy_control")
    if ac:
        return {"by": "NNCF", "kept_float": q.get("kept_float", []), "metric": ac.get("metric", ""),
                "images": ac["validation"]["count"], "drop_before": ac.get("drop_before"),
                "drop_after": ac.get("drop_after"), "max_drop": ac["max_drop"],
                "met": ac.get("drop_after") is None or ac["drop_after"] <= ac["max_drop"],
                "reverted": ac.get("reverted")}
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
                "evidence": 1, "agreement_gate": agreement_gate and not val.data.labelled,
                "pruned": val.pruned is not None})

    def run(tmp: Path) -> dict[str, Any]:
        from edgeport.config import SPLITS
        from edgeport.evaluate import primary, task_metrics
        from edgeport.quantize.evidence import drop_evidence

        art = artifacts_from_dict(info["artifacts"], stage.dir)
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
        if report["drop"] is not None and "agreement" not in report["reference"]:  # its interval, its spread
            idx = val.halves()["report"]
            report.update(drop_evidence(val.outputs[idx], got[idx], val.data.subset(idx), spec.layout))
        return {"metrics": report["metrics"], "reference": report["reference"], "metric": key,
                "drop": report["drop"], "agreement": report["agreement"], "source": val.data.source,
                "frames_sha256": val.data.frames_digest() if val.data.frames else None, "split_by": val.split,
                "drop_vs_pruned": report.get("drop_vs_pruned"), "interval": report.get("interval"),
                "resampled": report.get("resampled"), "leave_one_sequence_out": report.get("leave_one_sequence_out"),
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
    tol = tolerances(cfg, target, precision, outputs)
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
            "host_tolerance": tolerances(cfg, target, precision, outputs, host=True) if real else None}

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
    floor = min((t.get("min_agreement") or 0.0 for t in (info.get("tolerance") or {}).values()), default=0.0)
    own = acc and acc["drop"] is None and acc.get("agreement") is not None and not gate_all  # pruned: vs the original
    if own and acc["agreement"] < floor:
        # a plain image folder: no metric, so agreement on its report half is the gate (validate checks it too)
        reasons.append(f"agreement {acc['agreement']:.4f} < {floor:.4f} vs PyTorch on the report half of "
                       f"{acc['source']}")
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
    if own:
        gates["agreement"] = "failed" if acc["agreement"] < floor else "passed"
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
