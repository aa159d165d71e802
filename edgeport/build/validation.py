"""The gates' labelled set: split into a selection half (tuning) and a report half (gates), with the FP32
reference's outputs and metrics on it (cached by content)."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeport import __version__
from edgeport.build.export import ORIGINAL_ONNX
from edgeport.cache import Stage
from edgeport.evaluate import LabelledSet
from edgeport.model import file_sha256
from edgeport.preprocess import InputSpec
from edgeport.tasks import get as get_task

log = logging.getLogger("edgeport")


@dataclass
class ValidationRef:
    """The labelled validation set with the FP32 reference's outputs and metrics on it.

    Honest selection: the set is split deterministically (edgeport.evaluate.halves: by default the first half
    of each folder in sorted order selects and the second half reports, so a video's neighbouring frames stay on
    one side; ``[validation] split = "alternate"`` takes even and odd positions). Whatever is tuned (accuracy
    control, the float fallback) sees only the selection half; the INT8 gate and the headline figures use the
    report half, which chose nothing. A set of one image is not split (both halves are that image, and the
    report says so)."""

    data: LabelledSet
    outputs: np.ndarray  # the reference's outputs as the task packs them: the exported ONNX's, or when pruning
    metrics: dict[str, float]  # the original (unpruned) model's; its metrics on the whole set
    pruned: np.ndarray | None = None  # when pruning: the pruned export's outputs (what every artifact converts)
    split: str = "blocks"  # [validation] split
    _memo: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def _halves(self) -> dict[str, list[int]]:
        from edgeport.evaluate import split_halves

        return split_halves(self.data, self.split)

    def halves(self) -> dict[str, list[int]]:
        """{"selection": indices, "report": indices} into the set (edgeport.evaluate.halves)."""
        return self._halves

    @functools.cached_property
    def selection(self) -> LabelledSet:
        """The half that tuning may look at (made once: every INT8 compile key and compile reads it)."""
        return self.data.subset(self.halves()["selection"])

    def half_metrics(self, half: str, layout: str) -> dict[str, float]:
        """The FP32 reference's metrics on one half (what each artifact's drop there is measured from), computed
        once per build."""
        from edgeport.evaluate import task_metrics

        if (half, layout) not in self._memo:
            idx = self.halves()[half]
            self._memo[half, layout] = task_metrics(self.outputs[idx], self.data.subset(idx), layout)
        return self._memo[half, layout]

    def pruned_metrics(self, half: str, layout: str) -> dict[str, float] | None:
        """The pruned FP32 export's metrics on one half (None when not pruning)."""
        from edgeport.evaluate import task_metrics

        if self.pruned is None:
            return None
        if (f"pruned-{half}", layout) not in self._memo:
            idx = self.halves()[half]
            self._memo[f"pruned-{half}", layout] = task_metrics(self.pruned[idx], self.data.subset(idx), layout)
        return self._memo[f"pruned-{half}", layout]

    def pruning_drop(self, half: str, layout: str) -> tuple[str, float, float] | None:
        """(metric key, the original's value, the pruned export's) on one half, or None when not pruning. Without
        labels the metric is agreement with the original, in percent."""
        from edgeport.evaluate import score

        if self.pruned is None:
            return None
        idx = self.halves()[half]
        key, value = score(self.pruned[idx], self.outputs[idx], self.data.subset(idx), layout)
        return key, 100.0 if key == "agreement" else float(self.half_metrics(half, layout)[key]), value

    def report_metrics(self, layout: str) -> dict[str, float]:
        """The FP32 reference's metrics on the report half (what the table's drops are measured from)."""
        return self.half_metrics("report", layout)

def validation_stage(data: LabelledSet | None, spec: InputSpec, export_stage: Stage,
                      export_info: dict[str, Any], build_dir: Path, split: str = "blocks") -> ValidationRef | None:
    """Score the FP32 reference on the labelled set (cached by content)."""
    from edgeport.evaluate import task_metrics

    if data is None:
        return None
    original = export_stage.dir / ORIGINAL_ONNX
    stage = Stage(build_dir, "validation", {"val": data.sha256, "onnx": export_info["onnx_sha256"],
                                            "original": file_sha256(original) if original.is_file() else None,
                                            "v": __version__})

    def run(tmp: Path) -> dict[str, Any]:
        from edgeport.backends.onnxruntime.backend import BACKEND as ORT

        out = {}
        for key, path in (("reference", original), ("pruned", export_stage.dir / "model.onnx")):
            if path.is_file():
                with ORT.open_onnx(path) as rt:
                    out[key] = get_task(spec.task).pack(rt.run_batches(data.inputs), export_info["outputs"], spec)
                np.save(tmp / f"{key}.npy", out[key])
        if "reference" not in out:  # not pruned: the exported model is the reference
            out["reference"] = out.pop("pruned")
            (tmp / "pruned.npy").rename(tmp / "reference.npy")
        return {"metrics": task_metrics(out["reference"], data, spec.layout)}

    info, _ = stage.run(run)
    pruned = stage.dir / "pruned.npy"
    ref = ValidationRef(data, np.load(stage.dir / "reference.npy"), info["metrics"],
                        np.load(pruned) if pruned.is_file() else None, split)
    log.info("validation set: %d images from %s; %s", len(data), data.source,
             f"FP32 reference {_fmt_metrics(ref.metrics)}" if data.labelled else "no labels: agreement only")
    return ref

def _fmt_metrics(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k != "count")
