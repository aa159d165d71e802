"""The emulated device: the Debian 12 arm64 root's Python under qemu-user, on the device's own core.

qemu's default core (``max``) offers every extension qemu knows, and XNNPACK's kernels for some of them give wrong
results under qemu 7.2 (docs/arm-emulation.md); with the device's core (``-cpu cortex-a76`` for a Raspberry Pi 5)
and that core's /proc/cpuinfo (rootfs.cpu_view) the same wheels give the x86 results, and the kernels chosen are
the device's.

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


class Machine:
    """One emulated core over the cached root (``rootfs.ensure_root``)."""

    def __init__(self, root: Path, cpu: str) -> None:
        self.cpu = cpu
        self.root = rootfs.cpu_view(root, cpu)
        self.qemu = rootfs.qemu()
        self.shims = self.root.parent / f"bin-{cpu}"
        self._shim()

    def _shim(self) -> None:
        """``python3`` and ``python3.11`` on a PATH of their own: the emulated interpreter."""
        self.shims.mkdir(parents=True, exist_ok=True)
        line = " ".join(shlex.quote(str(a)) for a in self.argv([]))
        for name in ("python3", "python3.11", "python"):
            shim = self.shims / name
            text = f'#!/bin/sh\nexec {line} "$@"\n'
            if not shim.is_file() or shim.read_text() != text:
                shim.write_text(text)
                shim.chmod(0o755)

    def argv(self, args: list[str]) -> list[str]:
        """The host command that runs the emulated Python with ``args``."""
        return [self.qemu, "-cpu", self.cpu, "-L", str(self.root), str(self.root / PYTHON), *args]

    def venv_shims(self, venv: Path) -> None:
        """The venv's interpreters (links to the root's Python, which the host cannot run) as the emulator, started
        under the venv's own path so that Python finds its pyvenv.cfg."""
        for name in ("python", "python3", "python3.11"):
            shim = venv / "bin" / name
            if shim.is_symlink() or shim.exists():
                shim.unlink()
            args = [self.qemu, "-cpu", self.cpu, "-L", str(self.root), "-0", str(shim), str(self.root / PYTHON)]
            shim.write_text(f'#!/bin/sh\nexec {" ".join(shlex.quote(a) for a in args)} "$@"\n')
            shim.chmod(0o755)

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
