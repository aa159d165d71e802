"""Accuracy-aware INT8 for TensorRT: weighted layers kept in float until the drop is within max_drop.

TensorRT runs a layer without Q/DQ in FP16/FP32 (explicit quantization), so keeping a layer in
float means writing the Q/DQ model without it. The loop, on the selection half of the labelled set:

1. write the Q/DQ model, run it in ONNX Runtime, measure the task metric's drop from the FP32 ONNX
   (without labels: the drop of agreement with FP32, in points);
2. while the drop exceeds max_drop (on the whole selection set or on either of its halves:
   edgeport.evaluate.DropGauge), rank the quantized weighted layers by the error each adds by
   itself (per-channel relative squared error of its output minus that of its input, both against
   FP32, on a few images), keep the worst in float, and measure again;
3. stop within max_drop on the whole set and on both halves, or after a quarter of the weighted
   layers (at most 12): what is kept, and the drop before and after, go to the manifest whatever
   the outcome (the build's gate judges the result on the report half).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edgeport.evaluate import LabelledSet

log = logging.getLogger("edgeport")
RANK_IMAGES = 4


def _run(path: Path, val: LabelledSet) -> np.ndarray:
    """The model's outputs on the set's inputs, packed as its task reads them."""
    from edgeport.backends.onnxruntime.backend import BACKEND as ORT
    from edgeport.evaluate import pack

    with ORT.open_onnx(path) as rt:
        return pack(rt.run_batches(val.inputs), val)


def rank_layers(reference: tuple[list[dict[str, np.ndarray]], list[Any]], qdq: Path, x: np.ndarray,
                candidates: set[str]) -> list[tuple[str, float]]:
    """[(node, error it adds)] for the ``candidates`` (weighted node names), worst first: the per-channel relative
    squared error (``channel_error``) of the node's output in the Q/DQ model against the FP32 ONNX's tensors
    ``reference`` (``ort_tensors_each`` on the same images ``x``), minus that of its float input."""
    from edgeport.localize import ort_tensors_each
    from edgeport.runner.metrics import channel_error

    refs, nodes = reference
    err: dict[str, float] = {}
    for ref, got in zip(refs, ort_tensors_each(qdq, x)[0]):
        for name, r in ref.items():
            if name in got and got[name].shape == r.shape:
                err[name] = err.get(name, 0.0) + channel_error(got[name], r, 1)  # NCHW
    ranked = []
    for name, _op, inputs, outputs in nodes:
        if name in candidates and outputs and outputs[0] in err:
            ranked.append((name, err[outputs[0]] - err.get(inputs[0], 0.0)))
    return sorted(ranked, key=lambda r: -r[1])


def last_weighted(onnx: Path) -> set[str]:
    """The weighted nodes (Conv, ConvTranspose, Gemm, MatMul) whose outputs reach no other weighted node: a model's
    heads, where a detector's box regression and class scores come out."""
    import onnx as onnx_lib

    graph = onnx_lib.load(str(onnx), load_external_data=False).graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    memo: dict[str, bool] = {}

    def reaches(tensor: str) -> bool:
        if tensor not in memo:
            memo[tensor] = False
            memo[tensor] = any(n.op_type in weighted or any(reaches(o) for o in n.output)
                               for n in readers.get(tensor, []))
        return memo[tensor]

    return {n.name for n in graph.node if n.op_type in weighted and not any(reaches(o) for o in n.output)}


def choose_ranges(onnx: Path, candidates: dict[str, dict[str, float]], write: Any, out: Path, val: LabelledSet,
                  layout: str) -> tuple[str, dict[str, float], tuple[Any, np.ndarray]]:
    """Of activation ranges by several methods ({method: amax}, the configured method first), the one whose
    Q/DQ model (``write(amax)`` writes it to ``out``) holds the smaller drop on the selection half
    (edgeport.evaluate.DropGauge; a tie keeps the first); (its method, {method: drop held}, (the gauge, the
    chosen plain Q/DQ model's outputs): where the accuracy loop starts). As for TFLite: no one method wins on
    every model (edgeport.backends.tflite.fallback.choose_ranges)."""
    from edgeport.evaluate import DropGauge

    gauge = DropGauge(_run(onnx, val), val, layout)
    held, outputs = {}, {}
    for method, amax in candidates.items():
        write(amax)
        outputs[method] = _run(out, val)
        held[method] = float(gauge(outputs[method])[1])
    chosen = min(held, key=lambda m: held[m])
    log.info("activation ranges chosen on the selection half: %s (%s drop): %s",
             ", ".join(f"{m} holds {d:.4f}" for m, d in held.items()), gauge.key, chosen)
    return chosen, held, (gauge, outputs[chosen])


def accuracy_fallback(onnx: Path, write: Any, out: Path, keep: set[str], val: LabelledSet, layout: str,
                      max_drop: float, start: tuple[Any, np.ndarray] | None = None) -> dict[str, Any]:
    """Keep the layers that cost most in float until the drop is within ``max_drop`` (module docstring).

    ``write(keep) -> set of quantized weighted node names`` writes the Q/DQ model to ``out`` with the nodes in
    ``keep`` left in float. ``start``: (the drop gauge, the plain Q/DQ model's outputs on the selection half)
    when the range choice has measured them already. Returns the report: kept layers, drops before and after,
    every step."""
    from edgeport.evaluate import DropGauge, Tuning

    gauge, plain = start or (DropGauge(_run(onnx, val), val, layout), None)
    quantized = write(keep)
    tuning = Tuning(gauge, max_drop, _run(out, val) if plain is None else plain, len(val), val.labelled)
    kept: list[str] = []
    limit = min(12, max(1, len(quantized) // 4))
    heads = sorted(last_weighted(onnx) & quantized)
    if tuning.over and heads:  # the heads (a detector's box and score convolutions) as one step, if it helps
        trial = write(keep | set(heads))
        if tuning.trial(heads, _run(out, val)):
            kept, quantized = list(heads), trial
            log.info("accuracy fallback: kept the last weighted layers (%s) in float: drop %.4f (worst half %.4f)",
                     ", ".join(heads), tuning.drop, tuning.held)
            limit += len(heads)
        else:
            quantized = write(keep)
    reference = None  # the FP32 tensors on the ranking images: the same at every step
    while tuning.over and len(kept) < limit:
        if reference is None:
            from edgeport.localize import ort_tensors_each

            reference = ort_tensors_each(onnx, val.inputs[:RANK_IMAGES])
        ranked = rank_layers(reference, out, val.inputs[:RANK_IMAGES], quantized - set(kept))
        if not ranked:
            break
        worst, added = ranked[0]
        kept.append(worst)
        log.info("accuracy fallback: %s %.4f points over max_drop %g (the selection set or its worse half); keeping "
                 "%s in float (adds %.3g relative error)", gauge.key, tuning.held - max_drop, max_drop, worst, added)
        quantized = write(keep | set(kept))
        tuning.step(kept, _run(out, val))
    return tuning.report(kept)
