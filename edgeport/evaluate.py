"""Labelled validation data and task metrics, shared by every task.

Each task's host part (edgeport.tasks) reads its own kind of labelled set (label maps, class folders,
...) and scores outputs against it; what is left here is shared: the set itself, image reading and
preprocessing, a plain image folder (no ground truth: only agreement with the reference is measured),
and the dispatch to the task.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeport.calibration import IMAGE_EXTS, SYNTHETIC
from edgeport.config import SPLITS, resolve_path
from edgeport.errors import CalibrationError
from edgeport.preprocess import InputSpec
from edgeport.progress import progress
from edgeport.tasks import get as get_task
from edgeport.tasks import metric_keys

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
    spec: InputSpec | None = field(default=None, repr=False)  # what the inputs were made with (tasks read it)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def labelled(self) -> bool:
        """False for a plain image folder: only agreement with the reference can be measured."""
        return self.targets is not None

    def frames_digest(self) -> str:
        """A hash of the raw frames and their names, whatever the preprocessing: how `edgeport validate` knows it
        scores the very frames a build gated on (and so takes the same half)."""
        h = hashlib.sha256()
        for name, frame in zip(self.names, self.frames):
            h.update(name.encode())
            h.update(np.ascontiguousarray(frame).tobytes())
        return h.hexdigest()[:16]

    def subset(self, idx: list[int]) -> LabelledSet:
        """The samples at ``idx`` (NNCF's accuracy control ranks layers on subsets); its sha256 is the set's and
        the indices', so a build cache keyed by a subset (the selection half) sees a different split."""
        t = [self.targets[i] for i in idx] if isinstance(self.targets, list) else \
            None if self.targets is None else np.asarray(self.targets)[idx]
        sha = hashlib.sha256(f"{self.sha256}|{','.join(str(int(i)) for i in idx)}".encode()).hexdigest()
        return LabelledSet(self.source, self.task, self.inputs[idx], t, [self.geometries[i] for i in idx],
                           [self.names[i] for i in idx], sha, self.ignore_index, 0, [], self.spec)

    def joined(self, extra: LabelledSet) -> LabelledSet:
        """This set's frames, then ``extra``'s, as one unlabelled set: what INT8's choices measure agreement with
        FP32 on (their labelled metric reads this set alone)."""
        sha = hashlib.sha256(f"{self.sha256}+{extra.sha256}".encode()).hexdigest()
        return LabelledSet(f"{self.source} + {extra.source}", self.task, np.concatenate([self.inputs, extra.inputs]),
                           None, list(self.geometries) + list(extra.geometries), list(self.names) + list(extra.names),
                           sha, self.ignore_index, spec=self.spec or extra.spec)

    def summary(self) -> dict[str, Any]:
        """Manifest form."""
        return {"source": self.source, "count": len(self), "skipped": self.skipped, "sha256": self.sha256,
                "ignore_index": self.ignore_index, "labelled": self.labelled}


def unlabelled(source: str, task: str, inputs: np.ndarray, sha256: str, spec: InputSpec | None,
               prefix: str = "frame") -> LabelledSet:
    """Preprocessed frames without labels (calibration frames held back for INT8's decisions), named
    ``{prefix}_{i:05d}`` in their order: one sequence of neighbouring frames for the bootstrap's blocks."""
    n = len(inputs)
    return LabelledSet(source, task, inputs, None, [{} for _ in range(n)], [f"{prefix}_{i:05d}" for i in range(n)],
                       sha256, spec=spec)


def read_image(path: Path, flags: int) -> np.ndarray | None:
    """The image decoded with OpenCV's ``flags``; None when it cannot be decoded, or when its header declares more
    than HOST_MAX_PIXELS (said in a warning line: it is never decoded)."""
    from edgeport.runner.images import HOST_MAX_PIXELS, ImageTooLarge, decode_image

    try:
        return decode_image(path.read_bytes(), HOST_MAX_PIXELS, flags, str(path))
    except ImageTooLarge as e:
        log.warning("skipped %s: edgeport does not decode larger images", e)
        return None


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def load_labelled(images: str, labels: str | None, spec: InputSpec, *, max_images: int = 500,
                  root: Path | None = None) -> LabelledSet:
    """Load a labelled set for ``spec``'s task; CalibrationError naming what is wrong."""
    if images.startswith(SYNTHETIC):
        found = get_task(spec.task).synthetic(images, spec, max_images)
    else:
        img_dir = resolve_path(images, root)
        if not img_dir.is_dir():
            raise CalibrationError(f"validation images {img_dir}: not a folder")
        found = get_task(spec.task).load(img_dir, resolve_path(labels, root) if labels else None, spec, max_images)
        found = found if found is not None else _unlabelled(img_dir, spec, max_images)
    found.spec = spec
    return found


def pick(items: list[Any], limit: int) -> list[Any]:
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def _unlabelled(img_dir: Path, spec: InputSpec, limit: int) -> LabelledSet:
    """Images without ground truth: agreement with the reference only."""
    files = image_files(img_dir)
    if len(files) < MIN_LABELLED:
        raise CalibrationError(f"validation folder {img_dir} holds {len(files)} image(s); at least {MIN_LABELLED} "
                               "are needed")
    return read_images([(p, None) for p in files], spec, limit, str(img_dir), spec.task)


def read_images(entries: list[tuple[Path, int | None]], spec: InputSpec, limit: int, source: str,
                 task: str) -> LabelledSet:
    """Decode, preprocess and hash (image, class id or None) entries; undecodable ones are counted."""
    import cv2

    h = hashlib.sha256(spec_key(spec))
    inputs, targets, geoms, names, frames, skipped = [], [], [], [], [], 0
    for path, cid in progress(pick(entries, limit), "reading validation images"):
        img = read_image(path, cv2.IMREAD_COLOR)
        if img is None:
            skipped += 1
            continue
        x, geom = pre(img, spec)
        inputs.append(x)
        targets.append(cid)
        geoms.append(geom)
        names.append(f"{path.parent.name}/{path.name}" if cid is not None else path.name)
        frames.append(img)
        h.update(path.read_bytes())
    labelled = all(t is not None for t in targets)
    return LabelledSet(source, task, np.concatenate(inputs, 0), np.asarray(targets) if labelled else None, geoms,
                       names, h.hexdigest(), None, skipped, frames)


def pre(frame: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, dict[str, Any]]:
    from edgeport.runner.preprocess import preprocess

    return preprocess(frame, spec.to_dict())


def spec_key(spec: InputSpec) -> bytes:
    """Bytes that change when the preprocessing changes."""
    return repr(sorted(spec.to_dict().items())).encode()


# ---------------------------------------------------------------- metrics
def task_metrics(outputs: np.ndarray, ds: LabelledSet, layout: str = "NCHW") -> dict[str, float]:
    """The task's metrics in percent (mIoU and pixel accuracy, top-1/top-5 accuracy, ...), by the task's host
    part. ``outputs`` is the first model output for every sample, stacked (N, ...). An unlabelled set
    gives {}."""
    if not ds.labelled:
        return {}
    return get_task(ds.task).metrics(outputs, ds, layout)


def primary(metrics: dict[str, float]) -> tuple[str, float | None]:
    """The headline metric: (its key, value), the key being the task's (e.g. 'miou', 'top1'); ('agreement', v)
    where agreement with FP32 stands in for a metric (unlabelled data under accuracy control), else
    ('agreement', None) for unlabelled data."""
    for key in metric_keys():
        if key in metrics:
            return key, metrics[key]
    return "agreement", metrics.get("agreement")


def pack(outs: dict[str, np.ndarray], ds: LabelledSet) -> np.ndarray:
    """A model's outputs (all of them, by name, in the model's order) as the set's task reads them: the first
    output for classification and segmentation, boxes and scores together for detection."""
    assert ds.spec is not None, "load_labelled sets the spec"
    return get_task(ds.task).pack(outs, list(outs), ds.spec)


def halves(n: int, split: str = "blocks", groups: list[str] | None = None) -> dict[str, list[int]]:
    """Honest selection's split of a set of ``n`` samples in its sorted order into {"selection": indices,
    "report": indices}; a set of one is not split (both halves are that sample).

    ``blocks`` (the default): within each group (``groups[i]`` is sample i's: its class folder; one group when
    None), the first half in sorted order selects and the second half reports (the odd one out selects), so the
    frames of one video stay on one side: neighbouring frames are near copies, and a split that alternates them
    lets the report half see what the selection half tuned on. ``alternate``: even positions select, odd
    positions report (for sets of independent images)."""
    if n < 2:
        return {"selection": list(range(n)), "report": list(range(n))}
    if split == "alternate":
        return {"selection": list(range(0, n, 2)), "report": list(range(1, n, 2))}
    if split != "blocks":
        raise ValueError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
    members: dict[str, list[int]] = {}
    for i in range(n):
        members.setdefault(groups[i] if groups else "", []).append(i)
    out: dict[str, list[int]] = {"selection": [], "report": []}
    for idx in members.values():
        cut = (len(idx) + 1) // 2
        out["selection"] += idx[:cut]
        out["report"] += idx[cut:]
    if not out["report"]:  # every group of one sample: alternate over the groups instead
        return halves(n, "alternate")
    return {k: sorted(v) for k, v in out.items()}


def split_halves(ds: LabelledSet, split: str = "blocks") -> dict[str, list[int]]:
    """:func:`halves` of a loaded set, its groups being the samples' folders (a classification set's classes)."""
    import posixpath

    return halves(len(ds), split, [posixpath.dirname(name) for name in ds.names])


def score(got: np.ndarray, fp32: np.ndarray, ds: LabelledSet, layout: str) -> tuple[str, float]:
    """(metric key, points) of packed outputs ``got``: the task metric on a labelled set, else agreement with the
    float model's packed outputs ``fp32`` in percent (what accuracy-aware INT8 holds within max_drop)."""
    if ds.labelled:
        key, value = primary(task_metrics(got, ds, layout))
        if value is not None:
            return key, float(value)
    assert ds.spec is not None, "load_labelled sets the spec"
    return "agreement", 100.0 * float(get_task(ds.task).agreement(fp32, got, ds.spec))


NOISE = 1e-3  # of each image's standard deviation: about a tenth of what one INT8 rounding adds to a tensor


def noisy(inputs: np.ndarray, rel: float = NOISE, seed: int = 0) -> np.ndarray:
    """``inputs`` with seeded Gaussian noise of ``rel`` times each sample's own standard deviation added."""
    x = np.asarray(inputs, np.float32)
    sd = x.reshape(len(x), -1).std(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
    noise = np.random.default_rng(seed).standard_normal(x.shape, dtype=np.float32)
    return x + noise * np.float32(rel) * sd.astype(np.float32)


def noise_floor(onnx: Path, ds: LabelledSet, fp32: np.ndarray, layout: str) -> tuple[str, float]:
    """What the float model itself loses on ``ds`` when every input carries noise of NOISE times its standard
    deviation: (metric key, drop in points; agreement with its clean outputs ``fp32`` on an unlabelled set).

    INT8 rounds every quantized tensor with an error of about 1 % of its standard deviation (a step of range/255,
    ranges of 6-8 standard deviations), ten times this noise, and does so at every layer. A model that already
    loses max_drop to it amplifies small perturbations (seen on MobileNetV3 with random weights: 0.1 % at the input
    became 2.3 % at the output), and no placement of INT8 layers holds it: it wants FP16, or trained weights."""
    from edgeport.backends.onnxruntime.backend import BACKEND as ORT

    with ORT.open_onnx(onnx) as rt:
        got = pack(rt.run_batches(noisy(ds.inputs)), ds)
    key, clean = score(fp32, fp32, ds, layout)
    return key, clean - score(got, fp32, ds, layout)[1]
