"""The runner as a systemd service on the device (its unit, its token beyond loopback), and its health read on the
device's loopback through SSH."""
from __future__ import annotations

import json
import logging
import secrets
import shlex
from typing import Any

from edgeport.deploy.hosts import FlashOptions
from edgeport.deploy.ssh import SSH, remote_path

log = logging.getLogger("edgeport")


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
    res = ssh.run(f"cd {remote_path(model_dir)} && pwd && id -u", step="service")
    model_abs, uid = res.stdout.decode().split()
    user_unit = uid != "0"
    unit_dir = opts.unit_dir or ("~/.config/systemd/user" if user_unit else "/etc/systemd/system")
    source = opts.source or str(manifest.get("camera", {}).get("source", "0"))
    text = unit_text(manifest, model_abs, ssh.host.python, source, user_unit, opts.serve)
    name = unit_name(manifest)
    units = remote_path(unit_dir)
    ssh.run(f"mkdir -p {units} && cat > {units}/{name}.tmp && mv -f {units}/{name}.tmp {units}/{name}",
            stdin=text.encode(), step="service")
    where = json.dumps({"serve": opts.serve} if opts.serve else {}).encode()
    ssh.run(f"cat > {remote_path(model_dir)}/{SERVICE_JSON}.tmp && mv -f {remote_path(model_dir)}/{SERVICE_JSON}.tmp "
            f"{remote_path(model_dir)}/{SERVICE_JSON}", stdin=where, step="service")
    from edgeport.runner.serve import is_loopback, parse_bind

    token_note = ""
    if opts.serve and not is_loopback(parse_bind(opts.serve)[0]):
        # Beyond loopback the runner serves only with a token: keep the team's, else make one (readable by the
        # device user alone); devices status reads it from there.
        env = f"{remote_path(model_dir)}/{SERVICE_ENV}"
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


def restart_service(ssh: SSH, manifest: dict[str, Any]) -> None:
    """Restart the model's unit where systemd runs (as a system or a user unit); nothing where it does not."""
    name = unit_name(manifest)
    ssh.run(f"(systemctl restart {name} || systemctl --user restart {name}) 2>/dev/null || true", check=False,
            step="service")


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
    r = ssh.run(f"cd {remote_path(root)} 2>/dev/null && {remote_path(ssh.host.python)} - "
                f"{' '.join(shlex.quote(a) for a in args)}",
                stdin=HEALTH_PROBE.encode(), check=False, timeout=wait + 60, step="status")
    found = {}
    for line in r.stdout.decode(errors="replace").splitlines():
        name, sep, text = line.partition("|")
        if sep:
            found[name] = (text.startswith("ready"), text)
    return found
