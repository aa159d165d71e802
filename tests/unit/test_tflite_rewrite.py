"""The ONNX rewrites applied before onnx2tf are exact: explicit zero padding for MaxPool after ReLU, GELU
as one node."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import has

pytestmark = pytest.mark.skipif(not (has("onnx") and has("onnxruntime")), reason="onnx not installed")


def _model(path, first_op: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node(first_op, ["x"], ["a"], name="act"),
             helper.make_node("MaxPool", ["a"], ["y"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_maxpool_after_relu_gets_an_exact_zero_pad(tmp_path):
    import onnx

    from edgeport.backends.tflite.rewrite import rewrite_for_onnx2tf

    _model(tmp_path / "a.onnx", "Relu")
    assert rewrite_for_onnx2tf(tmp_path / "a.onnx", tmp_path / "b.onnx")["maxpool_pads"] == 1
    rewritten = onnx.load(str(tmp_path / "b.onnx"))
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Pad", "MaxPool"]
    x = np.random.default_rng(0).normal(size=(1, 4, 9, 10)).astype(np.float32) - 1.0  # mostly negative
    np.testing.assert_array_equal(_run(tmp_path / "a.onnx", x), _run(tmp_path / "b.onnx", x))


@pytest.mark.parametrize("size", [(10, 11), (9, 9), (8, 13)])
def test_ceil_mode_maxpool_after_relu_gets_exact_zero_end_padding(tmp_path, size):
    """googlenet's pools (k3 s2 ceil_mode=1): the end row/column ceil mode adds is padded with zeros, the pool runs
    in floor mode, and the values are the same (onnx2tf padded it with -inf: scale 1.33e36 in INT8)."""
    import onnx
    from onnx import TensorProto, helper

    from edgeport.backends.tflite.rewrite import rewrite_for_onnx2tf

    h, w = size
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("MaxPool", ["a"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "a.onnx"))
    assert rewrite_for_onnx2tf(tmp_path / "a.onnx", tmp_path / "b.onnx")["maxpool_pads"] == 1
    pool = [n for n in onnx.load(str(tmp_path / "b.onnx")).graph.node if n.op_type == "MaxPool"][0]
    assert {a.name: a.i for a in pool.attribute if a.name == "ceil_mode"} == {"ceil_mode": 0}
    x = np.random.default_rng(0).normal(size=(1, 4, h, w)).astype(np.float32) - 1.0  # mostly negative
    np.testing.assert_array_equal(_run(tmp_path / "a.onnx", x), _run(tmp_path / "b.onnx", x))


def test_maxpool_after_a_concat_of_relus_is_padded_too(tmp_path):
    """googlenet's inception pool (k3 s1 p1) reads a Concat of ReLU outputs: still >= 0, still exact."""
    import onnx
    from onnx import TensorProto, helper

    from edgeport.backends.tflite.rewrite import rewrite_for_onnx2tf

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x2"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 6, 7]) for n in ("x", "x2")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "a.onnx"))
    assert rewrite_for_onnx2tf(tmp_path / "a.onnx", tmp_path / "b.onnx")["maxpool_pads"] == 1

    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {n: rng.normal(size=(1, 2, 6, 7)).astype(np.float32) - 1.0 for n in ("x", "x2")}
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for f in ("a.onnx", "b.onnx"))
    np.testing.assert_array_equal(a, b)


def test_maxpool_on_signed_input_is_left_alone(tmp_path):
    from edgeport.backends.tflite.rewrite import rewrite_for_onnx2tf

    _model(tmp_path / "a.onnx", "Neg")
    assert rewrite_for_onnx2tf(tmp_path / "a.onnx", tmp_path / "b.onnx")["maxpool_pads"] == 0


def test_gelu_loses_its_erf_and_keeps_its_values(tmp_path):
    """torch's exact GELU (Div sqrt2, Erf, Add 1, Mul x, Mul 0.5) is rewritten without Erf, sign or a division
    that can reach zero, and gives the original's values to 1e-6 over a wide input range."""
    torch = pytest.importorskip("torch")
    import onnx

    from edgeport.backends.tflite.rewrite import rewrite_for_onnx2tf

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4), torch.nn.GELU()).eval()
    torch.onnx.export(net, (torch.zeros(1, 8),), str(tmp_path / "a.onnx"), input_names=["x"], opset_version=17,
                      dynamo=False)
    assert "Erf" in {n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node}
    assert rewrite_for_onnx2tf(tmp_path / "a.onnx", tmp_path / "b.onnx")["gelu"] == 2
    fused = onnx.load(str(tmp_path / "b.onnx"))
    onnx.checker.check_model(fused)
    ops = [n.op_type for n in fused.graph.node]
    assert not {"Erf", "Sign"} & set(ops), ops
    consts = {i.name for i in fused.graph.initializer}
    assert all(n.input[0] in consts for n in fused.graph.node if n.op_type == "Div")  # only 1 / (1 + p|u|)
    for scale in (0.1, 1.0, 10.0):
        x = np.random.default_rng(0).normal(size=(1, 8)).astype(np.float32) * scale
        np.testing.assert_allclose(_run(tmp_path / "b.onnx", x), _run(tmp_path / "a.onnx", x), rtol=1e-5, atol=1e-6)


def test_gelu_with_a_shared_intermediate_is_left_alone(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgeport.backends.tflite.rewrite import rewrite_for_onnx2tf

    c = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("r2", 2 ** 0.5), ("one", 1.0), ("h", 0.5))]
    nodes = [helper.make_node("Div", ["x", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "h"], ["y"]), helper.make_node("Neg", ["e"], ["z"])]  # Erf used twice
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])], initializer=c)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "a.onnx"))
    assert rewrite_for_onnx2tf(tmp_path / "a.onnx", tmp_path / "b.onnx")["gelu"] == 0
