"""The one calibration-set type: frames from a folder, a video, a .npy, or the generator.

Frames are preprocessed by the input spec (the same code the runner runs), checked for
size and decodability, and content-hashed so the build cache knows when they change.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import numpy as np

from edgeport.config import resolve_path
from edgeport.errors import CalibrationError
from edgeport.preprocess import InputSpec
from edgeport.progress import progress

log = logging.getLogger("edgeport")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
RECOMMENDED = 300
# The floor: below ~50 frames, per-tensor activation ranges follow a handful of scenes (one
# bright frame sets a max range). NNCF's default subset is 300 and NVIDIA recommends ~500;
# Ultralytics' Jetson table shows INT8 losing half its mAP with 4 calibration images.
# 50 still admits small labelled sets such as CamVid val (101). The default model (homogeneous synthetic
# scenes) is too easy to show the floor (docs/benchmarks/code-figures.md).
MINIMUM = 50
SYNTHETIC = "synthetic://"
# INT8's accuracy-aware choices hold back the last quarter of a calibration set of HELD_FROM frames or more (at
# most HELD_MOST) from range measurement, to judge their choices on frames the ranges did not see.
HELD_FROM, HELD_MOST = 100, 100


@dataclass
class CalibrationSet:
    """Preprocessed calibration inputs plus what is known about where they came from."""

    source: str
    data: np.ndarray  # (N, *input shape[1:]) float32, preprocessed
    sha256: str
    skipped: int = 0
    frames: list[np.ndarray] = field(default_factory=list)  # first few raw BGR frames (golden inputs)
    names: list[str] = field(default_factory=list)  # names of those frames
    held: np.ndarray | None = None  # frames held back from range measurement, for INT8's decisions (hold_back)

    def __len__(self) -> int:
        return len(self.data)

    def hold_back(self) -> CalibrationSet:
        """The set less its last quarter (at most ``HELD_MOST`` frames), which it keeps as ``held``: frames the
        activation ranges are not measured on, on which INT8's choices are judged beside the validation set's
        selection half (a contiguous part, so neighbouring frames of a video do not sit on both sides). Itself
        when it has fewer than ``HELD_FROM`` frames."""
        if len(self) < HELD_FROM or self.held is not None:
            return self
        k = min(HELD_MOST, len(self) // 4)
        sha = hashlib.sha256(f"{self.sha256}|held back {k}".encode()).hexdigest()
        return CalibrationSet(self.source, self.data[:-k], sha, self.skipped, self.frames, self.names,
                              self.data[-k:])

    def summary(self) -> dict[str, object]:
        """Manifest form."""
        return {"source": self.source, "count": len(self), "skipped": self.skipped, "sha256": self.sha256,
                **({"held_back": len(self.held)} if self.held is not None else {})}

    def batches(self, size: int = 1):
        """Yield (size, ...) float32 arrays."""
        for i in range(0, len(self.data), size):
            yield self.data[i:i + size]

    def nhwc(self) -> np.ndarray:
        """The data in NHWC (onnx2tf's calibration layout)."""
        return self.data if self.data.shape[-1] == 3 else self.data.transpose(0, 2, 3, 1)


def _read_folder(path: Path, limit: int) -> tuple[list[np.ndarray], list[str], int, hashlib._Hash]:
    import cv2

    from edgeport.runner.images import HOST_MAX_PIXELS, ImageTooLarge, decode_image

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    others = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_EXTS]
    if not files:
        hint = f" ({len(others)} other file(s) there)" if others else ""
        raise CalibrationError(f"calibration folder {path} holds no images{hint}; expected "
                               f"{', '.join(IMAGE_EXTS)}")
    if len(files) > limit:  # spread the pick over the whole folder, deterministically
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
    h = hashlib.sha256()
    frames, names, bad, large = [], [], [], []
    for p in progress(files, "reading calibration images"):
        raw = p.read_bytes()
        try:
            img = decode_image(raw, HOST_MAX_PIXELS, cv2.IMREAD_COLOR, p.name)
        except ImageTooLarge as e:
            large.append(str(e))
            continue
        if img is None:
            bad.append(p.name)
            continue
        h.update(p.name.encode())
        h.update(hashlib.sha256(raw).digest())
        frames.append(img)
        names.append(p.name)
    if bad:  # one line for all of them: a folder of 10,000 broken files must not print 10,000 lines
        log.debug("undecodable calibration images in %s: %s", path, ", ".join(bad))
        log.warning("%d undecodable image(s) in %s skipped (e.g. %s)", len(bad), path, ", ".join(bad[:3]))
    if large:  # never decoded: a compression bomb of a few hundred KB can decode to gigabytes
        log.warning("%d image(s) in %s skipped as too large to decode (e.g. %s)", len(large), path, large[0])
    return frames, names, len(bad) + len(large), h


def _read_video(path: Path, limit: int) -> tuple[list[np.ndarray], list[str], int, hashlib._Hash]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise CalibrationError(f"cannot open video {path} (not a video, or no codec for it in OpenCV)")
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    total = declared or limit
    step = max(1, total // limit)
    frames, names, skipped, i = [], [], 0, 0
    h = hashlib.sha256()
    bar = progress(None, "reading calibration video", total=min(limit, total))
    while len(frames) < limit:
        ok = cap.grab()
        if not ok:
            break
        if i % step == 0:
            ok, img = cap.retrieve()
            if not ok or img is None:
                skipped += 1
            else:
                h.update(hashlib.sha256(img.tobytes()).digest())
                frames.append(img)
                names.append(f"{path.name}#{i}")
                bar.update(1)
        i += 1
    bar.close()
    cap.release()
    # Containers that estimate the count from the duration (mkv, webm) may be off by a frame or two.
    if declared and len(frames) < limit and i + max(2, declared // 100) < declared:
        raise CalibrationError(f"calibration video {path} is truncated or corrupt: it ended after {i} of the "
                               f"{declared} frames its header declares; re-encode or re-copy it")
    return frames, names, skipped, h


SYNTHETIC_KEYS = ("n", "seed", "width", "height", "objects")


def synthetic_params(source: str, keys: tuple[str, ...] = SYNTHETIC_KEYS) -> dict[str, int]:
    """The whole-number parameters of ``synthetic://?k=v&...``; CalibrationError naming an unknown key, a value
    that is not a whole number, or a size out of range (frames of 16 to 100 MP pixels a side)."""
    from edgeport.runner.images import HOST_MAX_PIXELS, megapixels

    parsed = urlparse(source)
    if parsed.path.strip("/") or parsed.netloc:
        raise CalibrationError(f"{source}: synthetic:// takes only parameters, e.g. {SYNTHETIC}?n=300")
    out: dict[str, int] = {}
    for key, value in parse_qsl(parsed.query, keep_blank_values=True):
        if key not in keys:
            raise CalibrationError(f"{source}: unknown parameter '{key}' (synthetic:// takes {', '.join(keys)})")
        try:
            out[key] = int(value)
        except ValueError:
            raise CalibrationError(f"{source}: {key}={value!r} is not a whole number") from None
        least = {"n": 1, "width": 16, "height": 16, "seed": 0, "objects": 0}[key]
        if out[key] < least or (key == "objects" and out[key] > 1):
            raise CalibrationError(f"{source}: {key}={value} " + ("must be 0 or 1" if key == "objects" else
                                                                   f"must be at least {least}"))
    if out.get("width", 1) * out.get("height", 1) > HOST_MAX_PIXELS:
        raise CalibrationError(f"{source}: {out['width']}x{out['height']} frames are over "
                               f"{megapixels(HOST_MAX_PIXELS)}")
    return out


def _synthetic(source: str, spec: InputSpec, limit: int) -> tuple[list[np.ndarray], list[str]]:
    """Road scenes (``objects=1``: with pedestrians and signs, as the detector sees them)."""
    from edgeport.zoo.scene import render_scene, render_scene_boxes

    q = synthetic_params(source)
    n = min(q.get("n", limit), limit)
    seed = q.get("seed", 1_000_000)
    h, w = q.get("height", spec.hw[0]), q.get("width", spec.hw[1])
    render = render_scene_boxes if q.get("objects") == 1 else render_scene
    frames = [render(seed + i, h, w)[0] for i in progress(range(n), "rendering synthetic frames")]
    return frames, [f"synthetic-{seed + i}" for i in range(n)]


def load_calibration(source: str, spec: InputSpec, *, max_images: int = RECOMMENDED, minimum: int = MINIMUM,
                     keep_frames: int = 8, root: Path | None = None) -> CalibrationSet:
    """Load and check a calibration set; CalibrationError with numbers when it cannot serve."""
    skipped = 0
    spec_hash = hashlib.sha256(repr(sorted(spec.to_dict().items())).encode()).digest()
    if source.startswith(SYNTHETIC):
        frames, names = _synthetic(source, spec, max_images)
        h = hashlib.sha256(f"{source}|{len(frames)}".encode())
        from edgeport.zoo import scene

        h.update(Path(scene.__file__).read_bytes())
    else:
        path = resolve_path(source, root)
        if not path.exists():
            raise CalibrationError(f"calibration source {path} does not exist")
        if path.is_dir():
            frames, names, skipped, h = _read_folder(path, max_images)
        elif path.suffix.lower() == ".npy":
            return _from_npy(path, spec, minimum, keep_frames)
        elif path.suffix.lower() in VIDEO_EXTS:
            frames, names, skipped, h = _read_video(path, max_images)
        else:
            raise CalibrationError(f"calibration source {path}: expected an image folder, a video "
                                   f"({', '.join(VIDEO_EXTS)}), a .npy or {SYNTHETIC}")
    _check_count(source, len(frames), skipped, minimum)
    h.update(spec_hash)
    data = np.concatenate([spec.apply(f) for f in progress(frames, "preprocessing calibration set")], 0)
    return CalibrationSet(source, data, h.hexdigest(), skipped, frames[:keep_frames], names[:keep_frames])


def _from_npy(path: Path, spec: InputSpec, minimum: int, keep_frames: int) -> CalibrationSet:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CalibrationError(f"cannot read {path}: {e}") from None
    h = hashlib.sha256(arr.tobytes())
    h.update(str(arr.shape).encode())
    if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] == 3:  # raw BGR frames
        frames = list(arr)
        _check_count(str(path), len(frames), 0, minimum)
        data = np.concatenate([spec.apply(f) for f in progress(frames, "preprocessing calibration set")], 0)
        names = [f"{path.name}[{i}]" for i in range(len(frames))]
        return CalibrationSet(str(path), data, h.hexdigest(), 0, frames[:keep_frames], names[:keep_frames])
    want = tuple(spec.shape[1:])
    if arr.ndim != 4 or tuple(arr.shape[1:]) != want:
        raise CalibrationError(f"{path}: shape {list(arr.shape)} is neither (N,H,W,3) uint8 BGR frames nor "
                               f"preprocessed inputs (N,{','.join(map(str, want))})")
    _check_count(str(path), len(arr), 0, minimum)
    return CalibrationSet(str(path), arr.astype(np.float32), h.hexdigest(), 0, [], [])


def _check_count(source: str, count: int, skipped: int, minimum: int) -> None:
    bad = f" ({skipped} undecodable skipped)" if skipped else ""
    if count < minimum:
        raise CalibrationError(f"calibration set {source} has {count} usable image(s){bad}; at least {minimum} "
                               f"are needed and {RECOMMENDED}+ recommended for INT8 ranges that hold")
    if count < RECOMMENDED and minimum > 1:  # minimum 1: samples for parity, not calibration
        log.warning("calibration set %s has %d image(s)%s; %d+ recommended for stable INT8 ranges",
                    source, count, bad, RECOMMENDED)


def check_source(source: str, root: Path | None = None) -> None:
    """CalibrationError for a source that cannot be read at all (checked before any expensive stage)."""
    if source.startswith(SYNTHETIC):
        synthetic_params(source)
        return
    path = resolve_path(source, root)
    if not path.exists():
        raise CalibrationError(f"calibration source {path} does not exist")
    if path.is_file() and path.suffix.lower() not in (".npy", *VIDEO_EXTS):
        raise CalibrationError(f"calibration source {path}: expected an image folder, a video "
                               f"({', '.join(VIDEO_EXTS)}), a .npy or {SYNTHETIC}")


def fingerprint(source: str, root: Path | None = None) -> str:
    """A content hash of a calibration source, read without decoding (the cache key).

    Folders hash every image file's name and bytes; videos and .npy their bytes; synthetic://
    its parameters and the generator's code.
    """
    h = hashlib.sha256(source.encode())
    if source.startswith(SYNTHETIC):
        from edgeport.zoo import scene

        h.update(Path(scene.__file__).read_bytes())
        return h.hexdigest()
    path = resolve_path(source, root)
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                h.update(p.name.encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
    elif path.is_file():
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    else:
        raise CalibrationError(f"calibration source {path} does not exist")
    return h.hexdigest()
