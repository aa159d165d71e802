"""The FP32 noise floor: what 0.1 % input noise costs the float model itself, named when INT8 fails its gate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeport.evaluate import NOISE, LabelledSet, noise_floor, noisy
from edgeport.preprocess import InputSpec

pytest.importorskip("onnxruntime")


def _model(path: Path, gain: float) -> Path:
    """logits = sin(gain * x W): with a large gain, a perturbation of 0.1 % scrambles the outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((48, 5)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["m"]),
         helper.make_node("Mul", ["m", "g"], ["s"]), helper.make_node("Sin", ["s"], ["y"])],
        "chaos", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(gain, np.float32), "g")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the pinned onnxruntime reads
    onnx.save(model, path)
    return path


def _set_and_outputs(onnx_path: Path) -> tuple[LabelledSet, np.ndarray]:
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((64, 3, 4, 4)).astype(np.float32)
    y = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ds = LabelledSet("test", "classification", x, y.argmax(1), [{}] * 64, [f"f{i}.png" for i in range(64)], "0" * 64,
                     spec=InputSpec(shape=(1, 3, 4, 4), task="classification"))
    return ds, y


def test_noise_is_relative_to_each_sample_and_seeded():
    x = np.stack([np.full((3, 8, 8), 0.0, np.float32), np.full((3, 8, 8), 0.0, np.float32)])
    x[0] += np.linspace(0, 1, 192, dtype=np.float32).reshape(3, 8, 8)
    x[1] += 100 * np.linspace(0, 1, 192, dtype=np.float32).reshape(3, 8, 8)
    n = noisy(x) - x
    ratio = n.reshape(2, -1).std(axis=1) / x.reshape(2, -1).std(axis=1)
    assert np.allclose(ratio, NOISE, rtol=0.15), ratio
    assert np.array_equal(noisy(x), noisy(x))


def test_a_chaotic_model_loses_to_a_tenth_of_an_int8_rounding_and_a_smooth_one_does_not(tmp_path):
    smooth = _model(tmp_path / "smooth.onnx", 0.1)
    ds, y = _set_and_outputs(smooth)
    key, drop = noise_floor(smooth, ds, y, "NCHW")
    assert key == "top1" and drop < 2.0, drop
    chaotic = _model(tmp_path / "chaotic.onnx", 1e4)
    ds, y = _set_and_outputs(chaotic)
    key, drop = noise_floor(chaotic, ds, y, "NCHW")
    assert key == "top1" and drop > 30.0, drop
