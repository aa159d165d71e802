"""Shared fixtures: real CamVid frames from ../shared, tiny models built in code."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "datasets" / "camvid"


def has(module: str) -> bool:
    """True when ``module`` is installed (markers skip only then)."""
    return importlib.util.find_spec(module) is not None


needs_openvino = pytest.mark.skipif(not (has("openvino") and has("nncf")), reason="openvino/nncf not installed")
needs_torch = pytest.mark.skipif(not has("torch"), reason="torch not installed")


@pytest.fixture(scope="session")
def camvid() -> Path:
    """The CamVid folder; the tests need real frames."""
    if not (CAMVID / "val").is_dir():
        pytest.fail(f"CamVid is missing at {CAMVID}; the tests read real frames from ../shared")
    return CAMVID


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run `edgeport ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeport.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
