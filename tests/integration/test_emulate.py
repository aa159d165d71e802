"""ARM bundles proven on ARM: `edgeport validate --emulate aarch64` installs each bundle as its README says and runs
it on emulated aarch64 (a Debian 12 arm64 root made from Debian's packages, qemu-user with the device's core),
against the x86 run of the same model. Needs Debian's qemu-user-static and debootstrap (.ci/run installs them)
and the package registry for the aarch64 wheels."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import has, needs_openvino, needs_torch, run_cli

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [needs_torch, needs_openvino, pytest.mark.skipif(not (has("onnx2tf") and has("ai_edge_litert")),
                                              reason="the tflite extra is not installed"),
              pytest.mark.skipif(not (shutil.which("qemu-aarch64-static") and
                                      (shutil.which("debootstrap") or Path("/usr/sbin/debootstrap").exists())),
                                 reason="qemu-user-static and debootstrap are not installed")]
BROKEN_PIN = "ai-edge-litert==0.0.1"


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    """The default model for raspberry-pi-5 and android-arm64 (INT8), and for a profile of the project's own whose
    device requirements pin a LiteRT release that does not exist (one artifact for the three); and for
    arm64-openvino (OpenVINO's ARM CPU plugin)."""
    proj = tmp_path_factory.mktemp("arm")
    profile = (ROOT / "targets" / "raspberry-pi-5.toml").read_text()
    assert '"ai-edge-litert>=2.3"' in profile
    (proj / "targets").mkdir()
    (proj / "targets" / "pi-broken.toml").write_text(profile.replace('"ai-edge-litert>=2.3"', f'"{BROKEN_PIN}"'))
    res = run_cli("build", "--target", "raspberry-pi-5:int8", "--target", "android-arm64:int8", "--target",
                  "pi-broken:int8", "--target", "arm64-openvino:int8", cwd=proj)
    assert res.returncode == 0, res.stderr[-3000:]
    return proj


def test_arm_bundles_install_selftest_and_match_x86_on_their_emulated_cores(arm):
    res = run_cli("validate", "dist/raspberry-pi-5-int8", "dist/android-arm64-int8", "dist/arm64-openvino-int8",
                  "--emulate", "aarch64", "--frames", "2", "--report", "emulated", cwd=arm)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    report = json.loads((arm / "emulated" / "validate.json").read_text())
    cases = {(b["name"], c["check"]): c for b in report["bundles"] for c in b["cases"]}
    pi = "raspberry-pi-5-int8"
    install = cases[pi, "aarch64 install"]["metrics"]["line"]  # the README's own lines: a venv, pip into it
    assert install.startswith("python3 -m venv --system-site-packages .venv") and install.endswith(
        " && .venv/bin/python -m pip install -r requirements.txt"), install
    assert cases[pi, "aarch64 selftest"]["status"] == "passed"
    assert cases[pi, "aarch64 README run"]["metrics"]["line"].startswith(".venv/bin/python runner.py synthetic://")
    assert "cortex-a76" in cases[pi, "aarch64 selftest"]["backend"]  # the Raspberry Pi 5's core
    for name in (pi, "android-arm64-int8"):  # full-integer INT8: the same integers on both ISAs
        out = cases[name, "output aarch64 vs x86"]["metrics"]
        assert out["differ"] == 0 and out["max_step"] == 0 and out["elements"] > 0 and out["agreement"] == 1.0, out
        assert cases[name, "miou aarch64"]["metrics"]["aarch64"] == cases[name, "miou aarch64"]["metrics"]["x86"]
    assert (name, "aarch64 selftest") not in cases  # android: no runner, the model alone
    ov = "arm64-openvino-int8"  # OpenVINO's ARM kernels: INT8 close to x86's, not the same integers
    assert cases[ov, "aarch64 selftest"]["status"] == "passed" and "openvino" in cases[ov, "aarch64 install"]["backend"]
    assert cases[ov, "output aarch64 vs x86"]["metrics"]["agreement"] >= 0.99, cases[ov, "output aarch64 vs x86"]
    assert "aarch64 (emulated)" in res.stdout and "0 of " in res.stdout
    assert "### aarch64 (emulated) against x86" in (arm / "emulated" / "validate.md").read_text()


def test_an_unavailable_device_pin_fails_the_emulated_install_in_one_line(arm):
    res = run_cli("validate", "dist/pi-broken-int8", "--emulate", "aarch64", "--frames", "1", cwd=arm)
    assert res.returncode == 3, res.stdout[-3000:] + res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("pi-broken-int8: the device's install fails")]
    assert len(lines) == 1 and BROKEN_PIN in lines[0] and "No matching distribution" in lines[0], res.stdout[-2000:]
    assert "Traceback" not in res.stderr
