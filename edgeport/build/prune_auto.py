"""``--prune auto``: the largest pruning ratio of a small grid that stays within max_drop after recovery.

Each ratio of ``[optimize] prune_grid`` (0.3, 0.5, 0.7) is pruned from the original model and recovered by
distillation (edgeport.recover, the build's settings), then scored on the **selection half** of the validation
set against the original (the task metric, or agreement with the original without labels); the report half,
which the build's gates and table use, chooses nothing. The largest ratio within max_drop there is kept. Each
candidate is also exported and timed on the host's runtimes (ONNX Runtime, OpenVINO where installed), interleaved
with the original, so the table says what each ratio buys. The recovered weights of the chosen candidate are
handed to the export stage, which does not recover it again.
"""
from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.errors import PruningError
from edgeport.flags import dashed
from edgeport.tables import points

if TYPE_CHECKING:
    from edgeport.calibration import CalibrationSet
    from edgeport.config import ProjectConfig
    from edgeport.evaluate import LabelledSet

log = logging.getLogger("edgeport")
Recovered = tuple[dict[str, Any], dict[str, Any], list[float]]  # (state_dict, recovery record, loss per step)


def _score(model: Any, outputs: list[str], sel: LabelledSet, ref_packed: np.ndarray | None) -> tuple[str, float, Any]:
    """(metric key, value, packed outputs) of ``model`` on the selection half (edgeport.evaluate.score: agreement
    with ``ref_packed``, in percent, where the set has no labels; ``None``: the model is the reference)."""
    from edgeport.evaluate import score
    from edgeport.export import torch_outputs
    from edgeport.tasks import get as get_task

    assert sel.spec is not None
    packed = get_task(sel.task).pack(torch_outputs(model, sel.inputs, outputs), outputs, sel.spec)
    key, value = score(packed, packed if ref_packed is None else ref_packed, sel, sel.spec.layout)
    return key, value, packed


def _latencies(models: dict[str, Any], example: Any, opset: int) -> dict[str, dict[str, float]]:
    """{candidate: {runtime: median ms}} on the host's runtimes, every candidate timed in interleaved rounds."""
    from edgeport.backends.onnxruntime.backend import BACKEND as ORT
    from edgeport.bench import measure
    from edgeport.export import export_onnx

    x = example.numpy()
    fns: dict[str, Any] = {}
    opened = []
    with tempfile.TemporaryDirectory(prefix="edgeport-prune-auto-") as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, example, path, opset=opset, input_name="input", dynamic_batch=False, simplify=True,
                        metadata={})
            rt = ORT.open_onnx(path).__enter__()
            opened.append(rt)
            feed = {rt.inputs[0].name: x}
            fns[f"{name}|onnxruntime"] = lambda r=rt, f=feed: r.infer(f)
            try:
                import openvino as ov

                compiled = ov.Core().compile_model(str(path), "CPU")
                fns[f"{name}|openvino"] = lambda c=compiled: c(x)
            except ImportError:
                pass
        try:
            timings = measure(fns, iters=100, warmup=10, rounds=5, progress=False)
        finally:
            for rt in opened:
                rt.__exit__(None, None, None)
    out: dict[str, dict[str, float]] = {}
    for key, t in timings.items():
        name, runtime = key.split("|")
        out.setdefault(name, {})[runtime] = round(t.median, 3)
    return out


def choose_ratio(cfg: ProjectConfig, images: CalibrationSet, val: LabelledSet, opset: int,
                 supervised: tuple[np.ndarray, np.ndarray, str] | None = None
                 ) -> tuple[float, list[dict[str, Any]], dict[float, Recovered]]:
    """(the chosen ratio, one record per candidate, {ratio: (recovered state_dict, recovery record, loss per
    step)}); PruningError
    when no ratio of the grid stays within max_drop on the selection half."""
    import torch

    from edgeport.evaluate import split_halves
    from edgeport.export import named_outputs
    from edgeport.model import first_forward, load_model
    from edgeport.optimize import measure, prune
    from edgeport.recover import distill

    spec = cfg.input
    opt = cfg.optimize
    max_drop = cfg.quantize.max_drop
    sel = val.subset(split_halves(val, cfg.validation.split)["selection"])
    original = load_model(cfg.model.model, cfg.model.weights, cfg.root, seed=cfg.model.seed)
    example = torch.from_numpy(images.data[:1].copy())
    outputs = [n for n, _ in named_outputs(first_forward(original, example))]
    key, ref_value, ref_packed = _score(original, outputs, sel, None)
    log.info("--prune auto: ratios %s, each recovered (%d steps) and scored on the selection half (%d images) "
             "against the original's %s %.2f; max_drop %g", ", ".join(f"{r:g}" for r in opt.prune_grid),
             opt.recover_steps, len(sel), key, ref_value, max_drop)
    rows, recovered, models = [], {}, {"original": original}
    before = measure(original, example)
    for ratio in sorted(opt.prune_grid):
        model = prune(copy.deepcopy(original), example, ratio, opt.prune_ignore, opt.prune_type_ratios)
        rec = None
        if opt.recover_steps:
            rep = distill(original, model, images.data, spec.task, opt, images.source, spec.layout,
                          supervised[:2] if supervised is not None else None)
            rec = rep.to_dict()
            recovered[ratio] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, rec, rep.loss)
        _, value, _ = _score(model, outputs, sel, ref_packed)
        after = measure(model, example)
        drop = ref_value - value
        rows.append({"ratio": ratio, "metric": key, "selection": value, "drop": drop, "within": drop <= max_drop,
                     "params": after.params, "macs": after.macs, "recovery": rec})
        models[f"{ratio:g}"] = model
        log.info("--prune auto: %.0f%%: %s %.2f on the selection half, drop %s (%s max_drop %g); %.0fk params, "
                 "%.1fM MACs", ratio * 100, key, value, points(drop, max_drop), "within" if drop <= max_drop else
                 "over", max_drop, after.params / 1e3, after.macs / 1e6)
    lat = _latencies(models, example, opset)
    for row in rows:
        row["latency_ms"] = lat.get(f"{row['ratio']:g}", {})
    base = {"ratio": 0.0, "metric": key, "selection": ref_value, "drop": 0.0, "within": True,
            "params": before.params, "macs": before.macs, "recovery": None, "latency_ms": lat.get("original", {})}
    rows.insert(0, base)
    good = [r["ratio"] for r in rows[1:] if r["within"]]
    if not good:
        best = min(rows[1:], key=lambda r: r["drop"])
        raise PruningError(f"--prune auto: no ratio of {', '.join(f'{r:g}' for r in opt.prune_grid)} stays within "
                           f"max_drop {max_drop:g} on the selection half after recovery (the best, {best['ratio']:g}, "
                           f"loses {points(best['drop'], max_drop)} {key} points): recover longer "
                           "(--recover-steps), give smaller ratios ([optimize] prune_grid), or raise "
                           f"{dashed('max_drop')}")
    return max(good), rows, recovered


def auto_table(rows: list[dict[str, Any]], chosen: float) -> list[str]:
    """The candidates as text lines: ratio, size, selection-half metric and drop, latency per runtime."""
    from edgeport.tables import text_table

    runtimes = sorted({k for r in rows for k in r["latency_ms"]})
    head = ["prune", "params", "MACs", "selection", "drop", *[f"{rt} ms" for rt in runtimes], ""]
    body = []
    for r in rows:
        mark = "chosen" if r["ratio"] == chosen else ("original" if r["ratio"] == 0 else
                                                      "within" if r["within"] else "over max_drop")
        body.append([f"{r['ratio']:.0%}", f"{r['params'] / 1e3:.0f}k", f"{r['macs'] / 1e6:.1f}M",
                     f"{r['metric']} {r['selection']:.2f}", points(0.0 - r["drop"], signed=True),
                     *[f"{r['latency_ms'].get(rt, float('nan')):.2f}" for rt in runtimes], mark])
    return text_table(head, body)
