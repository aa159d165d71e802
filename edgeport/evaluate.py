"""Labelled validation data and task metrics (mIoU, pixel accuracy, top-1/top-5).

A labelled set is one of:

* segmentation: an image folder plus a label-map folder, matched by file stem (CamVid's
  ``val/`` + ``valannot/``); label maps hold class ids, ``ignore_index`` is not counted;
* classification: an image folder with one sub-folder per class, named by the label
  (or by the class index when the model has no labels);
* a plain image folder: no ground truth; only agreement with the reference is measured;
* ``synthetic://[?n=&seed=]``: the embedded road-scene generator with its pixel-exact labels
  (the default model's own domain).

Predictions are scored at the label map's resolution: the class map is mapped back onto
the frame the same way the runner draws it (undoing letterbox and crop).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

import numpy as np

from edgeport.calibration import IMAGE_EXTS, SYNTHETIC
from edgeport.config import resolve_path
from edgeport.errors import CalibrationError
from edgeport.preprocess import InputSpec
from edgeport.progress import progress

log = logging.getLogger("edgeport")
MIN_LABELLED = 8


@dataclass
class LabelledSet:
    """Preprocessed inputs with their ground truth."""

    source: str
    task: str
    inputs: np.ndarray  # (N, ...) float32 in the spec's layout
    targets: list[np.ndarray] | np.ndarray | None  # label maps (H, W) per image, (N,) class ids, or None
    geometries: list[dict[str, Any]]
    names: list[str]
    sha256: str
    ignore_index: int | None = None
    skipped: int = 0
    frames: list[np.ndarray] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def labelled(self) -> bool:
        """False for a plain image folder: only agreement with the reference can be measured."""
        return self.targets is not None

    def subset(self, idx: list[int]) -> LabelledSet:
        """The samples at ``idx`` (NNCF's accuracy control ranks layers on subsets)."""
        t = [self.targets[i] for i in idx] if isinstance(self.targets, list) else \
            None if self.targets is None else np.asarray(self.targets)[idx]
        return LabelledSet(self.source, self.task, self.inputs[idx], t, [self.geometries[i] for i in idx],
                           [self.names[i] for i in idx], self.sha256, self.ignore_index, 0, [])

    def summary(self) -> dict[str, Any]:
        """Manifest form."""
        return {"source": self.source, "count": len(self), "skipped": self.skipped, "sha256": self.sha256,
                "ignore_index": self.ignore_index, "labelled": self.labelled}


def _read_image(path: Path, flags: int) -> np.ndarray | None:
    import cv2

    raw = path.read_bytes()
    return cv2.imdecode(np.frombuffer(raw, np.uint8), flags) if raw else None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def load_labelled(images: str, labels: str | None, spec: InputSpec, *, max_images: int = 500,
                  root: Path | None = None) -> LabelledSet:
    """Load a labelled set for ``spec``'s task; CalibrationError naming what is wrong."""
    if images.startswith(SYNTHETIC):
        return _synthetic(images, spec, max_images)
    img_dir = resolve_path(images, root)
    if not img_dir.is_dir():
        raise CalibrationError(f"validation images {img_dir}: not a folder")
    if spec.task == "segmentation" and labels:
        return _segmentation(img_dir, resolve_path(labels, root), spec, max_images)
    if spec.task == "classification" and any(p.is_dir() for p in img_dir.iterdir()):
        return _classification(img_dir, spec, max_images)
    return _unlabelled(img_dir, spec, max_images)


def _pick(items: list[Any], limit: int) -> list[Any]:
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _segmentation(img_dir: Path, lab_dir: Path, spec: InputSpec, limit: int) -> LabelledSet:
    import cv2

    if not lab_dir.is_dir():
        raise CalibrationError(f"validation labels {lab_dir}: not a folder")
    label_files = {p.stem: p for p in _images(lab_dir)}
    pairs = [(p, label_files[p.stem]) for p in _images(img_dir) if p.stem in label_files]
    unmatched = len(_images(img_dir)) - len(pairs)
    if len(pairs) < MIN_LABELLED:
        raise CalibrationError(f"{img_dir} and {lab_dir}: {len(pairs)} image/label pair(s) share a file stem; "
                               f"at least {MIN_LABELLED} are needed")
    if unmatched:
        log.warning("%d validation image(s) in %s have no label map in %s", unmatched, img_dir, lab_dir)
    h = hashlib.sha256(spec_key(spec))
    inputs, targets, geoms, names, frames, skipped = [], [], [], [], [], 0
    for img_path, lab_path in progress(_pick(pairs, limit), "reading validation images"):
        img = _read_image(img_path, cv2.IMREAD_COLOR)
        lab = _read_image(lab_path, cv2.IMREAD_UNCHANGED)
        if img is None or lab is None:
            skipped += 1
            continue
        if lab.ndim == 3:
            raise CalibrationError(f"label map {lab_path} has {lab.shape[2]} channels; expected a single-channel "
                                   "map of class ids (not a colour rendering)")
        x, geom = _pre(img, spec)
        inputs.append(x)
        targets.append(lab)
        geoms.append(geom)
        names.append(img_path.stem)
        frames.append(img)
        h.update(img_path.read_bytes())
        h.update(lab_path.read_bytes())
    return LabelledSet(f"{img_dir} + {lab_dir}", "segmentation", np.concatenate(inputs, 0), targets, geoms, names,
                       h.hexdigest(), spec.ignore_index, skipped, frames)


def _classification(img_dir: Path, spec: InputSpec, limit: int) -> LabelledSet:
    classes = sorted(p for p in img_dir.iterdir() if p.is_dir())
    if not classes:
        raise CalibrationError(f"classification validation folder {img_dir} has no class sub-folders "
                               "(expected DIR/<label>/image.jpg)")
    index = {name: i for i, name in enumerate(spec.labels)}
    pairs = []
    for c in classes:
        if c.name in index:
            cid = index[c.name]
        elif c.name.isdigit():
            cid = int(c.name)
        else:
            raise CalibrationError(f"{c}: folder name '{c.name}' is neither one of the model's labels nor a "
                                   "class index")
        pairs += [(p, cid) for p in _images(c)]
    if len(pairs) < MIN_LABELLED:
        raise CalibrationError(f"{img_dir}: {len(pairs)} labelled image(s); at least {MIN_LABELLED} are needed")
    return _read_images(pairs, spec, limit, str(img_dir), "classification")


def _unlabelled(img_dir: Path, spec: InputSpec, limit: int) -> LabelledSet:
    """Images without ground truth: agreement with the reference only."""
    files = _images(img_dir)
    if len(files) < MIN_LABELLED:
        raise CalibrationError(f"validation folder {img_dir} holds {len(files)} image(s); at least {MIN_LABELLED} "
                               "are needed")
    return _read_images([(p, None) for p in files], spec, limit, str(img_dir), spec.task)


def _read_images(entries: list[tuple[Path, int | None]], spec: InputSpec, limit: int, source: str,
                 task: str) -> LabelledSet:
    """Decode, preprocess and hash (image, class id or None) entries; undecodable ones are counted."""
    import cv2

    h = hashlib.sha256(spec_key(spec))
    inputs, targets, geoms, names, frames, skipped = [], [], [], [], [], 0
    for path, cid in progress(_pick(entries, limit), "reading validation images"):
        img = _read_image(path, cv2.IMREAD_COLOR)
        if img is None:
            skipped += 1
            continue
        x, geom = _pre(img, spec)
        inputs.append(x)
        targets.append(cid)
        geoms.append(geom)
        names.append(f"{path.parent.name}/{path.name}" if cid is not None else path.name)
        frames.append(img)
        h.update(path.read_bytes())
    labelled = all(t is not None for t in targets)
    return LabelledSet(source, task, np.concatenate(inputs, 0), np.asarray(targets) if labelled else None, geoms,
                       names, h.hexdigest(), None, skipped, frames)


def _synthetic(source: str, spec: InputSpec, limit: int) -> LabelledSet:
    from edgeport.zoo.scene import render_scene

    if spec.task != "segmentation":
        raise CalibrationError(f"{SYNTHETIC} validation data is road-scene segmentation; this model does "
                               f"{spec.task}")
    q = dict(parse_qsl(urlparse(source).query))
    n, seed = min(int(q.get("n", 64)), limit), int(q.get("seed", 2_000_000))
    h, w = int(q.get("height", 2 * spec.hw[0])), int(q.get("width", 2 * spec.hw[1]))
    inputs, targets, geoms, frames = [], [], [], []
    for i in progress(range(n), "rendering validation scenes"):
        frame, label = render_scene(seed + i, h, w)
        x, geom = _pre(frame, spec)
        inputs.append(x)
        targets.append(label)
        geoms.append(geom)
        frames.append(frame)
    digest = hashlib.sha256(spec_key(spec) + f"{source}|{n}|{seed}|{h}x{w}".encode()).hexdigest()
    return LabelledSet(source, "segmentation", np.concatenate(inputs, 0), targets, geoms,
                       [f"synthetic-{seed + i}" for i in range(n)], digest, spec.ignore_index, 0, frames)


def _pre(frame: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, dict[str, Any]]:
    from edgeport.runner.preprocess import preprocess

    return preprocess(frame, spec.to_dict())


def spec_key(spec: InputSpec) -> bytes:
    """Bytes that change when the preprocessing changes."""
    return repr(sorted(spec.to_dict().items())).encode()


# ---------------------------------------------------------------- metrics
def task_metrics(outputs: np.ndarray, ds: LabelledSet, layout: str = "NCHW") -> dict[str, float]:
    """mIoU and pixel accuracy (segmentation) or top-1/top-5 accuracy (classification), in percent.

    ``outputs`` is the first model output for every sample, stacked (N, ...). An unlabelled
    set gives {}.
    """
    if not ds.labelled:
        return {}
    if ds.task == "classification":
        logits = outputs.reshape(len(outputs), -1)
        order = np.argsort(-logits, axis=1)
        t = np.asarray(ds.targets)
        top1 = float(np.mean(order[:, 0] == t))
        top5 = float(np.mean([t[i] in order[i, :5] for i in range(len(t))]))
        return {"top1": 100 * top1, "top5": 100 * top5, "count": len(t)}
    from edgeport.runner.core import segment

    return segmentation_metrics([segment(outputs[i:i + 1], layout == "NHWC") for i in range(len(outputs))], ds,
                                outputs.shape[-1 if layout == "NHWC" else 1])


def segmentation_metrics(masks: list[np.ndarray], ds: LabelledSet, n_classes: int) -> dict[str, float]:
    """mIoU over the classes present in labels or predictions, and pixel accuracy, at label resolution."""
    from edgeport.runner.core import mask_to_frame

    conf = np.zeros((n_classes, n_classes), np.int64)
    for mask, label, geom in zip(masks, ds.targets, ds.geometries):
        pred = mask_to_frame(mask, geom, label.shape[:2]).astype(np.int64)
        label = label.astype(np.int64)
        keep = (label >= 0) & (label < n_classes)
        if ds.ignore_index is not None:
            keep &= label != ds.ignore_index
        conf += np.bincount(label[keep] * n_classes + pred[keep], minlength=n_classes ** 2).reshape(n_classes,
                                                                                                    n_classes)
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    iou = inter[present] / union[present]
    return {"miou": 100 * float(iou.mean()) if iou.size else 0.0,
            "pixel_acc": 100 * float(inter.sum() / max(conf.sum(), 1)), "count": len(masks)}


def primary(metrics: dict[str, float]) -> tuple[str, float | None]:
    """The headline metric: ('miou', v) or ('top1', v); ('agreement', v) where agreement with FP32 stands in
    for a metric (unlabelled data under accuracy control), else ('agreement', None) for unlabelled data."""
    if "miou" in metrics:
        return "miou", metrics["miou"]
    if "top1" in metrics:
        return "top1", metrics["top1"]
    return "agreement", metrics.get("agreement")
