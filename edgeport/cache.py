"""Build cache: each stage writes into build/<stage>/<key>/, key = hash of inputs and settings.

A stage folder counts only once its ``stage.json`` exists; it is written into a temporary
folder and renamed, so an interrupted build never leaves a stage that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def key_of(settings: dict[str, Any]) -> str:
    """A short stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_hash(*files: Path) -> str:
    """Hash of source files (used so a code change to a backend invalidates its stages)."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


class Stage:
    """One cached stage. ``run(fn)`` calls fn(tmp_dir) -> info dict only on a miss."""

    def __init__(self, build_dir: Path, stage: str, settings: dict[str, Any]) -> None:
        self.key = key_of(settings)
        self.dir = build_dir / stage / self.key
        self.settings = settings
        self.name = stage

    @property
    def hit(self) -> bool:
        """Whether a complete result exists."""
        return (self.dir / "stage.json").is_file()

    def info(self) -> dict[str, Any]:
        """What the stage recorded when it ran."""
        return json.loads((self.dir / "stage.json").read_text())["info"]

    def run(self, fn: Callable[[Path], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """(info, cached). On a miss, fn fills a temporary folder that becomes the stage folder."""
        if self.hit:
            return self.info(), True
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}.", dir=self.dir.parent))
        try:
            info = fn(tmp)
            (tmp / "stage.json").write_text(json.dumps({"settings": self.settings, "info": info},
                                                       indent=1, sort_keys=True, default=str))
            if self.dir.exists():
                shutil.rmtree(self.dir)
            tmp.rename(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info, False
