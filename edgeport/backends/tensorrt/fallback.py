"""Accuracy-aware INT8 for TensorRT: the Q/DQ model as the shared loop (edgeport.quantize.loop) keeps layers in float.

TensorRT runs a layer without Q/DQ in FP16/FP32 (explicit quantization), so keeping a layer in float means
writing the Q/DQ model without it; it runs in ONNX Runtime on the selection half, and a quantized weighted layer's
cost is the per-channel relative squared error of its output minus that of its input, both against FP32, on a few
images.
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
    return _last_weighted(onnx)[1]


def _last_weighted(onnx: Path) -> tuple[list[str], set[str]]:
    """(every node's name in graph order, ``last_weighted``) from one read of the graph."""
    from edgeport.backends.base import WEIGHTED, weighted_reach

    graph, reaches = weighted_reach(onnx)
    return [n.name for n in graph.node], {n.name for n in graph.node
                                          if n.op_type in WEIGHTED and not any(reaches(o) for o in n.output)}


class QdqModel:
    """The Q/DQ model as the shared accuracy-aware loop (edgeport.quantize.loop) writes and measures it: the ONNX
    with Q/DQ pairs for ``amax``, written to ``out`` with some weighted nodes left in float (TensorRT runs those
    in FP16/FP32), run in ONNX Runtime on the selection set."""

    def __init__(self, onnx: Path, write: Any, out: Path, keep: set[str], val: LabelledSet,
                 frames: LabelledSet | None = None) -> None:
        self.onnx, self._write, self.out, self.keep, self.val = onnx, write, out, keep, val
        self.frames = frames if frames is not None else val  # what it runs on: the selection set, then held-back
        self.quantized: set[str] = write(keep)  # the weighted nodes the model last written quantizes
        self.weighted = len(self.quantized)
        self._reference: Any = None  # the FP32 tensors on the ranking images: the same at every step

    def write(self, kept: list[str]) -> None:
        """The Q/DQ model with ``kept`` (beyond the user's ignored nodes) in float."""
        self.quantized = self._write(self.keep | set(kept))

    def outputs(self) -> np.ndarray:
        """The model last written, on the selection set and the held-back calibration frames."""
        return _run(self.out, self.frames)

    def heads(self) -> list[str]:
        """The last weighted nodes (a detector's box and score convolutions) that are quantized."""
        return sorted(last_weighted(self.onnx) & self.quantized)

    def describe(self, name: str, what: str) -> str:
        """A node by its ONNX name."""
        return name

    def rank(self, kept: list[str]) -> list[tuple[str, str, float]]:
        """The quantized weighted nodes by the error each adds by itself (``rank_layers``), worst first."""
        if self._reference is None:
            from edgeport.localize import ort_tensors_each

            self._reference = ort_tensors_each(self.onnx, self.val.inputs[:RANK_IMAGES])
        ranked = rank_layers(self._reference, self.out, self.val.inputs[:RANK_IMAGES], self.quantized - set(kept))
        return [(name, "layer", added) for name, added in ranked]


def choose_ranges(onnx: Path, candidates: dict[str, dict[str, float]], write: Any, out: Path, val: LabelledSet,
                  layout: str, frames: LabelledSet | None = None
                  ) -> tuple[str, dict[str, float], tuple[Any, np.ndarray], dict[str, Any]]:
    """Of activation ranges by several methods ({method: amax}, the configured method first), the default unless
    another's Q/DQ model (``write(amax)`` writes it to ``out``) agrees with FP32 better on the selection half by a
    clear interval (edgeport.quantize.loop.choose_ranges); (its method, {method: drop held}, (the gauge, the
    chosen plain Q/DQ model's outputs): where the accuracy loop starts, the evidence)."""
    from edgeport.quantize.loop import DropGauge
    from edgeport.quantize.loop import choose_ranges as choose

    frames = frames if frames is not None else val
    gauge = DropGauge(_run(onnx, frames), val, layout, frames)

    def plain(method: str, amax: dict[str, float]) -> np.ndarray:
        write(amax)
        return _run(out, frames)

    chosen, held, outputs, evidence = choose(candidates, plain, gauge, lambda msg: log.info("%s", msg))
    return chosen, held, (gauge, outputs[chosen]), evidence


def accuracy_fallback(onnx: Path, write: Any, out: Path, keep: set[str], val: LabelledSet, layout: str,
                      max_drop: float, start: tuple[Any, np.ndarray] | None = None,
                      frames: LabelledSet | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Keep the weighted nodes that cost most in float until the drop is within ``max_drop`` (module docstring).

    ``write(keep) -> set of quantized weighted node names`` writes the Q/DQ model to ``out`` with the nodes in
    ``keep`` left in float. ``start``: (the drop gauge, the plain Q/DQ model's outputs on the selection half)
    when the range choice has measured them already. Returns (the report: kept nodes, drops before and after,
    every step; the per-frame agreement with FP32 of the Q/DQ model it leaves at ``out``)."""
    from edgeport.quantize.loop import DropGauge
    from edgeport.quantize.loop import accuracy_fallback as loop

    model = QdqModel(onnx, write, out, keep, val, frames)
    gauge, plain = start or (DropGauge(_run(onnx, model.frames), val, layout, model.frames), None)
    tuning, kept = loop(model, gauge, max_drop, model.outputs() if plain is None else plain, val,
                        lambda msg: log.info("%s", msg))
    return tuning.report([name for name, _ in kept]), tuning.agree


def plain_start(onnx: Path, write: Any, out: Path, val: LabelledSet, layout: str,
                frames: LabelledSet | None = None) -> tuple[Any, np.ndarray]:
    """(the drop gauge on the selection set, the plain Q/DQ model's outputs there; ``write()`` writes it to
    ``out``): where the FP16 layers' choice and the accuracy loop start when no range choice measured them."""
    from edgeport.quantize.loop import DropGauge

    frames = frames if frames is not None else val
    gauge = DropGauge(_run(onnx, frames), val, layout, frames)
    write()
    return gauge, _run(out, frames)


def edge_layers(onnx: Path, weighted: set[str]) -> dict[str, list[str]]:
    """TensorRT users' known-good mixed precision, as candidates: {"first layer": the first quantized weighted
    node in graph order (it reads the image, whose full range INT8 steps coarsely), "last layer": the weighted
    nodes whose outputs reach no other weighted node (the classifier or segmentation head)}, each one present."""
    names, heads = _last_weighted(onnx)
    order = [n for n in names if n in weighted]
    last = sorted(heads & weighted)
    out: dict[str, list[str]] = {}
    if order and order[0] not in last:
        out["first layer"] = [order[0]]
    if last:
        out["last layer"] = last
    return out


def choose_edges(onnx: Path, write: Any, out: Path, keep: set[str], quantized: set[str], val: LabelledSet,
                 gauge: Any, outputs: np.ndarray) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Each of ``edge_layers`` kept in FP16 only when its Q/DQ model (``write(keep)``) agrees with FP32 better
    than the model without it, frame by frame on the selection set, by a paired bootstrap interval above zero
    (edgeport.quantize.evidence), tried in turn, each against the model the last one left. (the layers taken,
    the outputs of the model they give, {candidate: its layers, gain and interval, taken}); the Q/DQ model at
    ``out`` is left as the layers taken write it. ``quantized``: the weighted nodes the candidates come from."""
    from edgeport.quantize.evidence import frame_agreement, paired_gain

    taken: list[str] = []
    val = gauge.frames  # the selection set, then the calibration frames held back
    base = frame_agreement(gauge.fp32, outputs, val)
    evidence: dict[str, Any] = {}
    for what, layers in edge_layers(onnx, quantized).items():
        write(keep | set(taken) | set(layers))
        got = _run(out, val)
        agree = frame_agreement(gauge.fp32, got, val)
        gain = paired_gain(agree, base, val.names)
        evidence[what] = {"layers": layers, **gain.to_dict(), "taken": gain.clears}
        log.info("%s in FP16 (%s): agreement with FP32 %s on %s -> %s", what, ", ".join(layers), gain,
                 gauge.where, "kept in FP16" if gain.clears else "stays INT8 (its interval does not clear zero)")
        if gain.clears:
            taken += layers
            base, outputs = agree, got
    write(keep | set(taken))
    return taken, outputs, evidence
