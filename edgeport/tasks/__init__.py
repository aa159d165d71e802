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

NAMES = ("classification", "segmentation", "detection")
# The [task] settings each task reads besides type, labels, palette and ignore_index, with what each does (data,
# so the config reader need not import the tasks; the configuration reference is generated from it).
OPTION_KEYS: dict[str, dict[str, str]] = {"detection": {
    "decoder": "how the outputs become boxes: boxes, yolo, anchors or centernet",
    "score_threshold": "detections below this score are dropped (default 0.25)",
    "iou_threshold": "NMS overlap limit (default 0.45; 1.0 skips NMS)",
    "max_detections": "detections kept per frame (default 100)",
    "agnostic": "NMS across classes instead of per class (default false)",
    "box_format": "the boxes decoder's coordinate order: xyxy or cxcywh",
    "normalized": "the boxes decoder's coordinates are in [0, 1] of the input (default true)",
    "anchors": "the anchors decoder's N x1y1x2y2 anchors in input pixels (torchvision detectors fill it)",
    "box_coder_weights": "the anchors decoder's box coder weights, e.g. [10, 10, 5, 5]",
    "score_activation": "sigmoid, softmax or none",
    "background": "the class index that is background (softmax heads), dropped from the detections",
}}
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


def all_option_keys() -> tuple[str, ...]:
    """Every task's settings, for the config reader (each task then refuses the ones it does not read)."""
    return tuple(k for keys in OPTION_KEYS.values() for k in keys)


def metric_keys() -> list[str]:
    """Every task's headline metric key, e.g. 'top1', 'miou'."""
    return [get(n).primary for n in NAMES]


def metric_cell(metrics: dict[str, float]) -> str | None:
    """'mIoU 54.08', 'top1 71.20', 'mAP 40.10': the headline metric as table cells show it (None if none)."""
    for n in NAMES:
        task = get(n)
        if task.primary in metrics:
            return f"{task.short} {metrics[task.primary]:.2f}"
    return None


def metric_label(key: str) -> str:
    """How a metric key reads in a chart or message: 'miou' -> 'mIoU', 'top1' -> 'top-1', 'map' -> 'mAP'."""
    for n in NAMES:
        if get(n).primary == key:
            return get(n).label
    return key or "metric"
