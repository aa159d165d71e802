"""Segmentation on the host: label-map sets, the synthetic road scenes, mIoU and pixel accuracy.

A labelled set is an image folder plus a label-map folder, matched by file stem (CamVid's ``val/`` +
``valannot/``); label maps hold class ids, ``ignore_index`` is not counted. ``synthetic://[?n=&seed=]``
is the embedded road-scene generator with its pixel-exact labels (the default model's own domain).
Predictions are scored at the label map's resolution: the class map is mapped back onto the frame the
same way the runner draws it (undoing letterbox and crop).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.errors import CalibrationError
from edgeport.progress import progress
from edgeport.tasks.base import Task, class_logit_kl
from edgeport.tasks.segmentation.runner import mask_to_frame, segment

if TYPE_CHECKING:
    from edgeport.evaluate import LabelledSet
    from edgeport.preprocess import InputSpec

log = logging.getLogger("edgeport")


class Segmentation(Task):
    name = "segmentation"
    primary = "miou"
    label = "mIoU"
    short = "mIoU"
    label_folder = True
    labelled_how = "segmentation label maps go in --val-labels, matched to --val-images by file stem"

    def load(self, img_dir: Path, labels: Path | None, spec: InputSpec, limit: int) -> LabelledSet | None:
        import cv2

        from edgeport.evaluate import MIN_LABELLED, LabelledSet, image_files, pick, pre, read_image, spec_key

        if labels is None:
            return None
        if not labels.is_dir():
            raise CalibrationError(f"validation labels {labels}: not a folder")
        label_files = {p.stem: p for p in image_files(labels)}
        pairs = [(p, label_files[p.stem]) for p in image_files(img_dir) if p.stem in label_files]
        unmatched = len(image_files(img_dir)) - len(pairs)
        if len(pairs) < MIN_LABELLED:
            raise CalibrationError(f"{img_dir} and {labels}: {len(pairs)} image/label pair(s) share a file stem; "
                                   f"at least {MIN_LABELLED} are needed")
        if unmatched:
            log.warning("%d validation image(s) in %s have no label map in %s", unmatched, img_dir, labels)
        h = hashlib.sha256(spec_key(spec))
        inputs, targets, geoms, names, frames, skipped = [], [], [], [], [], 0
        for img_path, lab_path in progress(pick(pairs, limit), "reading validation images"):
            img = read_image(img_path, cv2.IMREAD_COLOR)
            lab = read_image(lab_path, cv2.IMREAD_UNCHANGED)
            if img is None or lab is None:
                skipped += 1
                continue
            if lab.ndim == 3:
                raise CalibrationError(f"label map {lab_path} has {lab.shape[2]} channels; expected a "
                                       "single-channel map of class ids (not a colour rendering)")
            x, geom = pre(img, spec)
            inputs.append(x)
            targets.append(lab)
            geoms.append(geom)
            names.append(img_path.stem)
            frames.append(img)
            h.update(img_path.read_bytes())
            h.update(lab_path.read_bytes())
        return LabelledSet(f"{img_dir} + {labels}", self.name, np.concatenate(inputs, 0), targets, geoms, names,
                           h.hexdigest(), spec.ignore_index, skipped, frames)

    def synthetic(self, source: str, spec: InputSpec, limit: int) -> LabelledSet:
        from edgeport.calibration import synthetic_params
        from edgeport.evaluate import LabelledSet, pre, spec_key
        from edgeport.zoo.scene import render_scene

        q = synthetic_params(source, ("n", "seed", "width", "height"))
        n, seed = min(q.get("n", 64), limit), q.get("seed", 2_000_000)
        h, w = q.get("height", 2 * spec.hw[0]), q.get("width", 2 * spec.hw[1])
        inputs, targets, geoms, frames = [], [], [], []
        for i in progress(range(n), "rendering validation scenes"):
            frame, label = render_scene(seed + i, h, w)
            x, geom = pre(frame, spec)
            inputs.append(x)
            targets.append(label)
            geoms.append(geom)
            frames.append(frame)
        digest = hashlib.sha256(spec_key(spec) + f"{source}|{n}|{seed}|{h}x{w}".encode()).hexdigest()
        return LabelledSet(source, self.name, np.concatenate(inputs, 0), targets, geoms,
                           [f"synthetic-{seed + i}" for i in range(n)], digest, spec.ignore_index, 0, frames)

    def model_targets(self, ds: LabelledSet) -> np.ndarray:
        """Each label map taken into the model's pixels through its frame's geometry (nearest; padding, the
        ignore class and ids past the classes become -100)."""
        assert ds.spec is not None
        from edgeport.runner.preprocess import input_hw

        hw = input_hw(ds.spec.to_dict())
        n_classes = len(ds.spec.labels) or None
        return np.stack([label_to_model(lab, geom, hw, ds.ignore_index, n_classes)
                         for lab, geom in zip(ds.targets, ds.geometries)])

    def supervised_loss(self, student: list[Any], targets: Any) -> Any:
        """Per-pixel cross-entropy, the label maps brought to the output's size (nearest) when it is smaller."""
        import torch.nn.functional as F

        out = student[0]
        if targets.shape[-2:] != out.shape[-2:]:
            targets = F.interpolate(targets[:, None].float(), size=out.shape[-2:], mode="nearest")[:, 0].long()
        return F.cross_entropy(out, targets, ignore_index=-100)

    def distill_loss(self, student: list[Any], teacher: list[Any]) -> Any:
        """KL divergence between the softened class distributions of the first output, per pixel."""
        return class_logit_kl(student[0], teacher[0])

    def metrics(self, outputs: np.ndarray, ds: LabelledSet, layout: str) -> dict[str, Any]:
        """mIoU and pixel accuracy in percent."""
        return segmentation_metrics([segment(outputs[i:i + 1], layout == "NHWC") for i in range(len(outputs))],
                                    ds, outputs.shape[-1 if layout == "NHWC" else 1])

    def frame_stats(self, outputs: np.ndarray, ds: LabelledSet, layout: str) -> np.ndarray:
        """(N, classes, classes): each frame's confusion matrix (``confusions``)."""
        return confusions([segment(outputs[i:i + 1], layout == "NHWC") for i in range(len(outputs))], ds,
                          outputs.shape[-1 if layout == "NHWC" else 1])

    def metric_of(self, stats: np.ndarray) -> float:
        """mIoU of a summed confusion matrix."""
        return scores_of(stats)["miou"]


def segmentation_metrics(masks: list[np.ndarray], ds: LabelledSet, n_classes: int) -> dict[str, float]:
    """mIoU over the classes present in labels or predictions, and pixel accuracy, at label resolution."""
    return {**scores_of(confusions(masks, ds, n_classes).sum(0)), "count": len(masks)}


def confusions(masks: list[np.ndarray], ds: LabelledSet, n_classes: int) -> np.ndarray:
    """(N, classes, classes) int64: each frame's confusion matrix (label row, prediction column) at label
    resolution, ignored pixels left out; their sum scores the set, a resample of them a bootstrap."""
    conf = np.zeros((len(masks), n_classes, n_classes), np.int64)
    for i, (mask, label, geom) in enumerate(zip(masks, ds.targets, ds.geometries)):
        pred = mask_to_frame(mask, geom, label.shape[:2]).astype(np.int64)
        label = label.astype(np.int64)
        keep = (label >= 0) & (label < n_classes)
        if ds.ignore_index is not None:
            keep &= label != ds.ignore_index
        conf[i] = np.bincount(label[keep] * n_classes + pred[keep], minlength=n_classes ** 2).reshape(n_classes,
                                                                                                      n_classes)
    return conf


def scores_of(conf: np.ndarray) -> dict[str, float]:
    """mIoU (over the classes present in labels or predictions) and pixel accuracy, in percent, of one summed
    confusion matrix."""
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    iou = inter[present] / union[present]
    return {"miou": 100 * float(iou.mean()) if iou.size else 0.0,
            "pixel_acc": 100 * float(inter.sum() / max(conf.sum(), 1))}


TASK = Segmentation()


def label_to_model(label: np.ndarray, geom: dict[str, Any], hw: tuple[int, int], ignore: int | None,
                   n_classes: int | None) -> np.ndarray:
    """One label map (frame pixels) in model pixels (H, W) int64, through the resize its image went through:
    stretched, letterboxed (the padding -100) or cropped; ignored and unknown ids -100."""
    import cv2

    h, w = hw
    left, top, right, bottom = [int(round(v)) for v in geom["box"]]
    lab = label.astype(np.int32)
    if geom["mode"] == "shorter-crop":  # the box is the model's view in frame pixels
        out = cv2.resize(lab[max(top, 0):bottom, max(left, 0):right], (w, h), interpolation=cv2.INTER_NEAREST)
    elif geom["mode"] == "letterbox":  # the box is the frame's place in model pixels
        out = np.full((h, w), -100, np.int32)
        out[top:bottom, left:right] = cv2.resize(lab, (right - left, bottom - top), interpolation=cv2.INTER_NEAREST)
    else:
        out = cv2.resize(lab, (w, h), interpolation=cv2.INTER_NEAREST)
    out = out.astype(np.int64)
    if ignore is not None:
        out[out == ignore] = -100
    if n_classes:
        out[out >= n_classes] = -100
    return out
