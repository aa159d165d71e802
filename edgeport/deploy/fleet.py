"""Fleet rollouts on Ansible: staged, health-gated, rolled back on failure (``edgeport fleet``).

Ansible does what fleets already trust it for: the inventory (groups by device kind, host vars),
rolling batches (``serial``: a canary, then growing batches), ``max_fail_percentage``, forks, and
a playbook a team can run from its own Ansible (``--emit``). Each host's work is one task that runs
on the controller (``connection: local``) and calls :func:`step`, the same device-side steps as
``edgeport flash`` (edgeport.deploy.flash: preflight, checksummed resumable copy that skips unchanged
files, device-side sha256, selftest, atomic switch of current/previous, service restart), then a
**health gate**: the runner's parity smoke test on the bundle's golden frames in ``current``, and,
where the host serves (``edgeport_serve``), its ``/readyz``. A host that fails the gate after the
switch rolls back to ``previous`` by itself. The target needs no Python for Ansible at all (its
modules never run there): only what the runner needs (Python 3.6+), so JetPack 4.6's Python 3.6
boards are reached whatever ansible-core the controller runs.

Inventory: a host's group names its target with ``-`` as ``_`` (group ``jetson_orin_nano`` gets the
jetson-orin-nano bundle); host vars ``ansible_host``, ``ansible_port``, ``ansible_user``,
``ansible_ssh_private_key_file``, ``edgeport_python`` (the device's python), ``edgeport_root``
(install root, default ~/edgeport), ``edgeport_serve`` ([HOST:]PORT of the runner service, when it
serves) and ``edgeport_fingerprint`` (SHA256:..., to trust a first-contact host). Host keys are checked as
strictly as flash does: ``--known-hosts``, no first contact without the host's fingerprint.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeport.bundle import read_manifest
from edgeport.deploy.copy import expected_digests
from edgeport.deploy.flash import check_shippable, flash_host, model_dir_of, return_to_previous, status, version_of
from edgeport.deploy.hosts import FlashOptions, Host, HostResult
from edgeport.deploy.service import probe_health
from edgeport.deploy.ssh import check_host_keys, remote_path, session
from edgeport.errors import ConfigError, DeviceError

log = logging.getLogger("edgeport")
DEFAULT_BATCHES: list[int | str] = [1, "10%", "50%", "100%"]
STEP_TASK = "edgeport step"


@dataclass
class FleetOptions:
    """One rollout's settings (the playbook's and every host step's)."""

    batches: list[int | str] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    max_fail_percentage: int = 0
    known_hosts: str = str(Path.home() / ".ssh" / "known_hosts")
    health_timeout: float = 30.0
    install: bool = False
    service: bool = False
    source: str | None = None
    forks: int = 8


def group_of(target: str) -> str:
    """The inventory group of a target: jetson-orin-nano -> jetson_orin_nano."""
    return target.replace("-", "_")


def check_batches(batches: list[int | str]) -> list[int | str]:
    """Batches as Ansible's ``serial`` takes them: positive counts or percentages; ConfigError otherwise."""
    out: list[int | str] = []
    for b in batches:
        text = str(b).strip()
        if text.endswith("%") and text[:-1].isdigit() and 0 < int(text[:-1]) <= 100:
            out.append(text)
        elif text.isdigit() and int(text) > 0:
            out.append(int(text))
        else:
            raise ConfigError(f"--batches {b!r}: give host counts or percentages, e.g. 1,10%,50%,100%")
    if not out:
        raise ConfigError("--batches: at least one batch, e.g. 1,10%,50%,100%")
    return out


# ---------------------------------------------------------------- the playbook
ROLE_TASKS = """\
# edgeport's rollout role: one task per host, run on the controller (the device needs no Python for
# Ansible); it calls edgeport's own device steps over SSH (edgeport.deploy.fleet.step) and prints one JSON line.
- name: edgeport step
  ansible.builtin.command:
    argv:
      - "{{ edgeport_controller_python | default(ansible_playbook_python) }}"
      - "-m"
      - "edgeport.deploy.fleet"
      - "{{ edgeport_action }}"
      - "{{ {'name': edgeport_label | default(inventory_hostname),
             'address': ansible_host | default(inventory_hostname), 'user': ansible_user | default(''),
             'port': ansible_port | default(22),
             'identity': ansible_ssh_private_key_file | default(''), 'python': edgeport_python | default('python3'),
             'root': edgeport_root | default('~/edgeport'), 'serve': edgeport_serve | default(''),
             'fingerprint': edgeport_fingerprint | default(''), 'groups': group_names} | to_json }}"
      - "{{ edgeport_settings | to_json }}"
  register: edgeport_result
  changed_when: (edgeport_result.stdout | from_json).changed | default(false)
  failed_when: edgeport_result.rc != 0
"""


def playbook_text(action: str, opts: FleetOptions) -> str:
    """The play: every inventory host, local connection, ``serial`` batches and ``max_fail_percentage``."""
    serial = json.dumps(opts.batches)
    return f"""\
# edgeport fleet {action}: staged ({serial}), stopped when more than {opts.max_fail_percentage} % of a batch fails.
- name: edgeport fleet {action}
  hosts: all
  connection: local
  gather_facts: false
  serial: {serial}
  max_fail_percentage: {opts.max_fail_percentage}
  vars:
    ansible_python_interpreter: "{{{{ ansible_playbook_python }}}}"
    edgeport_action: {action}
  roles:
    - edgeport_rollout
"""


EXAMPLE_INVENTORY = """\
# edgeport fleet inventory: one group per target (its name with - as _), host vars for the device.
[jetson_orin_nano]
cam-01 ansible_host=10.0.0.21 ansible_user=ubuntu edgeport_python=/usr/bin/python3 edgeport_serve=8080
cam-02 ansible_host=10.0.0.22 ansible_user=ubuntu edgeport_python=/usr/bin/python3 edgeport_serve=8080

[raspberry_pi_5]
pi-01 ansible_host=10.0.1.11 ansible_user=pi edgeport_root=/opt/edgeport

[all:vars]
ansible_ssh_private_key_file=~/.ssh/id_ed25519
# a host not yet in known_hosts is refused unless its key's fingerprint is given (ssh-keygen -lf on the device):
# cam-03 ansible_host=10.0.0.23 edgeport_fingerprint=SHA256:...
"""


def write_project(dest: Path, action: str, opts: FleetOptions) -> Path:
    """playbook.yml, roles/edgeport_rollout/tasks/main.yml and inventory.example.ini under ``dest``; returns the
    playbook's path."""
    (dest / "roles" / "edgeport_rollout" / "tasks").mkdir(parents=True, exist_ok=True)
    (dest / "roles" / "edgeport_rollout" / "tasks" / "main.yml").write_text(ROLE_TASKS)
    play = dest / f"{action}.yml"
    play.write_text(playbook_text(action, opts))
    (dest / "inventory.example.ini").write_text(EXAMPLE_INVENTORY)
    return play


def settings_of(bundles: dict[str, str], opts: FleetOptions) -> dict[str, Any]:
    """What every host step reads (the ``edgeport_settings`` extra var)."""
    return {"bundles": bundles, "known_hosts": opts.known_hosts, "health_timeout": opts.health_timeout,
            "install": opts.install, "service": opts.service, "source": opts.source}


def emit(dest: Path, bundles: list[Path], opts: FleetOptions) -> list[Path]:
    """``--emit DIR``: the project a team runs from its own Ansible, with the settings as vars files."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = [write_project(dest, action, opts) for action in ("rollout", "rollback")]
    settings = settings_of(bundle_map(bundles), opts)
    (dest / "edgeport_settings.json").write_text(json.dumps({"edgeport_settings": settings}, indent=2) + "\n")
    (dest / "README.txt").write_text(
        "edgeport fleet project (written by `edgeport fleet rollout --emit`).\n\n"
        "  ansible-playbook -i inventory.ini rollout.yml -e @edgeport_settings.json\n"
        "  ansible-playbook -i inventory.ini rollback.yml -e @edgeport_settings.json\n\n"
        "The controller needs edgeport installed (the role runs `python -m edgeport.deploy.fleet`; set\n"
        "edgeport_controller_python to its python if it is not ansible's). Devices need only the runner's\n"
        "Python (3.6+) and runtime.\n")
    return [*paths, dest / "edgeport_settings.json"]


# ---------------------------------------------------------------- the controller
def bundle_map(bundles: list[Path]) -> dict[str, str]:
    """{inventory group: bundle folder} from the bundles' manifests; ConfigError for two of one target."""
    from edgeport.runner.manifest import load_manifest

    out: dict[str, str] = {}
    for b in bundles:
        if not (b / "manifest.json").is_file():
            raise ConfigError(f"{b}: not a bundle folder (no manifest.json); run `edgeport build` first")
        target = load_manifest(str(b))["target"]
        group = group_of(target)
        if group in out:
            raise ConfigError(f"two bundles for {target} ({out[group]} and {b}); give one per target")
        out[group] = str(b.resolve())
    return out


def _ansible_on_path() -> None:
    """ansible-runner starts ansible-playbook and ansible-inventory by name: the ones beside this python (its
    venv's bin), even when that folder is not on PATH."""
    here = os.path.dirname(sys.executable)
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def load_inventory(inventory: str) -> dict[str, Any]:
    """Ansible's view of the inventory (``ansible-inventory --list``); ConfigError when it cannot be read, with
    where (line and column) and why, from Ansible's own parse error of the file's format."""
    _ansible_on_path()
    path = Path(inventory)
    if not path.exists():
        raise ConfigError(f"--inventory {inventory}: no such file")
    exe = shutil.which("ansible-inventory")
    if exe is None:
        raise ConfigError("ansible-inventory is not installed beside this python: pip install 'edgeport[fleet]'")
    with tempfile.TemporaryDirectory(prefix="edgeport-inventory-") as tmp:
        # A source no plugin can parse is an error, not an empty inventory ("no hosts") with a warning.
        env = {**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "True", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_LOCAL_TEMP": tmp, "ANSIBLE_HOME": tmp, "PYTHONWARNINGS": "ignore"}
        res = subprocess.run([exe, "-i", str(path.resolve()), "--list"], capture_output=True, text=True, env=env,
                             timeout=300)
    try:
        out = json.loads(res.stdout) if res.returncode == 0 else None
    except ValueError:
        out = None
    if not isinstance(out, dict) or "_meta" not in out:
        raise ConfigError(f"--inventory {inventory}: Ansible cannot read it: {_inventory_problem(path, res.stderr)}")
    return out


def _inventory_problem(path: Path, stderr: str) -> str:
    """Why Ansible could not parse an inventory, in one line: a YAML file's syntax error with its line and column,
    else the message of the plugin for the file's format (ini, yaml, toml), else Ansible's last error line."""
    suffix = path.suffix.lower()
    if suffix in (".yml", ".yaml") and path.is_file():
        import yaml

        try:
            yaml.safe_load(path.read_text(errors="replace"))
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            return f"{where}{e.problem or e.context} (YAML)"
        except yaml.YAMLError as e:
            return f"{e} (YAML)"
    plugin = {".yml": "yaml", ".yaml": "yaml", ".toml": "toml"}.get(suffix, "ini")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        m = re.search(rf"Failed to parse .*with '?{plugin}'? plugin: (.*)", ln)
        if m:
            why = m.group(1).strip()
            if plugin == "ini" and not re.search(r":\d+:", why) and path.is_file():
                # Ansible's INI parser does not say where a section header is broken; say which line it is
                for n, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    if text.strip().startswith("[") and not text.split("#")[0].split(";")[0].strip().endswith("]"):
                        return f"line {n}: section header {text.strip()!r} has no closing ']' ({why})"
            return why
    errors = [ln.split("]:", 1)[-1].strip() for ln in lines if ln.startswith(("[ERROR]", "ERROR"))]
    return errors[-1] if errors else (lines[-1] if lines else "no hosts")


def inventory_hosts(inv: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{host: {"groups": [...], **host vars}} in the inventory's order."""
    hostvars = inv["_meta"].get("hostvars", {})
    groups: dict[str, list[str]] = {}
    order: list[str] = []

    def walk(group: str, parents: list[str]) -> None:  # a host is in its group and in that group's parents
        node = inv.get(group, {})
        for h in node.get("hosts", []):
            groups.setdefault(h, [])
            groups[h] += [g for g in (*parents, group) if g not in groups[h]]
            if h not in order:
                order.append(h)
        for child in node.get("children", []):
            walk(child, [*parents, group])

    walk("all", [])
    return {h: {"groups": [g for g in groups[h] if g not in ("all", "ungrouped")], **hostvars.get(h, {})}
            for h in order}


def check_rollout(bundles: dict[str, str], hosts: dict[str, dict[str, Any]]) -> None:
    """ConfigError when a host has no bundle (its groups name no target given) or the inventory is empty."""
    if not hosts:
        raise ConfigError("the inventory has no hosts")
    lost = [h for h, v in hosts.items() if not set(v["groups"]) & set(bundles)]
    if lost:
        raise ConfigError(f"{len(lost)} host(s) in no group of a given bundle's target ({', '.join(lost[:5])}); "
                          f"groups with bundles: {', '.join(sorted(bundles))}. Put each host in its target's "
                          "group (jetson-orin-nano -> [jetson_orin_nano]) or pass its bundle")


def run_playbook(action: str, inventory: str, bundles: dict[str, str], opts: FleetOptions,
                 hosts: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the play through ansible-runner; one result per inventory host (``not reached`` for hosts the
    rollout stopped before)."""
    import ansible_runner

    _ansible_on_path()
    results: dict[str, dict[str, Any]] = {}
    batch = {"n": 0, "seen": set()}
    t0 = time.time()

    def on_event(event: dict[str, Any]) -> bool:
        data = event.get("event_data", {})
        if event.get("event") == "playbook_on_task_start" and data.get("task") == STEP_TASK:
            batch["n"] += 1
        if event.get("event") in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable") and \
                data.get("task") == STEP_TASK:
            host, res = data.get("host", "?"), data.get("res", {})
            try:
                rec = json.loads(res.get("stdout") or "{}")
            except ValueError:
                rec = {}
            rec.setdefault("status", "failed")
            if not rec.get("message") and event["event"] != "runner_on_ok":
                rec["message"] = (res.get("stderr") or res.get("msg") or "").strip().splitlines()[-1:] or ["failed"]
                rec["message"] = rec["message"][0]
            rec.update({"host": host, "batch": batch["n"], "seconds_into_rollout": round(time.time() - t0, 1)})
            results[host] = rec
            log.info("fleet %s: batch %d: %s %s%s", action, batch["n"], host, rec["status"],
                     f" ({rec['message']})" if rec.get("message") else "")
        return True

    with tempfile.TemporaryDirectory(prefix="edgeport-fleet-") as tmp:
        play = write_project(Path(tmp) / "project", action, opts)
        log.info("fleet %s: %d host(s), batches %s, max_fail_percentage %d", action, len(hosts),
                 json.dumps(opts.batches), opts.max_fail_percentage)
        r = ansible_runner.run(private_data_dir=tmp, playbook=str(play), inventory=str(Path(inventory).resolve()),
                               extravars={"edgeport_settings": {**settings_of(bundles, opts), **(extra or {})},
                                          "edgeport_controller_python": sys.executable},
                               forks=opts.forks, quiet=True, event_handler=on_event,
                               envvars={"ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
                                        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        if r.rc not in (0, 2) and not results:  # 2: some host failed, which the results say
            raise DeviceError(f"fleet {action}: ansible-playbook failed (exit {r.rc}): "
                              f"{(r.stdout.read() if r.stdout else '')[-300:].strip()}")
    return [results.get(h) or {"host": h, "status": "not reached", "changed": False,
                               "message": "the rollout stopped before this host's batch; its version is unchanged"}
            for h in hosts]


def rollout(bundles: list[Path], inventory: str, opts: FleetOptions, action: str = "rollout") -> list[dict[str, Any]]:
    """Roll ``bundles`` out (or, with action ``rollback``, every host back to its previous version). Every bundle
    is checked (flash.check_shippable) and the inventory read before the first host is contacted."""
    for b in bundles if action == "rollout" else []:
        check_shippable(b, force=getattr(opts, "force", False))
    bmap = bundle_map(bundles) if action == "rollout" else {}
    hosts = inventory_hosts(load_inventory(inventory))
    if action == "rollout":
        check_rollout(bmap, hosts)
    return run_playbook(action, inventory, bmap, opts, hosts)


# ---------------------------------------------------------------- one host (run by the playbook's task)
def _host(spec: dict[str, Any]) -> Any:
    address = f"{spec['user']}@{spec['address']}" if spec.get("user") else spec["address"]
    return Host(address, int(spec.get("port") or 22), spec.get("identity") or None, spec.get("python") or "python3",
                spec["name"])


def step(action: str, spec: dict[str, Any], settings: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """One host's rollout (flash's steps, then the health gate; rolled back when the gate fails after the
    switch) or rollback; (ok, the record printed for Ansible)."""
    host = _host(spec)
    opts = FlashOptions(root=spec.get("root") or "~/edgeport", known_hosts=Path(settings["known_hosts"]).expanduser(),
                        install=bool(settings.get("install")), service=bool(settings.get("service")),
                        source=settings.get("source"), serve=spec.get("serve") or None, jobs=1,
                        unit_dir=settings.get("unit_dir"), force=bool(settings.get("force")))
    opts.accept_fingerprint = spec.get("fingerprint") or None  # a first-contact host only with its fingerprint
    refused = check_host_keys([host], opts)
    if refused:
        return False, {"status": "refused", "step": "host key", "changed": False, "message": refused[0]}
    if action == "rollback":
        manifest = settings.get("manifest") or _current_manifest(host, opts)
        opts.rollback = True
        res = flash_host(Path("."), manifest, {}, host, opts)
        rec = {"status": res.status, "step": res.step, "version": res.version, "previous": res.previous,
               "message": res.message, "changed": res.status == "rolled-back", "seconds": round(res.seconds, 1),
               "details": res.details}
        return res.status == "rolled-back", rec
    group = next((g for g in spec.get("groups", []) if g in settings["bundles"]), None)
    if group is None:
        return False, {"status": "refused", "changed": False,
                       "message": f"no bundle for groups {spec.get('groups')}"}
    bundle = Path(settings["bundles"][group])
    manifest = read_manifest(bundle)
    res = flash_host(bundle, manifest, expected_digests(bundle, manifest), host, opts)
    rec = {"status": res.status, "step": res.step, "version": res.version, "previous": res.previous,
           "message": res.message, "changed": res.status == "flashed", "seconds": round(res.seconds, 1),
           "copy": res.details.get("copy"), "details": res.details}
    if res.status not in ("flashed", "unchanged"):
        return False, rec
    if opts.serve and "not started" in str(res.details.get("service", "")):
        opts.serve = None  # no systemd there: nothing serves yet, so only the parity smoke test can gate
    ran = res.details.get("selftest") if res.status == "flashed" else None  # flash's own, in this folder
    ok, why = health_gate(host, opts, manifest, float(settings.get("health_timeout", 30)), ran)
    rec["health"] = why
    if ok:
        return True, rec
    rec["status"], rec["changed"] = "rolled-back", True
    if res.status == "flashed" and res.previous:
        back = _roll_back(host, opts, manifest, f"health gate failed: {why}")
        rec["message"] = f"health gate failed after the switch ({why}); {back}"
    else:
        rec["status"] = "failed"
        rec["message"] = f"health gate failed ({why}); no previous version to return to"
    return False, rec


def _current_manifest(host: Any, opts: Any) -> dict[str, Any]:
    """A stand-in manifest for rollback: the model whose folder is under the root (one model per fleet)."""
    with session(host, opts) as ssh:
        out = ssh.run(f"cd {remote_path(opts.root)} 2>/dev/null && ls -d */ 2>/dev/null", check=False,
                      step="rollback").stdout.decode().split()
    if len(out) > 1:
        raise DeviceError(f"{host.label}: {len(out)} models under {opts.root} ({', '.join(m.rstrip('/') for m in out)}"
                          "); roll back one with `edgeport flash BUNDLE --rollback`")
    return {"model": {"name": out[0].rstrip("/") if out else "?"}, "target": "?", "precision": "?"}


def health_gate(host: Any, opts: Any, manifest: dict[str, Any], timeout: float,
                selftest: str | None = None) -> tuple[bool, str]:
    """(passed, what was seen): the parity smoke test (``runner.py --selftest`` in ``current``: golden frames
    against PyTorch's and the build host's outputs; ``selftest`` is its line when the flash just ran it in this
    very folder, so it is not run twice) and, where the host serves, ``/readyz`` within ``timeout`` (flash's
    device-side health probe). One SSH session, none when there is nothing left to ask."""
    import shlex

    if selftest is not None and not opts.serve:
        return True, f"parity smoke test passed ({selftest})"
    model_dir = model_dir_of(manifest, opts.root)
    with session(host, opts) as ssh:
        if selftest is None:
            st = ssh.run(f"cd {remote_path(model_dir)}/current && {shlex.quote(host.python)} runner.py --selftest",
                         check=False, timeout=600, step="health")
            lines = (st.stdout + st.stderr).decode(errors="replace").strip().splitlines()
            if st.returncode != 0:
                return False, f"parity smoke test: {lines[-1] if lines else 'exit %d' % st.returncode}"
        if not opts.serve:
            return True, "parity smoke test passed"
        model = manifest["model"]["name"]
        ok, said = probe_health(ssh, opts.root, timeout, model, opts.serve).get(model, (False, "no answer"))
        if not ok:
            return False, f"/readyz on {opts.serve}: {said} within {timeout:g} s"
        return True, f"parity smoke test passed, /readyz on {opts.serve}: {said}"


def _roll_back(host: Any, opts: Any, manifest: dict[str, Any], why: str) -> str:
    with session(host, opts) as ssh:
        prev, _ = return_to_previous(ssh, manifest, model_dir_of(manifest, opts.root), opts.service,
                                     f"rolled back: {why}")
    return f"rolled back to {prev}"


def flash_many(bundle: Path, manifest: dict[str, Any], hosts: list[Any], opts: Any) -> list[Any]:
    """``edgeport flash`` to several hosts: through this engine (Ansible, one batch of all hosts, ``--jobs`` forks,
    no host's failure stopping another), after flash's own host-key checks (first contact included)."""
    if importlib.util.find_spec("ansible_runner") is None:
        raise ConfigError("flashing several hosts runs through Ansible: pip install 'edgeport[fleet]' (or flash one "
                          "--host at a time)")
    refused = check_host_keys(hosts, opts)
    trusted = [h for i, h in enumerate(hosts) if i not in refused]
    group = group_of(manifest["target"])
    results: dict[str, dict[str, Any]] = {}
    if trusted:
        with tempfile.TemporaryDirectory(prefix="edgeport-flash-") as tmp:
            inv = Path(tmp) / "hosts.ini"
            lines = [f"[{group}]"]
            for i, h in enumerate(trusted):
                user, _, addr = h.address.rpartition("@")
                fields = {"ansible_host": addr, "ansible_port": h.port, "edgeport_python": h.python,
                          "edgeport_root": opts.root, "edgeport_label": h.label}
                if user:
                    fields["ansible_user"] = user
                if h.identity:
                    fields["ansible_ssh_private_key_file"] = str(Path(h.identity).expanduser())
                if opts.serve:
                    fields["edgeport_serve"] = opts.serve
                lines.append(f"h{i} " + " ".join(f"{k}={json.dumps(str(v))}" for k, v in fields.items()))
            inv.write_text("\n".join(lines) + "\n")
            fopts = FleetOptions(batches=["100%"], max_fail_percentage=100, known_hosts=str(opts.known_hosts),
                                 install=opts.install, service=opts.service, source=opts.source, forks=opts.jobs)
            extra = {"unit_dir": opts.unit_dir, "force": opts.force, "manifest": manifest if opts.rollback else None}
            names = {f"h{i}": h for i, h in enumerate(trusted)}
            rows = run_playbook("rollback" if opts.rollback else "rollout", str(inv), {group: str(bundle.resolve())},
                                fopts, dict.fromkeys(names, {}), extra)
            for row in rows:
                results[names[row["host"]].label] = row
    out = []
    for i, h in enumerate(hosts):
        if i in refused:
            out.append(HostResult(h.label, "refused", "host key", version_of(manifest), message=refused[i]))
            continue
        r = results.get(h.label, {})
        message = r.get("message") or ""
        out.append(HostResult(h.label, r.get("status", "failed"), r.get("step", "-"), r.get("version") or
                              version_of(manifest), r.get("previous") or "", message,
                              float(r.get("seconds") or 0.0), r.get("details") or {}))
    return out


def fleet_status(inventory: str, known_hosts: str) -> list[dict[str, Any]]:
    """Per inventory host: current and previous version, service, health and the last rollout (history.log's last
    line), all from edgeport.flash.status (one SSH session per host)."""
    rows = []
    for name, v in inventory_hosts(load_inventory(inventory)).items():
        spec = {"name": name, "address": v.get("ansible_host", name), "user": v.get("ansible_user", ""),
                "port": v.get("ansible_port", 22), "identity": v.get("ansible_ssh_private_key_file", ""),
                "python": v.get("edgeport_python", "python3")}
        opts = FlashOptions(root=v.get("edgeport_root", "~/edgeport"), known_hosts=Path(known_hosts).expanduser())
        rows += [{**row, "host": name, "groups": v["groups"]} for row in status([_host(spec)], opts)]
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m edgeport.deploy.fleet ACTION HOST_JSON SETTINGS_JSON``: one host's step, one JSON line on stdout."""
    argv = sys.argv[1:] if argv is None else argv
    action, spec, settings = argv[0], json.loads(argv[1]), json.loads(argv[2])
    try:
        ok, rec = step(action, spec, settings)
    except Exception as e:  # reported to Ansible as this host's failure, in one line
        ok, rec = False, {"status": "failed", "changed": False, "message": f"{type(e).__name__}: {e}"}
    print(json.dumps(rec))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
