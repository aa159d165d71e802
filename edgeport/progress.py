"""Progress bars for long stages: tqdm on a terminal, silent otherwise (CI logs stay readable)."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


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
    return tqdm(iterable, desc=desc, total=total, leave=False, unit="it", dynamic_ncols=True)
