"""Real data end to end: the CamVid-trained model (models/camvid-roadseg.pt) through the recipe in
examples/camvid, scored on CamVid val with its label maps (void ignored), on every backend."""
from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, has, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino,
              pytest.mark.skipif(not has("onnx2tf"), reason="the tflite extra is not installed")]
RECIPE = ROOT / "examples" / "camvid" / "edgeport.toml"


def test_camvid_model_fp32_and_int8_miou_on_camvid_val(tmp_path, camvid):
    if not (ROOT / "models" / "camvid-roadseg.pt").is_file():
        pytest.fail("models/camvid-roadseg.pt is missing; run scripts/train_camvid.py")
    res = run_cli("build", "--config", str(RECIPE), "--target", "intel-cpu:fp32", "--target", "intel-cpu:int8",
                  "--target", "raspberry-pi-5:int8", "--target", "jetson-orin-nano:int8",
                  "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    acc = {}
    for name in ("intel-cpu-fp32", "intel-cpu-int8", "raspberry-pi-5-int8", "jetson-orin-nano-int8"):
        m = json.loads((tmp_path / "dist" / name / "manifest.json").read_text())
        acc[name] = m["parity"]["accuracy"]
        assert acc[name]["count"] == 50 and acc[name]["whole"]["count"] == 101  # the report half of CamVid val
        assert acc[name]["source"].endswith("valannot")
    assert acc["intel-cpu-fp32"]["reference"]["miou"] > 45  # 54.08 when trained by the script's defaults
    assert abs(acc["intel-cpu-fp32"]["drop"]) < 1e-6
    for name in ("intel-cpu-int8", "raspberry-pi-5-int8", "jetson-orin-nano-int8"):
        assert acc[name]["drop"] < 1.0 and acc[name]["agreement"] > 0.95, (name, acc[name])
    assert "mIoU" in res.stdout and "tensorrt (emulated)" in res.stdout
    # The gate on the same bundles: PyTorch vs each artifact on CamVid val, INT8 within the recipe's
    # max_drop (0.3 mIoU point) of FP32 on every backend, the emulated TensorRT INT8 included.
    res = run_cli("validate", str(tmp_path / "dist"), "--config", str(RECIPE), "--build-dir",
                  str(tmp_path / "build"), "--report", str(tmp_path / "reports"), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "reports" / "validate.json").read_text())
    ref = report["reference_metrics"]["miou"]
    assert abs(ref - acc["intel-cpu-fp32"]["whole"]["reference"]["miou"]) < 1e-6  # PyTorch == the build's FP32 ONNX
    for b in report["bundles"]:
        miou = next(c for c in b["cases"] if c["check"] == "miou")["metrics"]
        assert miou["max_drop"] == 0.3 and miou["drop"] <= 0.3, (b["name"], miou["drop"])
        assert b["status"] == "validated"
