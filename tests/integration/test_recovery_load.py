"""The same build gives the same model on a busy machine: recovery after pruning runs the steps it was given
whatever the load (a time budget is an explicit choice, off by default, and recorded).

Two builds of one pruned model, in two project folders: one on an idle machine, one while three processes keep
every core busy. Both run every step and land within 0.2 points of each other on the report half. Equality to the
bit is not asserted (on this 2-core host the two runs' final losses were equal to the bit, but nothing in
PyTorch's CPU kernels promises the same summation order under another thread schedule).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CAMVID, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]

NET = '''
import torch
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2),
                         nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 6))
'''
STEPS = 120
BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"


def _project(root: Path) -> Path:
    import cv2

    root.mkdir()
    (root / "net.py").write_text(NET)
    frames = sorted((CAMVID / "train").glob("*.png"))
    for folder, first, n in (("calib", 0, 60), ("val", 150, 16)):
        (root / folder).mkdir()
        for i in range(n):
            cv2.imwrite(str(root / folder / f"{i:03d}.png"), cv2.resize(cv2.imread(str(frames[first + i])), (40, 30)))
    return root


def _build(root: Path, steps: int = STEPS) -> tuple[dict, str]:
    res = run_cli("build", "--model", "net.py:make", "--input", "1x3x32x32", "--task", "classification",
                  "--target", "intel-cpu:fp32", "--calib", "calib", "--val-images", "val", "--prune", "0.3",
                  "--recover-steps", str(steps), "--max-drop", "100", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((root / "dist" / "intel-cpu-fp32" / "manifest.json").read_text())
    return manifest["parity"]["accuracy"]["pruning"], res.stderr


@pytest.mark.slow
def test_recovery_runs_every_step_on_a_busy_machine(tmp_path: Path) -> None:
    idle, _ = _build(_project(tmp_path / "idle"))
    busy_procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(3)]
    try:
        busy, _ = _build(_project(tmp_path / "busy"))
    finally:
        for p in busy_procs:
            p.kill()
            p.wait()
    for rec in (idle, busy):
        r = rec["recovery"]
        assert r["steps"] == STEPS == r["steps_asked"] and r["stopped_by"] == "steps", r
        assert r["seconds_budget"] is None, r
    assert idle["metric"] == busy["metric"] == "agreement"  # no labels: agreement with the original, in points
    assert abs(idle["pruned"] - busy["pruned"]) <= 0.2, (idle["pruned"], busy["pruned"])


@pytest.mark.slow
def test_a_time_budget_is_an_explicit_choice_the_manifest_records(tmp_path: Path) -> None:
    root = _project(tmp_path / "budget")
    (root / "edgeport.toml").write_text("[optimize]\nrecover_seconds = 2\n")
    rec, stderr = _build(root, steps=100_000)
    r = rec["recovery"]
    assert r["stopped_by"] == "time" and 0 < r["steps"] < 100_000 and r["steps_asked"] == 100_000, r
    assert r["seconds_budget"] == 2 and rec["recovery"]["steps"] == r["steps"]
    warned = [ln for ln in stderr.splitlines() if "recovery stopped at recover_seconds 2 after" in ln]
    assert len(warned) == 1 and "depends on this machine's speed and load" in warned[0], stderr[-2000:]
