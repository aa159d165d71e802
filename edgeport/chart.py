"""The benchmark chart as a PNG, drawn with OpenCV (already a core dependency; no plotting library).

Two horizontal bar panels per row of the benchmark table: throughput (FPS, from the median
latency) and the task metric, each row labelled with backend, precision and its status.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeport.tasks import metric_keys, metric_label

if TYPE_CHECKING:
    from edgeport.validate_report import ValidateReport

_COLORS = {"validated": (80, 160, 60), "failed": (60, 60, 200), "built": (150, 150, 150),
           "reference": (160, 110, 40)}  # BGR


def bench_chart(report: ValidateReport, path: Path) -> Path:
    """Write the chart for ``report``'s benchmark rows; returns ``path``."""
    import cv2

    rows = []
    ref_metric = report.reference_metrics or {}
    key = next((k for k in metric_keys() if k in ref_metric), None)
    rows.append(("pytorch fp32 (reference)", report.reference_latency, ref_metric.get(key) if key else None,
                 "reference"))
    for b in report.bundles:
        rows.append((f"{b.backend} {b.precision} [{b.name}]", b.latency,
                     (b.metrics or {}).get(key) if key else None, b.status))
    label_w, panel_w, row_h, top = 360, 330, 30, 60
    width = label_w + 2 * panel_w + 40
    height = top + row_h * len(rows) + 30
    img = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    title = f"edgeport validate: {report.model} (this host)"
    cv2.putText(img, title, (10, 24), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    fps_max = max([r[1]["fps"] for r in rows if r[1]] or [1.0])
    metrics = [r[2] for r in rows if r[2] is not None]
    m_lo = max(0.0, min(metrics) - 5.0) if metrics else 0.0
    m_hi = max(metrics) + 1.0 if metrics else 1.0
    x_fps, x_met = label_w, label_w + panel_w + 20
    cv2.putText(img, "FPS (1 / median latency)", (x_fps, 50), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"{metric_label(key) if key else 'metric'} "
                     f"(axis from {m_lo:.0f})", (x_met, 50), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i, (label, lat, metric, status) in enumerate(rows):
        y = top + i * row_h
        color = _COLORS.get(status, (120, 120, 120))
        cv2.putText(img, label[:46], (10, y + 19), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        if lat:
            w = int((panel_w - 70) * lat["fps"] / fps_max)
            cv2.rectangle(img, (x_fps, y + 5), (x_fps + max(w, 1), y + row_h - 5), color, -1)
            cv2.putText(img, f"{lat['fps']:.0f}", (x_fps + w + 4, y + 19), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        if metric is not None:
            w = int((panel_w - 70) * (metric - m_lo) / max(m_hi - m_lo, 1e-6))
            cv2.rectangle(img, (x_met, y + 5), (x_met + max(w, 1), y + row_h - 5), color, -1)
            cv2.putText(img, f"{metric:.2f}", (x_met + w + 4, y + 19), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "colours: green validated, red failed, grey built (device only), blue reference",
                (10, height - 10), font, 0.4, (60, 60, 60), 1, cv2.LINE_AA)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write {path}")
    return path
