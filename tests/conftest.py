"""Shared fixtures: real CamVid frames from ../shared, tiny models built in code."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "datasets" / "camvid"


def has(module: str) -> bool:
    """True when ``module`` is installed (markers skip only then)."""
    return importlib.util.find_spec(module) is not None


# The longest files (minutes each), collected first: with two workers each taking whole files, the run then ends
# on short files instead of one worker finishing a long one alone.
LONGEST_FIRST = ("integration/test_pruning.py", "integration/test_detection.py", "integration/test_hub_models.py",
                 "integration/test_camvid.py", "docs/test_readme.py", "integration/test_emulate.py",
                 "integration/test_tflite.py", "integration/test_fleet.py", "runner/test_soak.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the files longest first (a stable sort: each file's tests keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get("/".join(item.nodeid.split("::")[0].split("/")[-2:]), len(rank)))


needs_openvino = pytest.mark.skipif(not (has("openvino") and has("nncf")), reason="openvino/nncf not installed")
needs_torch = pytest.mark.skipif(not has("torch"), reason="torch not installed")


@pytest.fixture(scope="session")
def camvid() -> Path:
    """The CamVid folder; the tests need real frames."""
    if not (CAMVID / "val").is_dir():
        pytest.fail(f"CamVid is missing at {CAMVID}; the tests read real frames from ../shared")
    return CAMVID


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (nothing listens there unless bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run `edgeport ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeport.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _closure(dists: list[str]) -> list[str]:
    """The distributions plus everything they require (markers evaluated here)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen: list[str] = []
    todo = list(dists)
    while todo:
        name = todo.pop()
        if name.lower() in (s.lower() for s in seen):
            continue
        seen.append(name)
        for req in md.requires(name) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def make_device_venv(dest: Path, dists: list[str], base: str | None = None) -> Path:
    """A fresh venv whose site-packages holds only ``dists`` and their requirements.

    Offline: the packages are the ones installed here, linked in by their top-level names,
    so a device-side test proves runner.py needs nothing else (no edgeport, no torch).
    ``base`` is the python the venv is made from (default this one; it must be the same minor version).
    Returns the venv's python.
    """
    import importlib.metadata as md
    import sysconfig

    subprocess.run([base or sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    rel = Path(sysconfig.get_path("purelib")).relative_to(sysconfig.get_paths()["data"])
    site = dest / rel
    for name in _closure(dists):
        dist = md.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {"..", "__pycache__"}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    return dest / "bin" / "python"


def _runtime_venv(factory: pytest.TempPathFactory, runtime: str, module: str, absent: tuple[str, ...]) -> Path:
    """A device venv with numpy, opencv-python-headless and ``runtime``; asserts ``absent`` cannot import."""
    if not has(module):
        pytest.skip(f"{runtime} not installed")
    py = make_device_venv(factory.mktemp(f"venv-{runtime}"), ["numpy", "opencv-python-headless", runtime])
    probe = subprocess.run([str(py), "-c", f"import importlib.util as u; print([m for m in {absent!r} "
                            "if u.find_spec(m)])"], capture_output=True, text=True, env=device_env(), cwd=py.parent)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    return py


@pytest.fixture(scope="session")
def openvino_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """python of a venv holding only numpy, opencv-python-headless and openvino."""
    return _runtime_venv(tmp_path_factory, "openvino", "openvino", ("edgeport", "torch", "onnx", "nncf"))


def device_env() -> dict[str, str]:
    """A minimal environment for device-side processes (no PYTHONPATH leaking the package)."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONNOUSERSITE": "1", "HOME": os.environ.get("HOME", "/tmp")}


@pytest.fixture(scope="session")
def camvid_video(camvid: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MJPG .avi made from the CamVid val frames in name order (101 frames, 480x360, 10 fps)."""
    import cv2

    path = tmp_path_factory.mktemp("video") / "camvid-val.avi"
    frames = sorted((camvid / "val").glob("*.png"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (480, 360))
    for f in frames:
        img = cv2.imread(str(f))
        writer.write(cv2.resize(img, (480, 360)) if img.shape[:2] != (360, 480) else img)
    writer.release()
    assert path.stat().st_size > 100_000
    return path


@pytest.fixture(scope="session")
def default_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A project folder where `edgeport build` made the default model's intel-cpu and intel-igpu bundles."""
    if not (has("torch") and has("openvino")):
        pytest.skip("torch and openvino are needed to build")
    proj = tmp_path_factory.mktemp("proj")
    res = run_cli("build", "--target", "intel-cpu", "--target", "intel-igpu", cwd=proj)
    assert res.returncode == 0, res.stderr[-3000:]
    return proj, res


@pytest.fixture(scope="module")
def bundle(default_project: tuple[Path, subprocess.CompletedProcess[str]],
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the default model's intel-cpu INT8 bundle, away from the project (one per test module)."""
    import shutil

    dest = tmp_path_factory.mktemp("device") / "intel-cpu-int8"
    shutil.copytree(default_project[0] / "dist" / "intel-cpu-int8", dest)
    return dest


@pytest.fixture(scope="session")
def tflite_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """python of a venv holding only numpy, opencv-python-headless and ai-edge-litert."""
    return _runtime_venv(tmp_path_factory, "ai-edge-litert", "ai_edge_litert",
                         ("edgeport", "torch", "tensorflow", "onnx2tf", "openvino"))


def offline_prefix() -> list[str]:
    """A command prefix that runs a process in a network namespace of its own (no network at all)."""
    import shutil as sh

    if sh.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    pytest.skip("cannot make a network namespace here (unshare -rn)")


def run_cli_offline(*args: str, cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    """`edgeport ARGS` with networking disabled: a network namespace holding only a downed loopback."""
    return subprocess.run([*offline_prefix(), sys.executable, "-m", "edgeport.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def assert_build_and_validate_agree(project: Path) -> dict:
    """`edgeport validate` on a project's dist/ gives each bundle the build's verdict, and its task metric the
    build's figure (the build's reference is the exported ONNX, validate's PyTorch: within 0.02 points).
    Returns validate's JSON report."""
    import json

    res = run_cli("validate", "--report", str(project / "validate-report"), cwd=project, timeout=900)
    report = json.loads((project / "validate-report" / "validate.json").read_text())
    checked = 0
    for b in report["bundles"]:
        manifest = json.loads((Path(b["path"]) / "manifest.json").read_text())
        built = manifest["verdict"]["status"]
        assert (built == "failed") == (b["status"] == "failed"), (b["name"], built, b["status"], res.stdout[-3000:])
        acc = manifest["parity"]["accuracy"]
        metric = [c for c in b["cases"] if "drop" in c["metrics"]]
        if acc and acc.get("drop") is not None:
            assert len(metric) == 1 and "report half" in metric[0]["metrics"]["frames"], (b["name"], metric)
            key = acc["metric"]
            assert abs(metric[0]["metrics"]["metrics"][key] - acc["metrics"][key]) < 0.02, (b["name"], metric, acc)
            assert abs(metric[0]["metrics"]["drop"] - acc["drop"]) < 0.02, (b["name"], metric, acc)
            assert metric[0]["metrics"]["max_drop"] == acc["max_drop"]
            checked += 1
    assert checked, "no bundle had a task metric to compare"
    assert (res.returncode == 0) == all(b["status"] != "failed" for b in report["bundles"]), res.stdout[-2000:]
    return report
