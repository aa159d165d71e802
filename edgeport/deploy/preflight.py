"""Preflight: facts about a device (architecture, OS, Python, L4T, TensorRT, GStreamer, disk), every mismatch
with the bundle's target profile named with both sides."""
from __future__ import annotations

import logging
import shlex
from typing import Any

from edgeport.backends import get_backend
from edgeport.deploy.ssh import SSH, StepError, remote_path

log = logging.getLogger("edgeport")


# ---------------------------------------------------------------- preflight
PREFLIGHT = r"""
PY=%(python)s
echo "arch=$(uname -m)"
[ -r /etc/os-release ] && . /etc/os-release && echo "os=$PRETTY_NAME"
echo "python=$($PY -c 'import sys; print("%%d.%%d.%%d" %% sys.version_info[:3])' 2>/dev/null)"
[ -r /etc/nv_tegra_release ] && echo "l4t=$(head -n1 /etc/nv_tegra_release | sed 's/^# //')"
echo "tensorrt=$($PY -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null)"
echo "gstreamer=$($PY -c 'import cv2, re; print(re.search(r"GStreamer:\s*(\w+)", \
  cv2.getBuildInformation()).group(1))' 2>/dev/null)"
mkdir -p %(root)s && echo "free_mb=$(df -Pk %(root)s | awk 'NR==2 {print int($4/1024)}')"
echo "systemd=$(command -v systemctl >/dev/null 2>&1 && echo yes || echo no)"
echo "uid=$(id -u)"
echo "home=$HOME"
"""


def preflight(ssh: SSH, manifest: dict[str, Any], root: str, bundle_mb: float) -> dict[str, str]:
    """Facts about the device; StepError naming every mismatch with the bundle's target profile."""
    res = ssh.run(PREFLIGHT % {"python": shlex.quote(ssh.host.python), "root": remote_path(root)}, step="preflight")
    facts = dict(ln.split("=", 1) for ln in res.stdout.decode(errors="replace").splitlines() if "=" in ln)
    profile = manifest.get("target_profile", {})
    target, backend = manifest["target"], manifest["backend"]
    problems = []
    want_arch = profile.get("arch")
    if want_arch and facts.get("arch") and facts["arch"] != want_arch:
        problems.append(f"architecture: the bundle is for {want_arch}, the device is {facts['arch']}")
    py = facts.get("python", "")
    if not py:
        problems.append(f"python: {ssh.host.python} does not run on the device (pass --python)")
    elif tuple(int(p) for p in py.split(".")[:2]) < (3, 6):
        problems.append(f"python: the runner needs 3.6 or newer, the device has {py}")
    problems += get_backend(backend).device_preflight(profile, facts, ssh.host.python)
    free = int(facts.get("free_mb") or 0)
    if free and free < 2 * bundle_mb + 50:
        problems.append(f"disk: {free} MB free under {root}, the bundle needs {2 * bundle_mb + 50:.0f} MB")
    if problems:
        raise StepError("preflight", f"{ssh.host.label}: refused for {target}: " + "; ".join(problems))
    return facts
