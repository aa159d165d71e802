"""Build cache: each stage writes into build/<stage>/<key>/, key = hash of inputs and settings.

A stage folder counts only once its ``stage.json`` exists; it is written into a temporary
folder and renamed, so an interrupted build never leaves a stage that looks complete.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgeport.errors import ConfigError

log = logging.getLogger("edgeport")
LOCK_NAME = ".edgeport.lock"

TMP_PREFIX = ".edgeport-tmp-"  # every temporary name in build/ and dist/ starts so; a later build sweeps them


def make_temp_dir(parent: Path, label: str) -> Path:
    """A fresh, uniquely named folder in ``parent`` (0755, so what is renamed into place is world-readable)."""
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{label}-", dir=parent))
    tmp.chmod(0o755)
    return tmp


def sweep_stale(*folders: Path, depth: int = 3) -> int:
    """Remove what interrupted builds left under ``folders`` (names starting with TMP_PREFIX); call it only
    while holding the folders' build lock. Returns how many entries went."""
    count = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        todo = [(folder, 0)]
        while todo:
            here, level = todo.pop()
            for entry in list(here.iterdir()):
                if entry.name.startswith(TMP_PREFIX):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    count += 1
                elif entry.is_dir() and not entry.is_symlink() and level + 1 < depth:
                    todo.append((entry, level + 1))
    return count


def writable_folder(path: Path, flag: str, create: bool = True) -> Path:
    """``path`` (created when ``create``); ConfigError naming ``flag`` when it is a file or cannot be written.

    Without ``create`` only the nearest existing folder on the way is checked, so a build that fails
    before it writes anything leaves no folder behind.
    """
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} cannot be written (no permission on {existing}); choose a folder you "
                          "can write to")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{flag} {path} cannot be created ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def folder_lock(folder: Path, wait: bool = True, poll: float = 0.5) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (flock on its .edgeport.lock) for the block.

    A second build waits, saying which process holds the lock; with ``wait`` False it fails with one line
    instead. The kernel releases the lock when the process dies, however it dies. A build takes its build
    folder's lock first and its output folder's second, always in that order, so two builds cannot deadlock.
    """
    with open(folder / LOCK_NAME, "a+") as fh:  # closing releases the flock
        said = False
        t0 = time.time()
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                fh.seek(0)
                holder = fh.read().strip()  # empty for a moment: the holder writes its pid just after locking
                if not holder and time.time() - t0 < 2.0:
                    time.sleep(0.05)
                    continue
                holder = holder or "a process that has not written its pid"
                if not wait:
                    raise ConfigError(f"{folder} is in use by another edgeport build ({holder}); wait for it or "
                                      "use another --build-dir / --out") from None
                if not said:
                    log.info("waiting for another edgeport build (%s) that is using %s", holder, folder)
                    said = True
                time.sleep(poll)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield


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
        tmp = make_temp_dir(self.dir.parent, self.key)
        try:
            info = fn(tmp)
            (tmp / "stage.json").write_text(json.dumps({"settings": self.settings, "info": info},
                                                       indent=1, sort_keys=True, default=str))
            if self.dir.exists():  # an incomplete result (no stage.json) from an older edgeport
                shutil.rmtree(self.dir)
            tmp.rename(self.dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return info, False


def newest_stage(kind_dir: Path, name: str = "stage.json") -> Path | None:
    """The most recently written ``name`` among one stage kind's keys (``build/<kind>/<key>/<name>``): what the
    last build made, for scripts that study a built project. None when there is none."""
    found = sorted(kind_dir.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
