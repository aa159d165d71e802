"""Segmentation on the device: a class map per frame, its class areas in the JSON record, drawn as a
palette overlay with a legend.

Python 3.6 syntax, numpy and cv2 only (embedded into runner.py).
"""
import cv2
import numpy as np

from edgeport.runner.metrics import class_argmax, class_axis
from edgeport.runner.task import TaskPart, register_task


def segment(logits, layout_nhwc):
    """Class-id map (H, W) of one segmentation output (np.argmax over the class axis, ties to the first)."""
    return class_argmax(logits[0], -1 if layout_nhwc else 0).astype(np.uint8)


def mask_to_frame(mask, geometry, frame_hw):
    """Resize a model-space class map back onto the frame (undoing letterbox or crop)."""
    h, w = frame_hw
    left, top, right, bottom = geometry["box"]
    if geometry["mode"] == "letterbox":
        mask = mask[int(top):int(bottom), int(left):int(right)]
        return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    if geometry["mode"] == "shorter-crop":
        full = np.zeros((h, w), np.uint8)
        x0, y0, x1, y1 = [int(round(v)) for v in (left, top, right, bottom)]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        full[y0:y1, x0:x1] = cv2.resize(mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)
        return full
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)


def class_areas(mask, labels):
    """{label: percent of pixels} for the classes present in a class map."""
    counts = np.bincount(mask.ravel(), minlength=len(labels)).tolist()
    per_pct = mask.size / 100.0
    return dict((labels[i] if i < len(labels) else str(i), round(c / per_pct, 2)) for i, c in enumerate(counts) if c)


def draw_segmentation(frame, mask, palette, labels, areas, alpha=0.45):
    colours = np.array([[c[2], c[1], c[0]] for c in palette] or [[0, 0, 0]], np.uint8)  # RGB -> BGR
    colour = colours[np.clip(mask, 0, len(colours) - 1)]
    out = cv2.addWeighted(frame, 1 - alpha, colour, alpha, 0)
    y = 18
    for name, pct in sorted(areas.items(), key=lambda kv: -kv[1])[:8]:
        idx = labels.index(name) if name in labels else 0
        cv2.rectangle(out, (5, y - 10), (15, y), tuple(int(c) for c in colours[idx]), -1)
        cv2.putText(out, "%s %.1f%%" % (name, pct), (20, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        y += 14
    return out


@register_task
class SegmentationPart(TaskPart):
    """A class map per frame; agreement is pixel agreement over the class axis (NCHW or NHWC)."""

    name = "segmentation"

    @staticmethod
    def agreement(ref, got):
        if ref.ndim < 2:
            return 1.0
        axis = 1 if ref.ndim == 2 else class_axis(ref)
        return float(np.mean(class_argmax(ref, axis) == class_argmax(got, axis)))

    def __call__(self, outs, frame, geom, record, draw):
        mask = segment(outs[self.out_name], self.nhwc)
        # Areas from the model-space map inside the frame's box: the frame-sized map's areas up to
        # resize rounding, for a tenth of the cost. The full-size map is made only to draw.
        left, top, right, bottom = [int(round(v)) for v in geom["box"]]
        if geom["mode"] == "letterbox":
            record["areas"] = class_areas(mask[max(top, 0):bottom, max(left, 0):right], self.labels)
        else:
            record["areas"] = class_areas(mask, self.labels)
        if not draw:
            return None
        full = mask_to_frame(mask, geom, frame.shape[:2])
        return draw_segmentation(frame, full, self.palette, self.labels, record["areas"])
