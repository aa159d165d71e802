"""Progress bars for long stages (tqdm on a terminal, silent otherwise, so CI logs stay readable), and the
name of what the build works on, put in front of every log line and bar while a target is built."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

_WORKING_ON: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgeport_working_on", default=None)


class _Prefix(logging.Filter):
    """Puts "[<what>] " before edgeport's own log messages while ``working_on(what)`` is active."""

    def filter(self, record: logging.LogRecord) -> bool:
        what = _WORKING_ON.get()
        if what and not getattr(record, "edgeport_prefixed", False):
            record.msg = f"[{what}] {record.msg}"
            record.edgeport_prefixed = True
        return True


_LOG = logging.getLogger("edgeport")
if not any(isinstance(f, _Prefix) for f in _LOG.filters):
    _LOG.addFilter(_Prefix())


@contextlib.contextmanager
def working_on(what: str) -> Iterator[None]:
    """Name ``what`` (e.g. "intel-cpu int8") in every edgeport log line and progress bar of the block."""
    token = _WORKING_ON.set(what)
    try:
        yield
    finally:
        _WORKING_ON.reset(token)


class _Quiet:
    def __init__(self, iterable: Iterable[Any] | None) -> None:
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable or ())

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable[Any] | None, desc: str, total: int | None = None) -> Any:
    """Wrap ``iterable`` in a progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return _Quiet(iterable)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Quiet(iterable)
    what = _WORKING_ON.get()
    return tqdm(iterable, desc=f"[{what}] {desc}" if what else desc, total=total, leave=False, unit="it",
                dynamic_ncols=True)
