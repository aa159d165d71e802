"""What `edgeport validate --emulate aarch64` checks of each ARM bundle on the emulated device (machine.py), in a
working copy of the bundle (its files linked, so nothing is written into it):

1. ``aarch64 install``: the README's command lines up to its ``pip install`` (make a venv, install into it), run
   as they are written, ``python3`` being the emulated interpreter. One change: ``--without-pip`` is added to the
   ``python3 -m venv`` line, because the venv's ensurepip starts the venv's interpreter as a subprocess, which needs
   binfmt_misc; pip comes from Debian's python3-pip through ``--system-site-packages`` instead. The venv is kept
   per lines, requirements and core. A failure is the one line pip (or venv) ends with, and the checks below are
   skipped.
2. ``aarch64 selftest`` and ``aarch64 README run``: the README's other Python lines that need no camera
   (``runner.py --selftest``, a run on synthetic frames), as the device owner runs them.
3. per output, ``aarch64 vs x86``: the model on N frames through probe.py on both ISAs, the same code and the same
   inputs; the relative error, the elements that differ (how many integer steps, for a quantized output), the
   agreement, judged by the target's host tolerance (what the device's run of the artifact may differ from the
   build host's).
4. the task metric on those frames on aarch64, beside x86's (labelled frames).
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeport.emulate.machine import Machine, venv_for
from edgeport.validate_report import Case

PROBE = Path(__file__).with_name("probe.py")
DEFAULT_CPU = "cortex-a72"  # a profile that names no core: the ARMv8.0 baseline
INSTALL_TIMEOUT = 1800.0
RUN_TIMEOUT = 3600.0
# a bundle whose README gives no commands (an Android app's model): a device owner's venv and install
DEFAULT_STEPS = ["python3 -m venv --system-site-packages .venv", ".venv/bin/python -m pip install -r requirements.txt"]
_VENV_LINE = re.compile(r"^\s*python3? -m venv\b")


def applies(manifest: dict[str, Any]) -> bool:
    """True for an aarch64 bundle whose runtime runs under qemu-user (the backend's ``emulatable``: LiteRT)."""
    from edgeport.backends import REGISTRY, get_backend

    return manifest.get("backend") in REGISTRY and get_backend(manifest["backend"]).emulatable and \
        (manifest.get("target_profile") or {}).get("arch") == "aarch64"


def cpu_of(manifest: dict[str, Any]) -> str:
    """The core the bundle's device has (its profile's ``[emulation] cpu``)."""
    return ((manifest.get("target_profile") or {}).get("emulation") or {}).get("cpu") or DEFAULT_CPU


def device_steps(bundle: Path, manifest: dict[str, Any]) -> list[str]:
    """The README's fenced command lines that run Python (``python3 ...``, ``.venv/bin/python ...``) and need no
    camera, in order; the default install steps when it gives none (an Android app's model)."""
    readme = bundle / "README.md"
    camera = str((manifest.get("camera") or {}).get("source", "0"))
    lines, inside = [], False
    for ln in readme.read_text().splitlines() if readme.is_file() else []:
        if ln.startswith("```"):
            inside = not inside
            continue
        words = ln.split("#")[0].split()
        python = bool(words) and (words[0] == "python3" or words[0].endswith(("/bin/python", "/bin/python3")))
        if inside and python and camera not in words[2:3] and "--help" not in words:
            lines.append(ln.strip())
    return lines if any("pip install" in ln for ln in lines) else DEFAULT_STEPS + lines


def split_steps(steps: list[str]) -> tuple[list[str], list[str]]:
    """(the install steps: up to the last ``pip install`` line, the steps after it)."""
    last = max(i for i, ln in enumerate(steps) if "pip install" in ln)
    return steps[:last + 1], steps[last + 1:]


def _last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:") or "Error" in ln.split(":")[0]]
    return (errors or lines or ["no output"])[-1]


def device_home(bundle: Path, install_steps: list[str], cpu: str) -> Path:
    """The folder the README's lines run in, as a device owner's copy of the bundle: kept between runs (the venv the
    install steps make stays there, one per steps, requirements and core), the bundle's own files linked in afresh
    each time, so nothing is written into the bundle."""
    home = venv_for(install_steps, bundle / "requirements.txt", cpu)
    home.mkdir(parents=True, exist_ok=True)
    venv = _venv_dir(install_steps)
    for entry in home.iterdir():  # the last bundle's links (and what its lines wrote), not the venv
        if entry.name in (venv, ".edgeport-installed"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for entry in bundle.iterdir():
        (home / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return home


def _venv_dir(install_steps: list[str]) -> str | None:
    """The folder the README's ``python3 -m venv`` line makes, or None when it makes none."""
    line = next((ln for ln in install_steps if _VENV_LINE.match(ln)), None)
    return shlex.split(line, comments=True)[-1] if line else None


def install(machine: Any, home: Path, steps: list[str], say: Callable[[str], None]) -> tuple[bool, str, str]:
    """Run the install ``steps`` in ``home`` (``device_home``) unless they ran there already: (done, the steps run
    or the line that failed, its last error line)."""
    venv = _venv_dir(steps)
    if venv is None:
        return False, steps[0], "the README makes no venv before its pip install (Debian 12 refuses pip outside one)"
    if (home / ".edgeport-installed").is_file():
        return True, " && ".join(steps), ""
    shutil.rmtree(home / venv, ignore_errors=True)
    for line in steps:
        say(f"{line} (emulated aarch64, {machine.cpu})")
        made = _VENV_LINE.match(line)
        res = machine.shell(line.split("#")[0].strip() + (" --without-pip" if made else ""), home, INSTALL_TIMEOUT)
        if res.returncode != 0:
            shutil.rmtree(home / venv, ignore_errors=True)
            return False, line, _last_error(res.stdout + "\n" + res.stderr)
        if made:
            machine.venv_shims(home / venv)
    (home / ".edgeport-installed").write_text("\n".join(steps) + "\n")
    return True, " && ".join(steps), ""


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

    with tempfile.TemporaryDirectory(prefix="edgeport-emulate-") as tmp:
        install_steps, run_steps = split_steps(device_steps(bundle, manifest))
        work = device_home(bundle, install_steps, machine.cpu)
        done, line, error = install(machine, work, install_steps, lambda text: say(f"{name}: {text}"))
        if not done:
            return [case("aarch64 install", False, {"line": line, "cpu": machine.cpu},
                         f"the device's install fails on emulated aarch64 "
                         f"({line}): {error}")]
        cases = [case("aarch64 install", True, {"line": line, "cpu": machine.cpu})]
        for step in run_steps:  # as the README writes them, their Python the emulated one
            say(f"{name}: {step} (emulated aarch64, {machine.cpu})")
            res = machine.shell(step, work, RUN_TIMEOUT)
            failed = [ln.strip() for ln in res.stdout.splitlines() if " FAIL " in f" {ln} "]
            ok = res.returncode == 0
            check = "aarch64 selftest" if "--selftest" in step.split() else "aarch64 README run"
            cases.append(case(check, ok, {"line": step, "exit": res.returncode},
                              "" if ok else f"'{step}' fails on emulated aarch64: "
                              f"{failed[0] if failed else _last_error(res.stdout + res.stderr)}"))
        python = work / str(_venv_dir(install_steps)) / "bin" / "python"
        inputs, arm, x86 = Path(tmp) / "inputs.npy", Path(tmp) / "aarch64.npz", Path(tmp) / "x86.npz"
        np.save(inputs, np.ascontiguousarray(x, np.float32))
        runner = str(runner_folder(work, manifest, Path(tmp)))
        err = _probe([str(python), str(PROBE), runner, str(work), str(inputs), str(arm)], machine.env(), work, say,
                     f"{name} on emulated aarch64")
        err = err or _probe([sys.executable, str(PROBE), runner, str(work), str(inputs), str(x86)], None, work, say,
                            f"{name} on x86")
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
