"""Accuracy-aware INT8 for TFLite: the activation-range choice and the loop that keeps ops in float (TensorFlow's
selective quantization) until the drop on the selection half is within max_drop; run in the conversion job."""
from __future__ import annotations

from typing import Any

from edgeport.backends.tflite.litert import (
    QUANTIZED_OPS,
    RANK_IMAGES,
    _infer,
    _infer_all,
    _interpreter,
    _stage,
    _tensors,
    all_tensors,
    decode_tail,
    quantize,
    short_name,
)


def rank_ops(quantized: bytes, reference: list[dict[str, Any]], images: Any,
             exclude: set[str]) -> list[tuple[str, str, float]]:
    """[(output tensor name, op, error it adds)] for the ops that compute in int8 (convolutions, and also
    hard-swish, the multiplications of squeeze-excite, pooling...), worst first: the per-channel relative squared
    error of the op's output against the float model's tensor of the same name (``reference``: ``all_tensors``
    of the float model on the same ``images``), minus the largest of its inputs'."""
    import numpy as np

    from edgeport.runner.metrics import channel_error

    err: dict[str, float] = {}
    q_it = _interpreter(quantized, True)
    for x, ref in zip(images, reference):
        _infer(q_it, x[None])
        got = _tensors(q_it)
        for name, r in ref.items():
            if name in got and got[name].shape == r.shape:
                err[name] = err.get(name, 0.0) + channel_error(got[name], r, -1)  # NHWC
    details = {t["index"]: t for t in q_it.get_tensor_details()}
    names = {i: t["name"] for i, t in details.items()}
    ranked = []
    for op in q_it._get_ops_details():  # noqa: SLF001 (the public API has no op list)
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE") or not len(op["outputs"]) \
                or details[op["outputs"][0]]["dtype"] != np.int8:
            continue  # only ops that compute in int8 can be kept in float
        out = names[op["outputs"][0]]
        if out in exclude or out not in err:
            continue
        ins = [err.get(names[i], 0.0) for i in op["inputs"] if i >= 0 and i in names]
        ranked.append((out, op["op_name"], err[out] - max(ins, default=0.0)))
    return sorted(ranked, key=lambda r: -r[2])


class _Selection:
    """The selection half the child was given (``job`` is the fallback's), loaded once for the range choice and
    the accuracy loop: the set, its images in NHWC, and the float model's outputs on them (``gauge``)."""

    def __init__(self, job: dict[str, Any]) -> None:
        import pickle

        import numpy as np

        with open(job["val"], "rb") as f:
            self.val, self.frames = pickle.load(f)  # the selection set; it, then the calibration frames held back
        inputs = self.frames.inputs
        images = inputs.transpose(0, 2, 3, 1) if job.get("layout", "NCHW") == "NCHW" else inputs
        self.images = np.ascontiguousarray(images, np.float32)  # the model takes NHWC
        self.job = job
        self._gauge: Any = None

    def outputs(self, blob: bytes) -> Any:
        """A model's packed outputs on the selection images and the held-back calibration frames."""
        import numpy as np

        from edgeport.evaluate import pack

        it = _interpreter(blob)
        runs = [_infer_all(it, self.images[i:i + 1], self.job.get("outputs")) for i in range(len(self.images))]
        return pack({n: np.concatenate([r[n] for r in runs]) for n in runs[0]}, self.frames)

    def gauge(self, calibrated: bytes) -> Any:
        """The drop gauge against the float model (``calibrated`` run in float: its recorded ranges do not
        change that, so every candidate's calibrated model gives the same gauge, measured once)."""
        from edgeport.quantize.loop import DropGauge

        if self._gauge is None:
            self._gauge = DropGauge(self.outputs(calibrated), self.val, "NHWC", self.frames)
        return self._gauge


def choose_ranges(candidates: dict[str, bytes], selection: _Selection,
                  given: list[str]) -> tuple[str, dict[str, float], dict[str, tuple[bytes, Any]], dict[str, Any]]:
    """Of calibrated models that differ only in their activation ranges ({method: model}, the configured method
    first), the default unless another agrees with FP32 better on the selection half by a clear interval
    (edgeport.quantize.loop.choose_ranges); (its method, {method: drop held}, {method: (its plain INT8, its
    outputs)}: the accuracy loop starts from the chosen one's, the evidence)."""
    from edgeport.quantize.loop import choose_ranges as choose

    blobs: dict[str, bytes] = {}

    def plain(method: str, calibrated: bytes) -> Any:
        blobs[method] = quantize(calibrated, given)
        return selection.outputs(blobs[method])

    gauge = selection.gauge(next(iter(candidates.values())))
    chosen, held, outputs, evidence = choose(candidates, plain, gauge, _stage)
    return chosen, held, {m: (blobs[m], outputs[m]) for m in candidates}, evidence


class SelectiveModel:
    """The INT8 model as the shared accuracy-aware loop (edgeport.quantize.loop) writes and measures it:
    TensorFlow's selective quantization of the calibrated model, the layers kept in float (and the user's
    ``given``) denylisted, QUANTIZE/DEQUANTIZE around them; its heads are the last weighted ops and every op after
    them (``decode_tail``), whose outputs then stay in float too."""

    def __init__(self, plain: bytes, calibrated: bytes, selection: _Selection, given: list[str]) -> None:
        self.blob, self.calibrated, self.selection, self.given = plain, calibrated, selection, given
        self.weighted = sum(op["op_name"] in QUANTIZED_OPS
                            for op in _interpreter(plain)._get_ops_details())  # noqa: SLF001 (no public op list)
        self.tail = decode_tail(calibrated)
        self._reference: Any = None  # the float model's tensors on the ranking images: the same at every step

    def write(self, kept: list[str]) -> None:
        """The model with ``kept`` in float (and the model's outputs in float when the heads are among them)."""
        self.blob = quantize(self.calibrated, self.given + list(kept), float_outputs=bool(set(kept) & set(self.tail)))

    def outputs(self) -> Any:
        """The model last written, on the selection half."""
        return self.selection.outputs(self.blob)

    def heads(self) -> list[str]:
        """The heads and the ops after them (``decode_tail``)."""
        return list(self.tail)

    def describe(self, name: str, what: str) -> str:
        """An op and the TensorFlow op its fused tensor name ends in."""
        return f"{what} {short_name(name)}"

    def rank(self, kept: list[str]) -> list[tuple[str, str, float]]:
        """The ops that compute in int8 by the error each adds (``rank_ops``), worst first."""
        images = self.selection.images[:RANK_IMAGES]
        self._reference = self._reference or all_tensors(self.calibrated, images)
        return rank_ops(self.blob, self._reference, images, set(kept) | set(self.given))


def accuracy_fallback(plain: bytes, calibrated: bytes, selection: _Selection, given: list[str],
                      plain_outputs: Any = None) -> tuple[bytes, dict[str, Any]]:
    """Keep the TFLite ops that add the most error in float (``SelectiveModel``) until the task metric's drop from
    the float model on the selection half, and on each of its halves, is within max_drop
    (edgeport.quantize.loop.accuracy_fallback). ``plain_outputs``: ``plain``'s outputs on the selection half, when
    the range choice has measured them already. Returns the model and the report."""
    from edgeport.quantize.loop import HEADS
    from edgeport.quantize.loop import accuracy_fallback as loop

    model = SelectiveModel(plain, calibrated, selection, given)

    def say(msg: str) -> None:
        _stage(msg)

    tuning, kept = loop(model, selection.gauge(calibrated), float(selection.job["max_drop"]),
                        model.outputs() if plain_outputs is None else plain_outputs, selection.val, say)
    named = [(k, "decode tail" if what == HEADS else what) for k, what in kept]
    return model.blob, tuning.report(_kept_names(named), kept_tensors=[k for k, _ in named],
                                     ops=[op for _, op in named])


def _kept_names(kept: list[tuple[str, str]]) -> list[str]:
    """What the report names as kept in float: the decode tail as one entry, then each op the loop chose."""
    tail = sum(op == "decode tail" for _, op in kept)
    return ([f"the heads and the {tail} op(s) from them on"] if tail else []) + \
        [short_name(k) for k, op in kept if op != "decode tail"]
