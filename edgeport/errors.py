"""Errors users can act on. The CLI prints ``str(error)`` on one line and exits non-zero.

Anything that is not an EdgeportError is an internal bug: the CLI says so and asks for -v.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgeportError(Exception):
    """Base of every error a user can fix. ``kind`` names the family for reports."""

    kind = "error"
    exit_code = 2


class ConfigError(EdgeportError):
    """Bad flags, config file keys or values, unknown targets."""

    kind = "config"


class ModelError(EdgeportError):
    """The model cannot be found, built, or its weights do not fit."""

    kind = "model"


class CalibrationError(EdgeportError):
    """Calibration data missing, too small, or undecodable."""

    kind = "calibration"


class ConversionError(EdgeportError):
    """Export or a backend's compile failed."""

    kind = "conversion"


class ParityError(EdgeportError):
    """An artifact does not compute what the reference computes."""

    kind = "parity"
    exit_code = 3


class PruningError(EdgeportError):
    """Pruning lost more accuracy against the original model than max_drop allows: nothing is compiled."""

    kind = "pruning"
    exit_code = 3


class DeviceError(EdgeportError):
    """A device (camera, remote host) cannot be used."""

    kind = "device"


class BackendUnavailableError(EdgeportError):
    """A backend's libraries are not installed; the message holds the install command."""

    kind = "backend-unavailable"


class BundleError(EdgeportError):
    """A bundle is incomplete, tampered with, or of an unknown schema."""

    kind = "bundle"


def close_match(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a candidate is close to ``word``, else ''."""
    hits = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{hits[0]}'?)" if hits else ""
