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
    from edgeport.quantize.ranges import nonnegative_tensors

    got = nonnegative_tensors(_graph())
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


class _Views:
    """A model that shows its tensors as views into buffers it overwrites on every run, one pair at a time (as
    the TFLite interpreter with preserved tensors does): two tensors, x and -2x."""

    names = ["a", "b"]
    derived: dict[str, str] = {}
    footprint = 0

    def __init__(self) -> None:
        self.buf = {"a": np.empty((1, 4, 8, 8), np.float32), "b": np.empty((1, 4, 8, 8), np.float32)}

    def fork(self) -> _Views:
        return _Views()

    def run(self, x: np.ndarray):
        np.copyto(self.buf["a"], x)
        np.multiply(x, -2.0, out=self.buf["b"])
        for name in self.names:
            yield name, self.buf[name][:]


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_ranges_from_views_overwritten_by_the_next_image_match_copies(method):
    """A model that hands out views valid until its next run (one tensor at a time) gives the same ranges as the
    values themselves: nothing a collector keeps refers to a view."""
    from edgeport.quantize.ranges import measure

    rng = np.random.default_rng(0)
    data = rng.standard_normal((40, 1, 4, 8, 8)).astype(np.float32)[:, 0] * np.linspace(0.5, 3, 40)[:, None, None, None]
    got = measure(_Views(), data.astype(np.float32), method, "views", steps=lambda r, d: r)
    every = np.abs(data).ravel()
    k = max(1, every.size - int(np.ceil(0.9999 * every.size)) + 1)  # the K-th largest is the 99.99th percentile
    want = every.max() if method == "max" else np.sort(every)[-k]
    assert got["a"] == pytest.approx(float(want), rel=1e-6)
    assert got["b"] == pytest.approx(2 * float(want), rel=1e-6)


def test_workers_fit_a_quarter_of_the_memory_available(monkeypatch):
    """An instance that holds more than a quarter of the memory available gets one worker; a small one, a worker
    per core (at most 4)."""
    from edgeport.quantize import ranges

    monkeypatch.setattr(ranges.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(ranges, "_available_memory", lambda: 8 << 30)
    assert ranges._workers() == 4 and ranges._workers(1 << 20) == 4
    assert ranges._workers(1 << 30) == 2 and ranges._workers(3 << 30) == 1
    monkeypatch.setattr(ranges, "_available_memory", lambda: 0)  # unknown: by the cores
    assert ranges._workers(3 << 30) == 4
