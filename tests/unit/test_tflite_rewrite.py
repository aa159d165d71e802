"""The ONNX rewrite applied before onnx2tf: explicit zero padding for MaxPool after ReLU is exact."""
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

    from edgeport.backends.tflite.backend import pad_maxpools

    _model(tmp_path / "a.onnx", "Relu")
    assert pad_maxpools(tmp_path / "a.onnx", tmp_path / "b.onnx") == 1
    rewritten = onnx.load(str(tmp_path / "b.onnx"))
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Pad", "MaxPool"]
    x = np.random.default_rng(0).normal(size=(1, 4, 9, 10)).astype(np.float32) - 1.0  # mostly negative
    np.testing.assert_array_equal(_run(tmp_path / "a.onnx", x), _run(tmp_path / "b.onnx", x))


def test_maxpool_on_signed_input_is_left_alone(tmp_path):
    from edgeport.backends.tflite.backend import pad_maxpools

    _model(tmp_path / "a.onnx", "Neg")
    assert pad_maxpools(tmp_path / "a.onnx", tmp_path / "b.onnx") == 0
