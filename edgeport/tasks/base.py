"""The host side of the task seam: what each task supplies to the shared pipeline.

A task's host part reads its kind of labelled data, scores a model's outputs against it, names its
headline metric, and says which validation inputs it takes. Its runner part (edgeport.runner.task)
supplies agreement between raw outputs, postprocessing and drawing, on the host and on the device.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.errors import CalibrationError

if TYPE_CHECKING:
    from edgeport.evaluate import LabelledSet
    from edgeport.preprocess import InputSpec


class Task:
    """One task's host part. Subclasses set the class attributes and implement ``load`` and ``metrics``."""

    name = ""
    primary = ""  # the headline metric's key in metrics(), e.g. "miou"
    label = ""  # how tables name it, e.g. "mIoU"
    label_folder = False  # takes a separate folder of labels (--val-labels)
    labelled_how = ""  # how a labelled set of this task is laid out, for error messages

    def load(self, img_dir: Path, labels: Path | None, spec: InputSpec, limit: int) -> LabelledSet | None:
        """This task's labelled set from ``img_dir`` (and ``labels``), or None when the folder holds no
        ground truth of this task (shared code then reads it as plain images)."""
        raise NotImplementedError

    def synthetic(self, source: str, spec: InputSpec, limit: int) -> LabelledSet:
        """Labelled data from the embedded generator; only tasks it renders ground truth for have it."""
        from edgeport.calibration import SYNTHETIC

        raise CalibrationError(f"{SYNTHETIC} validation data is road-scene segmentation; this model does {self.name}")

    def metrics(self, outputs: np.ndarray, ds: LabelledSet, layout: str) -> dict[str, Any]:
        """This task's metrics in percent (with ``count``) from the first output of every sample (N, ...)."""
        raise NotImplementedError
