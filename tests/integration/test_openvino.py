"""The Intel target end to end: INT8 options, accuracy control, real-image agreement, device-side selftest."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import device_env, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]


@pytest.fixture(scope="module")
def classifier_build(tmp_path_factory, camvid):
    """resnet18 (10 classes, random init: no weights are downloaded) at int8, calibrated on CamVid
    train and checked for top-1 agreement on the 101 CamVid val frames."""
    proj = tmp_path_factory.mktemp("classifier")
    res = run_cli("build", "--model", "torchvision:resnet18?num_classes=10", "--input", "1x3x128x128", "--task",
                  "classification", "--calib", str(camvid / "train"), "--val-images", str(camvid / "val"),
                  "--target", "intel-cpu", "--precision", "int8", cwd=proj)
    assert res.returncode in (0, 3), res.stderr[-3000:]
    return proj, res


def _selftest_in_venv(python: Path, bundle: Path, where: Path) -> subprocess.CompletedProcess[str]:
    copy = where / "device" / bundle.name
    shutil.copytree(bundle, copy)
    return subprocess.run([str(python), "runner.py", "--selftest"], cwd=copy, capture_output=True, text=True,
                          env=device_env(), timeout=300)


def test_default_int8_selftest_in_a_venv_with_only_the_device_runtime(default_project, openvino_venv, tmp_path):
    proj, _ = default_project
    res = _selftest_in_venv(openvino_venv, proj / "dist" / "intel-cpu-int8", tmp_path)
    assert res.returncode == 0 and "selftest: PASS" in res.stdout, res.stdout + res.stderr
    assert "input_0.npy output" in res.stdout and "files sha256" in res.stdout


def test_classifier_int8_selftest_in_device_venv_and_top1_agreement(classifier_build, openvino_venv, tmp_path):
    proj, res = classifier_build
    bundle = proj / "dist" / "intel-cpu-int8"
    m = json.loads((bundle / "manifest.json").read_text())
    acc = m["parity"]["accuracy"]
    assert acc["metric"] == "agreement"  # CamVid frames carry no class labels
    assert acc["count"] == 50 and acc["halves"]["selection"]["count"] == 51 and acc["whole"]["count"] == 101
    assert 0.0 <= acc["agreement"] <= 1.0
    assert "val agree" in res.stdout  # the table shows it
    assert m["parity"]["export"]["output"]["max_rel"] < 1e-4
    assert m["provenance"]["quantization"]["fake_quantize_nodes"] > 10
    st = _selftest_in_venv(openvino_venv, bundle, tmp_path)
    assert st.returncode == 0 and "selftest: PASS" in st.stdout, st.stdout + st.stderr


def test_fp32_parity_within_1e4_of_range(default_project):
    proj, _ = default_project
    res = run_cli("build", "--target", "intel-cpu:fp32", cwd=proj)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((proj / "dist" / "intel-cpu-fp32" / "manifest.json").read_text())
    assert m["parity"]["artifact"]["output"]["max_rel"] < 1e-4


def test_accuracy_controlled_int8_reports_the_drop(tmp_path):
    res = run_cli("build", "--target", "intel-cpu:int8", "--val-images", "synthetic://?n=24", "--max-drop", "0.5",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "dist" / "intel-cpu-int8" / "manifest.json").read_text())
    q = m["provenance"]["quantization"]
    ac = q["accuracy_control"]
    assert ac["max_drop"] == 0.5 and ac["validation"]["count"] == 12  # the selection half
    acc = m["parity"]["accuracy"]
    assert acc["metric"] == "miou" and acc["reference"]["miou"] > 80
    assert acc["drop"] <= 0.5
    assert acc["agreement"] > 0.98
    assert "mIoU" in res.stdout


def test_ignored_scope_keeps_layers_in_float(tmp_path):
    full = run_cli("build", "--target", "intel-cpu:int8", "--out", "a", cwd=tmp_path)
    part = run_cli("build", "--target", "intel-cpu:int8", "--out", "b", "--int8-ignore", ".*up.*",
                   "--int8-preset", "mixed", "--int8-subset", "64", cwd=tmp_path)
    assert full.returncode == 0 and part.returncode == 0, part.stderr[-2000:]
    qa = json.loads((tmp_path / "a" / "intel-cpu-int8" / "manifest.json").read_text())["provenance"]["quantization"]
    qb = json.loads((tmp_path / "b" / "intel-cpu-int8" / "manifest.json").read_text())["provenance"]["quantization"]
    assert qb["ignored"]["patterns"] == [".*up.*"] and qb["preset"] == "mixed" and qb["subset_size"] == 64
    assert 0 < qb["fake_quantize_nodes"] < qa["fake_quantize_nodes"]


def test_a_model_openvino_cannot_convert_names_the_op(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgeport.backends.openvino.backend import BACKEND
    from edgeport.errors import ConversionError
    from edgeport.preprocess import InputSpec
    from edgeport.target import get_target

    node = helper.make_node("FancyWarp", ["input"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "custom.onnx")
    with pytest.raises(ConversionError, match="no conversion rule for com.example.FancyWarp"):
        BACKEND.compile(tmp_path / "custom.onnx", get_target("intel-cpu"), "fp32", None, tmp_path,
                        InputSpec(shape=(1, 3, 8, 8)))


def test_bad_int8_settings_are_one_line_errors(tmp_path):
    (tmp_path / "edgeport.toml").write_text("[quantize]\npreset = 'fastest'\n")
    res = run_cli("build", "--target", "intel-cpu", cwd=tmp_path)
    assert res.returncode == 2 and "int8_preset 'fastest' is not one of auto, mixed, performance" in res.stderr
    (tmp_path / "edgeport.toml").write_text("[quantize]\nmax_dorp = 2\n")
    res = run_cli("build", "--target", "intel-cpu", cwd=tmp_path)
    assert res.returncode == 2 and "did you mean 'max_drop'" in res.stderr
    (tmp_path / "edgeport.toml").unlink()
    res = run_cli("build", "--target", "intel-cpu", "--val-images", "nowhere/", cwd=tmp_path)
    assert res.returncode == 2 and "nowhere" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "dist").exists() and not (tmp_path / "build" / "export").exists()
