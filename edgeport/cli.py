"""The edgeport command line. Each command calls the api function of the same name.

Errors print one line and exit non-zero; -v shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from edgeport import __version__, options
from edgeport.errors import EdgeportError
from edgeport.flags import positive as _positive

EXAMPLES = {
    "build": "examples:\n  edgeport build\n  edgeport build --model torchvision:resnet18 --input 1x3x224x224 "
             "--task classification --calib images/ --target intel-cpu:int8\n"
             "  edgeport build --model net.py:make_model --weights ckpt.pth --target intel-cpu:fp16\n"
             "  edgeport build --target intel-cpu:int8 --val-images val/ --val-labels valannot/ --max-drop 0.5\n"
             "  edgeport build --report reports/   (JSON, JUnit XML and Markdown for CI)",
    "export": "examples:\n  edgeport export --model torchvision:resnet18?num_classes=10 --input 1x3x224x224 "
              "--out resnet18.onnx\n  edgeport export --target jetson-nano   (opset 13 for TensorRT 8.2)",
    "validate": "examples:\n  edgeport validate      # this project's dist/: golden frames (+ synthetic scenes "
                "for the default model)\n  edgeport validate dist/camvid --config examples/camvid/edgeport.toml "
                "--val-images camvid/val --val-labels camvid/valannot --bench --report reports/\n"
                "  edgeport validate dist/intel-cpu-int8 --localize   # name the first layer that diverges\n"
                "  edgeport validate --emulate aarch64 --frames 8     # ARM bundles on emulated aarch64 too",
    "flash": "examples:\n  edgeport flash dist/intel-cpu-int8 --host pi@10.0.0.7 --identity ~/.ssh/id_ed25519\n"
             "  edgeport flash dist/jetson-orin-nano-int8 --host ubuntu@jetson --accept-fingerprint SHA256:abc... "
             "--service --source csi://0\n  edgeport flash dist/jetson-orin-nano-int8 --host ubuntu@jetson --service "
             "--serve 8080   # live view and metrics on the device's loopback\n"
             "  edgeport flash dist/intel-cpu-int8 --inventory hosts.toml --jobs 8\n"
             "  edgeport flash dist/intel-cpu-int8 --host pi@10.0.0.7 --rollback",
    "devices": "examples:\n  edgeport devices status --host pi@10.0.0.7\n"
               "  edgeport devices status --inventory hosts.toml",
    "fleet": "examples:\n  edgeport fleet rollout dist/jetson-orin-nano-int8 dist/raspberry-pi-5-int8 "
             "--inventory hosts.ini\n"
             "  edgeport fleet rollout dist/intel-cpu-int8 --inventory hosts.ini --batches 1,25%,100% "
             "--max-fail-percentage 10\n"
             "  edgeport fleet rollout dist/jetson-orin-nano-int8 --inventory hosts.ini --emit fleet/   # "
             "playbook, role, example inventory\n"
             "  edgeport fleet rollback --inventory hosts.ini\n  edgeport fleet status --inventory hosts.ini",
    "targets": "examples:\n  edgeport targets\n  edgeport targets --json",
    "doctor": "examples:\n  edgeport doctor\n  edgeport doctor --json",
    "inspect": "examples:\n  edgeport inspect dist/intel-cpu-int8\n  edgeport inspect model.onnx --json",
}


def _host_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices and SSH")
    g.add_argument("--host", action="append", metavar="USER@ADDR[:PORT]", help="a device; repeatable (in parallel)")
    g.add_argument("--inventory", metavar="FILE", help="TOML with [[host]] address, port, identity, python, name")
    g.add_argument("--port", type=_positive, help="SSH port (default 22)")
    g.add_argument("--identity", metavar="KEY", help="private key file for ssh -i (only its path is used)")
    g.add_argument("--python", help="the device's python (default python3)")
    g.add_argument("--root", default="~/edgeport", help="folder on the device (default ~/edgeport)")
    g.add_argument("--known-hosts", metavar="FILE", help="known_hosts file (default ~/.ssh/known_hosts)")
    g.add_argument("--accept-fingerprint", metavar="SHA256:...", help="trust a first-contact host whose key has "
                                                                      "this fingerprint")
    g.add_argument("--jobs", type=_positive, default=8, help="hosts handled at once (default 8)")
    g.add_argument("--json", action="store_true", help="results as JSON")


class _Parser(argparse.ArgumentParser):
    """argparse with one error line (no usage block), exit status 2, like every other edgeport error; no
    abbreviated options (a typo must not silently become another flag)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    p = _Parser(
        prog="edgeport", description="One PyTorch vision model to Jetson (TensorRT), Intel (OpenVINO) and ARM "
                                     "(TFLite) bundles, validated against PyTorch.",
        epilog="examples:\n  edgeport build                 # the embedded default, every installed backend\n"
               "  edgeport targets\n  edgeport doctor\n  edgeport build --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"edgeport {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log and tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, epilog=EXAMPLES[name],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug log and tracebacks")
        return sp

    b = cmd("build", "build, validate and bundle the model for device targets")
    groups = options.add_flags(b, options.BUILD)
    out = groups[options.OUTPUT_GROUP]
    out.add_argument("--report", metavar="DIR", help="also write report.json, report.junit.xml and report.md "
                                                     "(a CI job summary) here")
    out.add_argument("--json", action="store_true", help="the build report as JSON on stdout (progress on stderr)")
    e = cmd("export", "export the model to ONNX (simplified, checked, parity-tested)")
    options.add_flags(e, options.EXPORT)
    e.add_argument("--target", action="append", help="choose the opset from these targets' ceilings")
    e.add_argument("--out", help="ONNX file to write (default: <model>.onnx)")
    v = cmd("validate", "check every bundle against the PyTorch model: golden frames and a dataset, per output "
                        "and task metric; exit 0 only when all pass")
    v.add_argument("paths", nargs="*", metavar="PATH", help="bundle folders or dist folders (default: the "
                                                          "project's dist)")
    g = options.add_flags(v, options.VALIDATE)[options.DATA_GROUP]
    g.add_argument("--localize", action="store_true", help="for a failing bundle, name the first layer whose "
                                                           "output diverges (OpenVINO, TensorRT)")
    g.add_argument("--bench", action="store_true", help="also time each runtime here: size, metric, latency "
                                                        "median/p99, FPS (Markdown table + PNG chart)")
    g.add_argument("--emulate", metavar="ARCH", choices=["aarch64"],
                   help="also install and run each ARM bundle on emulated aarch64 (a Debian 12 arm64 root made once "
                        "from Debian's packages, qemu-user with the device's core) and compare with x86; needs "
                        "qemu-user-static and debootstrap")
    g.add_argument("--frames", type=int, default=8, metavar="N", help="frames run on emulated aarch64 (default 8: "
                                                                       "emulation takes seconds per frame)")
    g.add_argument("--report", metavar="DIR", help="write validate.json, validate.junit.xml, validate.md "
                                                   "(and benchmark.png with --bench) here")
    g.add_argument("--json", action="store_true", help="the report as JSON on stdout")
    f = cmd("flash", "copy a bundle to devices over SSH, self-test it there, then switch to it atomically")
    f.add_argument("bundle", help="a bundle folder (dist/<target>-<precision>)")
    _host_flags(f)
    f.add_argument("--install", action="store_true", help="pip install the bundle's requirements.txt on the device "
                                                          "when its runtime cannot be imported")
    f.add_argument("--service", action="store_true", help="install a systemd unit that starts the runner at boot "
                                                          "and restarts it on failure")
    f.add_argument("--source", help="camera source for --service (default: the profile's, e.g. csi://0)")
    f.add_argument("--serve", metavar="[HOST:]PORT", help="with --service: the runner serves its live view, "
                                                          "/metrics, /healthz, /readyz and POST /infer there "
                                                          "(loopback unless a host is given; `devices status` "
                                                          "reads its health through SSH)")
    f.add_argument("--unit-dir", help="where the unit goes (default /etc/systemd/system as root, "
                                      "~/.config/systemd/user otherwise)")
    f.add_argument("--rollback", action="store_true", help="make the previous version current again")
    f.add_argument("--force", action="store_true", help="flash a bundle whose build failed its gates (recorded in "
                                                        "the device's history.log)")
    dv = cmd("devices", "what runs where: current and previous versions and the service on each device")
    dv.add_argument("action", choices=["status"], help="status: each device's current and previous versions, "
                                                       "service and health")
    _host_flags(dv)
    fl = cmd("fleet", "roll bundles out to a fleet with Ansible: staged batches, a health gate, rollback")
    fl.add_argument("action", choices=["rollout", "rollback", "status"],
                    help="rollout: the bundles to their groups' hosts; rollback: every host's previous version; "
                         "status: what each host runs")
    fl.add_argument("bundles", nargs="*", help="rollout: one bundle folder per target (dist/<target>-<precision>)")
    fl.add_argument("--inventory", required=True, metavar="FILE", help="an Ansible inventory: one group per "
                                                                       "target (jetson-orin-nano -> jetson_orin_nano)")
    fl.add_argument("--batches", default="1,10%,50%,100%", help="rolling batches, Ansible's serial (default "
                                                                 "%(default)s: a canary, then growing batches)")
    fl.add_argument("--max-fail-percentage", type=int, default=0, help="stop the rollout when more than this share "
                                                                      "of a batch fails (default 0: any failure)")
    fl.add_argument("--known-hosts", metavar="FILE", help="known_hosts file (default ~/.ssh/known_hosts); no "
                                                          "first-contact host is accepted")
    fl.add_argument("--health-timeout", type=float, default=30.0, help="seconds a serving host's /readyz has "
                                                                       "after the switch (default 30)")
    fl.add_argument("--service", action="store_true", help="install or restart the runner's systemd unit")
    fl.add_argument("--source", help="camera source for --service")
    fl.add_argument("--install", action="store_true", help="pip install the runtime where it cannot be imported")
    fl.add_argument("--forks", type=_positive, default=8, help="hosts of one batch handled at once (default 8)")
    fl.add_argument("--emit", metavar="DIR", help="write the playbooks, the role, the settings and an example "
                                                  "inventory there instead of running (for your own Ansible)")
    fl.add_argument("--json", action="store_true", help="results as JSON")
    t = cmd("targets", "list the device profiles")
    t.add_argument("--json", action="store_true", help="the profiles as JSON")
    d = cmd("doctor", "show which backends are installed, their versions, and how to install the rest")
    d.add_argument("--json", action="store_true", help="the backends as JSON")
    i = cmd("inspect", "describe a bundle folder or an ONNX file")
    i.add_argument("path", help="a bundle folder (dist/<target>-<precision>) or an ONNX file")
    i.add_argument("--json", action="store_true", help="the description as JSON")
    return p


def _declared(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The declared options of ``command`` as the command line gave them (edgeport.options)."""
    return {o.name: getattr(args, o.name) for o in options.options(command)}


def _run(args: argparse.Namespace) -> int:
    from edgeport import api

    if args.command == "build":
        from edgeport.build.report import parity_table, raise_on_failure, stage_table, summary_line

        report = api.build(**_declared(args, options.BUILD))
        if args.json:
            from edgeport.build.report import to_json

            print(api.to_json(to_json(report)))
        else:
            print(parity_table(report))
            print()
            print(stage_table(report))
        if args.report:
            from edgeport.build.report import write_reports

            for path in write_reports(report, Path(args.report)):
                print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
        print(summary_line(report), file=sys.stderr if args.json else sys.stdout)
        raise_on_failure(report)
        return 0
    if args.command == "validate":
        from edgeport import validate_report as gate

        report = api.validate(args.paths, localize=args.localize, bench=args.bench, emulate=args.emulate,
                              frames=args.frames, **_declared(args, options.VALIDATE))
        print(api.to_json(gate.to_json(report)) if args.json else gate.text(report))
        if args.report:
            for path in gate.write_reports(report, Path(args.report)):
                print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
        gate.raise_on_failure(report)
        return 0
    if args.command in ("flash", "devices"):
        return _flash(args)
    if args.command == "fleet":
        return _fleet(args)
    if args.command == "export":
        res = api.export(target=args.target, out=args.out, **_declared(args, options.EXPORT))
        p = next(iter(res["parity"].values()))
        print(f"wrote {res['onnx']} (opset {res['opset']}; vs PyTorch max error {p['max_abs']:.2e} = "
              f"{p['max_rel']:.1e} of range, cosine {p['cosine']:.7f}){' [cached]' if res['cached'] else ''}")
        return 0
    if args.command == "targets":
        rows = api.targets()
        if args.json:
            print(api.to_json(rows))
            return 0
        print(f"{'target':18} {'backend':9} {'precisions':28} {'opset':5}  runtime")
        for r in rows:
            rt = ", ".join(f"{k} {v}" for k, v in r["runtime"].items())
            prec = ",".join(f"{p}*" if p == r["default_precision"] else p for p in r["precisions"])
            print(f"{r['name']:18} {r['backend']:9} {prec:28} {r['opset_max']:<5}  {rt}")
        print("* default precision. Add a device: a TOML file in ./targets/ (the keys: `edgeport targets --json`).")
        return 0
    if args.command == "doctor":
        rows = api.doctor()
        if args.json:
            print(api.to_json(rows))
            return 0
        from edgeport.tables import text_table

        table = []
        for r in rows:
            note = r["reason"] + (f" -> {r['install']}" if not r["installed"] and r["install"] else "")
            table.append(["ok" if r["installed"] else "--", r["name"],
                          ", ".join(f"{k} {v}" for k, v in r["versions"].items()) or "-", note])
        print("\n".join(line.rstrip() for line in text_table(["", "what", "versions", "note"], table)))
        return 0
    if args.command == "inspect":
        res = api.inspect(args.path)
        print(api.to_json(res) if args.json else "\n".join(api.inspect_text(res)))
        if res.get("problems"):
            from edgeport.errors import BundleError

            raise BundleError(f"{args.path}: {res['problems'][0]}" + (f" (+{len(res['problems']) - 1} more problem(s))"
                                                                      if len(res["problems"]) > 1 else ""))
        return 0
    return 2


def _serve_option(args: argparse.Namespace) -> str | None:
    """flash's --serve, checked: it needs --service and a [HOST:]PORT."""
    from edgeport.errors import ConfigError
    from edgeport.runner.serve import parse_bind

    if not args.serve:
        return None
    if not args.service:
        raise ConfigError("--serve configures the runner service: add --service")
    try:
        parse_bind(args.serve)
    except ValueError as e:
        raise ConfigError(f"--serve {e}") from None
    return args.serve


def _fleet(args: argparse.Namespace) -> int:
    from edgeport.deploy import fleet
    from edgeport.errors import ConfigError, DeviceError
    from edgeport.tables import text_table

    if importlib.util.find_spec("ansible_runner") is None and not args.emit:
        raise ConfigError("edgeport fleet runs Ansible: pip install 'edgeport[fleet]' (ansible-core, ansible-runner)")
    opts = fleet.FleetOptions(batches=fleet.check_batches(args.batches.split(",")),
                              max_fail_percentage=args.max_fail_percentage, health_timeout=args.health_timeout,
                              install=args.install, service=args.service, source=args.source, forks=args.forks)
    if args.known_hosts:
        opts.known_hosts = str(Path(args.known_hosts).expanduser())
    if not 0 <= args.max_fail_percentage <= 100:
        raise ConfigError(f"--max-fail-percentage {args.max_fail_percentage}: give 0 to 100")
    bundles = [Path(b) for b in args.bundles]
    if args.action == "rollout" and not bundles:
        raise ConfigError("fleet rollout: name at least one bundle folder, e.g. dist/jetson-orin-nano-int8")
    if args.action != "rollout" and bundles:
        raise ConfigError(f"fleet {args.action} takes no bundles (it works on what the devices have)")
    if args.emit:
        for path in fleet.emit(Path(args.emit), bundles, opts):
            print(path)
        return 0
    if args.action == "status":
        rows = fleet.fleet_status(args.inventory, opts.known_hosts)
        keys = ["host", "model", "current", "previous", "service", "health", "last_rollout", "error"]
        if args.json:
            from edgeport.api import to_json

            print(to_json(rows))
        else:
            print("\n".join(text_table(keys, [[str(r.get(k, "-")) for k in keys] for r in rows])))
        return 0
    results = fleet.rollout(bundles, args.inventory, opts, args.action)
    if args.json:
        from edgeport.api import to_json

        print(to_json(results))
    else:
        print("\n".join(text_table(["host", "batch", "status", "version", "previous", "time", "note"], [
            [r["host"], str(r.get("batch", "-")), r["status"], r.get("version") or "-", r.get("previous") or "-",
             f"{r.get('seconds', 0):.1f}s", _unprefixed(r["host"], r.get("message") or r.get("health") or "")]
            for r in results])))
    bad = [r for r in results if r["status"] not in ("flashed", "unchanged", "rolled-back") or
           (args.action == "rollout" and r["status"] == "rolled-back")]
    if bad:
        raise DeviceError(f"fleet {args.action}: {len(bad)} of {len(results)} host(s) did not take it; "
                          f"{bad[0]['host']}: {_unprefixed(bad[0]['host'], bad[0].get('message') or bad[0]['status'])}")
    return 0


def _unprefixed(host: str, message: str) -> str:
    """A device step's message without the host label it starts with (the caller names the host once)."""
    return message[len(host) + 2:] if message.startswith(f"{host}: ") else message


def _flash(args: argparse.Namespace) -> int:
    from edgeport.deploy import flash as fl
    from edgeport.deploy import hosts as hs
    from edgeport.errors import DeviceError
    from edgeport.tables import text_table

    hosts = hs.parse_hosts(args.host, args.inventory, args.port, args.identity, args.python)
    flashing = args.command == "flash"
    opts = hs.FlashOptions(root=args.root, accept_fingerprint=args.accept_fingerprint,
                           interactive=sys.stdin.isatty() and args.accept_fingerprint is None, jobs=args.jobs,
                           install=flashing and args.install, service=flashing and args.service,
                           source=args.source if flashing else None, unit_dir=args.unit_dir if flashing else None,
                           serve=_serve_option(args) if flashing else None,
                           rollback=flashing and args.rollback, force=flashing and args.force)
    if args.known_hosts:
        opts.known_hosts = Path(args.known_hosts).expanduser()
    if args.command == "devices":
        rows = fl.status(hosts, opts)
        if args.json:
            from edgeport.api import to_json

            print(to_json(rows))
        else:
            keys = ["host", "model", "current", "previous", "versions", "service", "health", "error"]
            print("\n".join(text_table([*keys[:-1], "note"], [[str(r[k]) for k in keys] for r in rows])))
        bad = [r for r in rows if r["error"] and r["error"] != "nothing flashed"]
        if bad:
            raise DeviceError(f"{len(bad)} host(s) could not be read: {bad[0]['error']}")
        return 0
    if len(hosts) > 1:  # one engine for many hosts: Ansible's (edgeport.deploy.fleet)
        from edgeport.deploy.fleet import flash_many

        bundle = Path(args.bundle)
        results = flash_many(bundle, fl.check_shippable(bundle, opts.force, opts.rollback), hosts, opts)
    else:
        results = fl.flash(Path(args.bundle), hosts, opts)
    if args.json:
        from edgeport.api import to_json

        print(to_json([vars(r) for r in results]))
    else:
        print("\n".join(text_table(["host", "status", "step", "version", "previous", "time"], [
            [r.host, r.status, r.step, r.version, r.previous or "-", f"{r.seconds:.1f}s"] for r in results])))
        for r in results:
            if r.message:
                print(r.message if r.message.startswith(r.host) else f"{r.host}: {r.message}")
            elif r.details.get("service"):
                print(f"{r.host}: {r.details['service']}")
    bad = [r for r in results if r.status not in ("flashed", "unchanged", "rolled-back")]
    if bad:
        raise DeviceError(f"{len(bad)} of {len(results)} host(s) not flashed; the previous version stays current "
                          f"there: {bad[0].message}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgeport` console script."""
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 0
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s"
                        if verbose else "%(message)s", stream=sys.stderr)
    # Our own level, so a library that changes the root logger's level cannot mute us.
    logging.getLogger("edgeport").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("nncf", "openvino", "onnxslim", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # torch warns "No CUDA runtime is found" whenever something imports its C++ extension helper on a CPU host.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not verbose:  # OpenCV's decoder lines repeat, per file, what edgeport says once (undecodable images skipped)
        os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    # SIGTERM (a CI timeout, systemd, kill) unwinds like Ctrl-C: temporary folders are removed and child
    # processes killed on the way out, instead of the process vanishing and leaving them behind.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except EdgeportError as e:
        if verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"error: interrupted by {signal.Signals(signum).name}; unfinished work was removed, finished stages "
              "stay cached", file=sys.stderr)
        return 128 + int(signum)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except Exception as e:
        if verbose:
            raise
        print(f"internal error: {type(e).__name__}: {e} (a bug in edgeport; rerun with -v and report the "
              "traceback)", file=sys.stderr)
        return 70
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":
    sys.exit(main())
