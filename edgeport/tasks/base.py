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
    label = ""  # how messages name it, e.g. "mIoU"
    short = ""  # how table cells name it, e.g. "mIoU"
    label_folder = False  # takes a separate folder of labels (--val-labels)
    labelled_how = ""  # how a labelled set of this task is laid out, for error messages
    # INT8 keeps the arithmetic after the last weighted layers (a detector's box decoding) in float where the
    # backend decides per op (OpenVINO): coordinates and offsets lose more to 8 bits than they save in time
    float_tail = False
    # INT8 choices (activation ranges) go by agreement with FP32 frame by frame (edgeport.quantize.evidence);
    # False: by the labelled metric's drop, where the task's per-frame agreement is too coarse to tell variants apart
    choice_by_agreement = True

    def float_outputs(self, spec: InputSpec, shapes: dict[str, list[int]]) -> list[str]:
        """The outputs whose last learned layers INT8 keeps in float too, with the tail (``float_tail``): none by
        default."""
        return []

    @property
    def option_keys(self) -> tuple[str, ...]:
        """The [task] settings it reads besides type and labels (edgeport.tasks.OPTION_KEYS)."""
        from edgeport.tasks import OPTION_KEYS

        return tuple(OPTION_KEYS.get(self.name, {}))

    def check_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        """The task's settings, checked (ConfigError naming the first bad one) and with defaults where the task
        has them; a task without settings takes none."""
        from edgeport.errors import ConfigError

        for key in options:
            if key not in self.option_keys:
                takes = ", ".join(self.option_keys) or "none"
                raise ConfigError(f"{where}: task setting '{key}' is not one {self.name} reads (it reads: {takes})")
        return options

    def check_outputs(self, spec: InputSpec, shapes: dict[str, list[int]]) -> None:
        """ConfigError when the model's outputs (name: shape, in the model's order) do not fit the spec: by default,
        class names that do not match the classes of the first output."""
        from edgeport.errors import ConfigError

        first = next(iter(shapes.values()), [])
        if not spec.labels or len(first) < 2:
            return
        classes = int(first[1] if spec.layout == "NCHW" or len(first) == 2 else first[-1])
        if len(spec.labels) != classes:
            raise ConfigError(f"{len(spec.labels)} class name(s) are given (--class-names / [task] labels), but the "
                              f"model's output has {classes} classes; give one name per class, in class order")

    def with_model_options(self, spec: InputSpec, carried: dict[str, Any]) -> InputSpec:
        """``spec`` with the settings a model carries (``edgeport_task_options``) where the project gave none."""
        import dataclasses

        return dataclasses.replace(spec, task_options={**carried, **spec.task_options})

    def tolerance(self, precision: str, tol: dict[str, Any]) -> dict[str, Any]:
        """The per-output tolerance this task's outputs are held to at ``precision``, from the target's."""
        return tol

    def pack(self, outputs: dict[str, np.ndarray], names: list[str], spec: InputSpec) -> np.ndarray:
        """The one array (N, ...) the task's metric and agreement read from a model's outputs by name (in the
        model's order): the first output, unless the task needs more."""
        return outputs[names[0]]

    def agreement(self, ref: np.ndarray, got: np.ndarray, spec: InputSpec) -> float:
        """Share (0..1) of the reference's decisions that ``got`` repeats, from two packed outputs."""
        from edgeport.runner.metrics import task_agreement

        return float(task_agreement(ref, got, self.name))

    def distill_loss(self, student: list[Any], teacher: list[Any]) -> Any:
        """The loss that pulls a pruned model's outputs (torch tensors, in the model's order) towards the original's
        on the same input, for label-free recovery: each output's mean squared error over the teacher's variance,
        summed (box and score matching for detection; classification and segmentation match class logits)."""
        loss = 0.0
        for s, t in zip(student, teacher):
            loss = loss + ((s - t) ** 2).mean() / t.var().clamp_min(1e-8)
        return loss

    def model_targets(self, ds: LabelledSet) -> np.ndarray:
        """The set's labels in the model's output space, for a supervised term in recovery (int64; -100 where
        nothing is known). ConfigError for a task without one."""
        from edgeport.errors import ConfigError

        raise ConfigError(f"[optimize] recover_supervised has no supervised term for {self.name}; leave it at 0")

    def supervised_loss(self, student: list[Any], targets: Any) -> Any:
        """Cross-entropy of the first output against ``model_targets`` (-100 ignored)."""
        import torch.nn.functional as F

        return F.cross_entropy(student[0], targets, ignore_index=-100)

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

    def frame_stats(self, outputs: np.ndarray, ds: LabelledSet, layout: str) -> np.ndarray | None:
        """Per frame, the counts whose sum over any set of frames gives the headline metric (``metric_of``): what
        a bootstrap resamples without scoring again. None where the metric is not such a sum (mAP)."""
        return None

    def metric_of(self, stats: np.ndarray) -> float:
        """The headline metric of ``frame_stats`` summed over a set of frames."""
        raise NotImplementedError


def class_logit_kl(student: Any, teacher: Any, temperature: float = 2.0) -> Any:
    """KL divergence from the teacher's softened class distribution (class axis 1: per image, or per pixel of an
    NCHW map) to the student's, times T^2 so its gradients keep their size (Hinton et al., 2015)."""
    import torch.nn.functional as F

    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="none", log_target=True)
    return kl.sum(1).mean() * t * t
