"""Detection on the host: box-labelled sets (YOLO txt or COCO JSON), COCO mAP, and agreement after NMS.

A labelled set is an image folder plus either a folder of YOLO label files (``<stem>.txt``, one
``class cx cy w h`` line per box, normalised to the image) or a COCO JSON file (``images``,
``annotations`` with pixel ``bbox`` [x, y, w, h], ``categories`` named like the model's labels or taken in
id order). The model's outputs go through the same decoder, NMS and mapping back to the frame as the
runner's (edgeport/tasks/detection/runner.py); the metric is COCO mAP@[.5:.95] and mAP@.5 by
pycocotools (the ``detection`` extra), scored with a score threshold of 0.001 as COCO evaluation
expects; agreement is measured on the detections a device would report (the configured thresholds).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.errors import CalibrationError, ConfigError
from edgeport.progress import progress
from edgeport.runner.manifest import RunnerError
from edgeport.runner.preprocess import input_hw
from edgeport.tasks.base import Task
from edgeport.tasks.detection.runner import (
    DECODERS,
    DEFAULTS,
    FORMATS,
    boxes_to_frame,
    candidates,
    compare_detections,
    output_roles,
    postprocess,
    to_xyxy,
)

if TYPE_CHECKING:
    from edgeport.evaluate import LabelledSet
    from edgeport.preprocess import InputSpec

log = logging.getLogger("edgeport")
EVAL_SCORE = 0.001  # COCO evaluation ranks every detection; the deployed threshold would cut the curve short


class Detection(Task):
    name = "detection"
    primary = "map"
    label = "mAP"
    short = "mAP"
    label_folder = True
    labelled_how = "detection labels go in --val-labels: a folder of YOLO .txt files or a COCO .json file"
    float_tail = True
    # a frame holds a few detections, each repeated or not: on 100 frames min/max ranges against the percentile
    # gained +1.37 points of agreement [-2.68, +4.61] on roaddet (docs/benchmarks/int8-evidence.md)
    choice_by_agreement = False

    def check_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        """Decoder required; thresholds in [0, 1]; defaults filled in (the runner reads them from the manifest)."""
        super().check_options(options, where)
        decoder = options.get("decoder")
        if decoder not in DECODERS:
            raise ConfigError(f"{where}: detection needs a decoder ([task] decoder = one of {', '.join(DECODERS)}; "
                              f"got {decoder!r})")
        out = dict(DEFAULTS)
        fmt, normalized = FORMATS[decoder]
        out.update(box_format=fmt, normalized=normalized)
        out.update(options)
        for key in ("score_threshold", "iou_threshold"):
            if not isinstance(out[key], (int, float)) or not 0.0 <= float(out[key]) <= 1.0:
                raise ConfigError(f"{where}: task setting {key} = {out[key]!r} must be a number from 0 to 1")
            out[key] = float(out[key])
        if not isinstance(out["max_detections"], int) or out["max_detections"] < 1:
            raise ConfigError(f"{where}: task setting max_detections = {out['max_detections']!r} must be a whole "
                              "number of at least 1")
        for key in ("agnostic", "normalized"):
            if not isinstance(out[key], bool):
                raise ConfigError(f"{where}: task setting {key} = {out[key]!r} must be true or false")
        if out["box_format"] not in ("xyxy", "cxcywh"):
            raise ConfigError(f"{where}: task setting box_format = {out['box_format']!r} must be xyxy or cxcywh")
        anchor_keys = ("anchors", "box_coder_weights", "background")
        if decoder != "anchors":
            stray = [k for k in anchor_keys if k in options]
            if stray:
                raise ConfigError(f"{where}: task setting {stray[0]} is read by the anchors decoder only")
            if decoder == "centernet":
                if out.setdefault("score_activation", "sigmoid") not in ("sigmoid", "none"):
                    raise ConfigError(f"{where}: score_activation = {out['score_activation']!r} must be sigmoid "
                                      "(the heatmap is logits, as CenterNet heads emit) or none (probabilities)")
            elif "score_activation" in options:
                raise ConfigError(f"{where}: task setting score_activation is read by the anchors and centernet "
                                  "decoders only")
            return out
        if out.get("anchors") is None:  # the model may carry them (checked again once it is loaded)
            out["anchors"] = None
            return out
        anchors = np.asarray(out["anchors"], dtype=np.float64)
        ok = anchors.ndim == 2 and anchors.shape[1] == 4 and len(anchors) > 0
        if not ok or not np.all(anchors[:, 2:] > anchors[:, :2]):
            raise ConfigError(f"{where}: the anchors decoder needs anchors = [[x1, y1, x2, y2], ...] in input pixels, "
                              "one per candidate, each with x2 > x1 and y2 > y1")
        weights = out.setdefault("box_coder_weights", [1.0, 1.0, 1.0, 1.0])
        if len(weights) != 4 or any(not isinstance(w, (int, float)) or w <= 0 for w in weights):
            raise ConfigError(f"{where}: box_coder_weights = {weights!r} must be 4 positive numbers (SSD: 10, 10, "
                              "5, 5; RetinaNet: 1, 1, 1, 1)")
        if out.setdefault("score_activation", "sigmoid") not in ("sigmoid", "softmax"):
            raise ConfigError(f"{where}: score_activation = {out['score_activation']!r} must be sigmoid or softmax")
        out.setdefault("background", None)
        if out["background"] is not None and not isinstance(out["background"], int):
            raise ConfigError(f"{where}: background = {out['background']!r} must be a class index or absent")
        out["anchors"] = anchors.astype(np.float32).tolist()
        out["box_coder_weights"] = [float(w) for w in weights]
        return out

    def with_model_options(self, spec: InputSpec, carried: dict[str, Any]) -> InputSpec:
        """The anchors, box coder and score activation a wrapped detector carries replace the defaults when the
        project gave no anchors of its own (the head knows them; the project's thresholds stay)."""
        import dataclasses

        options = dict(spec.task_options)
        if options.get("decoder") == "anchors" and options.get("anchors") is None:
            options.update({k: carried[k] for k in ("anchors", "box_coder_weights", "score_activation", "background")
                            if k in carried})
        options = self.check_options(options, "the model's detection settings")
        return dataclasses.replace(spec, task_options=options)

    def tolerance(self, precision: str, tol: dict[str, Any]) -> dict[str, Any]:
        """Below FP32 a raw output's largest error is not a detector's gate (one sigmoid score near 0.5 moves most
        while the detections hold), and in INT8 the cosine of the score output is set by thousands of near-zero
        background scores (docs/benchmarks/code-figures.md): the detections' agreement and the mAP drop are the gates
        there, the cosine floor drops to 0.95. FP32 keeps every check (export and conversion bugs show there)."""
        if precision == "fp32":
            return tol
        out = {**tol, "max_rel": None}
        if precision == "int8" and out.get("min_cosine") is not None:
            out["min_cosine"] = min(out["min_cosine"], 0.95)
        return out

    def float_outputs(self, spec: InputSpec, shapes: dict[str, list[int]]) -> list[str]:
        """The class-score output of a two-output detector: its last convolutions are a few channels wide, cost
        next to nothing in float, and their INT8 rounding moves every confidence the thresholds decide on."""
        try:
            roles = output_roles(spec.task_options["decoder"], shapes)
        except (RunnerError, KeyError):
            return []
        return [roles["scores"]] if "scores" in roles else []

    def check_outputs(self, spec: InputSpec, shapes: dict[str, list[int]]) -> None:
        """ConfigError when the declared decoder does not fit the outputs, or the labels not their classes."""
        try:
            roles = output_roles(spec.task_options["decoder"], shapes)
        except RunnerError as e:
            raise ConfigError(str(e)) from None
        if "raw" in roles:
            s = shapes[roles["raw"]]
            classes = min(s[1], s[2]) - 4
        elif "heatmap" in roles:
            classes = shapes[roles["heatmap"]][1]  # the ONNX model is NCHW
        else:
            classes = shapes[roles["scores"]][2]
        anchors = spec.task_options.get("anchors", [])
        if anchors is None:
            raise ConfigError("the anchors decoder needs the anchors: [task] anchors = [[x1, y1, x2, y2], ...], or "
                              "a model that carries them (edgeport.zoo.tvdet wraps torchvision's SSD and RetinaNet)")
        if spec.task_options["decoder"] == "anchors" and len(anchors) != shapes[roles["boxes"]][1]:
            raise ConfigError(f"{len(anchors)} anchors are given ([task] anchors), but the model regresses "
                              f"{shapes[roles['boxes']][1]} boxes; give one anchor per box, in the model's order")
        if spec.labels and len(spec.labels) != classes:
            raise ConfigError(f"{len(spec.labels)} class name(s) are given ([task] labels), but the detector scores "
                              f"{classes} classes; give one name per class, in class order")

    def pack(self, outputs: dict[str, np.ndarray], names: list[str], spec: InputSpec) -> np.ndarray:
        """Rows (N, K, 4 + C): each candidate's box in the decoder's format, then its class scores."""
        opts = spec.task_options
        roles = output_roles(opts["decoder"], {n: list(outputs[n].shape) for n in names})
        if "raw" in roles:
            raw = outputs[roles["raw"]]
            return raw.transpose(0, 2, 1) if raw.shape[1] < raw.shape[2] else raw
        if opts["decoder"] in ("anchors", "centernet"):  # decoded per image, as the runner decodes them
            first = outputs[next(iter(roles.values()))]
            return np.stack([np.concatenate(candidates({n: outputs[n][i:i + 1] for n in roles.values()}, roles, opts),
                                            -1) for i in range(len(first))])
        return np.concatenate([outputs[roles["boxes"]], outputs[roles["scores"]]], -1)

    def candidates(self, rows: np.ndarray, spec: InputSpec) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image (boxes x1y1x2y2 normalised to the model input, class scores) before NMS, from packed rows."""
        opts = spec.task_options
        hw = input_hw(spec.to_dict())
        scale = np.float32(1.0) if opts["normalized"] else np.array([hw[1], hw[0], hw[1], hw[0]], np.float32)
        return [(to_xyxy(np.asarray(r[:, :4], np.float32), opts["box_format"]) / scale,
                 np.asarray(r[:, 4:], np.float32)) for r in rows]

    def detections(self, rows: np.ndarray, spec: InputSpec, score: float | None = None) -> list[tuple]:
        """Per image (boxes x1y1x2y2 normalised to the model input, class ids, scores) after NMS."""
        opts = dict(spec.task_options)
        if score is not None:
            opts["score_threshold"] = score
        return [postprocess(boxes, scores, opts) for boxes, scores in self.candidates(rows, spec)]

    def agreement(self, ref: np.ndarray, got: np.ndarray, spec: InputSpec) -> float:
        """Share of the reference's detections (at the deployed thresholds) repeated with the same class at
        IoU >= 0.9, pooled over the images; float-noise near-ties not counted (``compare_detections``)."""
        hits = total = found = 0
        for a, b in zip(self.candidates(ref, spec), self.candidates(got, spec)):
            h, t, _, f = compare_detections(a, b, spec.task_options, 0.9)
            hits, total, found = hits + h, total + t, found + f
        if total == 0:
            return 1.0 if found == 0 else 0.0
        return hits / total

    def metrics(self, outputs: np.ndarray, ds: LabelledSet, layout: str) -> dict[str, Any]:
        """COCO mAP@[.5:.95] and mAP@.5 in percent (pycocotools), boxes in frame pixels."""
        spec = ds.spec
        assert spec is not None, "load_labelled sets the spec"
        hw = input_hw(spec.to_dict())
        dets = self.detections(outputs, spec, score=EVAL_SCORE)
        images, annotations, results = [], [], []
        for i, ((boxes, classes, scores), truth, geom) in enumerate(zip(dets, ds.targets, ds.geometries)):
            h, w = geom["src_hw"]
            images.append({"id": i, "width": int(w), "height": int(h)})
            for b, c in zip(truth["boxes"], truth["classes"]):
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c) + 1,
                                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                                    "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0})
            for b, c, s in zip(boxes_to_frame(boxes, geom, hw, (h, w)), classes, scores):
                results.append({"image_id": i, "category_id": int(c) + 1, "score": float(s),
                                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
        n_classes = max([len(spec.labels)] + [int(c) + 1 for t in ds.targets for c in t["classes"]])
        m_all, m50 = coco_map(images, annotations, results, n_classes)
        return {"map": 100 * m_all, "map50": 100 * m50, "count": len(dets)}

    def load(self, img_dir: Path, labels: Path | None, spec: InputSpec, limit: int) -> LabelledSet | None:
        if labels is None:
            return None
        if labels.is_file() and labels.suffix.lower() == ".json":
            truth = _coco_boxes(labels, spec)
        elif labels.is_dir():
            truth = None  # read per image below (YOLO txt needs the image size)
        else:
            raise CalibrationError(f"detection labels {labels}: neither a folder of YOLO .txt files nor a COCO .json "
                                   "file")
        return _read_boxes(img_dir, labels, truth, spec, limit)

    def synthetic(self, source: str, spec: InputSpec, limit: int) -> LabelledSet:
        """Road scenes with pedestrians and signs and the box of every visible car, pedestrian and sign
        (edgeport.zoo.scene.render_scene_boxes), at twice the model's size by default."""
        from edgeport.calibration import synthetic_params
        from edgeport.evaluate import LabelledSet, pre, spec_key
        from edgeport.zoo.scene import DET_CLASSES, render_scene_boxes

        if spec.labels and list(spec.labels) != list(DET_CLASSES):
            raise CalibrationError(f"synthetic:// boxes are {', '.join(DET_CLASSES)}; this model detects "
                                   f"{', '.join(spec.labels)}: pass --val-images with --val-labels")
        q = synthetic_params(source)  # objects=1 is what it renders anyway
        n, seed = min(q.get("n", 64), limit), q.get("seed", 2_000_000)
        ih, iw = input_hw(spec.to_dict())
        h, w = q.get("height", 2 * ih), q.get("width", 2 * iw)
        inputs, targets, geoms, frames = [], [], [], []
        for i in progress(range(n), "rendering validation scenes"):
            frame, _, boxes, classes = render_scene_boxes(seed + i, h, w)
            x, geom = pre(frame, spec)
            inputs.append(x)
            targets.append({"boxes": boxes, "classes": classes})
            geoms.append(geom)
            frames.append(frame)
        digest = hashlib.sha256(spec_key(spec) + f"{source}|{n}|{seed}|{h}x{w}|boxes".encode()).hexdigest()
        return LabelledSet(source, self.name, np.concatenate(inputs, 0), targets, geoms,
                           [f"synthetic-{seed + i}" for i in range(n)], digest, None, 0, frames)


def coco_map(images: list[dict], annotations: list[dict], results: list[dict], n_classes: int) -> tuple[float, float]:
    """(mAP@[.5:.95], mAP@.5) by pycocotools' COCOeval; 0 for no detections."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ConfigError("detection metrics need pycocotools: pip install 'edgeport[detection]'") from None
    if not annotations:
        return 0.0, 0.0
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": c + 1, "name": str(c)} for c in range(n_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return 0.0, 0.0
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)


def _coco_boxes(path: Path, spec: InputSpec) -> dict[str, dict[str, np.ndarray]]:
    """{file name: {"boxes": (K, 4) x1y1x2y2 pixels, "classes": (K,)}} from a COCO JSON file."""
    try:
        data = json.loads(path.read_text())
        cats = sorted(data["categories"], key=lambda c: c["id"])
        by_name = {n: i for i, n in enumerate(spec.labels)}
        cat_index = {c["id"]: by_name.get(c["name"], i) for i, c in enumerate(cats)}
        names = {im["id"]: Path(im["file_name"]).name for im in data["images"]}
        out: dict[str, dict[str, list]] = {n: {"boxes": [], "classes": []} for n in names.values()}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            entry = out[names[a["image_id"]]]
            entry["boxes"].append([x, y, x + w, y + h])
            entry["classes"].append(cat_index[a["category_id"]])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CalibrationError(f"COCO labels {path}: cannot read ({type(e).__name__}: {e})") from None
    return {n: {"boxes": np.asarray(v["boxes"], np.float32).reshape(-1, 4), "classes": np.asarray(v["classes"],
                                                                                                   np.int64)}
            for n, v in out.items()}


def _yolo_boxes(path: Path, w: int, h: int) -> dict[str, np.ndarray]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            c, cx, cy, bw, bh = int(parts[0]), *(float(p) for p in parts[1:5])
        except (ValueError, IndexError):
            raise CalibrationError(f"{path}:{n}: expected 'class cx cy w h' (normalised), got {line!r}") from None
        rows.append([c, (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
    arr = np.asarray(rows, np.float32).reshape(-1, 5)
    return {"boxes": arr[:, 1:], "classes": arr[:, 0].astype(np.int64)}


def _read_boxes(img_dir: Path, labels: Path, truth: dict[str, dict[str, np.ndarray]] | None, spec: InputSpec,
                limit: int) -> LabelledSet:
    import cv2

    from edgeport.evaluate import MIN_LABELLED, LabelledSet, image_files, pick, pre, read_image, spec_key

    files = image_files(img_dir)
    if truth is None:
        pairs = [(p, labels / f"{p.stem}.txt") for p in files if (labels / f"{p.stem}.txt").is_file()]
    else:
        pairs = [(p, None) for p in files if p.name in truth]
    if len(pairs) < MIN_LABELLED:
        raise CalibrationError(f"{img_dir} and {labels}: {len(pairs)} image(s) have boxes; at least {MIN_LABELLED} "
                               "are needed")
    h = hashlib.sha256(spec_key(spec))
    inputs, targets, geoms, names, frames, skipped = [], [], [], [], [], 0
    for img_path, txt in progress(pick(pairs, limit), "reading validation images"):
        img = read_image(img_path, cv2.IMREAD_COLOR)
        if img is None:
            skipped += 1
            continue
        target = _yolo_boxes(txt, img.shape[1], img.shape[0]) if txt is not None else truth[img_path.name]
        x, geom = pre(img, spec)
        inputs.append(x)
        targets.append(target)
        geoms.append(geom)
        names.append(img_path.name)
        frames.append(img)
        h.update(img_path.read_bytes())
        h.update(txt.read_bytes() if txt is not None else json.dumps({k: v.tolist() for k, v in target.items()})
                 .encode())
    return LabelledSet(f"{img_dir} + {labels}", "detection", np.concatenate(inputs, 0), targets, geoms, names,
                       h.hexdigest(), None, skipped, frames)


TASK = Detection()
