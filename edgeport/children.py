"""Child processes that die with the build.

A conversion child (onnx2tf and TensorFlow, minutes on a large model) runs in a process group of
its own. When the build is interrupted (SIGINT, or SIGTERM, which the CLI turns into the same
exception) the whole group is killed before the exception goes on, so no converter keeps running,
re-parented to init, writing into folders that are being removed. On Linux the child also asks
the kernel to kill it if the build process itself dies (SIGKILL), through PR_SET_PDEATHSIG.
"""
from __future__ import annotations

import contextvars
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the process group kill still covers interruptions
        pass


def run_child(cmd: list[str], *, cwd: Path, env: dict[str, str],
              on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, capture_output=True, text=True)`` whose process group is killed whenever the
    caller is interrupted before the child ends; ``on_line`` sees each line of its stderr as it comes (the
    child's progress), not at the end."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    err: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))

    # The reader runs in the caller's context, so what on_line logs carries the build's current label.
    reader = threading.Thread(target=contextvars.copy_context().run, args=(read_stderr,), daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait()
        reader.join()
    except BaseException:
        kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "".join(err))


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
