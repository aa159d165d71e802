"""TensorRT Q/DQ: layers matched by [quantize] ignored_* get no Q/DQ and run in float in ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import has

pytestmark = pytest.mark.skipif(not (has("onnx") and has("onnxruntime")), reason="onnx not installed")


def _two_convs(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="/enc/conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="/enc/relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="/head/conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


def test_ignored_layers_stay_float(tmp_path):
    import onnx
    import onnxruntime as ort

    from edgeport.backends.tensorrt.qdq import ignored_nodes, write_qdq
    from edgeport.config import QuantizeConfig
    from edgeport.errors import ConversionError
    from edgeport.quantize.ranges import collect_ranges

    src = tmp_path / "m.onnx"
    _two_convs(src)
    x = np.random.default_rng(1).normal(size=(16, 3, 8, 8)).astype(np.float32)
    amax = collect_ranges(src, x, "max")
    assert ignored_nodes(src, QuantizeConfig(int8_ignore=[r"^/head/"])) == {"/head/conv2"}
    assert ignored_nodes(src, QuantizeConfig(int8_ignore_names=["/enc/conv1"], int8_ignore_types=["Relu"])) == \
        {"/enc/conv1", "/enc/relu1"}
    for bad, words in ((QuantizeConfig(int8_ignore=["^/tail/"]), "matches no layer"),
                       (QuantizeConfig(int8_ignore_names=["/enc/conv9"]), "no layer of the model is named"),
                       (QuantizeConfig(int8_ignore_types=["Softmax"]), "has no 'Softmax' layer")):
        with pytest.raises(ConversionError, match=words):
            ignored_nodes(src, bad)
    full, part = tmp_path / "full.onnx", tmp_path / "part.onnx"
    assert write_qdq(src, amax, full) == {"activations": 2, "weights": 2, "residuals": 0, "kept_float": 0}
    assert write_qdq(src, amax, part, {"/head/conv2"}) == {"activations": 1, "weights": 1, "residuals": 0,
                                                           "kept_float": 1}
    conv2 = next(n for n in onnx.load(str(part)).graph.node if n.name == "/head/conv2")
    assert list(conv2.input) == ["r1", "w2"]  # untouched: float input and weight

    def run(p):
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x[:1]})[0]

    ref = run(src)
    err_full, err_part = np.abs(run(full) - ref).max(), np.abs(run(part) - ref).max()
    assert 0 < err_part < err_full  # fewer quantised layers, less error, still some (conv1 is INT8)
