"""Accuracy-aware INT8, written once for every backend that keeps layers in float itself (TensorRT's Q/DQ model,
TFLite's selective quantization; OpenVINO's is NNCF's): the drop gauge, the choice of activation ranges, and the
loop that keeps the layers that cost most in float until the drop is within max_drop.

A backend supplies an ``Int8Model`` (how to write the INT8 model with some layers in float, run it on the
selection set, rank its quantized layers by the error each adds, and which layers are its heads); on the selection
half of the labelled set the loop then

1. measures the plain INT8 model's drop from FP32 (the task metric; without labels, agreement with FP32 in points),
   on the whole set and on each of its halves (``DropGauge``: the worst of them is the drop held);
2. if the drop held is over max_drop, tries the heads in float at once (a detector's box regression and scores),
   kept only if that holds a smaller drop;
3. while the drop held is over max_drop, tries the layer that adds the most error in float, writes and measures
   again; at most a quarter of the weighted layers (12 at the most), plus the heads when they were kept.

Every step is a non-default choice, so it must be shown: a layer (or the heads) is kept only when its gain in
agreement with FP32, frame by frame, over the last step kept has a paired bootstrap interval above zero
(edgeport.quantize.evidence). A layer whose interval does not clear stays pending: the next layer is tried with it
(a layer whose INT8 input is produced by another INT8 layer gains only with that one in float too), and what is
still pending when the loop ends goes back to INT8. For a task whose per-frame agreement is too coarse for it
(``Task.choice_by_agreement`` False: detection) the interval is recorded and the labelled metric's drop held
decides alone.

What is kept, each step's interval, and the drop before and after go to the manifest whatever the outcome: the
build's gate judges the result on the report half, which chose nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from edgeport.evaluate import LabelledSet, score, split_halves

HEADS = "heads"  # the label of the layers kept by the heads step


class DropGauge:
    """The drop edgeport's accuracy-aware loops hold within max_drop on a selection set: the worse of the drop on
    the whole set and on each of its two halves (in blocks, whatever ``[validation] split`` is: the selection
    set is already one side of that split, and its halves only need to keep neighbouring frames together). A
    decision that holds on both halves of the tuning data, not only on their sum, is one the report half is
    likelier to confirm: a drop just under max_drop on the sum whose halves disagree keeps tuning (sets of fewer
    than 4 samples: the whole set only)."""

    def __init__(self, fp32: np.ndarray, ds: LabelledSet, layout: str, frames: LabelledSet | None = None) -> None:
        n = len(ds)
        parts = [list(range(n))] + (list(split_halves(ds).values()) if n >= 4 else [])
        # the frames agreement is measured on (``ds``'s first, then calibration frames held back); ``fp32`` and
        # every output the gauge reads cover them all, the drop reads ``ds``'s
        self.frames = frames if frames is not None else ds
        self.fp32, self.layout = fp32, layout
        self.parts = [(idx, ds.subset(idx) if len(idx) < n else ds) for idx in parts]
        refs = [score(fp32[idx], fp32[idx], sub, layout) for idx, sub in self.parts]
        self.key, self.reference = refs[0]
        self.refs = [r for _, r in refs]

    @property
    def where(self) -> str:
        """The frames the choices are judged on, for log lines."""
        n, total = len(self.parts[0][0]), len(self.frames)
        return f"{n} frames" if total == n else f"{total} frames ({n} of the selection set, {total - n} " \
            "calibration frames held back from the ranges)"

    def __call__(self, got: np.ndarray) -> tuple[float, float]:
        """(the drop on the whole set, the drop held: the worst of the whole and each half)."""
        drops = [ref - score(got[idx], self.fp32[idx], sub, self.layout)[1]
                 for ref, (idx, sub) in zip(self.refs, self.parts)]
        return drops[0], max(drops)


class Tuning:
    """The record of an accuracy-aware loop: the drop and the drop held (``DropGauge``) at every step, what was
    kept in float at each with its agreement gain's interval over the step before, the steps put back, and the
    report it writes into the manifest."""

    def __init__(self, gauge: DropGauge, max_drop: float, first: np.ndarray, images: int, labelled: bool) -> None:
        from edgeport.quantize.evidence import frame_agreement
        from edgeport.tasks import get as get_task

        self.gauge, self.max_drop, self.images, self.labelled = gauge, max_drop, images, labelled
        self.ds = gauge.frames
        self.by_agreement = get_task(self.ds.task).choice_by_agreement
        self.agree = frame_agreement(gauge.fp32, first, self.ds)
        drop, held = gauge(first)
        self.steps: list[dict[str, Any]] = [{"kept": [], "drop": drop, "held": held,
                                             "agreement": round(float(self.agree.mean()), 4)}]
        self.rejected: list[dict[str, Any]] = []
        self.last_gain: Any = None  # the Gain of the last step tried (for the log line)

    @property
    def drop(self) -> float:
        """The whole selection set's drop at the step kept."""
        return float(self.steps[-1]["drop"])

    @property
    def held(self) -> float:
        """The drop held at the step kept: the worst of the whole set and its halves."""
        return float(self.steps[-1]["held"])

    @property
    def over(self) -> bool:
        """True while the drop held is beyond max_drop."""
        return self.held > self.max_drop

    def _try(self, kept: list[str], got: np.ndarray, must_hold_less: bool) -> bool:
        from edgeport.quantize.evidence import frame_agreement, paired_gain

        drop, held = self.gauge(got)
        agree = frame_agreement(self.gauge.fp32, got, self.ds)
        gain = self.last_gain = paired_gain(agree, self.agree, self.ds.names)
        step = {"kept": list(kept), "drop": drop, "held": held, "agreement": round(float(agree.mean()), 4),
                "gain": gain.to_dict()}
        if (must_hold_less and held >= self.held) or (self.by_agreement and not gain.clears):
            self.rejected.append(step)
            return False
        self.steps.append(step)
        self.agree = agree
        return True

    def step(self, kept: list[str], got: np.ndarray) -> bool:
        """Take the outputs ``got`` with ``kept`` in float as the next step when its agreement gain over the step
        before clears (module docstring); True when taken, else it is recorded as put back."""
        return self._try(kept, got, must_hold_less=False)

    def trial(self, kept: list[str], got: np.ndarray) -> bool:
        """As ``step``, and only if it also holds a smaller drop (a group tried at once, such as a detector's
        heads); True when it was kept."""
        return self._try(kept, got, must_hold_less=True)

    def report(self, kept_float: list[str], **extra: Any) -> dict[str, Any]:
        """The manifest's ``accuracy_fallback``: metric, drops before and after (whole set and held), the layers
        kept in float, every step (with its gain's interval) and every step put back."""
        return {"metric": self.gauge.key, "reference": self.gauge.reference, "max_drop": self.max_drop,
                "drop_before": self.steps[0]["drop"], "drop_after": self.drop, "held_before": self.steps[0]["held"],
                "held_after": self.held, "kept_float": kept_float, "steps": self.steps, "rejected": self.rejected,
                "images": self.images, "frames": len(self.ds), "met": not self.over, "labelled": self.labelled,
                "kept_by": "agreement interval" if self.by_agreement else "metric drop held", **extra}


class Int8Model(Protocol):
    """What a backend supplies to the loop: one INT8 model, written again with layers kept in float."""

    weighted: int  # the quantized weighted layers of the plain model (the loop's limit is a quarter of them)

    def write(self, kept: list[str]) -> None:
        """Write the INT8 model with the layers ``kept`` (beyond the user's own) in float."""

    def outputs(self) -> np.ndarray:
        """The model last written, run on the selection set, its outputs packed as the task reads them."""

    def heads(self) -> list[str]:
        """The layers the heads step keeps in float at once (the last weighted layers, what follows them)."""

    def rank(self, kept: list[str]) -> list[tuple[str, str, float]]:
        """(layer, what it is, the error it adds) of the model last written's quantized layers not in ``kept``,
        worst first."""

    def describe(self, name: str, what: str) -> str:
        """How a log line names a layer."""


def choose_ranges(candidates: dict[str, Any], plain_outputs: Callable[[str, Any], np.ndarray], gauge: DropGauge,
                  say: Callable[[str], None]) -> tuple[str, dict[str, float], dict[str, np.ndarray], dict[str, Any]]:
    """Of activation ranges by several methods ({method: ranges}, the configured method first: the default), the
    default unless another's plain INT8 model (``plain_outputs(method, ranges)`` writes and runs it) agrees with
    FP32 better on the selection set by a paired bootstrap interval that lies above zero (edgeport.quantize
    .evidence); for a task whose agreement is too coarse for it (``Task.choice_by_agreement`` False: detection),
    the one holding the smaller drop of the labelled metric. Chosen per model, because no one method wins on
    every model (docs/benchmarks/ranges.md). (its method,
    {method: drop held}, {method: its plain model's outputs}, the evidence for the manifest)."""
    from edgeport.quantize.evidence import frame_agreement, paired_gain
    from edgeport.tasks import get as get_task

    ds = gauge.frames
    held, outputs, agree = {}, {}, {}
    for method, ranges in candidates.items():
        outputs[method] = plain_outputs(method, ranges)
        held[method] = float(gauge(outputs[method])[1])
        agree[method] = frame_agreement(gauge.fp32, outputs[method], ds)
    default = next(iter(candidates))
    gains = {m: paired_gain(agree[m], agree[default], ds.names) for m in candidates if m != default}
    clear = [m for m, g in gains.items() if g.clears]
    chosen = max(clear, key=lambda m: gains[m].mean) if clear else default
    by_agreement = get_task(ds.task).choice_by_agreement
    if not by_agreement:  # the labelled metric's drop held decides; a tie keeps the default
        chosen = min(held, key=lambda m: held[m])
    why = ("" if chosen != default or not gains else " (no interval clears the default)") if by_agreement else \
        " (by the drop held: " + ", ".join(f"{m} {d:.4f}" for m, d in held.items()) + f" {gauge.key})"
    say(f"activation ranges on {gauge.where}: {default} agrees {agree[default].mean():.3f} %"
        + "".join(f", {m} {g}" for m, g in gains.items()) + f" -> {chosen}{why}")
    evidence = {"default": default, "chosen": chosen, "frames": len(ds), "held_back": len(ds) - len(gauge.parts[0][0]),
                "by": "agreement" if by_agreement else "metric drop held",
                "agreement": {m: round(float(a.mean()), 4) for m, a in agree.items()},
                "over_default": {m: g.to_dict() for m, g in gains.items()}}
    return chosen, held, outputs, evidence


def accuracy_fallback(model: Int8Model, gauge: DropGauge, max_drop: float, plain_outputs: np.ndarray,
                      val: LabelledSet, say: Callable[[str], None]) -> tuple[Tuning, list[tuple[str, str]]]:
    """Keep the layers that cost most in float until the drop held is within ``max_drop`` (module docstring).
    ``model`` holds the plain INT8 model (written, its outputs ``plain_outputs``). Returns the record and the layers
    kept, (name, what it is) each; the model last written is the one with them in float."""
    tuning = Tuning(gauge, max_drop, plain_outputs, len(val), val.labelled)
    say(f"accuracy-aware INT8: {gauge.key} drop {tuning.drop:.4f} on the selection half ({len(val)} images; worse of "
        f"its halves {tuning.held:.4f}), max_drop {max_drop:g}")
    kept: list[tuple[str, str]] = []
    limit = min(12, max(1, model.weighted // 4))
    heads = model.heads()
    if tuning.over and heads:
        model.write(heads)
        if tuning.trial(heads, model.outputs()):
            kept = [(h, HEADS) for h in heads]
            limit += len(heads)
            say(f"kept the heads in float ({len(heads)} layer(s)): drop {tuning.drop:.4f} (worse of its halves "
                f"{tuning.held:.4f}); agreement {tuning.last_gain}")
        else:
            say(f"the heads in float ({len(heads)} layer(s)) not kept: agreement {tuning.last_gain}")
            model.write([])
    pending: list[tuple[str, str]] = []  # tried, no gain shown alone: kept only with what follows, if that clears
    while tuning.over and len(kept) + len(pending) < limit:
        ranked = model.rank([k for k, _ in kept + pending])
        if not ranked:
            break
        name, what, added = ranked[0]
        say(f"{gauge.key} {tuning.held - max_drop:.4f} points over max_drop {max_drop:g} (the selection set or its "
            f"worse half): trying {model.describe(name, what)} in float (adds {added:.3g} relative error)")
        trial = kept + pending + [(name, what)]
        model.write([k for k, _ in trial])
        if tuning.step([k for k, _ in trial], model.outputs()):
            with_pending = f" with the {len(pending)} layer(s) tried before it" if pending else ""
            kept, pending = trial, []
            say(f"kept {model.describe(name, what)}{with_pending} in float: agreement {tuning.last_gain} over the "
                "last step kept")
        else:
            pending.append((name, what))
            say(f"{model.describe(name, what)} in float: agreement {tuning.last_gain} over the last step kept does "
                "not clear zero; it stays in float only if the next layer's step clears")
    if pending:  # what did not clear goes back to INT8
        say(f"put back in INT8 ({len(pending)} layer(s) whose agreement gain does not clear zero): "
            + ", ".join(model.describe(n, w) for n, w in pending))
        model.write([k for k, _ in kept])
    return tuning, kept
