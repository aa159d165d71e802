"""`edgeport flash` and `edgeport devices status`: bundles onto devices over SSH, verified there (one host at
a time; several hosts go through edgeport.deploy.fleet).

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

import logging
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from edgeport.backends import get_backend
from edgeport.bundle import failed_gates, read_manifest, verify_bundle
from edgeport.deploy.copy import copy_bundle, expected_digests, verify_remote
from edgeport.deploy.hosts import FlashOptions, Host, HostResult
from edgeport.deploy.preflight import preflight
from edgeport.deploy.service import install_service, probe_health, restart_service
from edgeport.deploy.ssh import SSH, StepError, over_hosts, remote_path, session
from edgeport.errors import BundleError

log = logging.getLogger("edgeport")


# ---------------------------------------------------------------- the flash
def version_of(manifest: dict[str, Any]) -> str:
    """The versioned folder's name: target, precision and build key (same bundle, same folder)."""
    return f"{manifest['target']}-{manifest['precision']}-{manifest.get('build_key', 'nokey')}"


def model_dir_of(manifest: dict[str, Any], root: str) -> str:
    """The model's folder under the device's install root: its versions, current and previous live there."""
    return f"{root.rstrip('/')}/{manifest['model']['name']}"


def _links(ssh: SSH, model_dir: str) -> tuple[str, str]:
    res = ssh.run(f"cd {remote_path(model_dir)} 2>/dev/null && echo \"$(readlink current)|$(readlink previous)\"",
                  check=False, step="status")
    cur, _, prev = res.stdout.decode().strip().partition("|")
    return cur, prev


def _switch(ssh: SSH, model_dir: str, version: str, previous: str, note: str = "") -> None:
    """current -> version, previous -> the old current; each a rename of a fresh symlink (atomic); a line in
    history.log (with ``note``, e.g. that a failed bundle was forced)."""
    parts = [f"cd {remote_path(model_dir)}"]
    if previous and previous != version:
        parts.append(f"ln -sfn {shlex.quote(previous)} .previous.tmp && mv -Tf .previous.tmp previous")
    parts.append(f"ln -sfn {shlex.quote(version)} .current.tmp && mv -Tf .current.tmp current")
    line = f"current {version}" + (f" {note}" if note else "")
    parts.append(f"echo \"$(date -u +%FT%TZ)\" {shlex.quote(line)} >> history.log")
    ssh.run(" && ".join(parts), step="switch")


def _setup(ssh: SSH, manifest: dict[str, Any], vdir: str, install: bool, forced: bool = False) -> str:
    backend = get_backend(manifest["backend"])
    if ssh.run(backend.device_import_check(ssh.host.python) + " 2>/dev/null", check=False,
               step="setup").returncode != 0:
        if not install:
            raise StepError("setup", f"{ssh.host.label}: numpy, OpenCV or {' / '.join(backend.device_modules)} cannot "
                                     f"be imported by {ssh.host.python}; install requirements.txt there, or pass "
                                     "--install")
        ssh.run(f"cd {remote_path(vdir)} && {shlex.quote(ssh.host.python)} -m pip install -q -r requirements.txt",
                step="setup")
    steps = backend.device_setup(ssh.host.python, forced)
    for step, command, timeout in steps:
        ssh.run(f"cd {remote_path(vdir)} && {command}", timeout=timeout, step=step)
    return ", ".join(f"{step} done" for step, _, _ in steps) or "runtime present"


def flash_host(bundle: Path, manifest: dict[str, Any], expected: dict[str, str], host: Host,
               opts: FlashOptions) -> HostResult:
    """Flash one host whose key known_hosts trusts; never raises for device problems: the result says where
    it stopped."""
    t0 = time.time()
    version = version_of(manifest)
    model_dir = model_dir_of(manifest, opts.root)
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
        restart_service(ssh, manifest)
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
    if ssh.run(f"test -f {remote_path(vdir)}/manifest.json", check=False, step="copy").returncode == 0:
        # Flashed before: reuse it when intact; never rewrite the live version in place.
        if not verify_remote(ssh, vdir, expected):
            res.details["copy"] = {"sent": 0, "skipped": len(expected), "resumed": 0}
        elif res.previous == os.path.basename(vdir):
            raise StepError("verify", f"{host.label}: the current version {vdir} on the device no longer matches "
                                      "the bundle; flash another version or --rollback, then flash again")
        else:
            # resume from it
            ssh.run(f"rm -rf {remote_path(partial)} && mv {remote_path(vdir)} {remote_path(partial)}", step="copy")
    if "copy" not in res.details:
        res.details["copy"] = copy_bundle(ssh, bundle, expected, partial, opts.bytes_limit)
        ssh.run(f"rm -rf {remote_path(vdir)} && mv {remote_path(partial)} {remote_path(vdir)}", step="copy")
    res.step = "setup"
    forced = opts.force and bool(failed_gates(manifest))
    res.details["setup"] = _setup(ssh, manifest, vdir, opts.install, forced)
    res.step = "selftest"
    st = ssh.run(f"cd {remote_path(vdir)} && {shlex.quote(host.python)} runner.py --selftest"
                 f"{' --force' if forced else ''}",
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
    """Flash ``bundle`` to every host (``opts.jobs`` at a time, each host on its own); one result per host, in the
    given order. (`edgeport flash` with several hosts uses Ansible instead: edgeport.deploy.fleet.flash_many.)"""
    manifest = check_shippable(bundle, opts.force, opts.rollback)
    expected = expected_digests(bundle, manifest)
    return over_hosts(hosts, opts, lambda h: flash_host(bundle, manifest, expected, h, opts),
                      lambda h, why: HostResult(h.label, "refused", "host key", version_of(manifest), message=why))


def status(hosts: list[Host], opts: FlashOptions) -> list[dict[str, Any]]:
    """What runs where: per host and model, the current and previous versions, their target, the service,
    history.log's last line and, where it serves (flash --service --serve), its health and a few metrics, read on
    the device's loopback."""
    script = (f"cd {remote_path(opts.root)} 2>/dev/null || exit 0; "
              "for m in */; do m=${m%/}; [ -d \"$m\" ] || continue; "
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
