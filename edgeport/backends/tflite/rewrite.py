"""ONNX rewrites before onnx2tf: each an exact identity in float, each for one way onnx2tf's output fails.

* ``pad_maxpools``: onnx2tf turns a padded MaxPool (ResNet's stem: k3 s2 p1) into PADV2 with -inf, whose INT8
  scale becomes ~1e36 and breaks the model (XNNPACK refuses it, the reference kernels abort). After a
  ReLU-like op the input is >= 0, so padding with 0 gives the same maximum exactly.
* ``fuse_gelu``: torch exports exact GELU (convnext, vit, swin, maxvit) as x * 0.5 * (1 + Erf(x / sqrt 2)).
  TFLite has no builtin Erf (FlexErf, which LiteRT refuses); onnx2tf's pseudo-Erf divides by |x| + 1e-11,
  which full-integer INT8 quantizes to a zero divisor ("tflite/kernels/div.cc data[i] != zero_point",
  vit_b_16 here); its own GELU pattern match (onnx2tf ops/Div.py, PINTO0309/onnx2tf#465) did not fire on
  torch's export, and an ONNX Gelu node (onnx2tf ops/Gelu.py) came out with the layout of the ops after a
  4-D GELU wrong (0.2 of the output range). So the pattern becomes plain elementwise ops onnx2tf handles
  everywhere, exact to 1.5e-7, with no sign and no division that can reach zero.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_NON_NEGATIVE = {"Relu", "Sigmoid", "Softmax", "Softplus"}


def rewrite_for_onnx2tf(src: Path, dest: Path) -> dict[str, int]:
    """Copy the ONNX with every rewrite applied; {rewrite: how many places}."""
    import onnx

    model = onnx.load(str(src))
    counts = {"maxpool_pads": pad_maxpools(model), "gelu": fuse_gelu(model)}
    onnx.save(model, str(dest))
    return counts


def _constants(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def pad_maxpools(model: Any) -> int:
    """MaxPool padding made explicit zeros where the input cannot be negative; returns how many, in place."""
    from onnx import helper, numpy_helper

    consts = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    count, new_nodes = 0, []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        pads = list(attrs["pads"].ints) if "pads" in attrs else []
        src_node = producer.get(node.input[0]) if node.input else None
        clip_ok = (src_node is not None and src_node.op_type == "Clip" and len(src_node.input) > 1
                   and src_node.input[1] in consts and float(consts[src_node.input[1]].min()) >= 0)
        if node.op_type == "MaxPool" and any(pads) and src_node is not None and \
                (src_node.op_type in _NON_NEGATIVE or clip_ok):
            half = len(pads) // 2
            name = f"{node.name or node.output[0]}_edgeport_pad"
            const = numpy_helper.from_array(np.array([0, 0, *pads[:half], 0, 0, *pads[half:]], np.int64),
                                            f"{name}_pads")
            model.graph.initializer.append(const)
            new_nodes.append(helper.make_node("Pad", [node.input[0], const.name], [f"{name}_out"], name=name,
                                              mode="constant"))
            node.input[0] = f"{name}_out"
            attrs["pads"].ints[:] = [0] * len(pads)
            count += 1
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return count


# Abramowitz & Stegun 7.1.26: erf(u) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-u^2), t = 1 / (1 + p u),
# for u >= 0, absolute error below 1.5e-7.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def fuse_gelu(model: Any) -> int:
    """Div(x, sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5 rewritten without Erf and without a sign; returns how
    many, in place. Since x sign(x) = |x|, GELU(x) = 0.5 x + 0.5 |x| E(|x| / sqrt 2), E(u) = erf(u) for u >= 0
    by Abramowitz & Stegun 7.1.26 (error below 1.5e-7): Abs, Mul, Add, Div (by 1 + p u >= 1, never a zero
    divisor in INT8), Exp, Sub, all TFLite builtins with INT8 kernels. Intermediate results used elsewhere
    leave the pattern alone."""
    from onnx import TensorProto, helper

    consts = _constants(model)
    users: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}

    def is_scalar(name: str, value: float) -> bool:
        c = consts.get(name)
        return c is not None and c.size == 1 and abs(float(c.ravel()[0]) - value) <= 1e-6 * max(1.0, abs(value))

    def only_user(node: Any, op: str) -> Any:
        out = node.output[0]
        found = users.get(out, [])
        return found[0] if len(found) == 1 and found[0].op_type == op and out not in outputs else None

    def other(node: Any, name: str) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    scalars: dict[float, str] = {}

    def scalar(value: float) -> str:
        if value not in scalars:
            scalars[value] = f"edgeport_gelu_c{len(scalars)}"
            model.graph.initializer.append(helper.make_tensor(scalars[value], TensorProto.FLOAT, [], [value]))
        return scalars[value]

    dropped: set[int] = set()
    replace: dict[int, list[Any]] = {}
    for div in model.graph.node:
        if div.op_type != "Div" or len(div.input) != 2 or not is_scalar(div.input[1], float(np.sqrt(2.0))):
            continue
        x = div.input[0]
        erf = only_user(div, "Erf")
        add = erf and only_user(erf, "Add")
        if not add or not is_scalar(other(add, erf.output[0]) or "", 1.0):
            continue
        mul = only_user(add, "Mul")
        if not mul or other(mul, add.output[0]) != x:
            continue
        half = only_user(mul, "Mul")
        if not half or not is_scalar(other(half, mul.output[0]) or "", 0.5):
            continue
        dropped |= {id(div), id(erf), id(add), id(mul)}
        prefix = (div.name or div.output[0]).rsplit("/", 1)[0] + f"/gelu_edgeport{len(replace)}"
        nodes = _gelu_nodes(x, half.output[0], prefix, scalar)
        replace[id(half)] = nodes
    if not replace:
        return 0
    kept: list[Any] = []
    for n in model.graph.node:
        if id(n) not in dropped:
            kept.extend(replace.get(id(n), [n]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(replace)


def _gelu_nodes(x: str, out: str, prefix: str, scalar: Any) -> list[Any]:
    """GELU(x) into ``out`` as 0.5 x + 0.5 |x| E(|x| / sqrt 2) (see fuse_gelu); ``scalar(v)`` names a constant."""
    from onnx import helper

    nodes: list[Any] = []

    def op(kind: str, *inputs: str, to: str | None = None) -> str:
        name = to or f"{prefix}/{kind}{len(nodes)}"
        nodes.append(helper.make_node(kind, list(inputs), [name], name=f"{prefix}/{kind}{len(nodes)}"))
        return name

    a = op("Abs", x)
    u = op("Mul", a, scalar(float(1.0 / np.sqrt(2.0))))
    t = op("Div", scalar(1.0), op("Add", op("Mul", u, scalar(_AS_P)), scalar(1.0)))
    poly = op("Mul", t, scalar(_AS_A[4]))
    for coef in reversed(_AS_A[:4]):
        poly = op("Mul", t, op("Add", poly, scalar(coef)))
    e = op("Exp", op("Neg", op("Mul", u, u)))
    erf_u = op("Sub", scalar(1.0), op("Mul", poly, e))
    op("Add", op("Mul", x, scalar(0.5)), op("Mul", op("Mul", a, scalar(0.5)), erf_u), to=out)
    return nodes
