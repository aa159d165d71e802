"""Detection on the device: raw outputs -> boxes (a declared decoder) -> NMS -> frame pixels, drawn with
label and score, with per-class counts in the overlay and the detections in the JSON record.

Python 3.6 syntax, numpy (1.13 and later) and cv2 only (embedded into runner.py); the host runs this
same code for its parity and metric figures. Options (the manifest's ``preprocess.task_options``):

* ``decoder``: ``yolo``: one output [1, 4+C, N] or [1, N, 4+C], rows (cx, cy, w, h, class scores...), as
  YOLOv8/11 heads emit; ``boxes``: already decoded boxes [1, N, 4] and scores [1, N, C], as separate
  outputs (each gets its own INT8 scale); ``anchors``: box regression [1, N, 4] and class logits [1, N, C]
  against ``anchors`` (N x1y1x2y2 in input pixels) with ``box_coder_weights`` (SSD 10, 10, 5, 5;
  RetinaNet 1, 1, 1, 1), ``score_activation`` (sigmoid or softmax) and ``background`` (a class index that
  scores 0, or none), as SSD and RetinaNet heads emit;
* ``box_format`` (``xyxy`` or ``cxcywh``) and ``normalized`` (coordinates in [0, 1] of the model input,
  or in its pixels): defaults ``cxcywh``/pixels for yolo, ``xyxy``/normalized for boxes;
* ``score_threshold`` (0.25), ``iou_threshold`` (0.45), ``max_detections`` (100), ``agnostic`` (false:
  NMS per class).
"""
import math

import cv2
import numpy as np

from edgeport.runner.manifest import RunnerError
from edgeport.runner.preprocess import input_hw
from edgeport.runner.task import TaskPart, register_task

DECODERS = ("yolo", "boxes", "anchors")
DEFAULTS = {"score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 100, "agnostic": False}
FORMATS = {"yolo": ("cxcywh", False), "boxes": ("xyxy", True), "anchors": ("xyxy", False)}
BOX_XFORM_CLIP = math.log(1000.0 / 16)  # the largest log-scale a box may grow by (as torchvision's BoxCoder)
COLOURS = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
           (23, 204, 146), (134, 219, 61), (211, 188, 0), (209, 99, 255), (203, 56, 255), (255, 149, 200)]


def detection_options(spec):
    """The task options with their defaults filled in; RunnerError for a missing or unknown decoder."""
    opts = dict(DEFAULTS)
    opts.update(spec.get("task_options") or {})
    decoder = opts.get("decoder")
    if decoder not in DECODERS:
        raise RunnerError("detection needs a declared decoder (task_options.decoder): one of %s, got %r"
                          % (", ".join(DECODERS), decoder))
    fmt, normalized = FORMATS[decoder]
    opts.setdefault("box_format", fmt)
    opts.setdefault("normalized", normalized)
    return opts


def output_roles(decoder, shapes):
    """{'boxes': name, 'scores': name} or {'raw': name} for ``decoder`` from {output name: shape};
    RunnerError naming the decoders and the shapes found when they do not fit."""
    found = ", ".join("%s %s" % (n, list(s)) for n, s in sorted(shapes.items()))
    if decoder == "yolo":
        three = [n for n, s in sorted(shapes.items()) if len(s) == 3 and min(s[1], s[2]) > 4]
        if len(shapes) == 1 and three:
            return {"raw": three[0]}
    elif decoder in ("boxes", "anchors"):
        boxes = [n for n, s in sorted(shapes.items()) if len(s) == 3 and s[2] == 4]
        scores = [n for n, s in sorted(shapes.items()) if len(s) == 3 and n not in boxes]
        if len(boxes) == 1 and len(scores) == 1 and shapes[boxes[0]][1] == shapes[scores[0]][1]:
            return {"boxes": boxes[0], "scores": scores[0]}
    raise RunnerError("decoder %r does not fit this model's outputs (%s); the decoders are: yolo (one output "
                      "[1, 4+C, N] or [1, N, 4+C]), boxes (boxes [1, N, 4] and scores [1, N, C] with the same N), "
                      "anchors (box regression [1, N, 4] and class logits [1, N, C] for N anchors)" % (decoder, found))


def decode_anchors(rel, anchors, weights):
    """Boxes x1y1x2y2 from box regression (N, 4) against anchors (N, 4) x1y1x2y2, the R-CNN box coder SSD and
    RetinaNet use: centre offsets over ``weights[0:2]`` scaled by the anchor's size, log sizes over
    ``weights[2:4]`` (clipped at log(1000/16))."""
    a = np.asarray(anchors, np.float32)
    rel = np.asarray(rel, np.float32)
    widths, heights = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    cx, cy = a[:, 0] + 0.5 * widths, a[:, 1] + 0.5 * heights
    wx, wy, ww, wh = [float(v) for v in weights]
    dw = np.minimum(rel[:, 2] / ww, BOX_XFORM_CLIP)
    dh = np.minimum(rel[:, 3] / wh, BOX_XFORM_CLIP)
    pcx, pcy = rel[:, 0] / wx * widths + cx, rel[:, 1] / wy * heights + cy
    half_w, half_h = 0.5 * np.exp(dw) * widths, 0.5 * np.exp(dh) * heights
    return np.stack([pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h], 1).astype(np.float32)


def activate(logits, activation, background):
    """Class scores from logits: a sigmoid per class (RetinaNet, FCOS) or a softmax over them (SSD); the
    ``background`` class (an index, or None) scores 0, so class ids keep their places."""
    x = np.asarray(logits, np.float32)
    if activation == "softmax":
        e = np.exp(x - x.max(1, keepdims=True))
        scores = e / e.sum(1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-x))
    if background is not None:
        scores[:, int(background)] = 0.0
    return scores


def candidates(outs, roles, opts):
    """(boxes (N, 4) in the decoder's box format and units, scores (N, C)) of one frame's raw outputs."""
    if "raw" in roles:
        raw = np.asarray(outs[roles["raw"]])[0]
        if raw.shape[0] < raw.shape[1]:  # [4+C, N]: the candidates run along the longer axis
            raw = raw.T
        return raw[:, :4], raw[:, 4:]
    b, scores = np.asarray(outs[roles["boxes"]])[0], np.asarray(outs[roles["scores"]])[0]
    if opts["decoder"] == "anchors":
        b = decode_anchors(b, opts["anchors"], opts.get("box_coder_weights") or (1.0, 1.0, 1.0, 1.0))
        scores = activate(scores, opts.get("score_activation", "sigmoid"), opts.get("background"))
    return b, scores


def to_xyxy(b, box_format):
    """Boxes (N, 4) as x1, y1, x2, y2."""
    if box_format == "xyxy":
        return b.astype(np.float32)
    cx, cy, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)


def decode(outs, roles, opts, in_hw):
    """(boxes (N, 4) x1y1x2y2 normalised to the model input, scores (N, C)) of one frame's raw outputs."""
    b, scores = candidates(outs, roles, opts)
    boxes = to_xyxy(np.asarray(b, np.float32), opts["box_format"])
    if not opts["normalized"]:
        h, w = in_hw
        boxes = boxes / np.array([w, h, w, h], np.float32)
    return boxes, np.asarray(scores, np.float32)


def iou_one_to_many(box, boxes):
    """IoU of one box (4,) with each of ``boxes`` (N, 4), all x1y1x2y2."""
    xx1 = np.maximum(box[0], boxes[:, 0])
    yy1 = np.maximum(box[1], boxes[:, 1])
    xx2 = np.minimum(box[2], boxes[:, 2])
    yy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
    area = max(float(box[2] - box[0]), 0.0) * max(float(box[3] - box[1]), 0.0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    union = area + areas - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes, scores, iou_threshold, max_keep):
    """Greedy non-maximum suppression: indices kept, best score first (ties: the earlier candidate)."""
    order = np.argsort(-scores, kind="mergesort")
    keep = []
    while order.size and len(keep) < max_keep:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        order = rest[iou_one_to_many(boxes[i], boxes[rest]) <= iou_threshold]
    return np.array(keep, np.int64)


def postprocess(boxes, scores, opts):
    """Detections after the score threshold and NMS: (boxes (K, 4), class ids (K,), scores (K,))."""
    classes = np.argmax(scores, 1) if scores.shape[1] else np.zeros(len(scores), np.int64)
    best = scores[np.arange(len(scores)), classes] if scores.shape[1] else np.zeros(len(scores), np.float32)
    keep = best >= float(opts["score_threshold"])
    boxes, classes, best = boxes[keep], classes[keep], best[keep]
    if not len(boxes):
        return boxes, classes, best
    shifted = boxes
    if not opts["agnostic"]:  # boxes of different classes never overlap once shifted apart by class
        span = float(np.abs(boxes).max()) + 1.0
        shifted = boxes + (classes.astype(np.float32) * 2 * span)[:, None]
    idx = nms(shifted, best, float(opts["iou_threshold"]), int(opts["max_detections"]))
    return boxes[idx], classes[idx], best[idx]


def boxes_to_frame(boxes, geometry, in_hw, frame_hw):
    """Normalised model-input boxes -> frame pixels, undoing stretch, letterbox or crop; clipped to the frame."""
    h, w = frame_hw
    ih, iw = in_hw
    left, top, right, bottom = [float(v) for v in geometry["box"]]
    xs, ys = boxes[:, 0::2], boxes[:, 1::2]
    if geometry["mode"] == "shorter-crop":  # the box is the model's view in frame pixels
        fx, fy = left + xs * (right - left), top + ys * (bottom - top)
    else:  # the box is the frame's place in model pixels
        fx = (xs * iw - left) / max(right - left, 1e-6) * w
        fy = (ys * ih - top) / max(bottom - top, 1e-6) * h
    out = np.empty_like(boxes)
    out[:, 0::2] = np.clip(fx, 0, w)
    out[:, 1::2] = np.clip(fy, 0, h)
    return out


def match_rate(ref, got, iou=0.9):
    """Share of the reference detections (boxes, classes) that ``got`` repeats: the same class and IoU >= ``iou``,
    each detection of ``got`` matched once (greedy, in the reference's order). 1.0 when the reference has none
    and ``got`` has none too."""
    ref_boxes, ref_cls = ref[0], ref[1]
    got_boxes, got_cls = got[0], got[1]
    if not len(ref_boxes):
        return 1.0 if not len(got_boxes) else 0.0
    free = np.ones(len(got_boxes), bool)
    hits = 0
    for b, c in zip(ref_boxes, ref_cls):
        cand = np.nonzero(free & (got_cls == c))[0]
        if cand.size:
            overlap = iou_one_to_many(b, got_boxes[cand])
            j = int(np.argmax(overlap))
            if overlap[j] >= iou:
                free[cand[j]] = False
                hits += 1
    return hits / float(len(ref_boxes))


def draw_detections(frame, dets, labels, counts):
    out = frame.copy()
    for d in dets:
        x1, y1, x2, y2 = [int(round(v)) for v in d["box"]]
        colour = COLOURS[d["class"] % len(COLOURS)]
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 2)
        text = "%s %.2f" % (d["label"], d["score"])
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        ty = max(y1, th + 4)
        cv2.rectangle(out, (x1, ty - th - 4), (x1 + tw + 4, ty), colour, -1)
        cv2.putText(out, text, (x1 + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
    y = 18
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]:
        cv2.putText(out, "%s: %d" % (name, n), (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        y += 16
    return out


@register_task
class DetectionPart(TaskPart):
    """Boxes per frame through the declared decoder and NMS, in frame pixels."""

    name = "detection"

    def __init__(self, manifest, args):
        super(DetectionPart, self).__init__(manifest, args)
        self.opts = detection_options(self.spec)
        self.precision = manifest.get("precision")
        self.roles = output_roles(self.opts["decoder"], dict((o["name"], o["shape"]) for o in manifest["outputs"]))
        self.in_hw = input_hw(self.spec)

    def detect(self, outs):
        """(boxes normalised to the model input, class ids, scores) after NMS, from one frame's raw outputs."""
        boxes, scores = decode(outs, self.roles, self.opts, self.in_hw)
        return postprocess(boxes, scores, self.opts)

    @staticmethod
    def agreement(ref, got):
        """None: one raw output of a detector (boxes alone, or scores alone) has no decisions of its own; the
        detections after NMS are compared instead (``match_rate``), from all outputs."""
        return None

    def selftest_rows(self, what, pairs, tolerance):
        """The detections after NMS against the golden ones, pooled over the golden frames: the share repeated with
        the same class, held to the first output's min_agreement (0.9 where it has none). Against the build host
        (the same runtime) at IoU >= 0.9; against PyTorch at IoU >= 0.5, the usual match of a detection: INT8
        moves box edges by a pixel or two, which the build's mAP gate has already measured."""
        need = (tolerance.get(self.out_name) or {}).get("min_agreement") or 0.9
        iou = 0.9 if "host" in what else 0.5
        hits = total = found = 0
        for ref_outs, got_outs in pairs:
            ref, got = self.detect(ref_outs), self.detect(got_outs)
            hits += match_rate(ref[:2], got[:2], iou) * len(ref[0])
            total += len(ref[0])
            found += len(got[0])
        rate = hits / total if total else (1.0 if not found else 0.0)
        detail = "%d reference detection(s) on %d frame(s), %.1f%% repeated (IoU >= %.1f, same class; limit %.1f%%); " \
                 "%d found" % (total, len(pairs), 100 * rate, iou, 100 * need, found)
        if "host" not in what and self.precision == "int8":
            # INT8 moves detections near the score threshold; the build's mAP gate measured what that costs, and
            # this device must repeat the build host's INT8 detections (the other row), which it is held to.
            return [("detections %s" % what, True, detail.replace("limit", "reported, not gated in INT8; limit"))]
        return [("detections %s" % what, rate >= need, detail)]

    def __call__(self, outs, frame, geom, record, draw):
        boxes, classes, scores = self.detect(outs)
        px = boxes_to_frame(boxes, geom, self.in_hw, frame.shape[:2])
        dets, counts = [], {}
        for b, c, s in zip(px, classes, scores):
            label = self.labels[c] if c < len(self.labels) else str(int(c))
            dets.append({"box": [round(float(v), 1) for v in b], "class": int(c), "label": label,
                         "score": round(float(s), 4)})
            counts[label] = counts.get(label, 0) + 1
        record["detections"] = dets
        record["counts"] = counts
        return draw_detections(frame, dets, self.labels, counts) if draw else None
