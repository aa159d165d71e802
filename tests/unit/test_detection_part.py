"""The detection runner part: decoders, NMS (against torchvision's), mapping boxes back to the frame through
each resize mode, matching, and the record it writes."""
from __future__ import annotations

import argparse

import cv2
import numpy as np
import pytest

from edgeport.runner.manifest import RunnerError
from edgeport.runner.preprocess import preprocess
from edgeport.tasks.detection.runner import (
    DetectionPart,
    boxes_to_frame,
    decode,
    detection_options,
    match_rate,
    nms,
    output_roles,
    postprocess,
)


def _random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(5, size / 3, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_nms_keeps_what_torchvision_keeps(seed):
    torch = pytest.importorskip("torch")
    from torchvision.ops import batched_nms
    from torchvision.ops import nms as tv_nms

    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, 300)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    ours = nms(boxes, scores, 0.5, 10_000)
    theirs = tv_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    assert ours.tolist() == theirs.tolist()
    # class-aware, through the score threshold, as postprocess runs it
    classes = rng.integers(0, 4, 300)
    onehot = np.zeros((300, 4), np.float32)
    onehot[np.arange(300), classes] = scores
    kept_boxes, kept_cls, kept_scores = postprocess(boxes, onehot, {"score_threshold": 0.0, "iou_threshold": 0.5,
                                                                    "max_detections": 10_000, "agnostic": False})
    ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), 0.5).numpy()
    assert np.array_equal(kept_boxes, boxes[ref]) and kept_cls.tolist() == classes[ref].tolist()
    assert np.array_equal(kept_scores, scores[ref])


def test_yolo_rows_either_way_round_and_pixel_boxes_normalised():
    opts = detection_options({"task_options": {"decoder": "yolo"}})
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.uniform(10, 50, (20, 4)), rng.uniform(0, 1, (20, 3))], 1).astype(np.float32)
    a = decode({"y": rows.T[None]}, {"raw": "y"}, opts, (64, 128))
    b = decode({"y": rows[None]}, {"raw": "y"}, opts, (64, 128))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    cx, cy, w, h = rows[0, :4]
    assert np.allclose(a[0][0], [(cx - w / 2) / 128, (cy - h / 2) / 64, (cx + w / 2) / 128, (cy + h / 2) / 64])
    assert a[1].shape == (20, 3)


def test_decoder_mismatch_names_the_choices_and_shapes():
    with pytest.raises(RunnerError, match=r"decoder 'boxes' does not fit .*out \[1, 84, 8400\].*yolo"):
        output_roles("boxes", {"out": [1, 84, 8400]})
    with pytest.raises(RunnerError, match=r"declared decoder .*yolo, boxes, anchors, centernet, got None"):
        detection_options({"task_options": {}})
    assert output_roles("boxes", {"b": [1, 100, 4], "s": [1, 100, 3]}) == {"boxes": "b", "scores": "s"}
    assert output_roles("yolo", {"y": [1, 7, 100]}) == {"raw": "y"}


@pytest.mark.parametrize("resize", ["stretch", "letterbox", "shorter-crop"])
def test_boxes_come_back_onto_the_frame_through_each_resize(resize):
    frame = np.zeros((360, 480, 3), np.uint8)
    x1, y1, x2, y2 = 200, 120, 320, 240
    frame[y1:y2, x1:x2] = 255
    spec = {"shape": [1, 3, 160, 160], "layout": "NCHW", "resize": resize, "interpolation": "nearest",
            "pad_value": 0, "color": "BGR", "scale": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1], "dtype": "float32"}
    x, geom = preprocess(frame, spec)
    ys, xs = np.nonzero(x[0, 0] > 127)
    model_box = np.array([[xs.min() / 160, ys.min() / 160, (xs.max() + 1) / 160, (ys.max() + 1) / 160]], np.float32)
    back = boxes_to_frame(model_box, geom, (160, 160), frame.shape[:2])[0]
    assert np.allclose(back, [x1, y1, x2, y2], atol=3.5), back


def test_match_rate_needs_the_class_and_the_overlap():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    cls = np.array([0, 1])
    assert match_rate((boxes, cls), (boxes.copy(), cls.copy())) == 1.0
    assert match_rate((boxes, cls), (boxes + [0, 0, 2, 0], cls)) == 0.5  # the small box moved below IoU 0.9
    assert match_rate((boxes, cls), (boxes, cls[::-1])) == 0.0
    assert match_rate((boxes[:0], cls[:0]), (boxes[:0], cls[:0])) == 1.0


def test_the_part_writes_detections_in_frame_pixels_and_draws_them():
    manifest = {"preprocess": {"task": "detection", "labels": ["car", "person"], "palette": [],
                               "layout": "NCHW", "shape": [1, 3, 100, 200],
                               "task_options": {"decoder": "boxes", "score_threshold": 0.5}},
                "outputs": [{"name": "boxes", "shape": [1, 3, 4]}, {"name": "scores", "shape": [1, 3, 2]}]}
    part = DetectionPart(manifest, argparse.Namespace())
    outs = {"boxes": np.array([[[0.1, 0.1, 0.3, 0.5], [0.11, 0.1, 0.3, 0.5], [0.5, 0.5, 0.9, 0.9]]], np.float32),
            "scores": np.array([[[0.9, 0.1], [0.8, 0.1], [0.2, 0.7]]], np.float32)}
    frame = np.zeros((200, 400, 3), np.uint8)
    record = {}
    vis = part(outs, frame, {"mode": "stretch", "box": [0, 0, 200, 100]}, record, True)
    assert record["counts"] == {"car": 1, "person": 1}  # the second car box is suppressed
    assert record["detections"][0] == {"box": [40.0, 20.0, 120.0, 100.0], "class": 0, "label": "car", "score": 0.9}
    assert vis.shape == frame.shape and vis.any() and not frame.any()
    assert part(outs, frame, {"mode": "stretch", "box": [0, 0, 200, 100]}, {}, False) is None
    cv2.imencode(".png", vis)  # a drawable image


def test_anchors_decoder_decodes_as_torchvision_ssd_does():
    """SSDlite (random init, no download) raw head outputs: the anchors decoder gives torchvision's BoxCoder boxes
    and softmax scores, the background class scoring 0."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    from torchvision.models.detection.image_list import ImageList

    from edgeport.tasks.detection.runner import candidates

    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5).eval()
    images = torch.rand(1, 3, 320, 320) * 2 - 1
    with torch.no_grad():
        features = list(model.backbone(images).values())
        head = model.head(features)
        anchors = model.anchor_generator(ImageList(images, [(320, 320)]), features)[0]
        ref_boxes = model.box_coder.decode_single(head["bbox_regression"][0], anchors)
        ref_scores = torch.softmax(head["cls_logits"][0], -1)
    opts = {"decoder": "anchors", "anchors": anchors.numpy().tolist(), "score_activation": "softmax",
            "box_coder_weights": list(model.box_coder.weights), "background": 0}
    boxes, scores = candidates({"b": head["bbox_regression"].numpy(), "s": head["cls_logits"].numpy()},
                               {"boxes": "b", "scores": "s"}, opts)
    assert boxes.shape == (anchors.shape[0], 4) == tuple(ref_boxes.shape)
    assert np.allclose(boxes, ref_boxes.numpy(), rtol=1e-5, atol=1e-3)
    assert np.all(scores[:, 0] == 0) and np.allclose(scores[:, 1:], ref_scores.numpy()[:, 1:], atol=1e-6)
    sigmoid = candidates({"b": head["bbox_regression"].numpy(), "s": head["cls_logits"].numpy()},
                         {"boxes": "b", "scores": "s"}, {**opts, "score_activation": "sigmoid", "background": None})[1]
    assert np.allclose(sigmoid, torch.sigmoid(head["cls_logits"][0]).numpy(), atol=1e-6)


def _centernet_outputs(objects, classes=3, hw=(16, 20), sigma=1.0):
    """A CenterNet head's outputs (NCHW, heatmap as logits) for objects [(class, cx, cy, w, h)] in grid cells."""
    h, w = hw
    heat = np.full((classes, h, w), 1e-4, np.float32)
    size, offset = np.zeros((2, h, w), np.float32), np.zeros((2, h, w), np.float32)
    ys, xs = np.mgrid[0:h, 0:w]
    for c, cx, cy, bw, bh in objects:
        ix, iy = int(cx), int(cy)
        heat[c] = np.maximum(heat[c], np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma ** 2)) * 0.9)
        size[:, iy, ix] = bw, bh
        offset[:, iy, ix] = cx - ix, cy - iy
    logits = np.log(heat / (1 - heat))
    return {"hm": logits[None], "wh": size[None], "reg": offset[None]}


@pytest.mark.parametrize("nhwc", [False, True])
def test_centernet_decodes_each_peak_to_its_box_in_either_layout(nhwc):
    """Each heatmap peak becomes one detection at its cell plus offset, sized from the size output; NCHW, and the
    mixed layouts onnx2tf leaves."""
    objects = [(0, 5.3, 4.6, 6.0, 3.0), (2, 14.5, 10.2, 4.0, 8.0), (1, 6.4, 5.1, 2.0, 2.0)]
    outs = _centernet_outputs(objects)
    if nhwc:  # onnx2tf turns some grids NHWC and leaves others
        outs = {k: v.transpose(0, 2, 3, 1) if k != "reg" else v for k, v in outs.items()}
    roles = output_roles("centernet", {k: list(v.shape) for k, v in outs.items()})
    assert roles == {"heatmap": "hm", "size": "wh", "offset": "reg"}
    opts = detection_options({"task_options": {"decoder": "centernet", "iou_threshold": 0.9}})
    boxes, scores = decode(outs, roles, opts, (64, 80))
    assert boxes.shape == (16 * 20, 4) and scores.shape == (16 * 20, 3)
    got_boxes, got_cls, got_scores = postprocess(boxes, scores, opts)
    assert sorted(got_cls.tolist()) == [0, 1, 2]  # one detection per peak: its neighbours are suppressed
    for c, cx, cy, bw, bh in objects:
        i = got_cls.tolist().index(c)
        want = [(cx - bw / 2) / 20, (cy - bh / 2) / 16, (cx + bw / 2) / 20, (cy + bh / 2) / 16]
        assert np.allclose(got_boxes[i], want, atol=1e-5), (c, got_boxes[i], want)
        assert abs(got_scores[i] - 0.9) < 1e-4


def test_centernet_peaks_are_those_of_a_3x3_max_pool():
    torch = pytest.importorskip("torch")
    from edgeport.tasks.detection.runner import decode_centernet

    rng = np.random.default_rng(3)
    heat = rng.normal(0, 2, (4, 12, 15)).astype(np.float32)
    heat[1, 3, 3:5] = 2.5  # a tie on a plateau: both cells are peaks, as with CenterNet's max-pool test
    _, scores = decode_centernet(heat, np.ones((2, 12, 15)), np.zeros((2, 12, 15)), "none")
    t = torch.from_numpy(heat)[None]
    pooled = torch.nn.functional.max_pool2d(t, 3, stride=1, padding=1)
    want = torch.where(pooled == t, t, torch.zeros_like(t))[0].numpy().reshape(4, -1).T
    assert np.array_equal(scores, want)


def test_centernet_outputs_told_apart_by_channels_and_order_without_names():
    shapes = {"a": [1, 2, 8, 10], "b": [1, 5, 8, 10], "c": [1, 2, 8, 10]}
    assert output_roles("centernet", shapes) == {"heatmap": "b", "size": "a", "offset": "c"}
    with pytest.raises(RunnerError, match="decoder 'centernet' does not fit .*centernet \\(heatmap"):
        output_roles("centernet", {"a": [1, 2, 8, 10], "b": [1, 5, 4, 5], "c": [1, 2, 8, 10]})
    with pytest.raises(RunnerError, match="decoder 'centernet' does not fit"):
        output_roles("centernet", {"b": [1, 100, 4], "s": [1, 100, 3]})


def test_float_noise_near_ties_are_not_counted_and_real_misses_are():
    """Two overlapping candidates scored 1e-6 apart: which one NMS keeps is float noise, and a runtime that keeps
    the other is not counted against; the same swap by 0.01 (above NOISE_CAP) is a miss."""
    from edgeport.tasks.detection.runner import compare_detections

    opts = detection_options({"task_options": {"decoder": "boxes", "iou_threshold": 0.5}})
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.16, 0.1, 0.56, 0.5], [0.6, 0.6, 0.9, 0.9]], np.float32)
    scores = np.array([[0.700001], [0.7], [0.9]], np.float32)
    for gap, ties in ((2e-6, 1), (0.01, 0)):
        swapped = scores.copy()
        swapped[1, 0] = scores[0, 0] + gap
        hits, counted, tied, found = compare_detections((boxes, scores), (boxes, swapped), opts, 0.9)
        assert (hits, found, tied) == (1, 2, ties), (gap, hits, counted, tied, found)
        assert counted == 2 - ties  # the far box always counts and matches
    assert compare_detections((boxes, scores), (boxes, scores), opts, 0.9) == (2, 2, 0, 2)
