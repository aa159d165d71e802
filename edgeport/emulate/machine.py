"""The emulated device: the Debian 12 arm64 root's Python under qemu-user, on the device's own core.

qemu's default core (``max``) offers every extension qemu knows, and XNNPACK's kernels for some of them give wrong
results under qemu 7.2 (docs/benchmarks/arm-emulation.md); with the device's core (``-cpu cortex-a76`` for a
Raspberry Pi 5) and that core's /proc/cpuinfo (rootfs.cpu_view) the same wheels give the x86 results, and the
kernels chosen are the device's.

``python3`` on the PATH of the command lines run here is the emulated interpreter, so a device README's lines run
as they are written. A venv made by the emulated Python gets interpreters that are the emulator too
(``venv_shims``): what binfmt_misc would do on a host that had it. Nothing is written into the host's Python or
the root.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
from pathlib import Path

from edgeport.emulate import rootfs

PYTHON = "usr/bin/python3.11"
NAMES = ("python3", "python3.11", "python")  # what a README or a venv calls the interpreter


class Machine:
    """One emulated core over the cached root (``rootfs.ensure_root``)."""

    def __init__(self, root: Path, cpu: str) -> None:
        self.cpu = cpu
        self.root = rootfs.cpu_view(root, cpu)
        self.qemu = rootfs.qemu()
        self.shims = self.root.parent / f"bin-{cpu}"
        self._shim()

    def _shim(self) -> None:
        """``python3``, ``python3.11`` and ``python`` on a PATH of their own: the emulated interpreter."""
        self.shims.mkdir(parents=True, exist_ok=True)
        for name in NAMES:
            self._write_shim(self.shims / name, self.argv([]))

    def argv(self, args: list[str], argv0: Path | None = None) -> list[str]:
        """The host command that runs the emulated Python with ``args`` (started as ``argv0`` when given)."""
        named = ["-0", str(argv0)] if argv0 is not None else []
        return [self.qemu, "-cpu", self.cpu, "-L", str(self.root), *named, str(self.root / PYTHON), *args]

    def venv_shims(self, venv: Path) -> None:
        """The venv's interpreters (links to the root's Python, which the host cannot run) as the emulator, started
        under the venv's own path so that Python finds its pyvenv.cfg."""
        for name in NAMES:
            shim = venv / "bin" / name
            if shim.is_symlink():
                shim.unlink()
            self._write_shim(shim, self.argv([], argv0=shim))

    @staticmethod
    def _write_shim(path: Path, argv: list[str]) -> None:
        """A shell script at ``path`` that runs ``argv`` with its own arguments (rewritten only when it differs)."""
        text = f'#!/bin/sh\nexec {" ".join(shlex.quote(a) for a in argv)} "$@"\n'
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            path.chmod(0o755)

    def env(self) -> dict[str, str]:
        """The environment of an emulated run: the shims first on PATH, nothing of the host's Python settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.shims}{os.pathsep}{env.get('PATH', '')}"
        env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore", "PIP_NO_INPUT": "1",
                    "PYTHONDONTWRITEBYTECODE": "1"})
        return env

    def shell(self, line: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        """One command line as a device README writes it, run with the emulated Python."""
        return subprocess.run(["/bin/sh", "-c", line], cwd=cwd, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)


def venv_for(steps: list[str], requirements: Path, cpu: str) -> Path:
    """Where the venv the install ``steps`` make is kept between runs: one per steps, requirements file and core
    (its interpreters start that core)."""
    digest = hashlib.sha256("\n".join([*steps, requirements.read_text() if requirements.is_file() else "", cpu,
                                       rootfs.RECIPE]).encode()).hexdigest()
    return rootfs.cache_folder() / "venvs" / digest[:16]
