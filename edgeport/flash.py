"""`edgeport flash` and `edgeport devices status`: bundles onto devices over SSH, verified there.

Steps per host, each one a point of no change until the last:

1. host key: known_hosts checking stays on; an unknown host needs its fingerprint confirmed
   (interactively) or given (``--accept-fingerprint SHA256:...``);
2. preflight: architecture, OS, Python, free disk; on a Jetson L4T/JetPack, TensorRT and
   OpenCV's GStreamer support; checked against the bundle's target profile;
3. copy into ``<root>/<model>/<version>.partial`` with resume (a file whose prefix is already
   there gets only the rest) and sha256 verification of every file on the device;
4. setup on the device: the runtime's imports (``pip install -r requirements.txt`` when they
   are missing and ``--install`` is on); Jetson: ``build_engine.py``;
5. ``runner.py --selftest`` on the device;
6. the atomic switch: ``current`` -> the new version (rename of a symlink), ``previous`` -> the
   old one; with ``--service`` a systemd unit that starts the runner at boot.

Everything runs through the system's OpenSSH client in batch mode (no password prompts); no key
material is read, logged or copied; only the identity file's path is passed to ssh.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edgeport.bundle import failed_gates, read_manifest, verify_bundle
from edgeport.errors import BundleError, ConfigError, DeviceError
from edgeport.model import file_sha256

log = logging.getLogger("edgeport")
DEFAULT_ROOT = "~/edgeport"


@dataclass
class Host:
    """One device: user@address, port, identity file, the python that runs the runner."""

    address: str
    port: int = 22
    identity: str | None = None
    python: str = "python3"
    name: str = ""

    @property
    def label(self) -> str:
        """How tables name this host."""
        return self.name or (self.address if self.port == 22 else f"{self.address}:{self.port}")

    @property
    def hostname(self) -> str:
        """The address without the user."""
        return self.address.rpartition("@")[2]


@dataclass
class HostResult:
    """What happened on one host."""

    host: str
    status: str  # flashed | unchanged | rolled-back | refused | failed
    step: str
    version: str = ""
    previous: str = ""
    message: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class StepError(DeviceError):
    """A step failed on a device; ``step`` names it."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


# ---------------------------------------------------------------- ssh
class SSH:
    """The OpenSSH client with host-key checking on, batch mode, and one shared connection."""

    def __init__(self, host: Host, known_hosts: Path, control_dir: Path, timeout: int = 15) -> None:
        self.host = host
        self.known_hosts = known_hosts
        self.base = ["ssh", "-p", str(host.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                     "-o", f"UserKnownHostsFile={known_hosts}", "-o", f"ConnectTimeout={timeout}",
                     "-o", "ServerAliveInterval=10", "-o", "ControlMaster=auto",
                     "-o", f"ControlPath={control_dir}/%C", "-o", "ControlPersist=30", "-o", "LogLevel=ERROR"]
        if host.identity:
            self.base += ["-o", "IdentitiesOnly=yes", "-i", host.identity]

    def run(self, script: str, *, stdin: bytes | None = None, timeout: float = 600,
            check: bool = True, step: str = "ssh") -> subprocess.CompletedProcess[bytes]:
        """Run ``script`` with sh on the device; StepError with its stderr's last line on failure."""
        cmd = [*self.base, "--", self.host.address, "sh -c " + shlex.quote(script)]
        try:
            res = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StepError(step, f"{self.host.label}: {step} timed out after {timeout:.0f}s") from None
        if res.returncode == 255:
            raise StepError(step, f"{self.host.label}: ssh failed: {_ssh_reason(res.stderr)}")
        if check and res.returncode != 0:
            tail = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
            raise StepError(step, f"{self.host.label}: {step} failed (exit {res.returncode}): "
                                  f"{tail[-1] if tail else 'no output'}")
        return res

    def close(self) -> None:
        """End the shared connection."""
        subprocess.run([*self.base, "-O", "exit", "--", self.host.address], capture_output=True, timeout=10)


def _ssh_reason(stderr: bytes) -> str:
    text = stderr.decode(errors="replace")
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        return ("host key verification failed: the device's key is not the one in known_hosts (a reinstalled "
                "device, or someone in between); check it, then remove the old entry with ssh-keygen -R")
    if "Permission denied" in text:
        return "permission denied (publickey): pass --identity KEY or add your key to the device's authorized_keys"
    if "Connection refused" in text:
        return "connection refused: is sshd running on the device, and is --port right?"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no answer"


def _known_hosts_name(host: Host) -> str:
    return host.hostname if host.port == 22 else f"[{host.hostname}]:{host.port}"


def scan_host_key(host: Host, known_hosts: Path) -> list[str] | None:
    """The device's host key lines when known_hosts does not know it yet; None when it does."""
    if known_hosts.is_file():
        found = subprocess.run(["ssh-keygen", "-F", _known_hosts_name(host), "-f", str(known_hosts)],
                               capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip():
            return None
    scan = subprocess.run(["ssh-keyscan", "-p", str(host.port), "-T", "10", host.hostname], capture_output=True,
                          text=True, timeout=30)
    keys = [ln for ln in scan.stdout.splitlines() if ln and not ln.startswith("#")]
    if not keys:
        raise StepError("host key", f"{host.label}: no SSH host key could be read (is sshd running on port "
                                    f"{host.port}?)")
    return keys


def trust_host_key(host: Host, keys: list[str], known_hosts: Path, accept: str | None, interactive: bool) -> None:
    """Add a first-contact host's keys to known_hosts, only when ``accept`` equals one of their SHA256
    fingerprints or the user confirms them; StepError naming the fingerprints otherwise."""
    fps = subprocess.run(["ssh-keygen", "-lf", "-"], input="\n".join(keys) + "\n", capture_output=True, text=True)
    prints = [ln.split()[1] for ln in fps.stdout.splitlines() if len(ln.split()) > 1]
    shown = ", ".join(f"{ln.split()[-1].strip('()')} {ln.split()[1]}" for ln in fps.stdout.splitlines() if ln)
    if accept is None and interactive:
        sys.stderr.write(f"{host.label} is not in {known_hosts}. Its host keys: {shown}\nCompare with "
                         "`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the device. Trust it? [y/N] ")
        sys.stderr.flush()
        ok = sys.stdin.readline().strip().lower() in ("y", "yes")
    else:
        ok = accept is not None and accept in prints
    if not ok:
        given = f"--accept-fingerprint {accept} does not match; " if accept else ""
        raise StepError("host key", f"{host.label} is not in {known_hosts}; {given}its host keys are {shown}: "
                                    "verify one on the device and pass --accept-fingerprint SHA256:...")
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    name = _known_hosts_name(host)
    with open(known_hosts, "a") as fh:
        for ln in keys:
            fh.write(f"{name} {ln.partition(' ')[2]}\n")


def check_host_keys(hosts: list[Host], opts: FlashOptions) -> dict[int, str]:
    """Make sure known_hosts trusts every host: scans in parallel, confirmations one host at a time.

    Returns {index: refusal message} for the hosts that stay untrusted.
    """
    def scan(h: Host) -> list[str] | str | None:
        try:
            return scan_host_key(h, opts.known_hosts)
        except (StepError, subprocess.SubprocessError) as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=max(1, min(opts.jobs, len(hosts)))) as pool:
        scans = list(pool.map(scan, hosts))
    refused = {}
    for i, (h, keys) in enumerate(zip(hosts, scans)):
        if isinstance(keys, str):
            refused[i] = keys
        elif keys is not None:
            try:
                trust_host_key(h, keys, opts.known_hosts, opts.accept_fingerprint, opts.interactive)
            except StepError as e:
                refused[i] = str(e)
    return refused


@contextmanager
def session(host: Host, opts: FlashOptions) -> Iterator[SSH]:
    """One shared SSH connection to ``host`` for the duration of the block."""
    ctl = Path(tempfile.mkdtemp(prefix="edgeport-ssh-"))
    ssh = SSH(host, opts.known_hosts, ctl)
    try:
        yield ssh
    finally:
        ssh.close()
        shutil.rmtree(ctl, ignore_errors=True)


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
    res = ssh.run(PREFLIGHT % {"python": shlex.quote(ssh.host.python), "root": _q(root)}, step="preflight")
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
    if backend == "tensorrt":
        want = str(profile.get("runtime", {}).get("tensorrt", ""))
        jp = profile.get("runtime", {}).get("jetpack", "?")
        if not facts.get("l4t"):
            problems.append(f"L4T: the bundle is for a Jetson (JetPack {jp}), the device has no /etc/nv_tegra_release")
        have = facts.get("tensorrt", "")
        if not have:
            problems.append(f"TensorRT: the bundle needs TensorRT {want} (JetPack {jp}); {ssh.host.python} on the "
                            "device cannot import tensorrt")
        elif want and have.split(".")[0] != want.split(".")[0]:
            problems.append(f"TensorRT: the bundle is for TensorRT {want} (JetPack {jp}), the device has {have}; "
                            f"rebuild for a profile with TensorRT {have.split('.')[0]}.x")
        if facts.get("l4t") and facts.get("gstreamer", "").upper() != "YES":
            problems.append(f"OpenCV: {ssh.host.python}'s cv2 has no GStreamer, so csi:// cameras cannot open; "
                            "use JetPack's python3-opencv, not a pip OpenCV")
    free = int(facts.get("free_mb") or 0)
    if free and free < 2 * bundle_mb + 50:
        problems.append(f"disk: {free} MB free under {root}, the bundle needs {2 * bundle_mb + 50:.0f} MB")
    if problems:
        raise StepError("preflight", f"{ssh.host.label}: refused for {target}: " + "; ".join(problems))
    return facts


# ---------------------------------------------------------------- copy
def expected_digests(bundle: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of every file to copy: the manifest's files (verified before flashing) and the manifest itself."""
    return {**manifest["files"], "manifest.json": file_sha256(bundle / "manifest.json")}


def copy_bundle(ssh: SSH, bundle: Path, expected: dict[str, str], dest: str,
                bytes_limit: int | None = None) -> dict[str, int]:
    """Copy into ``dest`` with resume, then verify every sha256 on the device.

    ``bytes_limit`` stops after that many bytes have been sent (used to test an interrupted copy).
    Returns counts: sent bytes, skipped files, resumed files.
    """
    listing = ssh.run(f"mkdir -p {_q(dest)} && cd {_q(dest)} && for f in $(find . -type f | sed 's|^./||'); do "
                      "printf '%s %s %s\\n' \"$(wc -c < \"$f\")\" \"$(sha256sum \"$f\" | cut -d' ' -f1)\" \"$f\"; "
                      "done", step="copy")
    remote = {}
    for ln in listing.stdout.decode().splitlines():
        size, digest, name = ln.split(" ", 2)
        remote[name] = (int(size), digest)
    stats = {"sent": 0, "skipped": 0, "resumed": 0}
    for name in sorted(expected, key=lambda n: n == "manifest.json"):  # the manifest last
        local = bundle / name
        size = local.stat().st_size
        have = remote.get(name)
        if have == (size, expected[name]):
            stats["skipped"] += 1
            continue
        offset = 0
        if have and 0 < have[0] < size and file_sha256(local, limit=have[0]) == have[1]:
            offset = have[0]
            stats["resumed"] += 1
        with open(local, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        if bytes_limit is not None and stats["sent"] + len(data) > bytes_limit:
            data = data[:max(0, bytes_limit - stats["sent"])]
            _put(ssh, dest, name, data, offset)
            raise StepError("copy", f"{ssh.host.label}: copy interrupted after {bytes_limit} bytes")
        _put(ssh, dest, name, data, offset)
        stats["sent"] += len(data)
    bad = verify_remote(ssh, dest, expected)
    if bad:
        raise StepError("verify", f"{ssh.host.label}: checksum mismatch on the device: {'; '.join(bad[:3])}")
    return stats


def verify_remote(ssh: SSH, dest: str, expected: dict[str, str]) -> list[str]:
    """sha256sum -c on the device: the lines of the files that do not match (empty when all do)."""
    check = ssh.run(f"cd {_q(dest)} && sha256sum -c --quiet -", stdin="".join(
        f"{d}  {n}\n" for n, d in expected.items()).encode(), check=False, step="verify")
    if check.returncode == 0:
        return []
    return check.stdout.decode(errors="replace").strip().splitlines() or [f"exit {check.returncode}"]


def _put(ssh: SSH, dest: str, name: str, data: bytes, offset: int) -> None:
    target = f"{dest}/{name}"
    op = ">>" if offset else ">"
    ssh.run(f"mkdir -p {_q(os.path.dirname(target))} && cat {op} {_q(target)}", stdin=data, step="copy")


def _q(path: str) -> str:
    """Quote a remote path, keeping a leading ~/ expandable."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


# ---------------------------------------------------------------- the flash
def version_of(manifest: dict[str, Any]) -> str:
    """The versioned folder's name: target, precision and build key (same bundle, same folder)."""
    return f"{manifest['target']}-{manifest['precision']}-{manifest.get('build_key', 'nokey')}"


def _model_dir(manifest: dict[str, Any], root: str) -> str:
    return f"{root.rstrip('/')}/{manifest['model']['name']}"


def _links(ssh: SSH, model_dir: str) -> tuple[str, str]:
    res = ssh.run(f"cd {_q(model_dir)} 2>/dev/null && echo \"$(readlink current)|$(readlink previous)\"",
                  check=False, step="status")
    cur, _, prev = res.stdout.decode().strip().partition("|")
    return cur, prev


def _switch(ssh: SSH, model_dir: str, version: str, previous: str, note: str = "") -> None:
    """current -> version, previous -> the old current; each a rename of a fresh symlink (atomic); a line in
    history.log (with ``note``, e.g. that a failed bundle was forced)."""
    parts = [f"cd {_q(model_dir)}"]
    if previous and previous != version:
        parts.append(f"ln -sfn {shlex.quote(previous)} .previous.tmp && mv -Tf .previous.tmp previous")
    parts.append(f"ln -sfn {shlex.quote(version)} .current.tmp && mv -Tf .current.tmp current")
    line = f"current {version}" + (f" {note}" if note else "")
    parts.append(f"echo \"$(date -u +%FT%TZ)\" {shlex.quote(line)} >> history.log")
    ssh.run(" && ".join(parts), step="switch")


def _setup(ssh: SSH, manifest: dict[str, Any], vdir: str, install: bool, forced: bool = False) -> str:
    py = shlex.quote(ssh.host.python)
    force = " --force" if forced else ""
    backend = manifest["backend"]
    module = {"openvino": "openvino", "tflite": "ai_edge_litert", "tensorrt": "tensorrt"}.get(backend, backend)
    probe = (f"{py} -c 'import numpy, cv2, {module}'" if backend != "tflite" else
             f"{py} -c 'import numpy, cv2' && ({py} -c 'import ai_edge_litert' || {py} -c 'import tflite_runtime' "
             f"|| {py} -c 'import tensorflow')")
    if ssh.run(probe + " 2>/dev/null", check=False, step="setup").returncode != 0:
        if not install:
            raise StepError("setup", f"{ssh.host.label}: numpy, OpenCV or {module} cannot be imported by "
                                     f"{ssh.host.python}; install requirements.txt there, or pass --install")
        ssh.run(f"cd {_q(vdir)} && {py} -m pip install -q -r requirements.txt", step="setup")
    if backend == "tensorrt":
        ssh.run(f"cd {_q(vdir)} && {py} build_engine.py{force}", timeout=3600, step="build engine")
        return "engine built"
    return "runtime present"


def flash_host(bundle: Path, manifest: dict[str, Any], expected: dict[str, str], host: Host,
               opts: FlashOptions) -> HostResult:
    """Flash one host whose key known_hosts trusts; never raises for device problems: the result says where
    it stopped."""
    t0 = time.time()
    version = version_of(manifest)
    model_dir = _model_dir(manifest, opts.root)
    vdir = f"{model_dir}/{version}"
    res = HostResult(host.label, "failed", "preflight", version)
    try:
        with session(host, opts) as ssh:
            if opts.rollback:
                _rollback(ssh, manifest, model_dir, opts, res)
            else:
                _flash_steps(ssh, bundle, manifest, expected, model_dir, vdir, opts, res)
    except StepError as e:
        res.status = "refused" if e.step == "preflight" else "failed"
        res.step, res.message = e.step, str(e)
    except (OSError, subprocess.SubprocessError) as e:
        res.message = f"{host.label}: {type(e).__name__}: {e}"
    res.seconds = time.time() - t0
    return res


def _rollback(ssh: SSH, manifest: dict[str, Any], model_dir: str, opts: FlashOptions, res: HostResult) -> None:
    res.step = "rollback"
    prev, cur = return_to_previous(ssh, manifest, model_dir, opts.service)
    res.status, res.step, res.version, res.previous = "rolled-back", "done", prev, cur


def return_to_previous(ssh: SSH, manifest: dict[str, Any], model_dir: str, service: bool,
                       note: str = "") -> tuple[str, str]:
    """Switch ``current`` back to ``previous`` (a history.log line with ``note``) and restart the service when
    there is one; (the version now current, the one left). StepError when there is no previous version."""
    cur, prev = _links(ssh, model_dir)
    if not prev:
        raise StepError("rollback", f"{ssh.host.label}: no previous version of {manifest['model']['name']} to "
                                    "return to")
    _switch(ssh, model_dir, prev, cur, note)
    if service:
        _restart_service(ssh, manifest)
    return prev, cur


def _flash_steps(ssh: SSH, bundle: Path, manifest: dict[str, Any], expected: dict[str, str], model_dir: str,
                 vdir: str, opts: FlashOptions, res: HostResult) -> None:
    """Preflight, copy, setup, selftest, switch (and service); ``res`` records where it got to."""
    host = ssh.host
    size_mb = sum((bundle / n).stat().st_size for n in manifest["files"]) / 1e6
    res.details["device"] = preflight(ssh, manifest, opts.root, size_mb)
    res.previous, before = _links(ssh, model_dir)
    res.step = "copy"
    if res.previous == os.path.basename(vdir) and not verify_remote(ssh, vdir, expected) and not opts.service:
        # this very version is current and intact: nothing to do (and its previous stays previous)
        res.status, res.step, res.previous = "unchanged", "done", before
        res.details["copy"] = {"sent": 0, "skipped": len(expected), "resumed": 0}
        return
    partial = f"{vdir}.partial"
    if ssh.run(f"test -f {_q(vdir)}/manifest.json", check=False, step="copy").returncode == 0:
        # Flashed before: reuse it when intact; never rewrite the live version in place.
        if not verify_remote(ssh, vdir, expected):
            res.details["copy"] = {"sent": 0, "skipped": len(expected), "resumed": 0}
        elif res.previous == os.path.basename(vdir):
            raise StepError("verify", f"{host.label}: the current version {vdir} on the device no longer matches "
                                      "the bundle; flash another version or --rollback, then flash again")
        else:
            ssh.run(f"rm -rf {_q(partial)} && mv {_q(vdir)} {_q(partial)}", step="copy")  # resume from it
    if "copy" not in res.details:
        res.details["copy"] = copy_bundle(ssh, bundle, expected, partial, opts.bytes_limit)
        ssh.run(f"rm -rf {_q(vdir)} && mv {_q(partial)} {_q(vdir)}", step="copy")
    res.step = "setup"
    forced = opts.force and bool(failed_gates(manifest))
    res.details["setup"] = _setup(ssh, manifest, vdir, opts.install, forced)
    res.step = "selftest"
    st = ssh.run(f"cd {_q(vdir)} && {shlex.quote(host.python)} runner.py --selftest{' --force' if forced else ''}",
                 check=False, timeout=600, step="selftest")
    out = (st.stdout + st.stderr).decode(errors="replace").strip().splitlines()
    # A forced bundle failed its gates at build time, so its golden checks are expected to fail on the device
    # too (exit 1); they are recorded, not blocking. Anything else (exit 2: a refusal, a runtime that does not
    # load) stops the flash even then.
    if st.returncode != 0 and not (forced and st.returncode == 1):
        raise StepError("selftest", f"{host.label}: runner.py --selftest failed on the device: "
                                    f"{out[-1] if out else 'exit %d' % st.returncode}")
    res.details["selftest"] = out[-1] if out else "ok"
    res.step = "switch"
    reasons = "; ".join(failed_gates(manifest))
    note = f"forced: the build FAILED its gates ({reasons}); device {res.details['selftest']}" if forced else ""
    _switch(ssh, model_dir, os.path.basename(vdir), res.previous, note)
    if forced:
        res.details["forced"] = note
    if opts.service:
        res.step = "service"
        res.details["service"] = install_service(ssh, manifest, model_dir, opts)
    res.status, res.step = "flashed", "done"


# ---------------------------------------------------------------- service
def unit_name(manifest: dict[str, Any]) -> str:
    """The systemd unit of a model."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in manifest["model"]["name"])
    return f"edgeport-{safe}.service"


def unit_text(manifest: dict[str, Any], model_dir_abs: str, python: str, source: str, user_unit: bool,
              serve: str | None = None) -> str:
    """A systemd unit that runs the current version's runner on ``source`` and restarts it on failure; with
    ``serve`` ([HOST:]PORT) the runner serves its live view, metrics and /infer there, and the optional
    ``service.env`` beside the versions may hold EDGEPORT_TOKEN (kept out of the unit, so out of ``ps``)."""
    argv = [python, "runner.py", source, "--headless", "--reconnect", "0", "--jsonl", "-"]
    if serve:
        argv += ["--serve", serve]
    args = " ".join(shlex.quote(a) for a in argv)
    lines = ["[Unit]", f"Description=edgeport camera runner: {manifest['model']['name']}",
             "After=network-online.target", "Wants=network-online.target", "StartLimitIntervalSec=0", "",
             "[Service]", "Type=simple", f"WorkingDirectory={model_dir_abs}/current",
             f"ExecStart={args}", "Restart=on-failure", "RestartSec=5", "Environment=PYTHONUNBUFFERED=1"]
    if serve:
        lines.append(f"EnvironmentFile=-{model_dir_abs}/{SERVICE_ENV}")
    lines += ["", "[Install]", f"WantedBy={'default.target' if user_unit else 'multi-user.target'}", ""]
    return "\n".join(lines)


SERVICE_ENV = "service.env"  # optional, the team's: EDGEPORT_TOKEN=...
SERVICE_JSON = "service.json"  # written by flash --serve: where `devices status` asks for health


def install_service(ssh: SSH, manifest: dict[str, Any], model_dir: str, opts: FlashOptions) -> str:
    """Write the unit (and, with --serve, service.json: where the service answers), then enable and (re)start it
    where systemd runs."""
    res = ssh.run(f"cd {_q(model_dir)} && pwd && id -u", step="service")
    model_abs, uid = res.stdout.decode().split()
    user_unit = uid != "0"
    unit_dir = opts.unit_dir or ("~/.config/systemd/user" if user_unit else "/etc/systemd/system")
    source = opts.source or str(manifest.get("camera", {}).get("source", "0"))
    text = unit_text(manifest, model_abs, ssh.host.python, source, user_unit, opts.serve)
    name = unit_name(manifest)
    ssh.run(f"mkdir -p {_q(unit_dir)} && cat > {_q(unit_dir)}/{name}.tmp && mv -f {_q(unit_dir)}/{name}.tmp "
            f"{_q(unit_dir)}/{name}", stdin=text.encode(), step="service")
    where = json.dumps({"serve": opts.serve} if opts.serve else {}).encode()
    ssh.run(f"cat > {_q(model_dir)}/{SERVICE_JSON}.tmp && mv -f {_q(model_dir)}/{SERVICE_JSON}.tmp "
            f"{_q(model_dir)}/{SERVICE_JSON}", stdin=where, step="service")
    from edgeport.runner.serve import is_loopback, parse_bind

    token_note = ""
    if opts.serve and not is_loopback(parse_bind(opts.serve)[0]):
        # Beyond loopback the runner serves only with a token: keep the team's, else make one (readable by the
        # device user alone); devices status reads it from there.
        env = f"{_q(model_dir)}/{SERVICE_ENV}"
        token = f"EDGEPORT_TOKEN={secrets.token_urlsafe(24)}\n".encode()
        made = ssh.run(f"grep -q '^EDGEPORT_TOKEN=' {env} 2>/dev/null && echo kept || "
                       f"(umask 077 && cat >> {env} && echo made)", stdin=token, step="service").stdout.decode().strip()
        token_note = (f"; its token is in {model_dir}/{SERVICE_ENV} on the device"
                      + (" (made now)" if made == "made" else ""))
    sc = "systemctl --user" if user_unit else "systemctl"
    on = ssh.run(f"command -v systemctl >/dev/null && [ -d /run/systemd/system ] && {sc} daemon-reload && "
                 f"{sc} enable {name} && {sc} restart {name}", check=False, step="service")
    if on.returncode == 0:
        return f"{name} enabled and started{token_note}"
    return f"{name} written to {unit_dir}; systemd is not running there, so it was not started{token_note}"


def _restart_service(ssh: SSH, manifest: dict[str, Any]) -> None:
    name = unit_name(manifest)
    ssh.run(f"(systemctl restart {name} || systemctl --user restart {name}) 2>/dev/null || true", check=False,
            step="service")


# ---------------------------------------------------------------- many hosts
@dataclass
class FlashOptions:
    """Settings shared by every host of one flash."""

    root: str = DEFAULT_ROOT
    known_hosts: Path = field(default_factory=lambda: Path.home() / ".ssh" / "known_hosts")
    accept_fingerprint: str | None = None
    interactive: bool = False
    install: bool = False
    service: bool = False
    source: str | None = None
    serve: str | None = None  # --service --serve [HOST:]PORT
    unit_dir: str | None = None
    rollback: bool = False
    force: bool = False  # flash a bundle whose build failed its gates (recorded in history.log)
    jobs: int = 8
    bytes_limit: int | None = None  # tests: stop the copy after this many bytes


_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?\Z")


def check_port(port: Any, where: str) -> int:
    """``port`` as an int in 1-65535; ConfigError naming ``where`` otherwise."""
    text = str(port).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"{where}: port {text or repr(port)} is not a port number from 1 to 65535")
    return int(text)


def parse_address(text: str, where: str = "--host") -> tuple[str, int | None]:
    """(USER@ADDRESS or ADDRESS, port or None) of ``[USER@]ADDRESS[:PORT]`` (an IPv6 address in brackets when a
    port follows it: [fe80::1]:2222), checked before anything connects: a user name, a host name or an IP
    address, a port from 1 to 65535, and no leading '-' anywhere (ssh would read it as an option). ConfigError
    naming what is wrong and ``where``."""
    import ipaddress

    given = text
    text = text.strip()
    if not text:
        raise ConfigError(f"{where}: empty; give USER@ADDRESS, e.g. pi@192.168.1.20")
    if text.startswith("-"):
        raise ConfigError(f"{where} {given!r} begins with '-': give USER@ADDRESS[:PORT], e.g. pi@192.168.1.20 "
                          "(ssh options are not taken here)")
    user, at, rest = text.rpartition("@")
    if at and not _USER.match(user):
        raise ConfigError(f"{where} {given!r}: {user!r} is not a user name (letters, digits, '.', '_', '-'; not "
                          "beginning with '-' or '.')" if user else f"{where} {given!r}: no user before '@'")
    port = None
    if rest.startswith("["):  # [v6]:port or [v6]
        addr, close, tail = rest[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ConfigError(f"{where} {given!r}: an IPv6 address in brackets is [ADDRESS] or [ADDRESS]:PORT")
        if tail:
            port = check_port(tail[1:], f"{where} {given!r}")
    elif rest.count(":") == 1:
        addr, _, p = rest.partition(":")
        port = check_port(p, f"{where} {given!r}")
    else:
        addr = rest
    if not addr:
        raise ConfigError(f"{where} {given!r}: no address" + (" after '@'" if at else "") +
                          "; give USER@ADDRESS, e.g. pi@192.168.1.20")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        if ":" in addr or not _HOSTNAME.match(addr) or addr.replace(".", "").isdigit():
            raise ConfigError(f"{where} {given!r}: {addr!r} is neither a host name nor an IP address") from None
    return (f"{user}@{addr}" if at else addr), port


def parse_hosts(hosts: list[str] | None, inventory: str | None, port: int | None, identity: str | None,
                python: str | None) -> list[Host]:
    """Hosts from repeated --host USER@ADDR[:PORT] and an inventory TOML ([[host]] address, port, ...), every
    address and port checked before anything connects (parse_address)."""
    out = []
    if port is not None:
        port = check_port(port, "--port")
    for h in hosts or []:
        addr, p = parse_address(h)
        out.append(Host(addr, p or port or 22, identity, python or "python3"))
    if inventory:
        path = Path(inventory)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"inventory {path}: {e}") from None
        for i, entry in enumerate(data.get("host", [])):
            if "address" not in entry:
                raise ConfigError(f"inventory {path}: host {i + 1} has no address")
            unknown = set(entry) - {"address", "port", "identity", "python", "name"}
            if unknown:
                raise ConfigError(f"inventory {path}: unknown key(s) {sorted(unknown)} in host {i + 1}")
            where = f"inventory {path} host {i + 1}"
            addr, p = parse_address(str(entry["address"]), where)
            if "port" in entry:
                p = check_port(entry["port"], where)
            out.append(Host(addr, p or port or 22, entry.get("identity", identity),
                            entry.get("python", python or "python3"), entry.get("name", "")))
    if not out:
        raise ConfigError("no host: pass --host USER@ADDRESS (repeatable) or --inventory hosts.toml")
    for h in out:
        if h.identity and not Path(h.identity).expanduser().is_file():
            raise ConfigError(f"--identity {h.identity}: no such key file")
    return out


def over_hosts(hosts: list[Host], opts: FlashOptions, work: Any, refusal: Any) -> list[Any]:
    """``work(host)`` for every host known_hosts trusts (after check_host_keys), ``opts.jobs`` at a time;
    ``refusal(host, message)`` for the others; results in the given order."""
    refused = check_host_keys(hosts, opts)
    trusted = [h for i, h in enumerate(hosts) if i not in refused]
    with ThreadPoolExecutor(max_workers=max(1, min(opts.jobs, len(trusted) or 1))) as pool:
        done = iter(list(pool.map(work, trusted)))
    return [refusal(h, refused[i]) if i in refused else next(done) for i, h in enumerate(hosts)]


def check_shippable(bundle: Path, force: bool = False, rollback: bool = False) -> dict[str, Any]:
    """The manifest of ``bundle`` once it is known to be fit to put on a device, checked before any device is
    contacted (flash and fleet alike): a bundle folder, its build's gates passed (or ``force``), every file's
    sha256 as the manifest records it, a runner. BundleError naming what is wrong otherwise. A ``rollback`` only
    reads the manifest (the devices go back to what they had)."""
    if not (bundle / "manifest.json").is_file():
        raise BundleError(f"{bundle}: not a bundle folder (no manifest.json); run `edgeport build` first")
    manifest = read_manifest(bundle)
    failed = failed_gates(manifest)
    if failed and not rollback and not force:
        raise BundleError(f"{bundle} FAILED its build gates ({'; '.join(failed)}); it must not ship. Fix the build, "
                          "or pass --force to flash it anyway (recorded in the device's history.log)")
    if not rollback:
        problems = verify_bundle(bundle)
        if problems:
            raise BundleError(f"{bundle} is damaged ({'; '.join(problems[:3])}); rebuild it before flashing")
        if not (bundle / "runner.py").is_file():
            raise BundleError(f"{bundle}: this bundle has no runner.py ({manifest['target']} bundles are for apps); "
                              "nothing to run on a device")
    return manifest


def flash(bundle: Path, hosts: list[Host], opts: FlashOptions) -> list[HostResult]:
    """Flash ``bundle`` to every host in parallel; one result per host, in the given order."""
    manifest = check_shippable(bundle, opts.force, opts.rollback)
    if len(hosts) > 1:  # one engine for many hosts: Ansible's (edgeport.fleet)
        from edgeport.fleet import flash_many

        return flash_many(bundle, manifest, hosts, opts)
    expected = expected_digests(bundle, manifest)
    return over_hosts(hosts, opts, lambda h: flash_host(bundle, manifest, expected, h, opts),
                      lambda h, why: HostResult(h.label, "refused", "host key", version_of(manifest), message=why))


# Run by the device's python (3.6+, standard library) in the install root as `python - WAIT [MODEL SERVE]`: one
# "model|health" line per model whose service serves (flash --service --serve writes service.json), or for MODEL
# serving on SERVE ([HOST:]PORT) alone, from /readyz and /metrics on the device's loopback; it asks again every
# 0.5 s until every one is ready or WAIT seconds have passed (0: once); exit 0 when all are ready.
HEALTH_PROBE = r"""
import json, os, re, sys, time, urllib.error, urllib.request


def where(m):
    try:
        return json.load(open(os.path.join(m, "service.json"))).get("serve")
    except (OSError, ValueError):
        return None


def token_of(m):
    path = os.path.join(m, "service.env")
    if os.path.isfile(path):
        for line in open(path):
            k, _, v = line.strip().partition("=")
            if k == "EDGEPORT_TOKEN":
                return v.strip().strip("'\"")
    return ""


def probe(m, serve):
    host, _, port = serve.rpartition(":")
    host = host.strip("[]")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    base = "http://%s:%s" % ("[%s]" % host if ":" in host else host, port)
    try:
        try:
            body = urllib.request.urlopen(base + "/readyz", timeout=3).read()
        except urllib.error.HTTPError as e:
            body = e.read()
        ready = json.loads(body.decode())
        if not ready.get("ready"):
            return False, "not ready (%s)" % ", ".join(
                "%s: %s" % (k, v["detail"]) for k, v in sorted(ready["checks"].items()) if not v["ok"])
        token = token_of(m)
        req = urllib.request.Request(base + "/metrics", headers={"Authorization": "Bearer " + token} if token else {})
        metrics = urllib.request.urlopen(req, timeout=3).read().decode()

        def value(pattern):
            found = re.search(r"^edgeport_%s (\S+)$" % pattern, metrics, re.M)
            return float(found.group(1)) if found else 0.0
        return True, "ready, %.1f FPS, %d frames, inference p50 %.1f ms" % (
            value("fps"), value("frames_total"), value(r'inference_latency_ms\{quantile="0.5"\}'))
    except Exception as e:
        return False, "not answering on %s (%s)" % (serve, getattr(e, "reason", e))


wait = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
if len(sys.argv) > 3:
    models = [(sys.argv[2], sys.argv[3])]
else:
    models = [(m, where(m)) for m in sorted(os.listdir(".")) if os.path.isdir(m)]
models = [(m, s) for m, s in models if s]
end = time.time() + wait
while True:
    seen = [(m,) + probe(m, s) for m, s in models]
    if all(ok for _, ok, _ in seen) or time.time() >= end:
        break
    time.sleep(0.5)
for m, ok, text in seen:
    print("%s|%s" % (m, text))
sys.exit(0 if all(ok for _, ok, _ in seen) else 1)
"""


def probe_health(ssh: SSH, root: str, wait: float = 0.0, model: str | None = None,
                 serve: str | None = None) -> dict[str, tuple[bool, str]]:
    """{model: (ready, health text)} of the services under ``root`` (or of ``model`` serving on ``serve``), read
    on the device's loopback through this SSH session; waits up to ``wait`` seconds for them to be ready."""
    args = [f"{wait:g}"] + ([model, serve] if model and serve else [])
    r = ssh.run(f"cd {_q(root)} 2>/dev/null && {_q(ssh.host.python)} - {' '.join(shlex.quote(a) for a in args)}",
                stdin=HEALTH_PROBE.encode(), check=False, timeout=wait + 60, step="status")
    found = {}
    for line in r.stdout.decode(errors="replace").splitlines():
        name, sep, text = line.partition("|")
        if sep:
            found[name] = (text.startswith("ready"), text)
    return found


def status(hosts: list[Host], opts: FlashOptions) -> list[dict[str, Any]]:
    """What runs where: per host and model, the current and previous versions, their target, the service,
    history.log's last line and, where it serves (flash --service --serve), its health and a few metrics, read on
    the device's loopback."""
    script = (f"cd {_q(opts.root)} 2>/dev/null || exit 0; for m in */; do m=${{m%/}}; [ -d \"$m\" ] || continue; "
              "c=$(readlink \"$m/current\"); p=$(readlink \"$m/previous\"); "
              "s=$( (systemctl is-active edgeport-$m.service || systemctl --user is-active edgeport-$m.service) "
              "2>/dev/null | head -n1); n=$(find \"$m\" -mindepth 1 -maxdepth 1 -type d ! -name '*.partial' | wc -l); "
              "l=$(tail -n 1 \"$m/history.log\" 2>/dev/null); echo \"$m|$c|$p|${s:-none}|$n|$l\"; done")

    def row(h: Host, model: str = "-", cur: str = "-", prev: str = "-", svc: str = "-", n: int = 0,
            error: str = "", health: str = "-", last: str = "-") -> dict[str, Any]:
        return {"host": h.label, "model": model, "current": cur or "-", "previous": prev or "-", "service": svc,
                "health": health, "versions": n, "last_rollout": last or "-", "error": error}

    def one(h: Host) -> list[dict[str, Any]]:
        try:
            with session(h, opts) as ssh:
                out = ssh.run(script, step="status").stdout.decode().splitlines()
                health = probe_health(ssh, opts.root) if out else {}
        except StepError as e:
            return [row(h, error=str(e))]
        rows = [row(h, m, c, p, s, int(n or 0), health=health.get(m, (False, "-"))[1], last=last)
                for m, c, p, s, n, last in (ln.split("|", 5) for ln in out)]
        return rows or [row(h, error="nothing flashed")]

    per_host = over_hosts(hosts, opts, one, lambda h, why: [row(h, error=why)])
    return [r for rows in per_host for r in rows]
