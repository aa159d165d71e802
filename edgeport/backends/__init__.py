"""Backend registry: lazy imports, recorded failures.

Shared code reaches a backend only through ``get_backend(name)``. Importing a backend
module imports no heavy library; those load inside its functions.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from edgeport.errors import BackendUnavailableError, ConfigError, close_match

if TYPE_CHECKING:
    from edgeport.backends.base import Availability, Backend

# One name per backend everywhere: folder, extra, registry key, profile value, CLI value.
REGISTRY = {
    "openvino": "edgeport.backends.openvino.backend",
    "tflite": "edgeport.backends.tflite.backend",
    "tensorrt": "edgeport.backends.tensorrt.backend",
}
# Host-only runtimes (not device targets): the ONNX reference.
HOST_RUNTIMES = {"onnxruntime": "edgeport.backends.onnxruntime.backend"}


def get_backend(name: str) -> Backend:
    """The backend object for ``name``; ConfigError when the name is unknown."""
    modules = {**REGISTRY, **HOST_RUNTIMES}
    if name not in modules:
        raise ConfigError(f"unknown backend '{name}'{close_match(name, modules)}")
    try:
        module = importlib.import_module(modules[name])
    except ModuleNotFoundError as e:
        raise BackendUnavailableError(f"backend {name} is not built into this edgeport ({e})") from None
    return module.BACKEND


def availability(name: str) -> Availability:
    """Availability of one backend; a backend module that fails to import is reported, not raised."""
    from edgeport.backends.base import Availability

    try:
        return get_backend(name).available()
    except BackendUnavailableError as e:
        return Availability(name, False, reason=str(e), install="")
