"""Child processes that die with the build.

A conversion child (onnx2tf and TensorFlow, minutes on a large model) runs in a process group of
its own. When the build is interrupted (SIGINT, or SIGTERM, which the CLI turns into the same
exception) the whole group is killed before the exception goes on, so no converter keeps running,
re-parented to init, writing into folders that are being removed. On Linux the child also asks
the kernel to kill it if the build process itself dies (SIGKILL), through PR_SET_PDEATHSIG.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the process group kill still covers interruptions
        pass


def run_child(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, capture_output=True, text=True)`` whose process group is killed whenever the
    caller is interrupted before the child ends."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        out, err = proc.communicate()
    except BaseException:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the child's whole process group and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
