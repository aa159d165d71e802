"""The emulated device: the Debian 12 arm64 root's Python under qemu-user, on the device's own core.

qemu's default core (``max``) offers every extension qemu knows, and XNNPACK's kernels for some of them give wrong
results under qemu 7.2 (a CamVid INT8 model agreed 6 % with itself on x86); with the device's core (``-cpu
cortex-a76`` for a Raspberry Pi 5) and that core's /proc/cpuinfo (rootfs.cpu_view) the same wheels give the x86
results, and the kernels chosen are the device's.

A bundle's Python packages go where the device owner's ``python3 -m pip install`` would put them, but into a folder
of their own (pip's PIP_TARGET), kept per requirements file: nothing is written into the host or the root.
``python3`` on the PATH of the commands run here is the emulated interpreter, so a device README's command lines run
as they are written.
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

    def env(self, site: Path | None = None) -> dict[str, str]:
        """The environment of an emulated run: the shims first on PATH, ``site`` (installed packages) on the
        import path and as pip's target; nothing of the host's Python settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.shims}{os.pathsep}{env.get('PATH', '')}"
        env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore", "PIP_NO_INPUT": "1",
                    "PYTHONDONTWRITEBYTECODE": "1"})
        if site is not None:
            env.update({"PYTHONPATH": str(site), "PIP_TARGET": str(site)})
        return env

    def shell(self, line: str, cwd: Path, site: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        """One command line as a device README writes it (``python3 ...``), run with the emulated Python."""
        return subprocess.run(["/bin/sh", "-c", line], cwd=cwd, env=self.env(site), capture_output=True, text=True,
                              timeout=timeout)

    def python(self, args: list[str], cwd: Path, site: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        """The emulated Python with ``args``, ``site``'s packages importable."""
        return subprocess.run(self.argv(args), cwd=cwd, env=self.env(site), capture_output=True, text=True,
                              timeout=timeout)


def site_for(requirements: Path, install_line: str) -> Path:
    """The folder a bundle's packages are installed into: one per requirements file's content and install line,
    kept between runs beside the root."""
    digest = hashlib.sha256(requirements.read_bytes() + install_line.encode() + rootfs.RECIPE.encode()).hexdigest()
    return rootfs.cache_folder() / "sites" / digest[:16]
