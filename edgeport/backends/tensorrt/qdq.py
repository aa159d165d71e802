"""The explicit-quantization (Q/DQ) ONNX for TensorRT, placed by TensorRT's rules, and a lint for it.

Placement follows the TensorRT developer guide's Q/DQ layer-placement recommendations:

* quantize the inputs of weighted layers (Conv, ConvTranspose, Gemm, MatMul with a constant
  float weight): the activation per-tensor, the weight per-channel (axis 0; axis 1 of
  ConvTranspose; Gemm by its transB), symmetric int8, zero point 0; never their outputs;
* quantize the residual input of an Add that follows a quantized weighted layer, so TensorRT can
  fuse the Add into that layer's INT8 kernel (the first weighted input is the one fused);
* one Q/DQ per tensor, shared by every consumer (so a tensor that feeds a Concat, a MaxPool or a
  Resize and a weighted layer has one scale, which TensorRT moves through those layers);
* layers with no INT8 kernel (activations, Softmax, Sigmoid, Mul, reductions) get no Q/DQ, and
  nodes named in ``keep_float`` (``[quantize] ignored_*`` or the accuracy loop) none either: TensorRT
  runs them in FP16/FP32.

``lint`` checks any Q/DQ model against those rules, one finding per offending node.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeport.backends.base import float_tail, ignored_nodes

__all__ = ["float_tail", "ignored_nodes", "lint", "naive_qdq", "weighted_nodes", "write_qdq"]
PLACEMENT_VERSION = 2  # bumped whenever placement changes, so cached Q/DQ models are written again
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Single-input ops TensorRT moves a DequantizeLinear through (a DQ -> Resize -> Concat input counts as quantized).
COMMUTING = frozenset({"MaxPool", "Resize", "Upsample", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                       "Slice", "Identity", "Pad", "DepthToSpace", "SpaceToDepth"})
# What a DQ may feed: weighted layers, layers with INT8 kernels, and the ops above. Anything else (Relu, Sigmoid,
# Softmax, Mul, HardSwish, ReduceMean...) runs in float after a reformat.
INT8_CONSUMERS = frozenset(WEIGHTED_OPS) | COMMUTING | {"Add", "Concat", "AveragePool", "GlobalAveragePool",
                                                       "GlobalMaxPool", "Split"}
RULES = {
    "QDQ001": "a QuantizeLinear feeds only its DequantizeLinear, with the same scale and zero point",
    "QDQ002": "symmetric: zero points are int8 zeros",
    "QDQ003": "scales are constant, positive and finite",
    "QDQ004": "activations are quantized per tensor (one scale)",
    "QDQ005": "weights per channel on the output-channel axis (Conv/Gemm(transB) 0, ConvTranspose 1)",
    "QDQ006": "a weighted layer has both its input and its weight quantized, or neither",
    "QDQ007": "a DequantizeLinear feeds only layers with INT8 kernels or that Q/DQ moves through",
    "QDQ008": "a tensor is quantized once (one scale for all its consumers)",
    "QDQ009": "the quantized inputs of a Concat share one scale, and all of them are quantized",
    "QDQ010": "the residual input of an Add after a quantized weighted layer is quantized (so it fuses)",
    "QDQ011": "every weighted layer is quantized unless it was kept in float on purpose",
}


@dataclass
class Finding:
    """One rule broken by one node."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule} {self.node}: {self.message}"


def weight_axis(node: Any) -> int:
    """The output-channel axis of a weighted node's weight (where its per-channel scales run)."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return 0


def weighted_nodes(onnx_path: Path) -> set[str]:
    """Names of the nodes ``write_qdq`` quantizes unless kept in float (weighted layers with float weights)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: i for i in graph.initializer}
    return {n.name for n in graph.node if _is_weighted(n, inits)}


def _is_weighted(node: Any, inits: dict[str, Any]) -> bool:
    from onnx import TensorProto

    return (node.op_type in WEIGHTED_OPS and len(node.input) >= 2 and node.input[1] in inits
            and inits[node.input[1]].data_type == TensorProto.FLOAT)


def write_qdq(onnx_path: Path, ranges: dict[str, float], out: Path,
              keep_float: set[str] | None = None) -> dict[str, int]:
    """The Q/DQ ONNX by TensorRT's placement rules (module docstring); counts of what was quantized.

    ``ranges`` maps tensor names to amax (|x| range): the scale is amax / 127.
    """
    import onnx
    from onnx import helper, numpy_helper

    from edgeport.backends.tensorrt.calib_cache import scale_of

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep_float = keep_float or set()
    producer = {o: n for n in graph.node for o in n.output}
    quantized = {n.name for n in graph.node if n.name not in keep_float and _is_weighted(n, inits)}
    new_nodes: list[Any] = []
    done: dict[str, str] = {}  # tensor -> its dequantized name (one Q/DQ per tensor, shared by its consumers)
    counts = {"activations": 0, "weights": 0, "residuals": 0, "kept_float": 0}

    def zp(name: str, n: int | None = None) -> str:
        graph.initializer.append(numpy_helper.from_array(np.zeros(n, np.int8) if n else np.array(0, np.int8), name))
        return name

    def activation(tensor: str) -> str:
        if tensor in done:
            return done[tensor]
        if tensor not in ranges:
            return tensor
        s, z = f"{tensor}_edgeport_scale", zp(f"{tensor}_edgeport_zp")
        graph.initializer.append(numpy_helper.from_array(np.array(scale_of(ranges[tensor]), np.float32), s))
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tensor}_q"], name=f"{tensor}_Q"))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}_q", s, z], [f"{tensor}_dq"],
                                          name=f"{tensor}_DQ"))
        done[tensor] = f"{tensor}_dq"
        counts["activations"] += 1
        return done[tensor]

    weights_done: dict[tuple[str, int], str] = {}

    def weight(name: str, axis: int) -> str:
        """One Q/DQ per weight, shared by every layer that reads it (RetinaNet's head runs the same convolutions
        on every pyramid level)."""
        if (name, axis) in weights_done:
            return weights_done[name, axis]
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        reduce = tuple(d for d in range(w.ndim) if d != axis)
        amax = np.abs(w).max(axis=reduce) if reduce else np.abs(w)
        scales = (np.maximum(amax, 1e-8) / 127.0).astype(np.float32)
        s, z = f"{name}_edgeport_wscale", zp(f"{name}_edgeport_wzp", len(scales))
        graph.initializer.append(numpy_helper.from_array(scales, s))
        new_nodes.append(helper.make_node("QuantizeLinear", [name, s, z], [f"{name}_q"], name=f"{name}_Q", axis=axis))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", s, z], [f"{name}_dq"], name=f"{name}_DQ",
                                          axis=axis))
        counts["weights"] += 1
        weights_done[name, axis] = f"{name}_dq"
        return f"{name}_dq"

    for node in graph.node:
        if node.name in keep_float:
            counts["kept_float"] += int(node.op_type in WEIGHTED_OPS)
        elif node.name in quantized:
            node.input[0] = activation(node.input[0])
            node.input[1] = weight(node.input[1], weight_axis(node))
        elif node.op_type == "Add" and len(node.input) == 2:
            fused = [i for i, t in enumerate(node.input) if t in producer and producer[t].name in quantized]
            if fused:
                other = 1 - fused[0]
                if node.input[other] not in inits and node.input[other] in ranges:
                    node.input[other] = activation(node.input[other])
                    counts["residuals"] += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(_toposort(new_nodes, [i.name for i in graph.input] + list(inits)))
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return counts


def _toposort(nodes: list[Any], available: Iterable[str]) -> list[Any]:
    """Nodes ordered so every input is produced before it is used (Q/DQ pairs join late)."""
    ready = set(available) | {""}
    produced_by = {o: n for n in nodes for o in n.output}
    out, placed = [], set()

    def place(n: Any) -> None:
        if id(n) in placed:
            return
        for i in n.input:
            if i not in ready and i in produced_by:
                place(produced_by[i])
        placed.add(id(n))
        out.append(n)
        ready.update(n.output)

    for n in nodes:
        place(n)
    return out


# ---------------------------------------------------------------- lint
def lint(model_or_path: Any, kept_float: Iterable[str] | None = None) -> list[Finding]:
    """Every way a Q/DQ model breaks TensorRT's placement rules (``RULES``), one finding per node and rule.

    ``kept_float``: the weighted layers left in float on purpose (the manifest's list); when given, any other
    weighted layer without Q/DQ is a finding (QDQ011).
    """
    import onnx
    from onnx import numpy_helper

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else \
        onnx.load(str(model_or_path), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    found: list[Finding] = []

    def add(rule: str, node: Any, message: str) -> None:
        found.append(Finding(rule, node.name or f"<{node.op_type}>", message))

    def const(name: str) -> np.ndarray | None:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            attr = next((a for a in consts[name].attribute if a.name == "value"), None)
            return numpy_helper.to_array(attr.t) if attr is not None else None
        return None

    def qparams(node: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
        return const(node.input[1]), (const(node.input[2]) if len(node.input) > 2 and node.input[2] else None)

    def axis_of(node: Any) -> int:
        return next((a.i for a in node.attribute if a.name == "axis"), 1)

    def dq_of(tensor: str) -> Any | None:
        p = producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def is_const(tensor: str) -> bool:
        return tensor in inits or tensor in consts

    def dq_through(tensor: str) -> Any | None:
        """The DequantizeLinear behind ``tensor``, through ops TensorRT moves it through."""
        seen = 0
        while seen < 64:
            p = producer.get(tensor)
            if p is None:
                return None
            if p.op_type == "DequantizeLinear":
                return p
            if p.op_type not in COMMUTING or not p.input:
                return None
            tensor, seen = p.input[0], seen + 1
        return None

    # QDQ001-QDQ003 and QDQ008: the pairs themselves.
    q_by_tensor: dict[str, list[Any]] = {}
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale, zero = qparams(n)
        if scale is None or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            add("QDQ003", n, "scale is not a positive finite constant")
        if len(n.input) > 2 and n.input[2] and (zero is None or zero.dtype != np.int8 or np.any(zero != 0)):
            add("QDQ002", n, "zero point is not int8 zero (TensorRT quantizes symmetrically)")
        if n.op_type == "QuantizeLinear":
            q_by_tensor.setdefault(n.input[0], []).append(n)
            users = consumers.get(n.output[0], [])
            bad = [u for u in users if u.op_type != "DequantizeLinear" or list(u.input[1:]) != list(n.input[1:])]
            if bad or not users:
                add("QDQ001", n, "feeds " + (", ".join(f"{u.op_type} {u.name}" for u in bad) if bad else "nothing")
                    + " instead of its own DequantizeLinear")
        else:
            src = producer.get(n.input[0])
            if not is_const(n.input[0]) and (src is None or src.op_type != "QuantizeLinear"):
                add("QDQ001", n, "dequantizes a tensor no QuantizeLinear produced")
    for tensor, qs in q_by_tensor.items():
        scales = {tuple(np.ravel(qparams(q)[0] if qparams(q)[0] is not None else [])) for q in qs}
        if len(qs) > 1 and len(scales) > 1:
            add("QDQ008", qs[1], f"{tensor} is quantized {len(qs)} times with different scales")

    quantized_weighted: set[str] = set()
    for n in graph.node:
        # QDQ004/QDQ007: where each activation DQ goes.
        if n.op_type == "DequantizeLinear":
            src = producer.get(n.input[0])
            is_weight = src is not None and src.op_type == "QuantizeLinear" and is_const(src.input[0]) \
                or is_const(n.input[0])
            scale = qparams(n)[0]
            if not is_weight and scale is not None and scale.size != 1:
                add("QDQ004", n, f"activation quantized per channel ({scale.size} scales)")
            for u in consumers.get(n.output[0], []):
                if u.op_type not in INT8_CONSUMERS:
                    add("QDQ007", n, f"feeds {u.op_type} {u.name}, which has no INT8 kernel in TensorRT "
                                     "(a reformat to float and back, no speed gained)")
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        # QDQ005/QDQ006: weighted layers.
        data_dq, w_dq = dq_of(n.input[0]), dq_of(n.input[1])
        w_const = is_const(n.input[1]) or (w_dq is not None and _weight_source_const(w_dq, producer, is_const))
        if not w_const:
            continue  # an activation x activation MatMul: not a weighted layer
        if (data_dq is None) != (w_dq is None):
            add("QDQ006", n, ("input" if data_dq is None else "weight") + " is float while the "
                + ("weight" if data_dq is None else "input") + " is quantized: the layer runs in float")
        if w_dq is not None:
            quantized_weighted.add(n.name)
            scale = qparams(w_dq)[0]
            src = producer.get(w_dq.input[0])
            wname = src.input[0] if src is not None and src.op_type == "QuantizeLinear" else w_dq.input[0]
            w = const(wname)
            want = weight_axis(n)
            if scale is not None and w is not None and scale.size > 1:
                if axis_of(w_dq) % w.ndim != want or scale.size != w.shape[want]:
                    add("QDQ005", n, f"weight scales run on axis {axis_of(w_dq)} ({scale.size} of them); "
                                     f"TensorRT wants axis {want} ({w.shape[want]} channels)")
    # QDQ009: Concat inputs.
    for n in graph.node:
        if n.op_type != "Concat":
            continue
        dqs = [dq_through(t) for t in n.input]
        if any(d is not None for d in dqs):
            if any(d is None and not is_const(t) for d, t in zip(dqs, n.input)):
                add("QDQ009", n, "some inputs are quantized and some are not (TensorRT cannot concatenate in INT8)")
            scales = {float(np.ravel(qparams(d)[0])[0]) for d in dqs if d is not None and qparams(d)[0] is not None}
            if len(scales) > 1:
                add("QDQ009", n, f"inputs quantized with {len(scales)} different scales; one shared scale "
                                 "lets TensorRT concatenate in INT8 without requantizing")
    # QDQ010: residual Adds.
    for n in graph.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        fused = [i for i, t in enumerate(n.input) if t in producer and producer[t].name in quantized_weighted]
        if fused:
            other = n.input[1 - fused[0]]
            if not is_const(other) and dq_through(other) is None:
                add("QDQ010", n, f"residual input {other} is float: TensorRT cannot fuse the Add into "
                                 f"{producer[n.input[fused[0]]].name}'s INT8 kernel")
    # QDQ011: weighted layers left in float without being asked to.
    if kept_float is not None:
        kept = set(kept_float)
        for n in graph.node:
            if n.op_type in WEIGHTED_OPS and n.name not in quantized_weighted and n.name not in kept \
                    and len(n.input) >= 2 and is_const(n.input[1]):
                add("QDQ011", n, "weighted layer has no Q/DQ and is not in the kept-in-float list")
    return found


def _weight_source_const(dq: Any, producer: dict[str, Any], is_const: Any) -> bool:
    src = producer.get(dq.input[0])
    return is_const(dq.input[0]) or (src is not None and src.op_type == "QuantizeLinear" and is_const(src.input[0]))


def naive_qdq(onnx_path: Path, ranges: dict[str, float], out: Path) -> None:
    """A Q/DQ pair before every input of every node (what an unguided tool writes): ``lint`` must fail it.
    For tests and comparisons; never shipped."""
    import onnx
    from onnx import helper, numpy_helper

    from edgeport.backends.tensorrt.calib_cache import scale_of

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    new: list[Any] = []
    for node in list(graph.node):
        for k, t in enumerate(node.input):
            if t in inits or t not in ranges:
                continue
            tag = f"{t}_naive{len(new)}"
            graph.initializer.append(numpy_helper.from_array(np.array(scale_of(ranges[t]), np.float32), tag + "_s"))
            graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), tag + "_z"))
            new.append(helper.make_node("QuantizeLinear", [t, tag + "_s", tag + "_z"], [tag + "_q"], name=tag + "_Q"))
            new.append(helper.make_node("DequantizeLinear", [tag + "_q", tag + "_s", tag + "_z"], [tag + "_dq"],
                                        name=tag + "_DQ"))
            node.input[k] = tag + "_dq"
        new.append(node)
    del graph.node[:]
    graph.node.extend(_toposort(new, [i.name for i in graph.input] + list(inits)))
    onnx.save(model, str(out))
