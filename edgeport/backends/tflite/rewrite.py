"""ONNX rewrites before onnx2tf: each an exact identity in float, each for one way onnx2tf's output fails.

* ``pad_maxpools``: onnx2tf turns a padded MaxPool (ResNet's stem: k3 s2 p1; googlenet's ceil-mode pools) into
  PADV2 with -inf, whose INT8 scale becomes ~1e36 and breaks the model (XNNPACK refuses it, the reference
  kernels abort). After a ReLU-like op the input is >= 0, so padding with 0 gives the same maximum exactly.
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
    """MaxPool padding made explicit zeros where the input cannot be negative; returns how many, in place.

    Both kinds of padding: the ``pads`` attribute, and the extra end row/column ``ceil_mode=1`` implies
    (googlenet's pools), which onnx2tf also pads with -inf (scale 1.33e36 on googlenet's first conv). A
    window of a ceil-mode pool always starts inside the input or its begin padding, so it holds a real value
    >= 0 and zero padding leaves its maximum exact; the pool then runs in floor mode with no padding.
    """
    import onnx
    from onnx import helper, numpy_helper

    consts = _constants(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes: dict[str, list[int | None]] | None = None  # inferred once, and only for a ceil-mode pool
    memo: dict[str, bool] = {}
    count, new_nodes = 0, []
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type != "MaxPool" or not _non_negative(node.input[0], producer, consts, memo):
            new_nodes.append(node)
            continue
        kernel = list(attrs["kernel_shape"].ints)
        pads = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * len(kernel))
        half = len(pads) // 2
        ceil = "ceil_mode" in attrs and attrs["ceil_mode"].i == 1
        if ceil:
            if shapes is None:
                shapes = _shapes(onnx.shape_inference.infer_shapes(model))
            dims = shapes.get(node.input[0])
            if dims is None or any(d is None for d in dims[2:]):  # no static size: leave it to onnx2tf
                new_nodes.append(node)
                continue
            strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * len(kernel)
            dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * len(kernel)
            for i, (size, k, st, dl) in enumerate(zip(dims[2:], kernel, strides, dilations)):
                span = (k - 1) * dl + 1
                out = -(-(size + pads[i] + pads[half + i] - span) // st) + 1
                if (out - 1) * st >= size + pads[i]:  # the last window would start in the end padding
                    out -= 1
                pads[half + i] += max(0, (out - 1) * st + span - (size + pads[i] + pads[half + i]))
        if not any(pads) and not ceil:
            new_nodes.append(node)
            continue
        name = f"{node.name or node.output[0]}_edgeport_pad"
        if any(pads):
            const = numpy_helper.from_array(np.array([0, 0, *pads[:half], 0, 0, *pads[half:]], np.int64),
                                            f"{name}_pads")
            model.graph.initializer.append(const)
            new_nodes.append(helper.make_node("Pad", [node.input[0], const.name], [f"{name}_out"], name=name,
                                              mode="constant"))
            node.input[0] = f"{name}_out"
        if "pads" in attrs:
            attrs["pads"].ints[:] = [0] * len(pads)
        if ceil:
            attrs["ceil_mode"].i = 0
        count += 1
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return count


# Ops whose output is >= 0 when their data input is: they move, pick or take the maximum of values.
_KEEPS_SIGN = {"Concat", "MaxPool", "Reshape", "Transpose", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Slice",
               "Split", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth", "GlobalMaxPool", "AveragePool",
               "GlobalAveragePool"}


def _non_negative(tensor: str, producer: dict[str, Any], consts: dict[str, np.ndarray], memo: dict[str, bool],
                  depth: int = 0) -> bool:
    """Whether ``tensor`` can never be negative: a ReLU-like op's output, a Clip with a minimum >= 0, or what
    Concat, pooling and reshaping ops make of such tensors (googlenet's inception pools read a Concat of
    ReLUs). Unknown means no."""
    if tensor in memo:
        return memo[tensor]
    node = producer.get(tensor)
    result = False
    if node is not None and depth < 64:
        if node.op_type in _NON_NEGATIVE:
            result = True
        elif node.op_type == "Clip":
            result = len(node.input) > 1 and node.input[1] in consts and float(consts[node.input[1]].min()) >= 0
        elif node.op_type in _KEEPS_SIGN:
            data = node.input if node.op_type == "Concat" else node.input[:1]
            result = bool(data) and all(_non_negative(t, producer, consts, memo, depth + 1) for t in data)
    memo[tensor] = result
    return result


def _shapes(model: Any) -> dict[str, list[int | None]]:
    """{tensor: dims} from the graph's inputs and value_info (None for a symbolic dimension)."""
    found = {}
    for info in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = info.type.tensor_type
        if t.HasField("shape"):
            found[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return found


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
