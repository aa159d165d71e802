"""`edgeport fleet` against six real OpenSSH servers on 127.0.0.1: separate ports, host keys, users and install
roots, throwaway keys; every device python a venv holding only numpy, OpenCV and OpenVINO; Ansible (ansible-core
through ansible-runner) batching the rollout."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port, has, needs_openvino, needs_torch, run_cli
from tests.fleet_devices import start_devices, stop_devices, write_inventory
from tests.integration.test_flash import SSHD, bundles  # noqa: F401 (the module's bundle fixture)

N = 6
pytestmark = [needs_torch, needs_openvino,
              pytest.mark.skipif(not (os.path.exists(SSHD) and shutil.which("ssh")),
                                 reason="openssh-server is not installed (.ci/run installs it)"),
              pytest.mark.skipif(not has("ansible_runner"), reason="the fleet extra (ansible) is not installed"),
              pytest.mark.skipif(os.geteuid() != 0, reason="six device users are created with useradd (root only)")]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Six devices (tests/fleet_devices.py)."""
    devices = start_devices(tmp_path_factory.mktemp("fleet"), N)
    if isinstance(devices, str):
        pytest.skip(devices)
    yield devices
    stop_devices(devices)


def _inventory(fleet, path: Path, extra: dict[str, str] | None = None) -> Path:
    return write_inventory(fleet, path, extra)


def _fleet(fleet, action: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    res = run_cli("fleet", action, *args, "--known-hosts", str(fleet["known_hosts"]), "--json", timeout=900)
    try:
        return res, json.loads(res.stdout)
    except ValueError:
        return res, []


def _current(h) -> tuple[str, str]:
    m = h["root"] / "roadseg"
    return (os.readlink(m / "current") if (m / "current").is_symlink() else "",
            os.readlink(m / "previous") if (m / "previous").is_symlink() else "")


def _version(bundle: Path) -> str:
    m = json.loads((bundle / "manifest.json").read_text())
    return f"{m['target']}-{m['precision']}-{m['build_key']}"


def test_staged_rollout_canary_health_gate_and_fleet_rollback(fleet, bundles, tmp_path):  # noqa: F811
    inv = _inventory(fleet, tmp_path / "hosts.ini")
    a, b = _version(bundles["a"]), _version(bundles["b"])

    # first contact: a host missing from known_hosts is refused (at the canary: nothing else runs) unless the
    # inventory gives its key's fingerprint, which is then trusted
    lines = fleet["known_hosts"].read_text().splitlines()
    fleet["known_hosts"].write_text("\n".join(lines[1:]) + "\n")
    res, rows = _fleet(fleet, "rollout", str(bundles["a"]), "--inventory", str(inv))
    assert res.returncode != 0 and rows[0]["status"] == "refused" and rows[0]["step"] == "host key", rows[0]
    assert [r["status"] for r in rows[1:]] == ["not reached"] * (N - 1) and not fleet["hosts"][0]["root"].exists()
    fp = subprocess.run(["ssh-keygen", "-lf", str(fleet["dir"] / "host_key1.pub")], capture_output=True, text=True,
                        check=True).stdout.split()[1]
    inv = _inventory(fleet, tmp_path / "hosts.ini", {"dev1": f"edgeport_fingerprint={fp}"})

    # a good bundle rolls out in batches (1, 10 %, 50 %, 100 % of six: 1, 1, 3, 1) to all six
    res, rows = _fleet(fleet, "rollout", str(bundles["a"]), "--inventory", str(inv))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["status"] for r in rows] == ["flashed"] * N, rows
    assert [r["batch"] for r in rows] == [1, 2, 3, 3, 3, 4]
    assert all(_current(h) == (a, "") for h in fleet["hosts"])
    assert all(os.stat(h["root"]).st_uid == pwd.getpwnam(h["user"]).pw_uid for h in fleet["hosts"])  # its user's
    # a second run changes nothing
    res, rows = _fleet(fleet, "rollout", str(bundles["a"]), "--inventory", str(inv))
    assert res.returncode == 0 and [(r["status"], r["changed"]) for r in rows] == [("unchanged", False)] * N, rows
    assert all(r["copy"]["sent"] == 0 for r in rows)

    # a bad bundle (its selftest fails on the device) stops at the canary; no other host is touched
    res, rows = _fleet(fleet, "rollout", str(bundles["broken"]), "--inventory", str(inv))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    error = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and "dev1: " in error[0] and "dev1: dev1:" not in error[0], error  # the host named once
    assert rows[0]["status"] == "failed" and rows[0]["step"] == "selftest", rows[0]
    assert [r["status"] for r in rows[1:]] == ["not reached"] * (N - 1)
    assert all(_current(h) == (a, "") for h in fleet["hosts"])
    assert not any((h["root"] / "roadseg" / "intel-cpu-int8-broken0000000000").exists() for h in fleet["hosts"][1:])

    # the second batch's host fails its health gate (its service never answers): it rolls back by itself,
    # and the rollout stops there (max_fail_percentage 0)
    dead = free_port()
    bad_inv = _inventory(fleet, tmp_path / "gate.ini", {"dev2": f"edgeport_serve=127.0.0.1:{dead}"})
    res, rows = _fleet(fleet, "rollout", str(bundles["b"]), "--inventory", str(bad_inv), "--health-timeout", "2")
    assert res.returncode != 0
    assert rows[0]["status"] == "flashed" and rows[1]["status"] == "rolled-back", rows[:2]
    assert "health gate failed" in rows[1]["message"] and f"rolled back to {a}" in rows[1]["message"]
    assert [r["status"] for r in rows[2:]] == ["not reached"] * (N - 2)
    hosts = fleet["hosts"]
    assert _current(hosts[0]) == (b, a) and _current(hosts[1]) == (a, b)
    assert all(_current(h) == (a, "") for h in hosts[2:])
    assert "rolled back: health gate failed" in (hosts[1]["root"] / "roadseg" / "history.log").read_text()

    # the whole fleet takes b, then goes back to its previous version
    res, rows = _fleet(fleet, "rollout", str(bundles["b"]), "--inventory", str(inv), "--batches", "2,100%")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["status"] for r in rows] == ["unchanged"] + ["flashed"] * (N - 1) and \
        [r["batch"] for r in rows] == [1, 1, 2, 2, 2, 2]
    res, rows = _fleet(fleet, "rollback", "--inventory", str(inv))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["status"] for r in rows] == ["rolled-back"] * N
    assert all(_current(h)[0] == a for h in hosts)

    res, rows = _fleet(fleet, "status", "--inventory", str(inv))
    assert res.returncode == 0, res.stderr
    assert [(r["host"], r["current"], r["previous"]) for r in rows] == [(h["name"], a, b) for h in hosts]
    assert all(r["last_rollout"].endswith(f"current {a}") for r in rows)


def test_emit_writes_a_project_for_your_own_ansible(bundles, tmp_path):  # noqa: F811
    out = tmp_path / "project"
    res = run_cli("fleet", "rollout", str(bundles["a"]), "--inventory", "hosts.ini", "--emit", str(out),
                  "--batches", "1,50%", "--max-fail-percentage", "20")
    assert res.returncode == 0, res.stderr
    play = (out / "rollout.yml").read_text()
    assert 'serial: [1, "50%"]' in play and "max_fail_percentage: 20" in play and "connection: local" in play
    assert "edgeport.deploy.fleet" in (out / "roles" / "edgeport_rollout" / "tasks" / "main.yml").read_text()
    settings = json.loads((out / "edgeport_settings.json").read_text())["edgeport_settings"]
    assert settings["bundles"] == {"intel_cpu": str(bundles["a"].resolve())}
    assert "[jetson_orin_nano]" in (out / "inventory.example.ini").read_text()
    syntax = subprocess.run([str(Path(os.sys.executable).parent / "ansible-playbook"), "--syntax-check", "-i",
                             str(out / "inventory.example.ini"), str(out / "rollout.yml")], capture_output=True,
                            text=True, cwd=out)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr


def test_the_emitted_project_runs_from_plain_ansible_playbook(fleet, bundles, tmp_path):  # noqa: F811
    """--emit's playbook, role and settings, run by ansible-playbook itself (as a team would, from its own
    Ansible), roll b out to the six devices."""
    import sys

    inv = _inventory(fleet, tmp_path / "hosts.ini")
    out = tmp_path / "project"
    res = run_cli("fleet", "rollout", str(bundles["b"]), "--inventory", str(inv), "--emit", str(out),
                  "--known-hosts", str(fleet["known_hosts"]), "--batches", "3,100%")
    assert res.returncode == 0, res.stderr
    bindir = Path(sys.executable).parent
    play = subprocess.run([str(bindir / "ansible-playbook"), "-i", str(inv), "rollout.yml", "-e",
                           "@edgeport_settings.json"], cwd=out, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
                               "ANSIBLE_NOCOLOR": "1"})
    assert play.returncode == 0, play.stdout[-3000:] + play.stderr[-2000:]
    assert play.stdout.count("failed=0") == N, play.stdout[-3000:]
    b = _version(bundles["b"])
    assert all(_current(h)[0] == b for h in fleet["hosts"])
