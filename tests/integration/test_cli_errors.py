"""Bad input: one clear error line, a non-zero exit, no traceback, no bundle."""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT, needs_openvino, needs_torch, run_cli

NET = textwrap.dedent('''
    import torch
    from torch import nn

    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    class FFT(nn.Module):
        def forward(self, x):
            return torch.fft.rfft2(x).abs().mean((2, 3))

    def fft():
        return FFT()
''')


def _one_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "internal error:"))]
    assert len(errors) == 1 and errors[0].startswith("error:"), res.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def project(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    return tmp_path


def _build(project, *extra):
    return run_cli("build", "--input", "1x3x32x32", "--task", "classification", "--target", "intel-cpu:fp32",
                   "--build-dir", str(project / "b"), "--out", str(project / "dist"), *extra, cwd=project)


pytestmark = [needs_torch, needs_openvino]


def test_missing_model_file(project):
    _one_error(_build(project, "--model", "nothere.py:make"), "nothere.py", "does not exist")
    _one_error(_build(project, "--model", "nothere.pt"), "does not exist")


def test_bad_factory_path(project):
    _one_error(_build(project, "--model", "net.py:mkae"), "has no 'mkae'", "did you mean 'make'")


def test_weights_that_do_not_fit(project):
    import torch

    torch.save({"state_dict": {"0.weight": torch.zeros(8, 3, 3, 3)}}, project / "w.pth")
    _one_error(_build(project, "--model", "net.py:make", "--weights", "w.pth"), "do not fit", "missing",
               "0.weight (8, 3, 3, 3) vs model (4, 3, 3, 3)")


def test_unknown_config_key(project):
    (project / "edgeport.toml").write_text('[model]\nsource = "net.py:make"\nwieghts = "w.pth"\n')
    _one_error(_build(project), "edgeport.toml", "model.wieghts", "did you mean 'weights'")


def test_calibration_folder_empty_or_corrupt(project):
    (project / "calib").mkdir()
    _one_error(_build(project, "--model", "net.py:make", "--calib", "calib", "--target", "intel-cpu:int8"),
               "holds no images")
    for i in range(60):
        (project / "calib" / f"{i}.jpg").write_bytes(b"\xff\xd8 broken")
    _one_error(_build(project, "--model", "net.py:make", "--calib", "calib", "--target", "intel-cpu:int8"),
               "0 usable image(s) (60 undecodable skipped)", "at least 50")


def test_unknown_target(project):
    _one_error(_build(project, "--model", "net.py:make", "--target", "jetson-nan"), "unknown target 'jetson-nan'",
               "did you mean 'jetson-nano'")


def test_unsupported_op_named(project):
    _one_error(_build(project, "--model", "net.py:fft"), "aten::fft_rfft2", "not supported")
    assert not (project / "dist").exists()


def test_int8_without_calibration_data(project):
    _one_error(_build(project, "--model", "net.py:make", "--target", "intel-cpu:int8"), "--calib")


BLOCK = textwrap.dedent('''
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "openvino", "nncf", "tensorflow", "tensorrt",
                                      "onnx2tf", "ai_edge_litert"}:
                raise ImportError("blocked for the test: " + name)
            return None
    sys.meta_path.insert(0, _Block())
''')


def test_help_and_doctor_without_heavy_libraries(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK)
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}"}
    for args in (["--help"], ["build", "--help"], ["doctor"], ["targets"], ["inspect", "--help"],
                 ["validate", "--help"], ["flash", "--help"], ["devices", "--help"]):
        res = run_cli(*args, env=env)
        assert res.returncode == 0, res.stderr
    res = run_cli("doctor", env=env)
    assert "-- " in res.stdout and "openvino" in res.stdout and "pip install 'edgeport[openvino]'" in res.stdout
    rows = {ln.split()[1]: ln for ln in res.stdout.splitlines()[2:]}
    # pruning needs torch: not "ok" because torch-pruning's files are there
    assert rows["pruning"].startswith("--") and "torch not installed" in rows["pruning"], res.stdout
    assert "pip install 'edgeport[torch,prune]'" in rows["pruning"]
    col = res.stdout.splitlines()[0].index("versions")  # every row's versions start under the heading
    assert all(ln[col - 2:col] == "  " and ln[col] != " " for ln in rows.values()), res.stdout
    probe = subprocess.run([sys.executable, "-c", "import torch"], env={**env}, capture_output=True, text=True)
    assert probe.returncode != 0  # the block really blocks


def test_every_command_has_an_example():
    for cmd in ("build", "validate", "flash", "devices", "export", "targets", "doctor", "inspect"):
        res = run_cli(cmd, "--help")
        assert res.returncode == 0 and "example" in res.stdout and f"edgeport {cmd}" in res.stdout


def test_no_shared_data_copied():
    assert shutil.which("git") is None or "0001TP" not in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout
