"""`edgeport flash` against a real OpenSSH server on 127.0.0.1 with throwaway keys.

The "device" is this machine: sshd (Debian's openssh-server, installed by .ci/run) on a free
port, the device's python is a venv holding only numpy, OpenCV and OpenVINO, and the device
folder is a temporary directory.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, needs_openvino, needs_torch, run_cli

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = [needs_torch, needs_openvino,
              pytest.mark.skipif(not (os.path.exists(SSHD) and shutil.which("ssh")),
                                 reason="openssh-server is not installed (.ci/run installs it)")]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1 accepting one throwaway key; yields its settings."""
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key"),
                    "-C", "edgeport-test"], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
AuthorizedKeysFile {d / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile {d / 'sshd.pid'}
LogLevel ERROR
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("sshd did not start: " + (d / "sshd.log").read_text())
    fp = subprocess.run(["ssh-keygen", "-lf", str(d / "host_key.pub")], capture_output=True, text=True,
                        check=True).stdout.split()[1]
    yield {"dir": d, "port": port, "host": f"{getpass.getuser()}@127.0.0.1", "key": d / "client_key",
           "fingerprint": fp, "known_hosts": d / "known_hosts"}
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def bundles(default_project, tmp_path_factory) -> dict[str, Path]:
    """Two OpenVINO versions of the default model, a broken one, a Jetson one."""
    proj, _ = default_project
    d = tmp_path_factory.mktemp("bundles")
    out = {"a": d / "intel-cpu-int8", "b": d / "b" / "intel-cpu-int8", "igpu": d / "intel-igpu-fp16"}
    shutil.copytree(proj / "dist" / "intel-cpu-int8", out["a"])
    shutil.copytree(proj / "dist" / "intel-cpu-int8", out["b"])
    shutil.copytree(proj / "dist" / "intel-igpu-fp16", out["igpu"])
    mb = json.loads((out["b"] / "manifest.json").read_text())
    mb["build_key"] = "second0000000000"  # a second version of the same bundle
    (out["b"] / "manifest.json").write_text(json.dumps(mb))
    # a third version whose selftest fails: golden outputs that no longer match (hashes made consistent)
    bad = d / "broken"
    shutil.copytree(out["a"], bad)
    m = json.loads((bad / "manifest.json").read_text())
    import hashlib

    import numpy as np

    g = bad / m["golden"]["cases"][0]["outputs"]["output"]
    np.save(g, -np.load(g))
    m["files"] = {n: hashlib.sha256((bad / n).read_bytes()).hexdigest() for n in m["files"]}
    m["build_key"] = "broken0000000000"
    (bad / "manifest.json").write_text(json.dumps(m))
    out["broken"] = bad
    res = run_cli("build", "--target", "jetson-orin-nano", "--out", str(d / "jetson"), cwd=proj)
    assert res.returncode == 0, res.stderr[-2000:]
    out["jetson"] = d / "jetson" / "jetson-orin-nano-int8"
    return out


def _flash(sshd, device_root, *args, python=None):
    return run_cli("flash", *args, "--host", f"{sshd['host']}:{sshd['port']}", "--identity", str(sshd["key"]),
                   "--known-hosts", str(sshd["known_hosts"]), "--root", str(device_root),
                   *(["--python", str(python)] if python else []), timeout=600)


def _links(root: Path) -> tuple[str, str]:
    m = root / "roadseg"
    return (os.readlink(m / "current") if (m / "current").is_symlink() else "",
            os.readlink(m / "previous") if (m / "previous").is_symlink() else "")


def test_flash_selftest_switch_rollback_and_failures(sshd, bundles, openvino_venv, tmp_path):
    root = tmp_path / "device"
    key_text = sshd["key"].read_text()
    # first contact: refused until the fingerprint is given; nothing is trusted or written
    res = _flash(sshd, root, str(bundles["a"]), python=openvino_venv)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "is not in" in res.stdout and sshd["fingerprint"] in res.stdout and "--accept-fingerprint" in res.stdout
    assert not sshd["known_hosts"].exists() and not root.exists()
    wrong = _flash(sshd, root, str(bundles["a"]), "--accept-fingerprint", "SHA256:" + "A" * 43, python=openvino_venv)
    assert wrong.returncode == 2 and "does not match" in wrong.stdout

    # version A: preflight, copy, verify, selftest on the device, switch
    res = _flash(sshd, root, str(bundles["a"]), "--accept-fingerprint", sshd["fingerprint"], python=openvino_venv)
    assert res.returncode == 0, res.stdout + res.stderr
    va = json.loads((bundles["a"] / "manifest.json").read_text())
    version_a = f"intel-cpu-int8-{va['build_key']}"
    assert _links(root) == (version_a, "")
    assert (root / "roadseg" / version_a / "runner.py").is_file()
    assert f"127.0.0.1:{sshd['port']}" in res.stdout and "flashed" in res.stdout

    # version B: A becomes previous
    res = _flash(sshd, root, str(bundles["b"]), python=openvino_venv)
    assert res.returncode == 0, res.stdout + res.stderr
    cur, prev = _links(root)
    assert cur == "intel-cpu-int8-second0000000000" and prev == version_a

    # a bundle whose runtime device is absent fails its selftest on the device: B stays current
    res = _flash(sshd, root, str(bundles["igpu"]), python=openvino_venv)
    assert res.returncode == 2 and "OpenVINO device GPU is not present" in res.stdout
    assert _links(root) == (cur, prev)

    # a failed selftest leaves B current
    res = _flash(sshd, root, str(bundles["broken"]), python=openvino_venv)
    assert res.returncode == 2 and "selftest" in res.stdout and "runner.py --selftest failed" in res.stdout
    assert _links(root) == (cur, prev)

    # an interrupted copy leaves B current; the next flash resumes it
    from edgeport.deploy import flash as fl
    from edgeport.deploy.hosts import FlashOptions, Host

    c = tmp_path / "c"
    shutil.copytree(bundles["a"], c)
    m = json.loads((c / "manifest.json").read_text())
    m["build_key"] = "resume0000000000"
    (c / "manifest.json").write_text(json.dumps(m))
    host = Host(sshd["host"].split(":")[0], sshd["port"], str(sshd["key"]), str(openvino_venv))
    opts = FlashOptions(root=str(root), known_hosts=sshd["known_hosts"], bytes_limit=60_000)
    [r] = fl.flash(c, [host], opts)
    assert (r.status, r.step) == ("failed", "copy") and "interrupted" in r.message
    assert _links(root) == (cur, prev)
    assert (root / "roadseg" / "intel-cpu-int8-resume0000000000.partial").is_dir()
    opts.bytes_limit = None
    [r] = fl.flash(c, [host], opts)
    assert r.status == "flashed", r.message
    assert r.details["copy"]["skipped"] + r.details["copy"]["resumed"] >= 1
    assert _links(root) == ("intel-cpu-int8-resume0000000000", cur)
    assert not (root / "roadseg" / "intel-cpu-int8-resume0000000000.partial").exists()

    # rollback returns to the previous version
    res = _flash(sshd, root, str(bundles["a"]), "--rollback")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _links(root) == (cur, "intel-cpu-int8-resume0000000000")

    # devices status shows it
    res = run_cli("devices", "status", "--host", f"{sshd['host']}:{sshd['port']}", "--identity", str(sshd["key"]),
                  "--known-hosts", str(sshd["known_hosts"]), "--root", str(root))
    assert res.returncode == 0, res.stderr
    assert "roadseg" in res.stdout and cur in res.stdout

    # no key material anywhere: not in outputs, not on the device
    for text in (res.stdout, res.stderr):
        assert "PRIVATE KEY" not in text and key_text not in text
    for p in root.rglob("*"):
        if p.is_file():
            assert b"PRIVATE KEY" not in p.read_bytes(), p
    assert "PRIVATE KEY" not in (root / "roadseg" / "history.log").read_text()


def test_jetson_bundle_stops_at_preflight(sshd, bundles, tmp_path):
    subprocess.run(["ssh-keygen", "-R", f"[127.0.0.1]:{sshd['port']}", "-f", str(sshd["known_hosts"])],
                   capture_output=True)
    root = tmp_path / "device"
    res = _flash(sshd, root, str(bundles["jetson"]), "--accept-fingerprint", sshd["fingerprint"])
    assert res.returncode == 2, res.stdout + res.stderr
    assert "refused" in res.stdout and "preflight" in res.stdout
    assert "the bundle needs TensorRT 10.3.0 (JetPack 6.1)" in res.stdout and "cannot import tensorrt" in res.stdout
    assert "the bundle is for aarch64" in res.stdout
    assert not (root / "roadseg").exists()


def test_service_unit_and_parallel_hosts(sshd, bundles, openvino_venv, tmp_path):
    subprocess.run(["ssh-keygen", "-R", f"[127.0.0.1]:{sshd['port']}", "-f", str(sshd["known_hosts"])],
                   capture_output=True)
    root, units = tmp_path / "device", tmp_path / "units"
    dead = free_port()  # nothing listens there
    inv = tmp_path / "hosts.toml"
    inv.write_text(f'[[host]]\nname = "cam-1"\naddress = "{sshd["host"]}"\nport = {sshd["port"]}\n'
                   f'python = "{openvino_venv}"\n\n[[host]]\nname = "cam-2"\naddress = "{sshd["host"]}"\n'
                   f"port = {dead}\n")
    res = run_cli("flash", str(bundles["a"]), "--inventory", str(inv), "--identity", str(sshd["key"]),
                  "--known-hosts", str(sshd["known_hosts"]), "--root", str(root), "--accept-fingerprint",
                  sshd["fingerprint"], "--service", "--source", "rtsp://10.0.0.9/stream", "--unit-dir", str(units))
    assert res.returncode == 2, res.stdout + res.stderr
    rows = {ln.split()[0]: ln.split() for ln in res.stdout.splitlines() if ln.startswith("cam-")}
    assert "cam-1" in rows, res.stdout + res.stderr
    assert rows["cam-1"][1] == "flashed" and rows["cam-2"][1] in ("refused", "failed")
    assert "1 of 2 host(s) not flashed" in res.stderr
    unit = (units / "edgeport-roadseg.service").read_text()
    assert f"WorkingDirectory={root}/roadseg/current" in unit
    assert "runner.py rtsp://10.0.0.9/stream --headless" in unit and "Restart=on-failure" in unit
    assert "WantedBy=" in unit and str(openvino_venv) in unit


def test_failed_bundle_is_refused_unless_forced_and_the_force_is_recorded(sshd, bundles, openvino_venv, default_project,
                                                                        tmp_path):
    """A bundle that really failed its parity gate at build time (INT8 under an FP32-like tolerance)."""
    subprocess.run(["ssh-keygen", "-R", f"[127.0.0.1]:{sshd['port']}", "-f", str(sshd["known_hosts"])],
                   capture_output=True)
    proj = tmp_path / "proj"
    shutil.copytree(default_project[0] / "build", proj / "build")
    (proj / "edgeport.toml").write_text('[validation.tolerance."*@int8"]\nmin_cosine = 0.99999\n')
    built = run_cli("build", "--target", "intel-cpu", cwd=proj)
    assert built.returncode == 3, built.stderr[-2000:]
    failed = proj / "dist" / "failed" / "intel-cpu-int8"
    version = f"intel-cpu-int8-{json.loads((failed / 'manifest.json').read_text())['build_key']}"
    root = tmp_path / "device"
    res = _flash(sshd, root, str(failed), "--accept-fingerprint", sshd["fingerprint"], python=openvino_venv)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "FAILED its build gates" in errors[0] and "--force" in errors[0], res.stderr
    assert not root.exists()  # refused before contacting the device
    ok = _flash(sshd, root, str(bundles["a"]), "--accept-fingerprint", sshd["fingerprint"], python=openvino_venv)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    res = _flash(sshd, root, str(failed), "--force", python=openvino_venv)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _links(root)[0] == version
    history = (root / "roadseg" / "history.log").read_text().splitlines()
    assert "forced: the build FAILED its gates (output 'output': cosine" in history[-1], history
    assert "device selftest: FAIL" in history[-1]  # its golden checks fail on the device too, as recorded
    assert "forced" not in history[0]
    # devices status counts version folders, not the current/previous links
    status = run_cli("devices", "status", "--host", f"{sshd['host']}:{sshd['port']}", "--identity",
                     str(sshd["key"]), "--known-hosts", str(sshd["known_hosts"]), "--root", str(root), "--json")
    assert status.returncode == 0, status.stderr
    [row] = json.loads(status.stdout)
    assert row["versions"] == 2 == len([p for p in (root / "roadseg").iterdir() if p.is_dir() and not p.is_symlink()])


def test_flash_service_serve_runs_and_devices_status_reads_its_health(sshd, bundles, openvino_venv, tmp_path):
    """flash --service --serve writes a unit whose ExecStart serves; run as systemd would (its working folder,
    command and EnvironmentFile with the token), `devices status` reads health and metrics through SSH."""
    import shlex
    import signal
    import urllib.error
    import urllib.request

    subprocess.run(["ssh-keygen", "-R", f"[127.0.0.1]:{sshd['port']}", "-f", str(sshd["known_hosts"])],
                   capture_output=True)
    root, units, port = tmp_path / "device", tmp_path / "units", free_port()
    res = _flash(sshd, root, str(bundles["a"]), "--serve", "8080", python=openvino_venv)
    assert res.returncode == 2 and "--serve configures the runner service: add --service" in res.stderr
    res = _flash(sshd, root, str(bundles["a"]), "--accept-fingerprint", sshd["fingerprint"], "--service",
                 "--serve", f"127.0.0.1:{port}", "--source", "synthetic://?frames=1000000", "--unit-dir", str(units),
                 python=openvino_venv)
    assert res.returncode == 0, res.stdout + res.stderr
    unit = (units / "edgeport-roadseg.service").read_text()
    assert f"--serve 127.0.0.1:{port}" in unit and f"EnvironmentFile=-{root}/roadseg/service.env" in unit
    (root / "roadseg" / "service.env").write_text("EDGEPORT_TOKEN=fleet-secret\n")
    fields = dict(ln.split("=", 1) for ln in unit.splitlines() if "=" in ln)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "PYTHONUNBUFFERED": "1",
           "EDGEPORT_TOKEN": "fleet-secret"}
    proc = subprocess.Popen(shlex.split(fields["ExecStart"]), cwd=fields["WorkingDirectory"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the token from the EnvironmentFile holds
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        time.sleep(1.0)
        status = run_cli("devices", "status", "--host", f"{sshd['host']}:{sshd['port']}", "--identity",
                         str(sshd["key"]), "--known-hosts", str(sshd["known_hosts"]), "--root", str(root),
                         "--python", str(openvino_venv), "--json")
        assert status.returncode == 0, status.stderr
        [row] = json.loads(status.stdout)
        assert row["health"].startswith("ready, ") and " FPS, " in row["health"], row
        assert int(row["health"].split(" FPS, ")[1].split()[0]) > 0  # frames counted, read with the token
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    status = run_cli("devices", "status", "--host", f"{sshd['host']}:{sshd['port']}", "--identity", str(sshd["key"]),
                     "--known-hosts", str(sshd["known_hosts"]), "--root", str(root), "--python", str(openvino_venv),
                     "--json")
    assert json.loads(status.stdout)[0]["health"].startswith(f"not answering on 127.0.0.1:{port}")
    # beyond loopback the runner serves only with a token: flash keeps the team's, or makes one only they can read
    res = _flash(sshd, root, str(bundles["a"]), "--service", "--serve", f"0.0.0.0:{port}", "--source",
                 "synthetic://", "--unit-dir", str(units), python=openvino_venv)
    assert res.returncode == 0 and "its token is in" in res.stdout and "(made now)" not in res.stdout, res.stdout
    assert (root / "roadseg" / "service.env").read_text() == "EDGEPORT_TOKEN=fleet-secret\n"
    (root / "roadseg" / "service.env").unlink()
    res = _flash(sshd, root, str(bundles["a"]), "--service", "--serve", f"0.0.0.0:{port}", "--source",
                 "synthetic://", "--unit-dir", str(units), python=openvino_venv)
    assert res.returncode == 0 and "(made now)" in res.stdout, res.stdout + res.stderr
    made = root / "roadseg" / "service.env"
    assert made.read_text().startswith("EDGEPORT_TOKEN=") and len(made.read_text().strip()) > 30
    assert made.stat().st_mode & 0o077 == 0
