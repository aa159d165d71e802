"""The one input and preprocessing spec, declared once.

``InputSpec`` is the typed host-side form. It serialises to the manifest's "input" and
"preprocess" sections, and is applied by ``edgeport.runner.preprocess``: the same numpy
code every bundle's runner.py embeds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edgeport.errors import ConfigError
from edgeport.tasks import NAMES
from edgeport.tasks import get as get_task

Resize = Literal["stretch", "letterbox", "shorter-crop"]
RESIZES = ("stretch", "letterbox", "shorter-crop")
TASKS = NAMES
LAYOUTS = ("NCHW", "NHWC")
COLORS = ("RGB", "BGR")
INTERPOLATIONS = ("linear", "nearest", "area", "cubic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InputSpec:
    """What the model takes and how a camera frame becomes that.

    Frames arrive as OpenCV gives them (BGR uint8); ``color`` is the order the model
    was trained on. The arithmetic is ``(pixel * scale - mean) / std`` per channel.
    """

    name: str = "input"
    shape: tuple[int, ...] = (1, 3, 224, 224)
    dtype: str = "float32"
    layout: str = "NCHW"
    resize: str = "stretch"
    interpolation: str = "linear"
    pad_value: int = 114
    resize_size: int | None = None
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    task: str = "classification"
    labels: list[str] = field(default_factory=list)
    palette: list[tuple[int, int, int]] = field(default_factory=list)
    ignore_index: int | None = None
    task_options: dict[str, Any] = field(default_factory=dict)  # the task's own settings (edgeport.tasks)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.mean = tuple(float(m) for m in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(s) for s in self.std)  # type: ignore[assignment]
        self.palette = [tuple(int(c) for c in p) for p in self.palette]  # type: ignore[misc]
        self.validate()

    def validate(self, where: str = "input spec") -> None:
        """Raise ConfigError naming the first bad field."""
        checks = [
            ("layout", self.layout, LAYOUTS),
            ("resize", self.resize, RESIZES),
            ("color", self.color, COLORS),
            ("task", self.task, TASKS),
            ("interpolation", self.interpolation, INTERPOLATIONS),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(allowed)}")
        if len(self.shape) != 4 or any(s <= 0 for s in self.shape):
            raise ConfigError(f"{where}: shape {list(self.shape)} must be 4 positive sizes, e.g. 1x3x224x224")
        channels = self.shape[1] if self.layout == "NCHW" else self.shape[3]
        if channels != 3:
            raise ConfigError(f"{where}: shape {list(self.shape)} has {channels} channels for layout "
                              f"{self.layout}; camera images have 3")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"{where}: mean and std need 3 values each")
        if any(s == 0 for s in self.std):
            raise ConfigError(f"{where}: std {list(self.std)} holds a zero")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"{where}: dtype {self.dtype!r} must be float32 or float16")
        if self.palette and self.labels and len(self.palette) != len(self.labels):
            raise ConfigError(f"{where}: {len(self.labels)} labels but {len(self.palette)} palette colours")
        self.task_options = get_task(self.task).check_options(dict(self.task_options), where)

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return (self.shape[2], self.shape[3]) if self.layout == "NCHW" else (self.shape[1], self.shape[2])

    def with_layout(self, layout: str) -> InputSpec:
        """The same spec for a model that takes ``layout`` (onnx2tf turns NCHW into NHWC)."""
        if layout == self.layout:
            return self
        n, a, b, c = self.shape
        shape = (n, b, c, a) if layout == "NHWC" else (n, c, a, b)
        return dataclasses.replace(self, layout=layout, shape=shape)

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (plain JSON types)."""
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["palette"] = [list(p) for p in self.palette]
        if not self.task_options:  # tasks without options keep the manifest (and every hash) they always had
            del d["task_options"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"input spec: unknown key(s) {', '.join(unknown)}")
        return cls(**d)

    def apply(self, frame_bgr: np.ndarray) -> np.ndarray:
        """Preprocess one BGR uint8 frame into a (1, ...) float32 model input."""
        from edgeport.runner.preprocess import preprocess

        return preprocess(frame_bgr, self.to_dict())[0]

    def apply_batch(self, frames_bgr: list[np.ndarray]) -> np.ndarray:
        """Preprocess frames into one (N, ...) float32 array."""
        from edgeport.runner.preprocess import preprocess_batch

        return preprocess_batch(frames_bgr, self.to_dict())


def default_spec() -> InputSpec:
    """The embedded default model's spec (road segmentation, 120x160)."""
    from edgeport.zoo.scene import SCENE_CLASSES, SCENE_PALETTE

    return InputSpec(
        name="image",
        shape=(1, 3, 120, 160),
        task="segmentation",
        labels=list(SCENE_CLASSES),
        palette=[tuple(p) for p in SCENE_PALETTE],
    )


def to_layout(arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """A 4-D array from layout ``src`` (NCHW or NHWC) to ``dst``; other ranks pass through."""
    if src == dst or arr.ndim != 4:
        return arr
    return arr.transpose(0, 2, 3, 1) if dst == "NHWC" else arr.transpose(0, 3, 1, 2)
