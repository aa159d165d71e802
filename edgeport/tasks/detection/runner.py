"""Detection on the device: raw outputs -> boxes (a declared decoder) -> NMS -> frame pixels, drawn with
label and score, with per-class counts in the overlay and the detections in the JSON record.

Python 3.6 syntax, numpy (1.13 and later) and cv2 only (embedded into runner.py); the host runs this
same code for its parity and metric figures. Options (the manifest's ``preprocess.task_options``):

* ``decoder``: ``yolo``: one output [1, 4+C, N] or [1, N, 4+C], rows (cx, cy, w, h, class scores...), as
  YOLOv8/11 heads emit; ``boxes``: already decoded boxes [1, N, 4] and scores [1, N, C], as separate
  outputs (each gets its own INT8 scale); ``anchors``: box regression [1, N, 4] and class logits [1, N, C]
  against ``anchors`` (N x1y1x2y2 in input pixels) with ``box_coder_weights`` (SSD 10, 10, 5, 5;
  RetinaNet 1, 1, 1, 1), ``score_activation`` (sigmoid or softmax) and ``background`` (a class index that
  scores 0, or none), as SSD and RetinaNet heads emit; ``centernet``: a class heatmap [1, C, H, W], box sizes
  [1, 2, H, W] (width, height) and centre offsets [1, 2, H, W] (x, y), both in grid cells, as CenterNet
  ("Objects as Points") heads emit (NHWC accepted too): a detection at each cell that is the largest of its
  3x3 neighbourhood in its class (the heatmap's own suppression), centred at the cell plus its offset; the
  heatmap goes through ``score_activation`` (sigmoid, or none when the graph applies it). The outputs are told
  apart by name (heat/hm, size/wh, offset/reg), else by channels and order: heatmap, size, offset;
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

DECODERS = ("yolo", "boxes", "anchors", "centernet")
DEFAULTS = {"score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 100, "agnostic": False}
FORMATS = {"yolo": ("cxcywh", False), "boxes": ("xyxy", True), "anchors": ("xyxy", False), "centernet": ("xyxy", True)}
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
    elif decoder == "centernet":
        roles = centernet_roles(shapes)
        if roles:
            return roles
    raise RunnerError("decoder %r does not fit this model's outputs (%s); the decoders are: yolo (one output "
                      "[1, 4+C, N] or [1, N, 4+C]), boxes (boxes [1, N, 4] and scores [1, N, C] with the same N), "
                      "anchors (box regression [1, N, 4] and class logits [1, N, C] for N anchors), centernet (heatmap "
                      "[1, C, H, W], sizes [1, 2, H, W] and offsets [1, 2, H, W] on one grid)" % (decoder, found))


def on_grid(shape, grid):
    """The channels of a 4-D output shape on the grid (H, W), NCHW or NHWC (each output its own: onnx2tf turns
    only some grids NHWC), or None when it is not on that grid."""
    if tuple(shape[2:4]) == grid:
        return shape[1]
    if tuple(shape[1:3]) == grid:
        return shape[3]
    return None


def centernet_roles(shapes):
    """{'heatmap', 'size', 'offset': output name} of three 4-D outputs on one grid, or None. Told apart by their
    names (heat/hm, size/wh, offset/reg); else the heatmap is the one output whose channels are not 2, sizes
    before offsets in the model's order; else all three in the model's order."""
    names = list(shapes)
    if len(names) != 3 or any(len(shapes[n]) != 4 for n in names):
        return None
    grids = [tuple(shapes[n][2:4]) for n in names if shapes[n][1] == 2]
    grids += [tuple(shapes[n][1:3]) for n in names if shapes[n][3] == 2]
    for grid in grids:
        chans = [on_grid(shapes[n], grid) for n in names]
        if None in chans or chans.count(2) < 2:
            continue
        hints = {"heatmap": ("heat", "hm"), "size": ("size", "wh"), "offset": ("off", "reg")}
        found = dict((role, [n for n in names if any(w in n.lower() for w in words)]) for role, words in hints.items())
        picked = [found[r][0] for r in ("heatmap", "size", "offset") if len(found[r]) == 1]
        if len(set(picked)) == 3:
            return {"heatmap": picked[0], "size": picked[1], "offset": picked[2]}
        others = [n for n, c in zip(names, chans) if c != 2]
        pairs = [n for n, c in zip(names, chans) if c == 2]
        order = others + pairs if len(others) == 1 else names
        return {"heatmap": order[0], "size": order[1], "offset": order[2]}
    return None


def as_chw(arr, grid):
    """One frame's grid output (C, H, W) from (C, H, W) or (H, W, C) on the grid (H, W)."""
    return arr if tuple(arr.shape[1:]) == tuple(grid) else arr.transpose(2, 0, 1)


def decode_centernet(heat, size, offset, activation):
    """(boxes (H*W, 4) x1y1x2y2 normalised to the input, scores (H*W, C)) from one frame's heatmap (C, H, W), sizes
    and offsets (2, H, W) in grid cells: a cell scores only in the classes where it is its 3x3 neighbourhood's
    peak (0 elsewhere), cells in row-major order."""
    heat = np.asarray(heat, np.float32)
    if activation == "sigmoid":
        heat = 1.0 / (1.0 + np.exp(-heat))
    c, h, w = heat.shape
    padded = np.pad(heat, ((0, 0), (1, 1), (1, 1)), "constant", constant_values=-np.inf)
    peak = heat.copy()
    for dy in range(3):
        for dx in range(3):
            peak = np.maximum(peak, padded[:, dy:dy + h, dx:dx + w])
    scores = np.where(heat >= peak, heat, 0.0).reshape(c, -1).T
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    size, offset = np.asarray(size, np.float32), np.asarray(offset, np.float32)
    cx, cy = xs + offset[0], ys + offset[1]
    half_w, half_h = 0.5 * size[0], 0.5 * size[1]
    boxes = np.stack([(cx - half_w) / w, (cy - half_h) / h, (cx + half_w) / w, (cy + half_h) / h], -1)
    return boxes.reshape(-1, 4).astype(np.float32), np.ascontiguousarray(scores, np.float32)


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
    if "heatmap" in roles:
        size = np.asarray(outs[roles["size"]])[0]
        grid = size.shape[1:] if size.shape[0] == 2 else size.shape[:2]
        heat, offset = [as_chw(np.asarray(outs[roles[r]])[0], grid) for r in ("heatmap", "offset")]
        return decode_centernet(heat, as_chw(size, grid), offset, opts.get("score_activation", "sigmoid"))
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


def match_flags(ref, got, iou=0.9):
    """Per reference detection (boxes, classes): whether ``got`` repeats it, with the same class and IoU >= ``iou``,
    each detection of ``got`` matched once (greedy, in the reference's order)."""
    ref_boxes, ref_cls = ref[0], ref[1]
    got_boxes, got_cls = got[0], got[1]
    free = np.ones(len(got_boxes), bool)
    flags = np.zeros(len(ref_boxes), bool)
    for k, (b, c) in enumerate(zip(ref_boxes, ref_cls)):
        cand = np.nonzero(free & (got_cls == c))[0]
        if cand.size:
            overlap = iou_one_to_many(b, got_boxes[cand])
            j = int(np.argmax(overlap))
            if overlap[j] >= iou:
                free[cand[j]] = False
                flags[k] = True
    return flags


def match_rate(ref, got, iou=0.9):
    """Share of the reference detections (boxes, classes) that ``got`` repeats (``match_flags``). 1.0 when the
    reference has none and ``got`` has none too."""
    if not len(ref[0]):
        return 1.0 if not len(got[0]) else 0.0
    return float(match_flags(ref, got, iou).mean())


NOISE_CAP = 1e-3  # the largest difference, of the output's range, still taken for float noise (FP32: 1e-7..1e-4)


def near_ties(boxes, scores, opts, dets, diff_boxes, diff_scores, runs=4):
    """Per detection of ``dets`` (the detections of candidates ``boxes``, ``scores``): whether noise of up to twice
    the given differences (per element), added to the candidates, already moves it (out of the score threshold,
    the top max_detections or NMS's choice); seeded, so host and device agree."""
    rng = np.random.RandomState(0)
    tied = np.zeros(len(dets[0]), bool)
    for _ in range(runs):
        nb = boxes + (rng.uniform(-2, 2, boxes.shape) * diff_boxes).astype(np.float32)
        ns = scores + (rng.uniform(-2, 2, scores.shape) * diff_scores).astype(np.float32)
        tied |= ~match_flags(dets[:2], postprocess(nb, ns, opts)[:2], 0.9)
    return tied


def noise_only(ref, diff):
    """Whether ``diff`` (from ``ref``) is float noise: at most NOISE_CAP of the reference's range."""
    return float(diff.max()) <= NOISE_CAP * max(float(np.abs(ref).max()), 1e-12)


def compare_detections(ref_cands, got_cands, opts, iou):
    """One frame's detections of ``got_cands`` against those of ``ref_cands`` (each (boxes, scores) before NMS):
    (reference detections repeated, reference detections counted, near-ties not counted, detections found).
    A reference detection that ``got`` misses is not counted when the outputs differ by float noise only (at most
    NOISE_CAP of their range) and noise of that size moves it on the reference itself: untrained heads score
    thousands of candidates alike, and which of them survive NMS is then decided by 1e-5."""
    ref = postprocess(ref_cands[0], ref_cands[1], opts)
    got = postprocess(got_cands[0], got_cands[1], opts)
    flags = match_flags(ref[:2], got[:2], iou)
    tied = np.zeros(len(flags), bool)
    if not flags.all() and ref_cands[1].shape == got_cands[1].shape and ref_cands[1].size:
        diff_b = np.abs(ref_cands[0] - got_cands[0])
        diff_s = np.abs(ref_cands[1] - got_cands[1])
        if noise_only(ref_cands[0], diff_b) and noise_only(ref_cands[1], diff_s):
            tied = near_ties(ref_cands[0], ref_cands[1], opts, ref, diff_b, diff_s) & ~flags
    return int(flags.sum()), int(len(flags) - tied.sum()), int(tied.sum()), len(got[0])


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
        detections after NMS are compared instead (``compare_detections``), from all outputs."""
        return None

    def selftest_rows(self, what, pairs, tolerance):
        """The detections after NMS against the golden ones, pooled over the golden frames: the share repeated with
        the same class, held to the first output's min_agreement (0.9 where it has none), float-noise near-ties
        not counted (``compare_detections``). Against the build host (the same runtime) at IoU >= 0.9; against
        PyTorch at IoU >= 0.5, the usual match of a detection: INT8 moves box edges by a pixel or two, which the
        build's mAP gate has already measured."""
        need = (tolerance.get(self.out_name) or {}).get("min_agreement") or 0.9
        iou = 0.9 if "host" in what else 0.5
        hits = total = ties = found = 0
        for ref_outs, got_outs in pairs:
            counts = compare_detections(decode(ref_outs, self.roles, self.opts, self.in_hw),
                                        decode(got_outs, self.roles, self.opts, self.in_hw), self.opts, iou)
            hits, total, ties, found = [a + b for a, b in zip((hits, total, ties, found), counts)]
        rate = hits / float(total) if total else (1.0 if not found else 0.0)
        detail = "%d reference detection(s) on %d frame(s), %.1f%% repeated (IoU >= %.1f, same class; limit %.1f%%); " \
                 "%d found" % (total, len(pairs), 100 * rate, iou, 100 * need, found)
        if ties:
            detail += "; %d float-noise near-tie(s) not counted" % ties
        if "host" not in what and self.precision == "int8":
            # INT8 moves detections near the score threshold; the build's mAP gate measured what that costs, and
            # this device must repeat the build host's INT8 detections (the other row), which it is held to.
            return [("detections %s" % what, True, detail.replace("limit", "reported, not gated in INT8; limit"))]
        return [("detections %s" % what, rate >= need, detail)]

    def deepstack(self, record, minimum):
        """DeepStack's predictions: label, confidence and the box in whole frame pixels."""
        return [{"label": d["label"], "confidence": d["score"], "x_min": int(round(d["box"][0])),
                 "y_min": int(round(d["box"][1])), "x_max": int(round(d["box"][2])),
                 "y_max": int(round(d["box"][3]))} for d in record.get("detections", []) if d["score"] >= minimum]

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
