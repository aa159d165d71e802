"""Devices for fleet tests and benchmarks: real OpenSSH servers on 127.0.0.1, each with its own port, host key,
user (epfleet1..N, created with useradd: root only) and install root in that user's home; one throwaway client
key; a known_hosts file holding every host key (nothing is accepted on first contact); a device venv with only
numpy, OpenCV and OpenVINO, made from the system's python3 so that the users can run it."""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.conftest import free_port, make_device_venv

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def start_devices(d: Path, n: int) -> dict[str, Any] | str:
    """The running devices (see the module), or why they cannot run here."""
    if os.geteuid() != 0:
        return "device users are created with useradd (root only)"
    # the users cannot enter /root, where this python may live: the venv is made from the system's python3 of the
    # same minor version, and links the packages installed here (in a folder they can read)
    system = shutil.which("python3", path="/usr/bin:/bin")
    probe = subprocess.run([system or "false", "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                           text=True)
    if probe.stdout.strip() != str(tuple(sys.version_info[:2])):
        return f"no system python3 of this python's version {sys.version_info[:2]} for the device users"
    shared = Path(tempfile.mkdtemp(prefix="edgeport-fleet-"))  # outside 0700 folders: the users read it
    shared.chmod(0o755)
    python = make_device_venv(shared / "venv", ["numpy", "opencv-python-headless", "openvino"], base=system)
    probe = subprocess.run(["su", "-s", "/bin/sh", "nobody", "-c", f"{python} -c 'import openvino, cv2, numpy'"],
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key"), "-C", "fleet"],
                   check=True)
    keys = shared / "authorized_keys"
    shutil.copy(d / "client_key.pub", keys)
    keys.chmod(0o644)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    hosts, procs, known = [], [], []
    for i in range(1, n + 1):
        user = f"epfleet{i}"
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", user], check=True)
        subprocess.run(["usermod", "-p", "*", user], check=True)  # no password, but not locked (sshd refuses "!")
        root = Path(pwd.getpwnam(user).pw_dir) / "edgeport-fleet"
        subprocess.run(["rm", "-rf", str(root)], check=True)
        hk = d / f"host_key{i}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)
        port = free_port()
        cfg = d / f"sshd_config{i}"
        cfg.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {keys}\n"
                       "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                       f"PidFile {d / f'sshd{i}.pid'}\nLogLevel ERROR\n")
        procs.append(subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stderr=open(d / f"sshd{i}.log", "w")))
        known.append(f"[127.0.0.1]:{port} {' '.join((d / f'host_key{i}.pub').read_text().split()[:2])}")
        hosts.append({"name": f"dev{i}", "user": user, "port": port, "root": root})
    for h in hosts:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", h["port"]), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
    (d / "known_hosts").write_text("\n".join(known) + "\n")
    return {"dir": d, "hosts": hosts, "key": d / "client_key", "known_hosts": d / "known_hosts", "python": python,
            "procs": procs, "shared": shared}


def stop_devices(devices: dict[str, Any]) -> None:
    for p in devices["procs"]:
        p.terminate()
        p.wait(10)
    shutil.rmtree(devices["shared"], ignore_errors=True)


def write_inventory(devices: dict[str, Any], path: Path, extra: dict[str, str] | None = None,
                    group: str = "intel_cpu") -> Path:
    """An Ansible INI inventory of the devices, all in ``group``; ``extra`` adds host vars by host name."""
    lines = [f"[{group}]"]
    for h in devices["hosts"]:
        lines.append(f"{h['name']} ansible_host=127.0.0.1 ansible_port={h['port']} ansible_user={h['user']} "
                     f"ansible_ssh_private_key_file={devices['key']} edgeport_python={devices['python']} "
                     f"edgeport_root={h['root']} {(extra or {}).get(h['name'], '')}")
    path.write_text("\n".join(lines) + "\n")
    return path
