"""README.md's commands, run as printed: its ``bash`` blocks, in order, in a copy of the repository, after the
Quickstart's build (the Quickstart's venv is this test run's own: CI runs the Quickstart itself, as printed, from
.ci/run). Blocks that need a device, an SSH host, a dataset or the user's own checkpoint are ``sh`` blocks whose
first line says so (tests/unit/test_docs.py holds them to that)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import has
from tests.unit.test_docs import README, fenced_blocks

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (has("torch") and has("openvino") and has("onnx")),
                                reason="the Quickstart's extras are not installed")
NEEDS = {"timm:": "timm", "ultralytics:": "ultralytics", "hf:": "transformers"}


def _copy(dst: Path) -> None:
    """The files a fresh clone would hold (tracked, and new files git does not ignore), no build outputs."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.split("\0")):
            src = ROOT / name
            if src.is_file():
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / name)
    else:
        shutil.copytree(ROOT, dst, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".venv", "build", "dist", ".git", "site", "__pycache__"))


def _run(line: str, cwd: Path) -> None:
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, capture_output=True, text=True,
                         timeout=1200, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, f"README command failed ({res.returncode}): {line}\n{res.stdout[-2000:]}\n" \
                                f"{res.stderr[-3000:]}"


def test_every_readme_command_runs_as_printed(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    _copy(clone)
    (clone / ".venv").symlink_to(Path(sys.prefix))  # the Quickstart's venv: this one
    blocks = fenced_blocks(README.read_text())
    quickstart = blocks[0][1][0]
    _run(quickstart.split(" && ")[-1], clone)  # .venv/bin/edgeport build: the embedded default, every target
    assert (clone / "dist" / "intel-cpu-int8" / "manifest.json").exists()
    ran = 0
    for lang, body in blocks[1:]:
        if lang != "bash":
            continue
        for line in body:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            missing = [mod for key, mod in NEEDS.items() if key in line and not has(mod)]
            if missing:
                continue  # the hub extra is not installed here (CI installs it)
            _run(line, clone)
            ran += 1
    assert ran >= 9, ran
