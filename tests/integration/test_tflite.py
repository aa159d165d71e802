"""The ARM target end to end, with the network unplugged: onnx2tf, full-integer INT8, device selftest."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import device_env, has, needs_torch, run_cli_offline

pytestmark = [needs_torch, pytest.mark.skipif(not (has("onnx2tf") and has("ai_edge_litert")),
                                              reason="the tflite extra is not installed")]


@pytest.fixture(scope="module")
def default_tflite(tmp_path_factory):
    """The default model for raspberry-pi-5 at fp32 and int8, and android-arm64, built offline."""
    proj = tmp_path_factory.mktemp("tflite")
    res = run_cli_offline("build", "--target", "raspberry-pi-5:fp32", "--target", "raspberry-pi-5:int8",
                          "--target", "android-arm64:int8", "--val-images", "synthetic://?n=24", cwd=proj)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return proj, res


@pytest.fixture(scope="module")
def classifier_tflite(tmp_path_factory, camvid):
    """resnet18 (10 classes, random init) for raspberry-pi-5 fp32 + int8, calibrated on CamVid train, offline."""
    proj = tmp_path_factory.mktemp("tflite-cls")
    res = run_cli_offline("build", "--model", "torchvision:resnet18?num_classes=10", "--input", "1x3x128x128",
                          "--task", "classification", "--calib", str(camvid / "train"), "--val-images",
                          str(camvid / "val"), "--target", "raspberry-pi-5:fp32", "--target", "raspberry-pi-5:int8",
                          cwd=proj)
    assert res.returncode in (0, 3), res.stdout[-2000:] + res.stderr[-3000:]
    return proj, res


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _selftest(python: Path, bundle: Path, where: Path) -> subprocess.CompletedProcess[str]:
    copy = where / bundle.name
    shutil.copytree(bundle, copy)
    return subprocess.run([str(python), "runner.py", "--selftest"], cwd=copy, capture_output=True, text=True,
                          env=device_env(), timeout=300)


def test_offline_build_records_layout_and_int8_io(default_tflite):
    proj, res = default_tflite
    fp32 = _manifest(proj / "dist" / "raspberry-pi-5-fp32")
    int8 = _manifest(proj / "dist" / "raspberry-pi-5-int8")
    for m in (fp32, int8):
        assert m["inputs"][0]["layout"] == "NHWC" and m["preprocess"]["layout"] == "NHWC"
        assert m["inputs"][0]["shape"] == [1, 120, 160, 3] and m["outputs"][0]["shape"] == [1, 120, 160, 7]
        assert m["provenance"]["layout_change"] == "NCHW -> NHWC (onnx2tf)"
    assert fp32["parity"]["artifact"]["output"]["max_rel"] < 1e-4
    assert "quant" not in fp32["inputs"][0]
    q_in, q_out = int8["inputs"][0], int8["outputs"][0]
    assert q_in["dtype"] == "int8" and q_out["dtype"] == "int8"
    assert q_in["quant"]["scale"] > 0 and -128 <= q_in["quant"]["zero_point"] <= 127

    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(proj / "dist" / "raspberry-pi-5-int8" / "model_int8.tflite"))
    d = it.get_input_details()[0]
    assert d["dtype"].__name__ == "int8" and d["quantization"][0] == pytest.approx(q_in["quant"]["scale"])
    acc = int8["parity"]["accuracy"]
    assert acc["metric"] == "miou" and acc["drop"] < 1.0 and acc["agreement"] > 0.98
    assert int8["parity"]["artifact"]["output"]["agreement"] > 0.98


def _scales(model: Path) -> dict[str, float]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))
    return {t["name"]: float(t["quantization"][0]) for t in it.get_tensor_details()
            if t["dtype"].__name__ == "int8" and t["quantization"][0]}


def test_percentile_ranges_narrow_the_converters_min_max_and_max_keeps_them(default_tflite):
    """The default (percentile) narrows activation ranges recorded as min/max; --calib-method max keeps the
    min/max. Every activation scale is at most max's, some strictly smaller; the input's is the
    same (its recorded range is left as it is). With labelled data the selection half chose between the two: max
    only when its agreement with FP32 beats the default's by an interval above zero."""
    proj, _ = default_tflite
    chose = _manifest(proj / "dist" / "raspberry-pi-5-int8")["provenance"]["quantization"]["ranges"]
    held, choice = chose["held_on_selection"], chose["choice"]
    assert set(held) == {"percentile", "max"} and choice["default"] == "percentile", chose
    low, high = choice["over_default"]["max"]["interval"]  # max only when its gain's interval is above zero
    assert chose["method"] == choice["chosen"] == ("max" if low > 0 else "percentile") and low <= high, chose
    for method in ("percentile", "max"):
        res = run_cli_offline("build", "--target", "raspberry-pi-5:int8", "--calib-method", method,
                              "--no-accuracy-control", "--out", f"dist-{method}", cwd=proj)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    pct, mx = _manifest(proj / "dist-percentile" / "raspberry-pi-5-int8"), \
        _manifest(proj / "dist-max" / "raspberry-pi-5-int8")
    ranges = pct["provenance"]["quantization"]["ranges"]
    assert ranges["method"] == "percentile" and 0 < ranges["narrowed"] <= ranges["tensors"], ranges
    assert "held_on_selection" not in ranges and mx["provenance"]["quantization"]["ranges"] == {"method": "max"}
    a, b = _scales(proj / "dist-percentile" / "raspberry-pi-5-int8" / "model_int8.tflite"), \
        _scales(proj / "dist-max" / "raspberry-pi-5-int8" / "model_int8.tflite")
    shared = [n for n in a if n in b]  # the weights' scales do not depend on the ranges: equal in both
    assert shared and all(a[n] <= b[n] * (1 + 1e-6) for n in shared), [(n, a[n], b[n]) for n in shared]
    assert sum(a[n] < b[n] * 0.999 for n in shared) >= ranges["narrowed"] // 2, ranges
    assert pct["inputs"][0]["quant"] == mx["inputs"][0]["quant"]
    # an output produced by a scale-keeping op (this model's Resize) takes its input's narrowed range
    assert pct["outputs"][0]["quant"]["scale"] <= mx["outputs"][0]["quant"]["scale"] * (1 + 1e-6)


def test_default_selftests_pass_in_a_venv_with_only_litert(default_tflite, tflite_venv, tmp_path):
    proj, _ = default_tflite
    for name in ("raspberry-pi-5-fp32", "raspberry-pi-5-int8"):
        res = _selftest(tflite_venv, proj / "dist" / name, tmp_path)
        assert res.returncode == 0 and "selftest: PASS" in res.stdout, name + res.stdout + res.stderr
        assert "ai-edge-litert" not in res.stderr or "error" not in res.stderr


def test_classifier_offline_selftest_and_top1_agreement(classifier_tflite, tflite_venv, tmp_path):
    proj, res = classifier_tflite
    for name in ("raspberry-pi-5-fp32", "raspberry-pi-5-int8"):
        bundle = proj / "dist" / name
        m = _manifest(bundle)
        assert m["parity"]["accuracy"]["count"] == 50  # the report half of 101
        st = _selftest(tflite_venv, bundle, tmp_path)
        assert st.returncode == 0 and "selftest: PASS" in st.stdout, name + st.stdout + st.stderr
    fp32 = _manifest(proj / "dist" / "raspberry-pi-5-fp32")
    assert fp32["parity"]["artifact"]["output"]["max_rel"] < 1e-4
    assert fp32["parity"]["accuracy"]["agreement"] > 0.99


def test_android_bundle_is_model_labels_manifest_without_runner(default_tflite):
    proj, _ = default_tflite
    bundle = proj / "dist" / "android-arm64-int8"
    names = {p.name for p in bundle.iterdir()}
    assert {"model_int8.tflite", "labels.txt", "manifest.json", "README.md", "golden"} <= names
    assert "runner.py" not in names
    assert (bundle / "labels.txt").read_text().split() == _manifest(bundle)["model"]["labels"]
    assert "zero_point" in (bundle / "README.md").read_text()


def test_tflite_runner_on_camvid_video(default_tflite, tflite_venv, camvid_video, tmp_path):
    proj, _ = default_tflite
    bundle = tmp_path / "b"
    shutil.copytree(proj / "dist" / "raspberry-pi-5-int8", bundle)
    js, out = tmp_path / "f.jsonl", tmp_path / "out.avi"
    res = subprocess.run([str(tflite_venv), "runner.py", str(camvid_video), "--headless", "--jsonl", str(js),
                          "--save", str(out)], cwd=bundle, capture_output=True, text=True, env=device_env(),
                         timeout=300)
    assert res.returncode == 0, res.stderr
    records = [json.loads(ln) for ln in js.read_text().splitlines()]
    assert len(records) == 101 and all(abs(sum(r["areas"].values()) - 100) < 0.2 for r in records)
    summary = json.loads(next(ln for ln in res.stderr.splitlines() if ln.startswith("summary: "))[9:])
    assert summary["frames"] == 101
    import cv2

    assert int(cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT)) == 101
    res = subprocess.run([str(tflite_venv), "runner.py", "synthetic://?width=320&height=240", "--headless",
                          "--max-frames", "10", "--jsonl", "-"], cwd=bundle, capture_output=True, text=True,
                         env=device_env(), timeout=300)
    lines = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert res.returncode == 0 and len(lines) == 10 and "road" in lines[0]["areas"], res.stderr


def test_an_op_onnx2tf_cannot_convert_names_op_and_node(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgeport.backends.tflite.backend import BACKEND
    from edgeport.errors import ConversionError
    from edgeport.preprocess import InputSpec
    from edgeport.target import get_target

    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu_1"),
             helper.make_node("FancyWarp", ["r"], ["y"], domain="com.example", name="warp_7")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), tmp_path / "c.onnx")
    with pytest.raises(ConversionError, match=r"op FancyWarp \(node 'warp_7'\)"):
        BACKEND.compile(tmp_path / "c.onnx", get_target("raspberry-pi-5"), "fp32", None, tmp_path,
                        InputSpec(shape=(1, 3, 8, 8)))


CALIBRATION_CHECK = r"""
import json, os, sys
from pathlib import Path
import numpy as np
import tensorflow as tf
from tensorflow.lite.tools import flatbuffer_utils
from edgeport.backends.tflite import convert, litert

os.chdir(sys.argv[1])
convert.write_sample(np.zeros((20, 64, 64, 3), np.uint8), Path(convert.SAMPLE))
import onnx2tf

onnx2tf.convert(input_onnx_file_path=sys.argv[2], output_folder_path="sm", non_verbose=True,
                output_signaturedefs=True, copy_onnx_input_output_names_to_tflite=True)
images = np.random.default_rng(0).normal(size=(40, 32, 32, 3)).astype(np.float32)

def recorded(n):
    conv = tf.lite.TFLiteConverter.from_saved_model("sm")
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([images[i:i + 1]] for i in range(n))
    conv._experimental_calibrate_only = True
    return conv.convert()

def ranges(blob):
    g = flatbuffer_utils.read_model_from_bytearray(bytearray(blob)).subgraphs[0]
    return {t.name.decode(): [float(t.quantization.min[0]), float(t.quantization.max[0])]
            for t in g.tensors if litert._min_max(t)}

print(json.dumps({"converter": ranges(recorded(40)), "edgeport": ranges(litert.calibrate(recorded(1), images)[0]),
                  "one_image": ranges(recorded(1))}))
"""


def test_edgeport_calibration_records_the_converters_min_max(tmp_path):
    """The converter records ranges from one image and edgeport measures every recorded min/max (activations, the
    input, the output) over all calibration images: the converter's own 40-image calibration gives the same
    ranges, to float rounding."""
    import sys

    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Sigmoid(),
                        nn.Conv2d(8, 4, 1)).eval()
    onnx_path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(onnx_path), input_names=["x"], dynamo=False)
    res = subprocess.run([sys.executable, "-c", CALIBRATION_CHECK, str(tmp_path), str(onnx_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    theirs, ours, one = got["converter"], got["edgeport"], got["one_image"]
    assert set(theirs) == set(ours) and len(ours) >= 5
    for name, (lo, hi) in theirs.items():
        width = hi - lo
        assert abs(ours[name][0] - lo) <= 1e-5 * width and abs(ours[name][1] - hi) <= 1e-5 * width, (name, ours[name])
    assert sum(one[n] != theirs[n] for n in theirs) >= len(theirs) - 1  # one image's ranges were not kept
