"""The OpenSSH client as edgeport uses it: batch mode, host keys checked (first contact only with a confirmed
fingerprint), one shared connection per host, remote paths quoted; hosts worked on in parallel."""
from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgeport.deploy.hosts import FlashOptions, Host
from edgeport.errors import DeviceError

log = logging.getLogger("edgeport")


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


def over_hosts(hosts: list[Host], opts: FlashOptions, work: Any, refusal: Any) -> list[Any]:
    """``work(host)`` for every host known_hosts trusts (after check_host_keys), ``opts.jobs`` at a time;
    ``refusal(host, message)`` for the others; results in the given order."""
    refused = check_host_keys(hosts, opts)
    trusted = [h for i, h in enumerate(hosts) if i not in refused]
    with ThreadPoolExecutor(max_workers=max(1, min(opts.jobs, len(trusted) or 1))) as pool:
        done = iter(list(pool.map(work, trusted)))
    return [refusal(h, refused[i]) if i in refused else next(done) for i, h in enumerate(hosts)]


def remote_path(path: str) -> str:
    """Quote a remote path, keeping a leading ~/ expandable."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)
