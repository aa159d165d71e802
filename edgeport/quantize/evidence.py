"""Evidence for an INT8 choice: agreement with the float model frame by frame, and a paired bootstrap interval of
how much one choice gains over the default.

A choice between INT8 variants (activation ranges by another method, a layer kept in float) made on a few dozen
labelled frames follows the noise of those frames: a task metric such as mIoU moves by tenths of a point from one
set of 50 frames of a drive to the next. Agreement with FP32 (the share of pixels, top-1 classes or detections
the INT8 model repeats) needs no labels and varies less, and the difference of two variants on the same frames
(paired) varies less again. A non-default choice is taken only when the 95 % interval of its gain over the
default lies above zero.

The bootstrap resamples whole units, not frames, where frames are not independent: each sequence (the file
name's prefix before its frame number, as CamVid's ``0016E5_08070.png``) when the set spans at least
``MIN_SEQUENCES``; otherwise runs of ``block`` neighbouring frames in name order (a block bootstrap: neighbouring
frames of one drive are near copies, and resampling them one by one would give an interval too narrow).
"""
from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_SEQUENCES = 4
DRAWS = 2000
_FRAME_NUMBER = re.compile(r"^(.*?)[_\-.]?[A-Za-z]?\d+$")


def sequence_of(name: str) -> str:
    """The sequence a frame's file name belongs to: the stem before a trailing frame number ('0016E5_08070.png'
    -> '0016E5'; '000123.png' -> '', one unnamed sequence; 'street.png' -> 'street', a frame of its own)."""
    stem = posixpath.splitext(posixpath.basename(name))[0]
    m = _FRAME_NUMBER.match(stem)
    return m.group(1) if m else stem


def sequences(names: list[str]) -> dict[str, list[int]]:
    """The frames' indices by the sequence their names give (``sequence_of``), in order of first appearance."""
    seqs: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        seqs.setdefault(sequence_of(name), []).append(i)
    return seqs


def resamples(n_units: int, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """(draws, n_units) unit indices drawn with replacement: every bootstrap here, seeded, so that variants
    compared on the same units see the same draws."""
    return np.random.default_rng(seed).integers(0, n_units, size=(draws, n_units))


def units(names: list[str]) -> tuple[list[list[int]], str]:
    """The frames' indices grouped into the bootstrap's units, and how they were formed (for the report)."""
    seqs = sequences(names)
    if len(seqs) >= MIN_SEQUENCES:
        return list(seqs.values()), f"{len(seqs)} sequences"
    block = max(1, math.ceil(math.sqrt(len(names))))
    out: list[list[int]] = []
    for idx in seqs.values():
        idx = sorted(idx, key=lambda i: names[i])
        out += [idx[k:k + block] for k in range(0, len(idx), block)]
    return out, f"{len(out)} blocks of up to {block} neighbouring frames"


def frame_agreement(ref: np.ndarray, got: np.ndarray, ds: Any) -> np.ndarray:
    """Agreement with the float model's packed outputs ``ref``, one value in percent per frame (the task's own
    agreement on that frame alone)."""
    from edgeport.tasks import get as get_task

    task = get_task(ds.task)
    return np.array([100.0 * float(task.agreement(ref[i:i + 1], got[i:i + 1], ds.spec)) for i in range(len(ref))])


@dataclass
class Gain:
    """A variant's agreement gain over the default, per frame's mean, with its paired bootstrap interval."""

    mean: float
    low: float
    high: float
    units: str

    @property
    def clears(self) -> bool:
        """True when the whole interval is a gain."""
        return self.low > 0.0

    def to_dict(self) -> dict[str, Any]:
        """Manifest form, in agreement points."""
        return {"gain": round(self.mean, 4), "interval": [round(self.low, 4), round(self.high, 4)],
                "resampled": self.units}

    def __str__(self) -> str:
        return f"{self.mean:+.3f} points [{self.low:+.3f}, {self.high:+.3f}]"


def paired_gain(variant: np.ndarray, default: np.ndarray, names: list[str], draws: int = DRAWS,
                seed: int = 0) -> Gain:
    """The mean of ``variant - default`` (per-frame agreements) and its 95 % bootstrap interval, resampling the
    units of ``units(names)`` with replacement (the same draws for every variant: seeded)."""
    diff = np.asarray(variant, np.float64) - np.asarray(default, np.float64)
    groups, how = units(names)
    sums = np.array([diff[g].sum() for g in groups])
    counts = np.array([len(g) for g in groups], np.float64)
    pick = resamples(len(groups), draws, seed)
    means = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Gain(float(diff.mean()), float(low), float(high), how)


def drop_evidence(ref: np.ndarray, got: np.ndarray, ds: Any, layout: str, draws: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """How far an artifact's drop from the float model on a labelled set could move on other frames: its 95 %
    paired bootstrap interval (the same resampled units, ``units(ds.names)``, for both models; tasks whose metric
    is a sum over frames, ``Task.frame_stats``), and, when the set spans two sequences or more, the drop with each
    sequence left out in turn (its spread: what new footage could do to the figure)."""
    from edgeport.evaluate import primary, task_metrics
    from edgeport.tasks import get as get_task

    task = get_task(ds.task)
    out: dict[str, Any] = {}
    ref_stats, got_stats = task.frame_stats(ref, ds, layout), task.frame_stats(got, ds, layout)
    if ref_stats is not None and got_stats is not None and len(ds) > 1:
        groups, how = units(ds.names)
        ref_u = np.stack([ref_stats[g].sum(0) for g in groups])
        got_u = np.stack([got_stats[g].sum(0) for g in groups])
        pick = resamples(len(groups), draws, seed)
        drops = np.array([task.metric_of(ref_u[p].sum(0)) - task.metric_of(got_u[p].sum(0)) for p in pick])
        low, high = np.percentile(drops, [2.5, 97.5])
        out["interval"] = [round(float(low), 4), round(float(high), 4)]
        out["resampled"] = how

    def drop_on(idx: list[int]) -> float:
        if ref_stats is not None and got_stats is not None:
            return task.metric_of(ref_stats[idx].sum(0)) - task.metric_of(got_stats[idx].sum(0))
        sub = ds.subset(idx)
        return float(primary(task_metrics(ref[idx], sub, layout))[1]) - \
            float(primary(task_metrics(got[idx], sub, layout))[1])

    seqs = sequences(ds.names)
    if len(seqs) >= 2:
        left = {s: round(drop_on(sorted(i for t, idx in seqs.items() if t != s for i in idx)), 4) for s in seqs}
        out["leave_one_sequence_out"] = {"drops": left, "spread": [min(left.values()), max(left.values())]}
    return out
