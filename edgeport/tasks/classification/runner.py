"""Classification on the device: the top classes of each frame, listed in the JSON record and drawn as text.

Python 3.6 syntax, numpy and cv2 only (embedded into runner.py).
"""
import cv2
import numpy as np

from edgeport.runner.metrics import class_argmax
from edgeport.runner.task import TaskPart, register_task


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def classify(logits, labels, k=5):
    """[(label, probability)] of the top k classes of one (1, C) output."""
    scores = logits.reshape(-1)
    if scores.min() < 0 or abs(float(scores.sum()) - 1.0) > 1e-3:
        scores = softmax(scores)
    order = np.argsort(-scores)[:k]
    return [(labels[i] if i < len(labels) else str(i), float(scores[i])) for i in order]


def draw_classes(frame, top):
    out = frame.copy()
    for i, (name, p) in enumerate(top):
        cv2.putText(out, "%s %.2f" % (name, p), (8, 20 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 0), 1)
    return out


@register_task
class ClassificationPart(TaskPart):
    """Top-k classes per frame; agreement is top-1 agreement over the class axis (1)."""

    name = "classification"
    cli_options = ("topk",)

    def __init__(self, manifest, args):
        super(ClassificationPart, self).__init__(manifest, args)
        self.topk = getattr(args, "topk", None) or 5

    @staticmethod
    def agreement(ref, got):
        if ref.ndim < 2:
            return 1.0
        return float(np.mean(class_argmax(ref, 1) == class_argmax(got, 1)))

    @staticmethod
    def extra_agreement(ref, got):
        if ref.ndim != 2 or ref.shape[1] < 5:
            return {}
        top5 = np.argsort(-got, axis=1)[:, :5]
        return {"top5_agreement": float(np.mean([r in t for r, t in zip(np.argmax(ref, 1), top5)]))}

    def __call__(self, outs, frame, geom, record, draw):
        top = classify(outs[self.out_name], self.labels, self.topk)
        record["top"] = [[n, round(p, 4)] for n, p in top]
        return draw_classes(frame, top) if draw else None
