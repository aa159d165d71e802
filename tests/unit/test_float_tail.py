"""The float tail OpenVINO keeps for detectors: what follows the last learned layer, a DFL head's fixed-bin
convolution included; and the ``auto`` NNCF preset a hub model's own exporter decides."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeport.backends.base import tail_nodes
from edgeport.build.compile import quantize_settings
from edgeport.config import ProjectConfig


def _const(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).normal(size=shape).astype(np.float32), name)


def _graph(path: Path) -> Path:
    """boxes: learned -> Reshape -> Softmax -> bins (a DFL) -> Mul; scores: learned -> Sigmoid; attention:
    Softmax -> MatMul (values) -> MatMul (a learned projection)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w_box"], ["b0"], name="box_conv"),
        helper.make_node("Reshape", ["b0", "shape"], ["b1"], name="box_reshape"),
        helper.make_node("Softmax", ["b1"], ["b2"], name="dfl_softmax", axis=-1),
        helper.make_node("MatMul", ["b2", "bins"], ["b3"], name="dfl_conv"),
        helper.make_node("Mul", ["b3", "stride"], ["boxes"], name="box_scale"),
        helper.make_node("MatMul", ["x", "w_cls"], ["s0"], name="cls_conv"),
        helper.make_node("Sigmoid", ["s0"], ["scores"], name="cls_sigmoid"),
        helper.make_node("Softmax", ["x"], ["a0"], name="attn_softmax", axis=-1),
        helper.make_node("MatMul", ["a0", "values"], ["a1"], name="attn_values"),
        helper.make_node("MatMul", ["a1", "w_proj"], ["feat"], name="attn_proj"),
    ]
    inits = [_const("w_box", (16, 16)), numpy_helper.from_array(np.array([1, 4, 16], np.int64), "shape"),
             numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(16, 1), "bins"),
             _const("stride", (1,)), _const("w_cls", (16, 3)), _const("values", (16, 16)),
             _const("w_proj", (16, 8))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("boxes", "scores", "feat")], inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_tail_holds_the_decoding_after_the_last_learned_layers(tmp_path: Path) -> None:
    tail = tail_nodes(_graph(tmp_path / "m.onnx"))
    assert tail == {"box_reshape", "dfl_softmax", "dfl_conv", "box_scale", "cls_sigmoid"}
    # a last learned layer joins when the output it alone leads to is named (the class logits for "scores")
    assert tail_nodes(tmp_path / "m.onnx", ["scores"]) == tail | {"cls_conv"}
    assert tail_nodes(tmp_path / "m.onnx", ["boxes"]) == tail | {"box_conv"}


def test_auto_preset_is_the_hub_exporters_own() -> None:
    cfg = ProjectConfig()
    assert cfg.quantize.int8_preset == "auto"
    assert quantize_settings(cfg).int8_preset == "performance"
    cfg.model.model = "ultralytics:runs/best.pt"
    assert quantize_settings(cfg).int8_preset == "mixed"
    cfg.model.model = "timm:resnet18"
    assert quantize_settings(cfg).int8_preset == "performance"
    cfg.model.model = "ultralytics:runs/best.pt"
    cfg.quantize.int8_preset = "performance"
    assert quantize_settings(cfg).int8_preset == "performance"
