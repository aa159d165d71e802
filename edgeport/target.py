"""Device profiles: data files in the repository's targets/*.toml (and ./targets/*.toml of a project).

A user adds a device by adding a file; unknown keys are errors with a close match.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from edgeport.backends import REGISTRY
from edgeport.errors import ConfigError, close_match


def _builtin_dir() -> Path:
    """The shipped profiles: edgeport/targets/ inside an installed wheel (pyproject.toml packages the
    repository's targets/ there); targets/ at the repository root in a checkout or an editable install."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "targets", here.parent / "targets"):
        if (candidate / "intel-cpu.toml").is_file():
            return candidate
    return here.parent / "targets"


BUILTIN_DIR = _builtin_dir()
BACKENDS = tuple(REGISTRY)
PRECISIONS = ("fp32", "fp16", "int8", "dynamic-range")

# Default parity tolerances per precision. max_rel: max |a-b| over the reference output's
# range; min_cosine: cosine similarity; min_agreement: top-1 (classification) or pixel
# (segmentation) agreement with the reference. None disables a check.
DEFAULT_TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"max_rel": 1e-4, "min_cosine": 0.99999, "min_agreement": 0.999},
    "fp16": {"max_rel": 2e-2, "min_cosine": 0.999, "min_agreement": 0.98},
    "dynamic-range": {"max_rel": None, "min_cosine": 0.99, "min_agreement": 0.95},
    "int8": {"max_rel": None, "min_cosine": 0.98, "min_agreement": 0.95},
}

# The device's artifact against the build host's run of the same artifact (runner.py --selftest): the
# same runtime on another CPU differs by kernel choice only (TFLite INT8 bit-exact and FP32 within 2e-6
# on aarch64 vs x86-64); an Intel GPU/NPU runs FP16 arithmetic where the host CPU ran FP32.
DEFAULT_HOST_TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"max_rel": 1e-4, "min_cosine": 0.99999, "min_agreement": 0.999},
    "fp16": {"max_rel": 1e-2, "min_cosine": 0.9999, "min_agreement": 0.99},
    "dynamic-range": {"max_rel": None, "min_cosine": 0.999, "min_agreement": 0.99},
    "int8": {"max_rel": None, "min_cosine": 0.999, "min_agreement": 0.99},
}


@dataclass(frozen=True)
class Target:
    """One device profile."""

    name: str
    description: str
    backend: str
    precisions: tuple[str, ...]
    default_precision: str
    opset_max: int
    arch: str
    runtime: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    camera: dict[str, Any] = field(default_factory=dict)
    requirements: dict[str, list[str]] = field(default_factory=dict)
    tolerance: dict[str, dict[str, float | None]] = field(default_factory=dict)
    host_tolerance: dict[str, dict[str, float | None]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    emulation: dict[str, str] = field(default_factory=dict)  # [emulation] cpu: qemu's model of the device's core
    path: str = ""

    def tolerances(self, precision: str) -> dict[str, float | None]:
        """Parity tolerances for ``precision``: defaults overridden by the profile."""
        tol = dict(DEFAULT_TOLERANCES[precision])
        tol.update(self.tolerance.get(precision, {}))
        return tol

    def host_tolerances(self, precision: str) -> dict[str, float | None]:
        """Tolerances of the device's artifact against the build host's run of it: defaults, then the profile."""
        tol = dict(DEFAULT_HOST_TOLERANCES[precision])
        tol.update(self.host_tolerance.get(precision, {}))
        return tol

    def check_precision(self, precision: str) -> None:
        """ConfigError unless the profile allows ``precision``."""
        if precision not in self.precisions:
            raise ConfigError(f"target {self.name} does not support precision {precision!r}; "
                              f"it supports {', '.join(self.precisions)}{close_match(precision, self.precisions)}")

    def fingerprint(self) -> str:
        """Hash of everything in the profile (cache key part)."""
        d = dataclasses.asdict(self)
        d.pop("path")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Manifest form."""
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


_FIELDS = {f.name for f in dataclasses.fields(Target)} - {"name", "path"}
_REQUIRED = {"description", "backend", "precisions", "default_precision", "opset_max", "arch", "runtime"}


def parse_target(path: Path) -> Target:
    """Load and validate one profile file."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read target profile: {e}") from None
    where = str(path)
    for key in data:
        if key not in _FIELDS:
            raise ConfigError(f"{where}: unknown key '{key}'{close_match(key, _FIELDS)}")
    missing = sorted(_REQUIRED - set(data))
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
    if data["backend"] not in BACKENDS:
        raise ConfigError(f"{where}: backend '{data['backend']}' is not one of {', '.join(BACKENDS)}"
                          f"{close_match(data['backend'], BACKENDS)}")
    for p in list(data["precisions"]) + [data["default_precision"]] + list(data.get("tolerance", {})) + \
            list(data.get("host_tolerance", {})):
        if p not in PRECISIONS:
            raise ConfigError(f"{where}: precision '{p}' is not one of {', '.join(PRECISIONS)}"
                              f"{close_match(p, PRECISIONS)}")
    for section in ("tolerance", "host_tolerance"):
        for prec, tol in data.get(section, {}).items():
            for k in tol:
                if k not in DEFAULT_TOLERANCES["fp32"]:
                    raise ConfigError(f"{where}: unknown tolerance '{k}' in [{section}.{prec}]"
                                      f"{close_match(k, DEFAULT_TOLERANCES['fp32'])}")
    cpu = data.get("emulation", {}).get("cpu")
    if cpu is not None:
        from edgeport.emulate.rootfs import CPUS

        if cpu not in CPUS:
            raise ConfigError(f"{where}: [emulation] cpu '{cpu}' is not one of {', '.join(CPUS)}"
                              f"{close_match(cpu, CPUS)}")
    if data["default_precision"] not in data["precisions"]:
        raise ConfigError(f"{where}: default_precision '{data['default_precision']}' is not in precisions")
    data["precisions"] = tuple(data["precisions"])
    data["notes"] = tuple(data.get("notes", ()))
    return Target(name=path.stem, path=where, **data)


def target_dirs(project_dir: Path | None = None) -> list[Path]:
    """Where profiles are looked up: the built-in ones, then the project's ./targets."""
    dirs = [BUILTIN_DIR]
    local = (project_dir or Path.cwd()) / "targets"
    if local.is_dir() and local.resolve() != BUILTIN_DIR.resolve():
        dirs.append(local)
    return dirs


def all_targets(project_dir: Path | None = None) -> dict[str, Target]:
    """Every known profile by name; a project's file overrides a built-in one of that name."""
    found: dict[str, Target] = {}
    for d in target_dirs(project_dir):
        for path in sorted(d.glob("*.toml")):
            found[path.stem] = parse_target(path)
    return found


def get_target(name: str, project_dir: Path | None = None) -> Target:
    """One profile by name; ConfigError with a close match when unknown."""
    targets = all_targets(project_dir)
    if name not in targets:
        raise ConfigError(f"unknown target '{name}'{close_match(name, targets)}; "
                          f"known: {', '.join(sorted(targets))} (see `edgeport targets`)")
    return targets[name]
