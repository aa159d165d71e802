"""The Jetson path as far as it runs here: Q/DQ ONNX in ONNX Runtime, the calibration cache,
emulated INT8 accuracy on real images, and the on-device files (Python 3.6, allowed imports).

TensorRT itself cannot run on this machine; nothing here claims an engine was built.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import device_env, needs_torch, run_cli

pytestmark = [needs_torch]
DEVICE_IMPORTS = {"numpy", "cv2", "tensorrt", "pycuda", "cuda"}


@pytest.fixture(scope="module")
def jetson(tmp_path_factory):
    """Default model: jetson-orin-nano int8 (TensorRT 10.3), jetson-nano int8 and fp16 (TensorRT 8.2)."""
    proj = tmp_path_factory.mktemp("jetson")
    res = run_cli("build", "--target", "jetson-orin-nano:int8", "--target", "jetson-nano:int8", "--target",
                  "jetson-nano:fp16", "--val-images", "synthetic://?n=24", cwd=proj)
    assert res.returncode == 0, res.stderr[-3000:]
    return proj, res


def _m(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_bundles_hold_what_the_device_needs(jetson):
    proj, res = jetson
    orin, nano, nano16 = (proj / "dist" / n for n in ("jetson-orin-nano-int8", "jetson-nano-int8",
                                                        "jetson-nano-fp16"))
    for b in (orin, nano, nano16):
        names = set(_m(b)["files"])
        assert {"model.onnx", "build_engine.py", "runner.py", "README.md"} <= names
        assert any(n.startswith("golden/") for n in names)
    assert {"model_qdq.onnx"} <= set(_m(orin)["files"]) and "calib.cache" not in _m(orin)["files"]  # 10.x: Q/DQ
    assert {"model_qdq.onnx", "calib.cache"} <= set(_m(nano)["files"])  # 8.x: both
    assert "model_qdq.onnx" not in _m(nano16)["files"]
    assert "tensorrt (emulated)" in res.stdout and "tensorrt (device only)" in res.stdout
    import onnx

    assert onnx.load(str(nano / "model.onnx")).opset_import[0].version == 13  # TensorRT 8.2's ceiling


def test_calibration_cache_parses_back_to_the_qdq_scales(jetson):
    import onnx
    from onnx import numpy_helper

    from edgeport.backends.tensorrt.calib_cache import read_cache

    proj, _ = jetson
    bundle = proj / "dist" / "jetson-nano-int8"
    tag, algo, scales = read_cache(bundle / "calib.cache")
    assert tag == "8201" and algo == "EntropyCalibration2"  # the profile's exact TensorRT 8.2.1
    assert scales["image"] > 0 and all(s > 0 for s in scales.values())
    qdq = onnx.load(str(bundle / "model_qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    checked = 0
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and inits[node.input[1]].ndim == 0:
            assert scales[node.input[0]] == pytest.approx(float(inits[node.input[1]]), rel=1e-6)
            checked += 1
    assert checked >= 10
    text = (bundle / "calib.cache").read_text().splitlines()
    assert all(len(ln.rsplit(": ", 1)[1]) == 8 for ln in text[1:])  # big-endian float32 hex


def test_qdq_model_follows_tensorrt_rules_node_by_node(jetson):
    import onnx
    from onnx import numpy_helper

    proj, _ = jetson
    model = onnx.load(str(proj / "dist" / "jetson-orin-nano-int8" / "model_qdq.onnx"))
    onnx.checker.check_model(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale, zp = inits[node.input[1]], inits[node.input[2]]
            assert scale.dtype == np.float32 and np.all(scale > 0), node.name  # positive constant scales
            assert zp.dtype == np.int8 and not zp.any(), node.name  # symmetric int8, zero point 0
            assert scale.shape == zp.shape
            if node.op_type == "QuantizeLinear":
                assert [c.op_type for c in consumers[node.output[0]]] == ["DequantizeLinear"]
            if scale.ndim == 1:  # per-channel only for weights
                assert node.input[0] in inits or producer[node.input[0]].input[0] in inits, node.name
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            x_dq, w_dq = producer[node.input[0]], producer[node.input[1]]
            assert x_dq.op_type == "DequantizeLinear" and inits[x_dq.input[1]].ndim == 0  # per-tensor activations
            assert w_dq.op_type == "DequantizeLinear"
            axis = next(a.i for a in w_dq.attribute if a.name == "axis")
            w = inits[producer[w_dq.input[0]].input[0]]
            assert axis == (1 if node.op_type == "ConvTranspose" else 0)
            assert inits[w_dq.input[1]].shape == (w.shape[axis],)


def test_qdq_runs_in_onnxruntime_close_to_fp32_on_real_frames(jetson, camvid):
    import cv2

    from edgeport.backends.onnxruntime.backend import BACKEND as ORT
    from edgeport.preprocess import default_spec
    from edgeport.runner.metrics import compare

    proj, _ = jetson
    bundle = proj / "dist" / "jetson-orin-nano-int8"
    spec = default_spec()
    frames = [cv2.imread(str(p)) for p in sorted((camvid / "val").glob("*.png"))[:16]]
    x = spec.apply_batch(frames)
    with ORT.open_onnx(bundle / "model.onnx") as fp32, ORT.open_onnx(bundle / "model_qdq.onnx") as q:
        ref, got = fp32.run_batches(x), q.run_batches(x)
    m = compare(ref["output"], got["output"], "segmentation", {})
    # Real road frames are outside the default model's synthetic calibration domain: 94.9 % pixel
    # agreement measured here (99.7 % on synthetic scenes).
    assert m["cosine"] > 0.99 and m["agreement"] > 0.9, m


def test_emulated_int8_accuracy_is_reported(jetson):
    proj, res = jetson
    acc = _m(proj / "dist" / "jetson-orin-nano-int8")["parity"]["accuracy"]
    assert acc["metric"] == "miou" and acc["count"] == 12 and acc["drop"] < 1.0
    info = _m(proj / "dist" / "jetson-orin-nano-int8")["provenance"]
    ranges = info["ranges"]  # labelled data: the selection half chose between percentile (the default) and max
    held = ranges["held_on_selection"]
    assert info["emulated"] is True and set(held) == {"percentile", "max"}, ranges
    _assert_shown_choice(ranges)
    edges = ranges["fp16_edges"]  # the first and the last layer in FP16, each only on a clear interval
    assert set(edges) == {"first layer", "last layer"}, edges
    for edge in edges.values():
        assert edge["taken"] == (edge["interval"][0] > 0) and edge["interval"][0] <= edge["gain"], edge
        assert (set(edge["layers"]) <= set(info["kept_float"])) == edge["taken"], (edge, info["kept_float"])
    gap = ranges["symmetric_gap"]  # held to its unsigned twin: each layer in FP16 only on a clear interval
    for step in gap["steps"]:
        assert step["taken"] == (step["interval"][0] > 0) and 0 < step["macs_share"] < 1, gap
    assert gap["layers"] == [s["layer"] for s in gap["steps"] if s["taken"]], gap
    assert set(gap["layers"]) <= set(info["kept_float"]) and gap["frames"] > 0, (gap, info["kept_float"])
    assert gap["met"] == (gap["unsigned_twin"] - gap["after"] <= gap["margin"]), gap
    if not gap["met"]:  # it stops only within the margin, at the limit, or when the best layer shows no gain
        assert len(gap["layers"]) == 4 or not gap["steps"] or not gap["steps"][-1]["taken"], gap
    assert "ranges " + ranges["method"] in res.stdout and "resampling" in res.stdout
    assert "against its unsigned twin's" in res.stdout


def _assert_shown_choice(ranges: dict) -> None:
    """max replaces the default (percentile) only when its gain in agreement has an interval above zero."""
    choice = ranges["choice"]
    gain = choice["over_default"]["max"]
    low, high = gain["interval"]
    assert choice["default"] == "percentile" and low <= gain["gain"] <= high and choice["frames"] > 0, choice
    assert ranges["method"] == choice["chosen"] == ("max" if low > 0 else "percentile"), choice


@pytest.mark.slow
def test_emulated_int8_top1_agreement_on_camvid(tmp_path, camvid):
    res = run_cli("build", "--model", "torchvision:resnet18?num_classes=10", "--input", "1x3x128x128", "--task",
                  "classification", "--calib", str(camvid / "train"), "--val-images", str(camvid / "val"),
                  "--int8-subset", "64", "--target", "jetson-orin-nano:int8", cwd=tmp_path)
    assert res.returncode in (0, 3), res.stderr[-2000:]
    acc = _m(tmp_path / "dist" / "jetson-orin-nano-int8")["parity"]["accuracy"]
    assert acc["count"] == 50 and acc["whole"]["count"] == 101 and 0.0 <= acc["agreement"] <= 1.0
    assert "tensorrt (emulated)" in res.stdout


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_device_files_are_python36_and_import_only_what_a_jetson_has(jetson):
    proj, _ = jetson
    allowed = DEVICE_IMPORTS | set(sys.stdlib_module_names) | {"build_engine"}  # the bundle's own file, checked too
    for bundle in ("jetson-nano-int8", "jetson-orin-nano-int8"):
        for name in ("runner.py", "build_engine.py"):
            src = (proj / "dist" / bundle / name).read_text()
            tree = ast.parse(src, name, feature_version=(3, 6))
            extra = _imports(tree) - allowed
            assert not extra, f"{bundle}/{name} imports {extra}"
    assert "tensorrt" in _imports(ast.parse((proj / "dist" / "jetson-nano-int8" / "runner.py").read_text()))


def test_build_engine_keys_modes_and_trtexec_without_tensorrt(jetson):
    proj, _ = jetson
    bundle = proj / "dist" / "jetson-nano-int8"
    spec = importlib.util.spec_from_file_location("build_engine", bundle / "build_engine.py")
    be = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(be)
    m = _m(bundle)
    assert be.default_mode((8, 2, 1), m) == "cache" and be.default_mode((8, 6, 2), m) == "qdq"
    k = be.engine_key((8, 2, 1), "NVIDIA Tegra X1", m, "cache")
    assert k == be.engine_key((8, 2, 1), "NVIDIA Tegra X1", m, "cache")
    others = {be.engine_key((8, 2, 3), "NVIDIA Tegra X1", m, "cache"), be.engine_key((8, 2, 1), "Orin", m, "cache"),
              be.engine_key((8, 2, 1), "NVIDIA Tegra X1", m, "qdq")}
    assert len(others | {k}) == 4
    cmd = be.trtexec_command(m, "cache", "engines/x.engine", (8, 2, 1))
    assert "--int8" in cmd and "--calib=calib.cache" in cmd and "--workspace=1024" in cmd and "--fp16" in cmd
    assert "--memPoolSize=workspace:1024M" in be.trtexec_command(m, "qdq", "e", (10, 3, 0))


def test_runner_on_a_host_without_tensorrt_says_so(jetson, openvino_venv):
    proj, _ = jetson
    bundle = proj / "dist" / "jetson-orin-nano-int8"
    res = subprocess.run([str(openvino_venv), "runner.py", "--selftest"], cwd=bundle, capture_output=True,
                         text=True, env=device_env())
    assert res.returncode != 0 and "TensorRT's Python module is missing" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    res = subprocess.run([str(openvino_venv), "build_engine.py"], cwd=bundle, capture_output=True, text=True,
                         env=device_env())
    assert res.returncode == 2 and "not a TensorRT device" in res.stderr


def test_range_methods_differ_and_entropy_clips():
    from edgeport.quantize.collectors import BINS, _Percentile, _Scratch, entropy_amax

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 200_000), [40.0]]).astype(np.float32)  # one outlier sets the max
    amax = float(np.abs(x).max())
    hist = np.histogram(np.abs(x), bins=BINS, range=(0, amax))[0]
    collector = _Percentile(len(x))
    for chunk in np.array_split(x, 7):  # in pieces, as images arrive
        collector.add(chunk, _Scratch())
    p = collector.result()
    assert p == float(np.quantile(np.abs(x), 0.9999, method="inverted_cdf"))
    e = entropy_amax(hist, amax)
    assert 3.0 < p < 6.0 and 2.0 < e < 10.0 and amax == 40.0
