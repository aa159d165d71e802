"""The model ecosystems users bring, one module each: ``ultralytics:``, ``hf:`` and ``timm:``.

A hub turns its own form of ``--model`` into an nn.Module whose outputs fit one of edgeport's tasks, and says
what the model carries about its input (size, resize, normalisation, class names, decoder), which becomes the
build's input spec unless the project or the flags say otherwise. Each hub's package is an optional extra,
imported only when a model of that form is loaded; nothing is downloaded (each sets its package's offline
switches before importing it).
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeport.errors import ModelError
from edgeport.intake.common import local_path, query  # noqa: F401 (for model.py)

if TYPE_CHECKING:
    from edgeport.preprocess import InputSpec


class Hub(Protocol):
    """One ecosystem's intake."""

    prefix: str  # "ultralytics": the --model form is "ultralytics:REST"
    package: str  # the importable package it needs
    extra: str  # the pip extra that installs it
    forms: str  # the forms of REST, for error lines
    int8_preset: str | None  # the NNCF preset the model's own exporter quantizes with (None: edgeport's default)

    def check(self, rest: str, root: Path, weights: str | None) -> None:
        """ModelError for a form that cannot work, found without importing torch or the package."""

    def files(self, rest: str, root: Path) -> list[Path]:
        """The files whose content makes the model (for its fingerprint)."""

    def name(self, rest: str) -> str:
        """A short model name for bundles and reports."""

    def load(self, rest: str, root: Path) -> Any:
        """The model in eval mode, its outputs fitting an edgeport task."""

    def weights_into(self, model: Any) -> Any:
        """The module of ``model`` (as load returned it) that ``--weights`` are a state_dict of."""

    def spec(self, rest: str, root: Path) -> InputSpec:
        """The input the model was made for: shape, resize, normalisation, task, labels, task options."""


def _hubs() -> dict[str, Hub]:
    from edgeport.intake.huggingface import HUB as HF
    from edgeport.intake.timm_models import HUB as TIMM
    from edgeport.intake.yolo import HUB as YOLO

    return {h.prefix: h for h in (YOLO, HF, TIMM)}


PREFIXES = ("ultralytics", "hf", "timm")


def find(source: str) -> tuple[Hub, str] | None:
    """(hub, rest) for a --model string of a hub's form, else None."""
    prefix, sep, rest = source.partition(":")
    if not sep or prefix not in PREFIXES:
        return None
    return _hubs()[prefix], rest


def require(hub: Hub) -> None:
    """ModelError naming the extra to install when the hub's package is missing (checked without importing it)."""
    if importlib.util.find_spec(hub.package) is None:
        raise ModelError(f"--model {hub.prefix}:... needs the '{hub.package}' package, which is not installed: "
                         f"pip install 'edgeport[{hub.extra}]'")


def int8_preset(source: str) -> str | None:
    """The NNCF preset a hub model's own exporter uses (``int8_preset = "auto"`` takes it), None for others."""
    found = find(source)
    return found[0].int8_preset if found is not None else None


def fingerprint(source: str, root: Path) -> str:
    """A hash of the hub model's files and its package's version."""
    found = find(source)
    h = hashlib.sha256(source.encode())
    if found is None:
        return h.hexdigest()
    hub, rest = found
    from importlib.metadata import PackageNotFoundError, version

    try:
        h.update(version(hub.package).encode())
    except PackageNotFoundError:
        pass
    for path in hub.files(rest, root):
        if path.is_file():
            with open(path, "rb") as f:
                h.update(path.name.encode() + hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


_SPECS: dict[tuple[str, str, str], Any] = {}


def carried_spec(source: str, root: Path) -> InputSpec | None:
    """The input spec a hub model carries (None for other forms); read once per process and model file."""
    found = find(source)
    if found is None:
        return None
    hub, rest = found
    hub.check(rest, root, None)
    key = (source, str(root), fingerprint(source, root))
    if key not in _SPECS:
        require(hub)
        _SPECS[key] = hub.spec(rest, root)
    return _SPECS[key]
