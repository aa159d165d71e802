"""Which tensors the range pass can skip reading, and the percentile's row filter, on small hand-built cases."""
from __future__ import annotations

import numpy as np
import pytest


def _graph():
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Resize", ["r", "", "scales"], ["lin"], mode="linear"),
        helper.make_node("Resize", ["r", "", "scales"], ["cub"], mode="cubic"),
        helper.make_node("Resize", ["x", "", "scales"], ["big"], mode="nearest"),
        helper.make_node("Neg", ["big"], ["neg"]),
        helper.make_node("Relu", ["neg"], ["r2"]),
        helper.make_node("Concat", ["lin", "r2"], ["cat_pos"], axis=1),
        helper.make_node("MaxPool", ["cat_pos"], ["pool2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["lin", "big"], ["cat_mixed"], axis=1),
        helper.make_node("Sigmoid", ["x"], ["sig"]),
        helper.make_node("MaxPool", ["sig"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    scales = helper.make_tensor("scales", f, [4], [1.0, 1.0, 2.0, 2.0])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info(n, f, None) for n in ("cub", "pool2", "cat_mixed",
                                                                                     "pool")],
                              [scales])
    return helper.make_model(graph)


def test_nonnegative_follows_the_sign_through_the_graph():
    from edgeport.quantize.ranges import _nonnegative

    got = _nonnegative(_graph())
    assert {"r", "lin", "r2", "cat_pos", "pool2", "sig", "pool"} <= got
    assert not {"x", "big", "neg", "cub", "cat_mixed"} & got  # cubic Resize overshoots; a Concat with a signed input


def test_plan_reads_each_value_once():
    from edgeport.quantize.ranges import _float_tensors, _plan

    model = _graph()
    same, derived, unions = _plan(model, _float_tensors(model))
    assert same == {"neg": "r2"}  # read only by a Relu: takes the Relu's range
    assert derived == {"r": "x"}  # x is read anyway (it is the input): its Relu comes from that read
    assert unions == {"cat_pos": ["lin", "r2"]}  # cat_mixed is a graph output: read as it is


@pytest.mark.parametrize("absolute", [False, True])
def test_above_finds_exactly_the_values_past_the_floor(absolute, monkeypatch):
    from edgeport.quantize import collectors

    monkeypatch.setattr(collectors, "ROW", 64)
    rng = np.random.default_rng(0)
    v = rng.standard_t(2, size=64 * 40 + 37).astype(np.float32)  # heavy tails both ways, a short last row
    for floor in (0.0, 1.0, 5.0, float(np.abs(v).max()), -1.0 if not absolute else 0.5):
        a = np.abs(v) if absolute else v
        want = np.sort(a[a > floor])
        assert np.array_equal(np.sort(collectors._above(v, floor, absolute)), want), floor
