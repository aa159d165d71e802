"""The detection task's host part: its settings, YOLO and COCO labels, COCO mAP through the runner's own decoding
and the mapping back through letterbox, and agreement after NMS."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from edgeport.errors import ConfigError
from edgeport.evaluate import load_labelled, task_metrics
from edgeport.preprocess import InputSpec
from edgeport.tasks import get
from edgeport.zoo.scene import DET_CLASSES, render_scene_boxes

pytest.importorskip("pycocotools")


def _spec(**options) -> InputSpec:
    return InputSpec(name="image", shape=(1, 3, 128, 160), resize="letterbox", task="detection",
                     labels=list(DET_CLASSES), task_options={"decoder": "boxes", **options})


def test_settings_are_checked_and_completed():
    spec = _spec()
    assert spec.task_options == {"decoder": "boxes", "score_threshold": 0.25, "iou_threshold": 0.45,
                                 "max_detections": 100, "agnostic": False, "box_format": "xyxy", "normalized": True}
    with pytest.raises(ConfigError, match="detection needs a decoder .*yolo, boxes, anchors"):
        InputSpec(task="detection", task_options={})
    with pytest.raises(ConfigError, match="score_threshold = 2 must be a number from 0 to 1"):
        _spec(score_threshold=2)
    with pytest.raises(ConfigError, match="task setting 'colour' is not one detection reads"):
        _spec(colour="red")
    with pytest.raises(ConfigError, match="task setting anchors is read by the anchors decoder only"):
        _spec(anchors=[[0, 0, 8, 8]])
    with pytest.raises(ConfigError, match=r"anchors decoder needs anchors = \[\[x1, y1, x2, y2\]"):
        _spec(decoder="anchors", anchors=[[0, 0, 8]])
    anchored = _spec(decoder="anchors", anchors=[[0, 0, 8, 8], [4, 4, 20, 12]], score_activation="softmax",
                     background=0).task_options
    assert anchored["box_coder_weights"] == [1.0, 1.0, 1.0, 1.0] and anchored["box_format"] == "xyxy"
    assert anchored["normalized"] is False
    with pytest.raises(ConfigError, match="task setting 'decoder' is not one segmentation reads .*none"):
        InputSpec(task="segmentation", task_options={"decoder": "boxes"})
    assert "task_options" not in InputSpec().to_dict()  # other tasks' manifests are unchanged


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """12 rendered scenes (360x480) with their boxes as YOLO .txt files and as one COCO .json."""
    root = tmp_path_factory.mktemp("det")
    (root / "images").mkdir()
    (root / "yolo").mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": 7 + i, "name": n} for i, n in
                                                            enumerate(DET_CLASSES)]}
    for i in range(12):
        img, _, boxes, classes = render_scene_boxes(100 + i, 360, 480)
        cv2.imwrite(str(root / "images" / f"f{i:02d}.png"), img)
        lines = [f"{c} {(b[0] + b[2]) / 960:.6f} {(b[1] + b[3]) / 720:.6f} {(b[2] - b[0]) / 480:.6f} "
                 f"{(b[3] - b[1]) / 360:.6f}" for b, c in zip(boxes, classes)]
        (root / "yolo" / f"f{i:02d}.txt").write_text("\n".join(lines) + "\n")
        coco["images"].append({"id": i, "file_name": f"f{i:02d}.png", "width": 480, "height": 360})
        for b, c in zip(boxes, classes):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": 7 + int(c),
                                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    (root / "coco.json").write_text(json.dumps(coco))
    return root


def test_yolo_and_coco_labels_read_the_same_boxes(labelled_folder):
    spec = _spec()
    a = load_labelled(str(labelled_folder / "images"), str(labelled_folder / "yolo"), spec)
    b = load_labelled(str(labelled_folder / "images"), str(labelled_folder / "coco.json"), spec)
    assert len(a) == len(b) == 12 and a.task == "detection" and a.labelled
    for ta, tb in zip(a.targets, b.targets):
        assert ta["classes"].tolist() == tb["classes"].tolist()
        assert np.allclose(ta["boxes"], tb["boxes"], atol=0.01)
    assert sum(len(t["classes"]) for t in a.targets) > 20


def _outputs_from_truth(ds, spec, shift=0.0):
    """Packed rows a perfect detector would give (the boxes mapped into the letterboxed model input), 100 rows."""
    ih, iw = 128, 160
    rows = np.zeros((len(ds), 100, 4 + len(DET_CLASSES)), np.float32)
    rows[:, :, :4] = [0.0, 0.0, 0.01, 0.01]
    for i, (t, g) in enumerate(zip(ds.targets, ds.geometries)):
        h, w = g["src_hw"]
        left, top, right, bottom = g["box"]
        b = t["boxes"].copy()
        b[:, 0::2] = (b[:, 0::2] / w * (right - left) + left) / iw + shift
        b[:, 1::2] = (b[:, 1::2] / h * (bottom - top) + top) / ih
        rows[i, :len(b), :4] = b
        rows[i, np.arange(len(b)), 4 + t["classes"]] = 0.9
    return rows


def test_map_is_100_for_the_truth_through_letterbox_and_drops_when_boxes_move(labelled_folder):
    spec = _spec()
    ds = load_labelled(str(labelled_folder / "images"), str(labelled_folder / "yolo"), spec)
    perfect = task_metrics(_outputs_from_truth(ds, spec), ds)
    assert perfect["map"] > 99.0 and perfect["map50"] > 99.0 and perfect["count"] == 12
    moved = task_metrics(_outputs_from_truth(ds, spec, shift=0.02), ds)
    assert moved["map"] < perfect["map"] - 10
    task = get("detection")
    rows = _outputs_from_truth(ds, spec)
    assert task.agreement(rows, rows.copy(), spec) == 1.0
    assert task.agreement(rows, _outputs_from_truth(ds, spec, shift=0.05), spec) < 0.5


def test_decoder_that_does_not_fit_is_one_line_naming_the_shapes():
    with pytest.raises(ConfigError, match=r"decoder 'boxes' does not fit .*\(output \[1, 84, 8400\]"):
        get("detection").check_outputs(_spec(), {"output": [1, 84, 8400]})
    with pytest.raises(ConfigError, match="3 class name.*scores 5 classes"):
        get("detection").check_outputs(_spec(), {"b": [1, 10, 4], "s": [1, 10, 5]})


def test_anchor_models_are_packed_decoded_as_the_runner_decodes_them():
    from edgeport.tasks.detection.runner import candidates

    spec = _spec(decoder="anchors", anchors=[[0, 0, 16, 16], [32, 32, 96, 64], [100, 20, 150, 120]],
                 box_coder_weights=[10, 10, 5, 5], score_activation="softmax", background=0, score_threshold=0.3)
    rng = np.random.default_rng(0)
    outs = {"reg": rng.normal(0, 1, (2, 3, 4)).astype(np.float32),
            "logits": rng.normal(0, 2, (2, 3, 3)).astype(np.float32)}
    task = get("detection")
    task.check_outputs(spec, {"reg": [1, 3, 4], "logits": [1, 3, 3]})
    with pytest.raises(ConfigError, match="3 anchors are given .* regresses 5 boxes"):
        task.check_outputs(spec, {"reg": [1, 5, 4], "logits": [1, 5, 3]})
    rows = task.pack(outs, ["reg", "logits"], spec)
    assert rows.shape == (2, 3, 7)
    one = candidates({k: v[1:2] for k, v in outs.items()}, {"boxes": "reg", "scores": "logits"}, spec.task_options)
    assert np.allclose(rows[1, :, :4], one[0]) and np.allclose(rows[1, :, 4:], one[1])
    assert np.all(rows[:, :, 4] == 0)  # the background class never detects
    boxes, classes, scores = task.detections(rows, spec)[1]
    assert np.all(scores >= 0.3) and np.all(classes > 0) and np.all(boxes[:, 2:] <= 1.5)
