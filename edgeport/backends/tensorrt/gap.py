"""TensorRT's own INT8 handicap, measured on every build and closed where it shows.

TensorRT quantizes every activation symmetric (signed INT8, zero point 0), so a tensor that cannot be negative (a
Relu's output) uses 128 of its 256 levels, where OpenVINO's unsigned INT8 and TFLite's zero points use all of them.
The *unsigned twin* of a Q/DQ model is the same model (the same ranges, the same layers in float) with those
tensors quantized unsigned (scale amax/255): what INT8 with zero points makes of the same choices, the agreement
TensorRT is held to.

When the Q/DQ model agrees with FP32 by more than ``MARGIN`` points less than its twin, on the frames INT8's choices
are judged on, layers go to FP16 one at a time: each round tries every quantized weighted layer whose input cannot
be negative (the layers the handicap costs) in FP16 on ``RANK_FRAMES`` frames, and the best of them is measured on
every frame and kept only when its agreement gain has a paired bootstrap interval above zero
(edgeport.quantize.evidence). It stops when the gap is within the margin, when no layer shows a gain, or after
``LIMIT`` layers. What the layers kept cost is given as their share of the model's multiply-accumulates.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edgeport.evaluate import LabelledSet

log = logging.getLogger("edgeport")
MARGIN = 0.3  # agreement points TensorRT may stay below its unsigned twin
LIMIT = 4  # layers this step keeps in FP16 at the most
RANK_FRAMES = 16
CODE_VERSION = 1  # bumped when what this step keeps in FP16 changes, so cached Q/DQ models are written again


def unsigned_twin(qdq: Path, nonnegative: set[str], out: Path) -> int:
    """The Q/DQ model at ``qdq`` with each activation in ``nonnegative`` quantized unsigned (uint8, zero point 0,
    scale amax/255 for the same amax), written to ``out``; how many activations changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq))
    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in nonnegative or node.input[1] not in inits:
            continue
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        if numpy_helper.to_array(scale).size != 1:
            continue  # per channel: a weight
        s = numpy_helper.to_array(scale).astype(np.float32) * np.float32(127.0 / 255.0)
        scale.CopyFrom(numpy_helper.from_array(s, scale.name))
        zero.CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(zero).shape, np.uint8), zero.name))
        changed += 1
    onnx.save(model, str(out))
    return changed


def macs(model: Any) -> dict[str, int]:
    """{weighted node: multiply-accumulates per inference} of an ONNX model (or its path) from the graph's inferred
    shapes (Conv, ConvTranspose, Gemm, MatMul with a constant weight); a node whose shapes are not known counts 0."""
    import onnx

    model = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    out: dict[str, int] = {}
    for node in model.graph.node:
        w, y = (weights.get(node.input[1]) if len(node.input) > 1 else None), shapes.get(node.output[0], [])
        if w is None or not y or not all(y):
            continue
        if node.op_type == "Conv":  # each output value: Cin/groups x kernel
            out[node.name] = int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":  # each input value to Cout/groups x kernel
            x = shapes.get(node.input[0], [])
            out[node.name] = int(np.prod(x)) * int(np.prod(w[1:])) if x and all(x) else 0
        elif node.op_type in ("Gemm", "MatMul"):
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            out[node.name] = int(np.prod(y)) * int(w[1] if trans_b else w[0])
    return out


def _agreement(fp32: np.ndarray, path: Path, frames: LabelledSet) -> np.ndarray:
    from edgeport.backends.tensorrt.fallback import _run
    from edgeport.quantize.evidence import frame_agreement

    return frame_agreement(fp32, _run(path, frames), frames)


def close_gap(onnx: Path, write: Any, out: Path, keep: set[str], quantized: set[str], gauge: Any,
              agree: np.ndarray | None = None) -> tuple[list[str], dict[str, Any]]:
    """Keep layers in FP16 while TensorRT's Q/DQ model agrees with FP32 more than ``MARGIN`` points less than its
    unsigned twin (module docstring). ``write(kept)`` writes the Q/DQ model with the nodes ``kept`` in float to
    ``out`` (the model at ``out`` on entry is ``write(keep)``'s); ``quantized``: the weighted nodes the candidates
    come from; ``gauge``: the FP32 outputs and frames (edgeport.quantize.loop.DropGauge); ``agree``: the model at
    ``out``'s per-frame agreement with FP32 there, when the loop measured it already. (the layers taken, the
    evidence for the manifest); the model at ``out`` is left as the layers taken write it."""
    import onnx as onnx_lib

    from edgeport.quantize.evidence import paired_gain
    from edgeport.quantize.ranges import nonnegative_tensors

    frames, fp32 = gauge.frames, gauge.fp32
    model = onnx_lib.load(str(onnx))
    nonnegative = nonnegative_tensors(model)
    reads = {n.name: n.input[0] for n in model.graph.node if n.input}
    twin_path = out.with_name(out.stem + "_unsigned.onnx")
    unsigned_twin(out, nonnegative, twin_path)
    twin = _agreement(fp32, twin_path, frames)
    twin_path.unlink(missing_ok=True)
    agree = _agreement(fp32, out, frames) if agree is None else agree
    reference, before = float(twin.mean()), float(agree.mean())
    pick = np.unique(np.linspace(0, len(frames) - 1, min(RANK_FRAMES, len(frames))).round().astype(int))
    sub, sub_fp32 = frames.subset(list(pick)), fp32[pick]
    taken: list[str] = []
    steps: list[dict[str, Any]] = []
    say = f"on {gauge.where}"
    log.info("TensorRT's symmetric INT8 agrees %.3f %% with FP32, its unsigned twin (INT8 with zero points, the same "
             "ranges) %.3f %% %s", before, reference, say)
    cost: dict[str, int] = {}  # each layer's multiply-accumulates, read once a layer is tried
    while reference - float(agree.mean()) > MARGIN and len(taken) < LIMIT:
        candidates = sorted(n for n in quantized - set(taken) if reads.get(n) in nonnegative)
        if not candidates:
            break
        tried = {}
        for name in candidates:
            write(keep | set(taken) | {name})
            tried[name] = float(_agreement(sub_fp32, out, sub).mean())
        best = max(tried, key=lambda n: tried[n])
        cost = cost or macs(model)
        write(keep | set(taken) | {best})
        got = _agreement(fp32, out, frames)
        gain = paired_gain(got, agree, frames.names)
        steps.append({"layer": best, **gain.to_dict(), "taken": gain.clears,
                      "macs_share": round(cost.get(best, 0) / (sum(cost.values()) or 1), 4)})
        log.info("%s in FP16 (best of %d layers on %d frames): agreement %s %s -> %s", best, len(candidates),
                 len(pick), gain, say, "kept in FP16" if gain.clears else "stays INT8 (its interval does not clear "
                 "zero); stopping")
        if not gain.clears:
            break
        taken.append(best)
        agree = got
    write(keep | set(taken))
    after = float(agree.mean())
    evidence = {"unsigned_twin": round(reference, 4), "before": round(before, 4), "after": round(after, 4),
                "margin": MARGIN, "met": reference - after <= MARGIN, "layers": taken, "steps": steps,
                "frames": len(frames),
                "macs_share": round(sum(cost.get(n, 0) for n in taken) / (sum(cost.values()) or 1), 4)}
    if steps or reference - before > MARGIN:
        log.info("TensorRT INT8 %.3f %% against its unsigned twin's %.3f %%: %s (%d layer(s) in FP16, %.1f %% of the "
                 "model's multiply-accumulates)", after, reference,
                 "within" if evidence["met"] else "NOT within", len(taken), 100 * evidence["macs_share"])
    return taken, evidence
