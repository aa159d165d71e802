"""Label-free recovery of a pruned model: knowledge distillation from the original on unlabelled images.

Pruning removes channels; the pruned network computes a different function (the CamVid model at 30 %: mIoU 54.08
-> 16.37). The original model is the teacher: on the calibration images (or ``[optimize] recover_images``), lightly
augmented (horizontal flip, brightness and contrast), the pruned model is trained to match the original's outputs
by the task's own loss (``Task.distill_loss``: KL divergence on class logits per image or per pixel, normalised
squared error on boxes and scores), with Adam and a cosine learning rate, seeded, for ``recover_steps`` steps. No
labels are read. The loss curve is drawn as a PNG.

The step count is the contract: the same settings run the same steps on an idle machine and on a loaded one, so
the recovered model does not depend on the load (its weights match to the last bits only where the kernels' thread
count and order match too). A time budget, ``recover_seconds``, is off by default; set, it is an explicit choice
that may stop recovery early on a slow or busy machine, the learning rate then follows the cosine over whichever
budget runs out first (so a cut run still ends at a low rate), and the manifest records the steps that ran.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.progress import progress

if TYPE_CHECKING:
    from edgeport.config import OptimizeConfig

log = logging.getLogger("edgeport")


@dataclass
class RecoveryReport:
    """What recovery did, for the build log and the manifest."""

    steps: int
    seconds: float
    images: int
    source: str
    stopped: str  # "steps" or "time": which budget ended it
    batch: int
    lr: float
    loss: list[float] = field(default_factory=list)  # one value per step

    def to_dict(self) -> dict[str, Any]:
        """Manifest form: the settings, the budget that ended it, and the loss at its start and end."""
        k = max(1, min(20, len(self.loss) // 10))
        return {"steps": self.steps, "seconds": round(self.seconds, 1), "images": self.images, "source": self.source,
                "stopped_by": self.stopped, "batch": self.batch, "lr": self.lr,
                "loss_first": float(np.mean(self.loss[:k])) if self.loss else None,
                "loss_last": float(np.mean(self.loss[-k:])) if self.loss else None}


def augment(x: Any, gen: Any, width_axis: int) -> Any:
    """A batch, each image flipped left-right with probability 1/2 and its contrast and brightness moved by up to
    10 % (in the normalised input: a scale and a shift)."""
    import torch

    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(width_axis), x)
    scale = 1.0 + 0.2 * (torch.rand(n, *([1] * (x.dim() - 1)), generator=gen) - 0.5)
    shift = 0.2 * (torch.rand(n, *([1] * (x.dim() - 1)), generator=gen) - 0.5)
    return x * scale + shift


def distill(teacher: Any, student: Any, images: np.ndarray, task: str, settings: OptimizeConfig, source: str,
            layout: str = "NCHW", supervised: tuple[np.ndarray, np.ndarray] | None = None) -> RecoveryReport:
    """Train ``student`` (in place) to match ``teacher`` on ``images`` (preprocessed, the model's layout) by the
    task's distillation loss; returns what it did (module docstring). With ``supervised`` (labelled inputs and
    their targets in the output's space, ``Task.model_targets``), each step adds ``recover_supervised`` times the
    task's supervised loss on a batch of them (not augmented)."""
    import torch

    from edgeport.export import named_outputs
    from edgeport.tasks import get as get_task

    loss_fn, sup_fn = get_task(task).distill_loss, get_task(task).supervised_loss
    weight = settings.recover_supervised if supervised is not None else 0.0
    if weight:
        sup_x = torch.from_numpy(np.ascontiguousarray(supervised[0], np.float32))
        sup_y = torch.from_numpy(np.asarray(supervised[1], np.int64))
    gen = torch.Generator().manual_seed(settings.recover_seed)
    data = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    batch = min(settings.recover_batch, len(data))
    steps, budget = settings.recover_steps, settings.recover_seconds
    teacher.eval()
    student.train()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=settings.recover_lr)
    losses: list[float] = []
    stopped = "steps"
    t0 = time.time()
    bar = progress(None, f"recovering the pruned model (distillation, {steps} steps)", total=steps)
    try:
        for step in range(steps):
            if budget and time.time() - t0 > budget:
                stopped = "time"
                break
            x = augment(data[torch.randint(0, len(data), (batch,), generator=gen)], gen, 3 if layout == "NCHW" else 2)
            with torch.no_grad():
                target = [v for _, v in named_outputs(teacher(x))]
            got = [v for _, v in named_outputs(student(x))]
            loss = loss_fn(got, target)
            if weight:
                pick = torch.randint(0, len(sup_x), (min(batch, len(sup_x)),), generator=gen)
                labelled = [v for _, v in named_outputs(student(sup_x[pick]))]
                loss = loss + weight * sup_fn(labelled, sup_y[pick])
            done = step / steps if not budget else max(step / steps, min(1.0, (time.time() - t0) / budget))
            for group in opt.param_groups:
                group["lr"] = settings.recover_lr * 0.5 * (1 + math.cos(math.pi * done))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if (step + 1) % max(1, steps // 5) == 0:
                log.info("recovery step %d/%d: distillation loss %.4f (%.0fs)", step + 1, steps,
                         float(np.mean(losses[-20:])), time.time() - t0)
    finally:
        bar.close()
        student.eval()
    return RecoveryReport(len(losses), time.time() - t0, len(data), source, stopped, batch, settings.recover_lr,
                          losses)


def loss_chart(losses: list[float], path: Path, title: str) -> Path:
    """The distillation loss per step (log scale, with a 20-step running mean) as a PNG, drawn with OpenCV."""
    import cv2

    w, h, left, top, bottom = 640, 360, 70, 40, 40
    img = np.full((h, w, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (10, 24), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    vals = np.log10(np.maximum(np.asarray(losses, np.float64), 1e-12))
    if len(vals):
        smooth = np.convolve(vals, np.ones(min(20, len(vals))) / min(20, len(vals)), "valid")
        lo, hi = float(vals.min()), float(vals.max())
        hi = hi if hi > lo else lo + 1.0
        pw, ph = w - left - 20, h - top - bottom

        def pts(v: np.ndarray, offset: int) -> np.ndarray:
            xs = left + (np.arange(len(v)) + offset) / max(len(vals) - 1, 1) * pw
            ys = top + (hi - v) / (hi - lo) * ph
            return np.stack([xs, ys], 1).astype(np.int32).reshape(-1, 1, 2)

        cv2.polylines(img, [pts(vals, 0)], False, (200, 200, 200), 1, cv2.LINE_AA)
        cv2.polylines(img, [pts(smooth, len(vals) - len(smooth))], False, (160, 80, 20), 2, cv2.LINE_AA)
        cv2.rectangle(img, (left, top), (left + pw, top + ph), (0, 0, 0), 1)
        for v, y in ((hi, top), (lo, top + ph)):
            cv2.putText(img, f"{10 ** v:.3g}", (5, y + 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"step 1 .. {len(vals)} (loss, log scale; blue: 20-step mean)", (left, h - 12), font, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path
