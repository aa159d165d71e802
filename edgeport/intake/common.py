"""Helpers the hubs share: paths relative to the project, settings in the model string."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def local_path(text: str, root: Path) -> Path:
    """``text`` as a path: ~ expanded, relative to ``root``."""
    p = Path(text).expanduser()
    return p if p.is_absolute() else root / p


def query(rest: str) -> tuple[str, dict[str, Any]]:
    """('name', {k: v}) from 'name?k=v&k2=v2', values read as Python literals where they parse."""
    import ast
    from urllib.parse import parse_qsl

    name, _, q = rest.partition("?")
    kwargs: dict[str, Any] = {}
    for key, raw in parse_qsl(q, keep_blank_values=True):
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return name, kwargs
