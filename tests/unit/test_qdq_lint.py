"""The Q/DQ lint: our placement passes TensorRT's rules, a naive one and hand-broken ones fail, by name."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import has

pytestmark = pytest.mark.skipif(not (has("onnx") and has("onnxruntime")), reason="onnx not installed")


def _resnet_like(path):
    """stem conv -> relu -> maxpool -> [conv -> relu -> conv] + residual -> relu -> concat(with a branch conv)
    -> conv head -> sigmoid: every placement rule has something to bite on."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32),
                                       name)

    inits = [w("w_stem", 8, 3, 3, 3), w("w_a", 8, 8, 3, 3), w("w_b", 8, 8, 3, 3), w("w_br", 8, 8, 1, 1),
             w("w_head", 4, 16, 1, 1)]
    p1 = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["s"], name="/stem/conv", pads=p1),
             helper.make_node("Relu", ["s"], ["sr"], name="/stem/relu"),
             helper.make_node("MaxPool", ["sr"], ["mp"], name="/stem/pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["mp", "w_a"], ["a"], name="/block/conv_a", pads=p1),
             helper.make_node("Relu", ["a"], ["ar"], name="/block/relu_a"),
             helper.make_node("Conv", ["ar", "w_b"], ["b"], name="/block/conv_b", pads=p1),
             helper.make_node("Add", ["b", "mp"], ["res"], name="/block/add"),
             helper.make_node("Relu", ["res"], ["rr"], name="/block/relu"),
             helper.make_node("Conv", ["rr", "w_br"], ["br"], name="/branch/conv"),
             helper.make_node("Concat", ["rr", "br"], ["cat"], name="/cat", axis=1),
             helper.make_node("Conv", ["cat", "w_head"], ["h"], name="/head/conv"),
             helper.make_node("Sigmoid", ["h"], ["y"], name="/head/sigmoid")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))


@pytest.fixture
def resnet_like(tmp_path):
    from edgeport.quantize.ranges import collect_ranges

    src = tmp_path / "m.onnx"
    _resnet_like(src)
    x = np.random.default_rng(1).normal(size=(8, 3, 16, 16)).astype(np.float32)
    return src, collect_ranges(src, x, "max"), x


def _rules(findings):
    return {f.rule for f in findings}


def test_our_placement_passes_and_follows_tensorrts_rules(resnet_like, tmp_path):
    import onnx
    import onnxruntime as ort

    from edgeport.backends.tensorrt.qdq import lint, write_qdq

    src, amax, x = resnet_like
    out = tmp_path / "qdq.onnx"
    counts = write_qdq(src, amax, out)
    assert counts == {"activations": 5, "weights": 5, "residuals": 1, "kept_float": 0}
    assert lint(out, kept_float=[]) == []
    graph = onnx.load(str(out)).graph
    add = next(n for n in graph.node if n.name == "/block/add")
    assert list(add.input) == ["b", "mp_dq"]  # the residual input quantized, the fused conv's output not
    for n in graph.node:  # no Q on any weighted layer's output, no DQ into Relu or Sigmoid
        if n.op_type == "QuantizeLinear":
            assert n.input[0] not in {"s", "a", "b", "br", "h"}
    cat_inputs = [n for n in graph.node if n.name == "/cat"][0].input
    assert list(cat_inputs) == ["rr", "br"]  # the Concat stays float; its output has one scale at the head
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x[:1]})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x[:1]})[0]
    assert 0 < np.abs(got - ref).max() < 0.05


def test_a_naive_qdq_model_fails_the_lint_by_node(resnet_like, tmp_path):
    from edgeport.backends.tensorrt.qdq import lint, naive_qdq

    src, amax, _ = resnet_like
    naive = tmp_path / "naive.onnx"
    naive_qdq(src, amax, naive)
    findings = lint(naive)
    assert {"QDQ006", "QDQ007"} <= _rules(findings)
    text = "\n".join(map(str, findings))
    assert "/stem/relu" in text and "/head/sigmoid" in text and "/block/conv_a" in text


def test_the_old_placement_fails_the_residual_rule(resnet_like, tmp_path):
    import onnx

    from edgeport.backends.tensorrt.qdq import lint, write_qdq

    src, amax, _ = resnet_like
    out = tmp_path / "qdq.onnx"
    write_qdq(src, amax, out)
    model = onnx.load(str(out))
    add = next(n for n in model.graph.node if n.name == "/block/add")
    add.input[1] = "mp"  # the residual left in float, as edgeport placed it before
    findings = lint(model)
    assert [(f.rule, f.node) for f in findings] == [("QDQ010", "/block/add")]


def test_hand_broken_models_fail_the_rule_they_break(resnet_like, tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgeport.backends.tensorrt.qdq import lint, write_qdq

    src, amax, _ = resnet_like
    out = tmp_path / "qdq.onnx"
    write_qdq(src, amax, out)

    def broken(edit):
        model = onnx.load(str(out))
        edit(model, {i.name: i for i in model.graph.initializer}, {n.name: n for n in model.graph.node})
        return {(f.rule, f.node) for f in lint(model, kept_float=[])}

    def rewire(node, **inputs):  # node's inputs by position: rewire("/cat", i0="rr_dq")
        def edit(model, inits, nodes):
            for k, tensor in inputs.items():
                nodes[node].input[int(k[1:])] = tensor
        return edit

    def zero_point(model, inits, nodes):
        inits["mp_edgeport_zp"].CopyFrom(numpy_helper.from_array(np.array(3, np.int8), "mp_edgeport_zp"))

    def negative_scale(model, inits, nodes):
        inits["ar_edgeport_scale"].CopyFrom(numpy_helper.from_array(np.array(-0.1, np.float32), "ar_edgeport_scale"))

    def wrong_axis(model, inits, nodes):
        nodes["w_a_DQ"].attribute[0].i = 1

    float_weight = rewire("/head/conv", i1="w_head")
    unasked_float = rewire("/branch/conv", i0="rr", i1="w_br")
    dq_into_relu = rewire("/stem/relu", i0="x_dq")
    concat_mixed = rewire("/cat", i0="rr_dq")

    assert ("QDQ002", "mp_Q") in broken(zero_point)
    assert ("QDQ003", "ar_Q") in broken(negative_scale)
    assert ("QDQ005", "/block/conv_a") in broken(wrong_axis)
    assert ("QDQ006", "/head/conv") in broken(float_weight)
    assert ("QDQ011", "/branch/conv") in broken(unasked_float)
    assert ("QDQ007", "x_DQ") in broken(dq_into_relu)
    assert ("QDQ009", "/cat") in broken(concat_mixed)


def test_kept_float_layers_are_not_findings(resnet_like, tmp_path):
    from edgeport.backends.tensorrt.qdq import lint, write_qdq

    src, amax, _ = resnet_like
    out = tmp_path / "qdq.onnx"
    counts = write_qdq(src, amax, out, {"/block/conv_b"})
    assert counts["kept_float"] == 1 and counts["residuals"] == 0  # nothing to fuse into a float conv
    assert lint(out, kept_float=["/block/conv_b"]) == []
    assert [(f.rule, f.node) for f in lint(out, kept_float=[])] == [("QDQ011", "/block/conv_b")]


def test_a_weight_shared_by_two_convolutions_gets_one_qdq(tmp_path):
    """RetinaNet's head runs one set of convolutions on every pyramid level: one weight initializer read by several
    Conv nodes. It gets one Q/DQ pair, read by both, and the model stays valid and passes the lint."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeport.backends.tensorrt.qdq import lint, write_qdq
    from edgeport.quantize.ranges import collect_ranges

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w_shared"),
             numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w_down")]
    nodes = [helper.make_node("Conv", ["x", "w_shared"], ["a"], name="/level0/conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w_down"], ["d"], name="/down", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["d"], ["dr"], name="/down/relu"),
             helper.make_node("Slice", ["dr", "st", "en", "ax"], ["ds"], name="/slice"),
             helper.make_node("Conv", ["ds", "w_shared4"], ["b"], name="/level1/conv", pads=[1, 1, 1, 1])]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("st", 0), ("en", 3), ("ax", 1))]
    # the second level reads 3 channels too, so it can share w_shared: slice the first 3 of 4 channels
    nodes[-1].input[1] = "w_shared"
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, 16, 16]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    src, out = tmp_path / "shared.onnx", tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(src))
    x = rng.normal(size=(4, 3, 16, 16)).astype(np.float32)
    counts = write_qdq(src, collect_ranges(src, x, "max"), out)
    assert counts["weights"] == 2  # w_shared once, w_down once
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    readers = [n.name for n in model.graph.node if "w_shared_dq" in n.input]
    assert readers == ["/level0/conv", "/level1/conv"]
    assert lint(out, kept_float=[]) == []
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x[:1]})


def test_unsigned_twin_quantizes_what_cannot_be_negative_unsigned_and_errs_less(resnet_like, tmp_path):
    """TensorRT's symmetric INT8 gives a Relu's output 128 levels; the unsigned twin (the agreement TensorRT is held
    to, edgeport.backends.tensorrt.gap) gives the same range 256: uint8 zero points and scale amax/255 on the
    non-negative activations only, the weights and signed activations as they were, and a smaller output error."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgeport.backends.tensorrt.gap import macs, unsigned_twin
    from edgeport.backends.tensorrt.qdq import write_qdq
    from edgeport.quantize.ranges import nonnegative_tensors

    src, ranges, x = resnet_like
    sym, twin = tmp_path / "sym.onnx", tmp_path / "twin.onnx"
    write_qdq(src, ranges, sym)
    nonnegative = nonnegative_tensors(onnx.load(str(src)))
    assert unsigned_twin(sym, nonnegative, twin) == 3  # mp (pooled Relu), ar, rr; x (the image) is signed
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(twin)).graph.initializer}
    for node in onnx.load(str(twin)).graph.node:
        if node.op_type == "QuantizeLinear":
            zero, scale = inits[node.input[2]], inits[node.input[1]]
            assert (zero.dtype == np.uint8) == (node.input[0] in nonnegative), node.name
            if zero.dtype == np.uint8:
                assert scale == pytest.approx(ranges[node.input[0]] / 255.0, rel=1e-6), node.name
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, sym, twin)}
    y = {p: np.concatenate([s.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))]) for p, s in run.items()}
    err_sym, err_twin = np.abs(y[sym] - y[src]).mean(), np.abs(y[twin] - y[src]).mean()
    assert err_twin < 0.95 * err_sym, (err_twin, err_sym)
    m = macs(src)  # 16x16 stem, 8x8 after the pool
    assert m["/stem/conv"] == 8 * 16 * 16 * 3 * 9 and m["/block/conv_a"] == 8 * 8 * 8 * 8 * 9
    assert m["/head/conv"] == 4 * 8 * 8 * 16
