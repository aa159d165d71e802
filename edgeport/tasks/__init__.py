"""Tasks: what a model's outputs mean. The second seam, beside the backends.

Each task has a host part (``edgeport/tasks/<task>/task.py``: labelled data, the metric, the spec
fields it adds) and a runner part (``edgeport/tasks/<task>/runner.py``, Python 3.6: postprocess, draw,
the JSON record, agreement of two raw outputs) that goes into every runner.py of that task. Shared code
asks ``get(name)`` (host) or ``edgeport.runner.task.task_part(name)`` (runner) and never names a task.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeport.tasks.base import Task

NAMES = ("classification", "segmentation")
_HERE = Path(__file__).resolve().parent


def get(name: str) -> Task:
    """The host part of task ``name`` (ValueError for an unknown one; the spec checks names first)."""
    if name not in NAMES:
        raise ValueError(f"unknown task {name!r} (one of {', '.join(NAMES)})")
    return importlib.import_module(f"edgeport.tasks.{name}.task").TASK


def runner_part(name: str) -> Path:
    """The runner part's file of task ``name`` (assembled into runner.py)."""
    get(name)
    return _HERE / name / "runner.py"


def metric_keys() -> list[str]:
    """Every task's headline metric key, e.g. 'top1', 'miou'."""
    return [get(n).primary for n in NAMES]
