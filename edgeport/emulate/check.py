"""What `edgeport validate --emulate aarch64` checks of each ARM bundle on the emulated device (machine.py):

1. ``aarch64 install``: the pip line of the bundle's README, run as it is written (``python3`` being the emulated
   interpreter; the packages go to a folder of their own, kept per requirements file). A failure is the one line
   pip ends with, and the checks below are skipped.
2. ``aarch64 selftest`` and ``aarch64 README run``: the README's other ``python3`` lines that need no camera
   (``runner.py --selftest``, a run on synthetic frames), as the device owner runs them.
3. per output, ``aarch64 vs x86``: the model on N frames through probe.py on both ISAs, the same code and the same
   inputs; the relative error, the elements whose integers differ (a quantized output), the agreement, judged by
   the target's host tolerance (what the device's run of the artifact may differ from the build host's).
4. the task metric on those frames on aarch64, beside x86's (labelled frames).
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeport.emulate.machine import Machine, site_for
from edgeport.validate_report import Case

PROBE = Path(__file__).with_name("probe.py")
DEFAULT_CPU = "cortex-a72"  # a profile that names no core: the ARMv8.0 baseline
INSTALL_TIMEOUT = 1800.0
RUN_TIMEOUT = 3600.0
_PIP_LINE = re.compile(r"^\s*python3? -m pip install\b.*$", re.M)


def applies(manifest: dict[str, Any]) -> bool:
    """True for an aarch64 bundle whose runtime runs under qemu-user (the backend's ``emulatable``: LiteRT)."""
    from edgeport.backends import REGISTRY, get_backend

    return manifest.get("backend") in REGISTRY and get_backend(manifest["backend"]).emulatable and \
        (manifest.get("target_profile") or {}).get("arch") == "aarch64"


def cpu_of(manifest: dict[str, Any]) -> str:
    """The core the bundle's device has (its profile's ``[emulation] cpu``)."""
    return ((manifest.get("target_profile") or {}).get("emulation") or {}).get("cpu") or DEFAULT_CPU


def install_line(bundle: Path) -> str:
    """The pip line the bundle's README gives the device owner (the default pip line when it gives none)."""
    readme = bundle / "README.md"
    found = _PIP_LINE.search(readme.read_text()) if readme.is_file() else None
    return found.group(0).strip() if found else "python3 -m pip install -r requirements.txt"


def device_lines(bundle: Path, manifest: dict[str, Any]) -> list[str]:
    """The README's other ``python3`` command lines that need no camera (the selftest, a synthetic run), in order:
    what the device owner runs after the install."""
    readme = bundle / "README.md"
    if not readme.is_file():
        return []
    camera = str((manifest.get("camera") or {}).get("source", "0"))
    lines, inside = [], False
    for ln in readme.read_text().splitlines():
        if ln.startswith("```"):
            inside = not inside
            continue
        words = ln.split()
        if inside and words[:1] == ["python3"] and not _PIP_LINE.match(ln) and camera not in words[2:3] \
                and "--help" not in words:
            lines.append(ln.strip())
    return lines


def _last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:") or "Error" in ln.split(":")[0]]
    return (errors or lines or ["no output"])[-1]


def install(machine: Machine, bundle: Path, say: Callable[[str], None]) -> tuple[Path | None, str, str]:
    """(the folder the packages went to, or None; the line run; pip's last error line when it failed)."""
    line = install_line(bundle)
    site = site_for(bundle / "requirements.txt", line)
    if (site / ".edgeport-installed").is_file():
        return site, line, ""
    say(f"{bundle.name}: wheels for aarch64: {line}")
    site.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=site.parent))
    res = machine.shell(line, bundle, tmp, INSTALL_TIMEOUT)
    if res.returncode != 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return None, line, _last_error(res.stdout + "\n" + res.stderr)
    (tmp / ".edgeport-installed").write_text(line + "\n")
    if not site.exists():
        tmp.rename(site)
    return site, line, ""


def _probe(argv: list[str], env: dict[str, str] | None, cwd: Path, say: Callable[[str], None], what: str) -> str:
    """Run probe.py, reporting its frames at most every 5 s; its stderr's last lines on failure, else ''."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    tail: list[str] = []
    last = 0.0
    for line in proc.stderr:
        tail = (tail + [line.rstrip()])[-20:]
        if line.startswith("frame ") and time.time() - last > 5.0:
            say(f"{what}: {line.strip()}")
            last = time.time()
    if proc.wait(timeout=RUN_TIMEOUT) != 0:
        return _last_error("\n".join(tail))
    return ""


def runner_folder(bundle: Path, manifest: dict[str, Any], tmp: Path) -> Path:
    """The folder of the runner.py the probe imports: the bundle's own, or one assembled for its backend and task
    (a bundle that ships none, such as an Android app's model)."""
    if (bundle / "runner.py").is_file():
        return bundle
    from edgeport.backends import get_backend
    from edgeport.bundle import assemble_runner

    (tmp / "runner.py").write_text(assemble_runner(get_backend(manifest["backend"]).runner_part(),
                                                   manifest["preprocess"]["task"]))
    return tmp


def emulated_cases(bundle: Path, manifest: dict[str, Any], machine: Machine, x: np.ndarray, where: str,
                   to_ref: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                   score: Callable[[dict[str, np.ndarray]], dict[str, float] | None], tolerance: dict[str, Any],
                   task: str, say: Callable[[str], None]) -> list[Case]:
    """The emulated checks of one ARM bundle (module docstring) on the inputs ``x`` (N preprocessed frames in the
    bundle's layout, described by ``where``); ``to_ref`` puts outputs in the reference's layout, ``score`` gives
    the task metrics of outputs on those frames (None without labels)."""
    from edgeport.evaluate import primary
    from edgeport.runner.metrics import compare

    bundle = bundle.resolve()
    name, precision = bundle.name, manifest["precision"]
    label = f"{manifest['backend']} (aarch64 {machine.cpu}, emulated)"

    def case(check: str, ok: bool | None, metrics: dict[str, Any], message: str = "") -> Case:
        status = "skipped" if ok is None else "passed" if ok else "failed"
        return Case(name, label, precision, check, status, metrics, message)

    site, line, error = install(machine, bundle, say)
    if site is None:
        return [case("aarch64 install", False, {"line": line}, f"the device's install fails on emulated aarch64 "
                     f"({line}): {error}")]
    cases = [case("aarch64 install", True, {"line": line})]
    for step in device_lines(bundle, manifest):  # as the README writes them, python3 being the emulated one
        say(f"{name}: {step} (emulated aarch64, {machine.cpu})")
        res = machine.shell(step, bundle, site, RUN_TIMEOUT)
        failed = [ln.strip() for ln in res.stdout.splitlines() if " FAIL " in f" {ln} "]
        ok = res.returncode == 0
        check = "aarch64 selftest" if "--selftest" in step.split() else "aarch64 README run"
        cases.append(case(check, ok, {"line": step, "exit": res.returncode},
                          "" if ok else f"'{step}' fails on emulated aarch64: "
                          f"{failed[0] if failed else _last_error(res.stdout + res.stderr)}"))
    with tempfile.TemporaryDirectory(prefix="edgeport-emulate-") as tmp:
        inputs, arm, x86 = Path(tmp) / "inputs.npy", Path(tmp) / "aarch64.npz", Path(tmp) / "x86.npz"
        np.save(inputs, np.ascontiguousarray(x, np.float32))
        runner = str(runner_folder(bundle, manifest, Path(tmp)))
        err = _probe(machine.argv([str(PROBE), runner, str(bundle), str(inputs), str(arm)]), machine.env(site),
                     bundle, say, f"{name} on emulated aarch64")
        err = err or _probe([sys.executable, str(PROBE), runner, str(bundle), str(inputs), str(x86)], None, bundle,
                            say, f"{name} on x86")
        if err:
            return cases + [case("aarch64 vs x86", False, {}, f"the model does not run on emulated aarch64: {err}")]
        with np.load(arm) as a, np.load(x86) as b:
            raw_arm, raw_x86 = {k: a[k] for k in a.files}, {k: b[k] for k in b.files}
    got, ref = to_ref(raw_arm), to_ref(raw_x86)
    steps = {o["name"]: o["quant"]["scale"] for o in manifest["outputs"] if o.get("quant")}
    for out in ref:
        m = compare(ref[out], got[out], task, tolerance)
        m.update({"frames": where, "tolerance": tolerance, "elements": int(ref[out].size),
                  "differ": int(np.count_nonzero(got[out] != ref[out]))})
        if out in steps:  # a quantized output: how many of its integer steps apart, at most
            m["max_step"] = int(np.round(np.abs(got[out] - ref[out]).max() / steps[out]))
        why = f"{label} output '{out}': {', '.join(m['failed'])} vs the x86 run of the same model on {where}"
        cases.append(case(f"{out} aarch64 vs x86", m["ok"], m, "" if m["ok"] else why))
    metrics_arm, metrics_x86 = score(got), score(ref)
    if metrics_arm and metrics_x86:
        key, value = primary(metrics_arm)
        cases.append(case(f"{key} aarch64", None if value is None else True,
                          {"aarch64": metrics_arm, "x86": metrics_x86, "metric": key, "frames": where,
                           "count": len(x)}))
    return cases
