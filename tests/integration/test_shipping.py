"""Only proven bundles ship: a bundle that fails a gate is kept apart and refused by everything downstream,
and golden outputs are PyTorch's, so an artifact that diverged cannot pass its device self-test."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]
STRICT = '[validation.tolerance."*@int8"]\nmin_cosine = 0.99999\n'  # INT8 cannot meet it: the gate fails


@pytest.fixture(scope="module")
def failed_build(default_project, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A project whose intel-cpu INT8 bundle fails its parity gate while intel-igpu FP16 passes."""
    proj = tmp_path_factory.mktemp("shipping")
    shutil.copytree(default_project[0] / "build", proj / "build")  # calibration and export from the cache
    shutil.copytree(default_project[0] / "dist", proj / "dist")  # a good intel-cpu-int8 of an earlier build
    (proj / "edgeport.toml").write_text(STRICT)
    res = run_cli("build", "--target", "intel-cpu", "--target", "intel-igpu", cwd=proj)
    return proj, res


def _errors(res: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith(("error:", "internal error:"))]


def test_a_failed_gate_is_written_apart_and_counted(failed_build):
    proj, res = failed_build
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-2000:]
    failed = proj / "dist" / "failed" / "intel-cpu-int8"
    m = json.loads((failed / "manifest.json").read_text())
    assert m["verdict"]["status"] == "failed" and "cosine" in m["verdict"]["reasons"][0]
    assert m["verdict"]["gates"]["parity"] == {"output": "failed"}
    assert not (proj / "dist" / "failed" / "intel-cpu-int8.tar.gz").exists()  # never archived
    # the good bundle of the earlier build stays, and the build says so: a good bundle leaves only for a better one
    kept = json.loads((proj / "dist" / "intel-cpu-int8" / "manifest.json").read_text())
    assert kept["verdict"]["status"] == "passed" and (proj / "dist" / "intel-cpu-int8.tar.gz").is_file()
    assert "still holds an earlier build's bundle, which passed" in res.stderr, res.stderr[-2000:]
    good = json.loads((proj / "dist" / "intel-igpu-fp16" / "manifest.json").read_text())
    assert good["verdict"]["status"] == "passed" and (proj / "dist" / "intel-igpu-fp16.tar.gz").is_file()
    assert "FAILED its build gates" in (failed / "README.md").read_text()
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("2 target(s): ") and ", 1 failed in " in last and "dist/failed" in last, last
    assert "nothing changed" not in res.stdout
    assert _errors(res) == ["error: 1 target(s) failed: intel-cpu-int8 (see the table above); nothing of them ships"]
    again = run_cli("build", "--target", "intel-cpu", "--target", "intel-igpu", cwd=proj)
    assert again.returncode == 3 and "nothing changed" not in again.stdout  # a failure is never "nothing changed"


def test_selftest_inspect_and_validate_refuse_a_failed_bundle(failed_build, tmp_path):
    proj, _ = failed_build
    copy = tmp_path / "device" / "intel-cpu-int8"
    shutil.copytree(proj / "dist" / "failed" / "intel-cpu-int8", copy)
    st = subprocess.run([sys.executable, "runner.py", "--selftest"], cwd=copy, capture_output=True, text=True)
    assert st.returncode == 2 and "selftest: PASS" not in st.stdout
    assert len(_errors(st)) == 1 and "FAILED its build gates" in st.stderr and "--force" in st.stderr
    run = subprocess.run([sys.executable, "runner.py", "synthetic://", "--headless", "--max-frames", "2"], cwd=copy,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "FAILED its build gates" in run.stderr
    forced = subprocess.run([sys.executable, "runner.py", "--selftest", "--force"], cwd=copy, capture_output=True,
                            text=True)
    assert forced.returncode == 1 and "selftest: FAIL" in forced.stdout  # it runs, and its checks fail
    ins = run_cli("inspect", str(copy))
    assert ins.returncode == 2 and "verdict     FAILED" in ins.stdout and "FAILED its build gates" in _errors(ins)[0]
    js = json.loads(run_cli("inspect", str(copy), "--json").stdout)
    assert js["verdict"]["status"] == "failed" and js["problems"]
    val = run_cli("validate", str(copy), "--config", str(proj / "edgeport.toml"), cwd=proj)
    assert val.returncode == 3 and "failed" in val.stdout


def test_golden_outputs_are_pytorchs_so_a_divergent_artifact_fails_its_selftest(default_project, tmp_path):
    """Before, OpenVINO and TFLite golden outputs were the artifact's own: a broken artifact agreed with itself.
    Here the IR's weights are corrupted and its own (corrupted) outputs are even written as the host's
    golden outputs, hashes made consistent: the check against PyTorch still fails it."""
    from tests.integration.test_validate import _negate_openvino_weight

    bundle = tmp_path / "intel-cpu-int8"
    shutil.copytree(default_project[0] / "dist" / "intel-cpu-int8", bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["golden"]["reference"] == "pytorch"
    ok = subprocess.run([sys.executable, "runner.py", "--selftest"], cwd=bundle, capture_output=True, text=True)
    assert ok.returncode == 0 and "vs pytorch" in ok.stdout and "vs build host" in ok.stdout, ok.stdout
    _negate_openvino_weight(bundle, 2)
    import openvino as ov

    compiled = ov.Core().compile_model(str(bundle / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for case in m["golden"]["cases"]:
        x = np.load(bundle / case["input"])
        np.save(bundle / case["host_outputs"]["output"], np.asarray(compiled({"image": x})[0], np.float32))
    m["files"] = {n: hashlib.sha256((bundle / n).read_bytes()).hexdigest() for n in m["files"]}
    (bundle / "manifest.json").write_text(json.dumps(m))
    bad = subprocess.run([sys.executable, "runner.py", "--selftest"], cwd=bundle, capture_output=True, text=True)
    assert bad.returncode == 1 and "selftest: FAIL" in bad.stdout
    rows = [ln for ln in bad.stdout.splitlines() if " output " in ln]
    assert any("vs pytorch" in r and "FAIL" in r for r in rows)
    assert all("PASS" in r for r in rows if "vs build host" in r)  # it agrees with itself, and still fails


def test_fixing_the_build_moves_the_bundle_back(failed_build, tmp_path):
    proj, _ = failed_build
    work = tmp_path / "p"
    shutil.copytree(proj, work)
    (work / "edgeport.toml").unlink()
    res = run_cli("build", "--target", "intel-cpu", "--target", "intel-igpu", "--report", "r", cwd=work)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (work / "dist" / "intel-cpu-int8" / "manifest.json").is_file()
    assert not (work / "dist" / "failed" / "intel-cpu-int8").exists()
    root = ET.parse(work / "r" / "report.junit.xml").getroot()
    assert root.get("failures") == "0"
