"""Classification on the host: class-folder labelled sets, top-1/top-5 accuracy.

A labelled set is an image folder with one sub-folder per class, named by the label (or by the class
index when the model has no labels).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeport.errors import CalibrationError
from edgeport.tasks.base import Task, class_logit_kl

if TYPE_CHECKING:
    from edgeport.evaluate import LabelledSet
    from edgeport.preprocess import InputSpec


class Classification(Task):
    name = "classification"
    primary = "top1"
    label = "top-1"
    short = "top1"
    label_folder = False
    labelled_how = "a classification set is labelled by its folders (--val-images DIR with one sub-folder per class)"

    def load(self, img_dir: Path, labels: Path | None, spec: InputSpec, limit: int) -> LabelledSet | None:
        from edgeport.evaluate import MIN_LABELLED, image_files, read_images

        if not any(p.is_dir() for p in img_dir.iterdir()):
            return None
        classes = sorted(p for p in img_dir.iterdir() if p.is_dir())
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
            pairs += [(p, cid) for p in image_files(c)]
        if len(pairs) < MIN_LABELLED:
            raise CalibrationError(f"{img_dir}: {len(pairs)} labelled image(s); at least {MIN_LABELLED} are needed")
        return read_images(pairs, spec, limit, str(img_dir), self.name)

    def model_targets(self, ds: LabelledSet) -> np.ndarray:
        """The class id of each image."""
        return np.asarray(ds.targets, np.int64)

    def distill_loss(self, student: list[Any], teacher: list[Any]) -> Any:
        """KL divergence between the softened class distributions of the first output, per image."""
        return class_logit_kl(student[0], teacher[0])

    def metrics(self, outputs: np.ndarray, ds: LabelledSet, layout: str) -> dict[str, Any]:
        """Top-1 and top-5 accuracy in percent."""
        logits = outputs.reshape(len(outputs), -1)
        order = np.argsort(-logits, axis=1)
        t = np.asarray(ds.targets)
        top1 = float(np.mean(order[:, 0] == t))
        top5 = float(np.mean([t[i] in order[i, :5] for i in range(len(t))]))
        return {"top1": 100 * top1, "top5": 100 * top5, "count": len(t)}

    def frame_stats(self, outputs: np.ndarray, ds: LabelledSet, layout: str) -> np.ndarray:
        """(N, 2): whether top-1 is right, and 1 (the frame)."""
        right = outputs.reshape(len(outputs), -1).argmax(1) == np.asarray(ds.targets)
        return np.stack([right.astype(np.float64), np.ones(len(right))], 1)

    def metric_of(self, stats: np.ndarray) -> float:
        """Top-1 in percent."""
        return 100.0 * float(stats[0]) / max(float(stats[1]), 1.0)


TASK = Classification()
