"""End to end: the embedded default and real models through export, OpenVINO, bundle and runner."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]


@pytest.fixture(scope="module")
def default_build(default_project):
    return default_project


def test_default_build_writes_bundles_and_table(default_build):
    proj, res = default_build
    assert "onnx (export)" in res.stdout and "intel-cpu" in res.stdout and "built" in res.stdout
    for name in ("intel-cpu-int8", "intel-igpu-fp16"):
        b = proj / "dist" / name
        m = json.loads((b / "manifest.json").read_text())
        assert {"model.xml", "model.bin", "runner.py", "requirements.txt", "README.md"} <= set(m["files"])
        assert (proj / "dist" / f"{name}.tar.gz").is_file()
        assert m["parity"]["export"]["output"]["max_rel"] < 1e-4
        assert m["parity"]["artifact"]["output"]["ok"]
        cal = m["provenance"]["calibration"]  # INT8's ranges: less the quarter held back to judge its choices on
        held = cal.get("held_back", 0)
        assert cal["count"] + held >= 300 and held == (75 if "int8" in name else 0), cal
        assert m["runtime"]["inference_precision"] in ("f32", "f16")


def test_second_build_is_cached_and_one_target_change_rebuilds_only_it(default_build):
    proj, _ = default_build
    again = run_cli("build", "--target", "intel-cpu", "--target", "intel-igpu", cwd=proj)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stdout
    changed = run_cli("build", "--target", "intel-cpu", "--target", "intel-igpu:fp32", cwd=proj)
    assert changed.returncode == 0
    rows = {ln.split()[0] + ln.split()[2]: ln for ln in changed.stdout.splitlines() if ln.startswith("intel")}
    assert "cached" in rows["intel-cpuint8"] and "built" in rows["intel-igpufp32"]


def test_runner_selftest_from_a_copy_and_tamper_detection(default_build, tmp_path):
    proj, _ = default_build
    copy = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(proj / "dist" / "intel-cpu-int8", copy)
    ok = subprocess.run([sys.executable, "runner.py", "--selftest"], cwd=copy, capture_output=True, text=True)
    assert ok.returncode == 0 and "selftest: PASS" in ok.stdout, ok.stdout + ok.stderr
    run = subprocess.run([sys.executable, "runner.py", "synthetic://", "--headless", "--max-frames", "5", "--jsonl",
                          "-", "--width", "320", "--height", "240"], cwd=copy, capture_output=True, text=True)
    lines = [json.loads(ln) for ln in run.stdout.splitlines()]
    assert run.returncode == 0 and len(lines) == 5 and "road" in lines[0]["areas"]
    assert '"frames": 5' in run.stderr
    with open(copy / "model.bin", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    bad = subprocess.run([sys.executable, "runner.py", "--selftest"], cwd=copy, capture_output=True, text=True)
    assert bad.returncode != 0 and "model.bin" in bad.stdout and "sha256 mismatch" in bad.stdout
    start = subprocess.run([sys.executable, "runner.py", "synthetic://", "--headless"], cwd=copy,
                           capture_output=True, text=True)
    assert start.returncode != 0 and "sha256" in start.stderr and "Traceback" not in start.stderr


def test_inspect_bundle_and_onnx(default_build):
    proj, _ = default_build
    res = run_cli("inspect", str(proj / "dist" / "intel-cpu-int8"), "--json")
    info = json.loads(res.stdout)
    assert res.returncode == 0 and info["problems"] == [] and info["precision"] == "int8"
    onnx = next((proj / "build" / "export").glob("*/model.onnx"))
    res = run_cli("inspect", str(onnx), "--json")
    info = json.loads(res.stdout)
    assert info["edgeport"]["preprocess"]["task"] == "segmentation" and info["inputs"][0]["shape"] == [1, 3, 120, 160]


def test_readme_torchvision_example_builds_then_validates_in_a_fresh_process(tmp_path, camvid):
    """README's example (random-init resnet18, seeded): the build passes, and so does `edgeport validate` run
    later in another process, with no config: the manifest names the model and its seed."""
    res = run_cli("build", "--model", "torchvision:resnet18", "--input", "1x3x224x224", "--task",
                  "classification", "--calib", str(camvid / "val"), "--target", "intel-cpu:int8", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "dist" / "intel-cpu-int8" / "manifest.json").read_text())
    assert m["verdict"]["status"] == "passed" and m["model"]["seed"] == 0
    assert m["parity"]["export"]["output"]["max_rel"] < 1e-4
    assert m["provenance"]["calibration"]["count"] == 101
    assert "recommended" in res.stderr  # 101 < 300 warns
    again = run_cli("validate", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "0 failed" in again.stdout and "reference from intel-cpu-int8's build record" in again.stderr


def test_random_init_model_with_vanishing_outputs_is_refused_with_advice(tmp_path, camvid):
    """mobilenet_v3_small without weights peaks at 2e-9: one error that says so and what to do, no table."""
    res = run_cli("build", "--model", "torchvision:mobilenet_v3_small", "--input", "1x3x224x224", "--task",
                  "classification", "--calib", str(camvid / "val"), "--target", "intel-cpu:int8", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "at most" in err[0] and "--weights" in err[0] and "random init" in err[0], res.stderr
    assert not (tmp_path / "dist").exists()


def test_model_from_file_with_checkpoint_and_export(tmp_path):
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), "
        "nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))\n")
    import torch

    sys.path.insert(0, str(tmp_path))
    try:
        import net

        model = net.make()
    finally:
        sys.path.remove(str(tmp_path))
    torch.save({"epoch": 1, "model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "ckpt.pth")
    res = run_cli("build", "--model", "net.py:make", "--weights", "ckpt.pth", "--input", "1x3x64x64", "--task",
                  "classification", "--target", "intel-cpu:fp32", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "dist" / "intel-cpu-fp32" / "model.xml").is_file()
    res = run_cli("export", "--model", "net.py:make", "--weights", "ckpt.pth", "--input", "1x3x64x64", "--target",
                  "jetson-nano", "--out", "net.onnx", cwd=tmp_path)
    assert res.returncode == 0 and "opset 13" in res.stdout, res.stderr[-2000:]
    assert (tmp_path / "net.onnx").is_file()
