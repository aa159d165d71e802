"""Builds survive faults: SIGTERM mid-conversion, SIGKILL mid-archive, two builds on the same folders.

Real processes and real signals: `edgeport build` runs as a user runs it, and is interrupted from here.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeport.bundle import archive_matches, archive_of
from edgeport.cache import TMP_PREFIX
from tests.conftest import has, needs_openvino, needs_torch, run_cli

pytestmark = [needs_torch, needs_openvino]


def _start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "edgeport.cli", "build", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the processes whose parent is ``pid``."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _leftovers(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob(f"{TMP_PREFIX}*")]


@pytest.fixture()
def cached_project(default_project, tmp_path: Path) -> Path:
    """A project whose calibration and export stages are cached, so a build reaches its targets at once."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copytree(default_project[0] / "build" / "calibration", proj / "build" / "calibration")
    shutil.copytree(default_project[0] / "build" / "export", proj / "build" / "export")
    return proj


@pytest.mark.skipif(not has("onnx2tf"), reason="the TFLite backend is not installed")
def test_sigterm_during_tflite_conversion_kills_the_converter_and_leaves_nothing(cached_project: Path) -> None:
    proc = _start(cached_project, "--target", "raspberry-pi-5:fp32")
    deadline = time.time() + 120
    converter = None
    while time.time() < deadline and converter is None and proc.poll() is None:
        converter = next((pid for pid, cmd in _children(proc.pid).items() if "tflite.convert" in cmd), None)
        time.sleep(0.05)
    assert converter is not None, "the TFLite converter never started"
    time.sleep(2.0)  # onnx2tf and TensorFlow are loading and writing in the work folder
    work = _leftovers(cached_project / "build")
    assert work, "the conversion's work folder should exist while it runs"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith(("error:", "internal error:"))]
    assert errors == ["error: interrupted by SIGTERM; unfinished work was removed, finished stages stay cached"], err
    assert "Traceback" not in err
    for _ in range(50):  # the group was killed before the build exited; give the kernel a moment to reap
        if not _alive(converter):
            break
        time.sleep(0.1)
    assert not _alive(converter), "the TFLite converter outlived the build"
    assert _leftovers(cached_project / "build", cached_project / "dist") == []
    assert not (cached_project / "dist" / "raspberry-pi-5-fp32").exists()
    assert not list(Path("/tmp").glob("edgeport-tflite-*"))  # nothing left in the system temp folder either
    again = run_cli("build", "--target", "raspberry-pi-5:fp32", cwd=cached_project)
    assert again.returncode == 0, again.stderr[-2000:]


def test_sigkill_while_an_archive_is_written_then_the_next_build_repairs(cached_project: Path) -> None:
    targets = ("--target", "intel-cpu", "--target", "intel-igpu")
    first = run_cli("build", *targets, cwd=cached_project)
    assert first.returncode == 0, first.stderr[-2000:]
    # a change that rewrites both bundles: a per-output tolerance every artifact still meets
    (cached_project / "edgeport.toml").write_text('[validation.tolerance."*"]\nmin_sqnr_db = 1\n')
    dist = cached_project / "dist"
    proc = _start(cached_project, *targets)
    hit = False
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(dist.glob(f"{TMP_PREFIX}*.tar.gz.part")):
            proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up
            hit = True
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    assert hit, "the build ended before an archive was being written"
    assert _leftovers(dist), "a SIGKILL while writing an archive leaves its temporary file"
    for archive in dist.glob("*.tar.gz"):  # whatever is in place is a consistent pair
        assert archive_matches(archive.with_name(archive.name[:-len(".tar.gz")]))
    again = run_cli("build", *targets, cwd=cached_project)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "leftover(s) of an interrupted build" in again.stderr
    assert _leftovers(cached_project / "build", dist) == []
    for name in ("intel-cpu-int8", "intel-igpu-fp16"):
        assert archive_matches(dist / name), name


def test_an_archive_that_does_not_match_its_folder_is_rewritten(cached_project: Path) -> None:
    """The state an older edgeport left after a kill: the previous build's archive beside the new folder."""
    targets = ("--target", "intel-cpu", "--target", "intel-igpu")
    assert run_cli("build", *targets, cwd=cached_project).returncode == 0
    dist = cached_project / "dist"
    archive_of(dist / "intel-cpu-int8").write_bytes(archive_of(dist / "intel-igpu-fp16").read_bytes())
    assert not archive_matches(dist / "intel-cpu-int8")
    res = run_cli("build", *targets, cwd=cached_project)
    assert res.returncode == 0 and "did not match its folder" in res.stderr, res.stderr[-2000:]
    assert archive_matches(dist / "intel-cpu-int8")


@pytest.mark.parametrize("shared", ["build and dist", "dist only"])
def test_two_concurrent_builds_on_the_same_folders(default_project, tmp_path: Path, shared: str) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    targets = ("--target", "intel-cpu", "--target", "intel-igpu")
    dirs = [(), ()] if shared == "build and dist" else [("--build-dir", "build-a"), ("--build-dir", "build-b")]
    procs = [_start(proj, *targets, *d) for d in dirs]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err and "internal error" not in err
    assert sum("waiting for another edgeport build" in err for _, err in results) == 1, [e for _, e in results]
    waited = next(err for _, err in results if "waiting for another edgeport build" in err)
    assert re.search(r"waiting for another edgeport build \(pid \d+\)", waited), waited  # the holder, by pid
    dist = proj / "dist"
    for name in ("intel-cpu-int8", "intel-igpu-fp16"):
        assert archive_matches(dist / name), name
    assert _leftovers(proj) == []
    check = run_cli("build", *targets, *dirs[0], cwd=proj)
    assert check.returncode == 0 and "nothing changed" in check.stdout


def test_a_second_build_waits_and_says_for_whom(cached_project: Path) -> None:
    """While one process holds the build folder, a build waits, naming it, then goes on when it is released."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from edgeport.cache import folder_lock\n"
                               f"with folder_lock(Path({str(cached_project / 'build')!r})):\n"
                               "    print('locked', flush=True); time.sleep(4)"],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.time()
    res = run_cli("build", "--target", "intel-igpu", cwd=cached_project)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"waiting for another edgeport build (pid {holder.pid})" in res.stderr
    assert time.time() - t0 > 2.0
    holder.wait(10)
