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
            self.val = pickle.load(f)
        images = self.val.inputs.transpose(0, 2, 3, 1) if job.get("layout", "NCHW") == "NCHW" else self.val.inputs
        self.images = np.ascontiguousarray(images, np.float32)  # the model takes NHWC
        self.job = job
        self._gauge: Any = None

    def outputs(self, blob: bytes) -> Any:
        """A model's packed outputs on the selection images."""
        import numpy as np

        from edgeport.evaluate import pack

        it = _interpreter(blob)
        runs = [_infer_all(it, self.images[i:i + 1], self.job.get("outputs")) for i in range(len(self.images))]
        return pack({n: np.concatenate([r[n] for r in runs]) for n in runs[0]}, self.val)

    def gauge(self, calibrated: bytes) -> Any:
        """The drop gauge against the float model (``calibrated`` run in float: its recorded ranges do not
        change that, so every candidate's calibrated model gives the same gauge, measured once)."""
        from edgeport.evaluate import DropGauge

        if self._gauge is None:
            self._gauge = DropGauge(self.outputs(calibrated), self.val, "NHWC")
        return self._gauge


def choose_ranges(candidates: dict[str, bytes], selection: _Selection,
                  given: list[str]) -> tuple[str, dict[str, float], dict[str, tuple[bytes, Any]]]:
    """Of calibrated models that differ only in their activation ranges ({method: model}, the configured method
    first), the one whose plain INT8 holds the smaller drop on the selection half (edgeport.evaluate.DropGauge;
    a tie keeps the first); (its method, {method: drop held}, {method: (its plain INT8, its outputs)}: the
    accuracy loop starts from the chosen one's).

    Chosen per model because no one method wins everywhere: the 99.99th percentile wins on the CamVid U-Net,
    min/max on the CenterNet detector of tests/models/centernet.py, whose box regression the clipped top 0.01 %
    costs (the figures: docs/ranges.md)."""
    gauge = selection.gauge(next(iter(candidates.values())))
    tried, held = {}, {}
    for m, calibrated in candidates.items():
        blob = quantize(calibrated, given)
        tried[m] = (blob, selection.outputs(blob))
        held[m] = float(gauge(tried[m][1])[1])
    chosen = min(held, key=lambda m: held[m])
    _stage("activation ranges chosen on the selection half: " + ", ".join(
        f"{m} holds {d:.4f}" for m, d in held.items()) + f" ({gauge.key} drop): {chosen}")
    return chosen, held, tried


def accuracy_fallback(plain: bytes, calibrated: bytes, selection: _Selection, given: list[str],
                      plain_outputs: Any = None) -> tuple[bytes, dict[str, Any]]:
    """Keep the TFLite ops that add the most error in float (TensorFlow's selective quantization: the
    quantizer's denylisted nodes, with QUANTIZE/DEQUANTIZE around them) until the task metric's drop from
    the float model on the selection half, and on each of its halves (edgeport.evaluate.DropGauge), is within
    max_drop; at most a quarter of the weighted ops (12). ``plain_outputs``: ``plain``'s outputs on the
    selection half, when the range choice has measured them already."""
    from edgeport.evaluate import Tuning

    images, outputs = selection.images, selection.outputs
    max_drop = float(selection.job["max_drop"])
    gauge = selection.gauge(calibrated)  # the whole selection set and its halves: the worst held
    blob = plain
    tuning = Tuning(gauge, max_drop, outputs(blob) if plain_outputs is None else plain_outputs, len(images),
                    selection.val.labelled)
    n_weighted = sum(op["op_name"] in QUANTIZED_OPS for op in _interpreter(plain)._get_ops_details())  # noqa: SLF001
    limit = min(12, max(1, n_weighted // 4))
    kept: list[tuple[str, str]] = []
    _stage(f"accuracy-aware INT8: {gauge.key} drop {tuning.drop:.4f} on the selection half ({len(images)} images; "
           f"worse of its halves {tuning.held:.4f}), max_drop {max_drop:g}")
    tail = decode_tail(calibrated)
    if tuning.over and tail:  # the heads and what follows them (a detector's box decoding): as one step
        trial = quantize(calibrated, given + tail, float_outputs=True)
        if tuning.trial(tail, outputs(trial)):
            blob = trial
            kept += [(t, "decode tail") for t in tail]
            _stage(f"kept the last weighted layers and the {len(tail)} op(s) from them on in float: drop "
                   f"{tuning.drop:.4f}")
    reference = None  # the float model's tensors on the ranking images: the same at every step
    while tuning.over and len(kept) < limit + len(tail):
        reference = reference or all_tensors(calibrated, images[:RANK_IMAGES])
        ranked = rank_ops(blob, reference, images[:RANK_IMAGES], {k for k, _ in kept} | set(given))
        if not ranked:
            break
        name, op, added = ranked[0]
        kept.append((name, op))
        with_tail = any(op == "decode tail" for _, op in kept)
        blob = quantize(calibrated, given + [k for k, _ in kept], float_outputs=with_tail)
        tuning.step([k for k, _ in kept], outputs(blob))
        _stage(f"kept {op} {short_name(name)} in float (adds {added:.3g} relative error): drop {tuning.drop:.4f}")
    return blob, tuning.report(_kept_names(kept), kept_tensors=[k for k, _ in kept], ops=[op for _, op in kept])


def _kept_names(kept: list[tuple[str, str]]) -> list[str]:
    """What the report names as kept in float: the decode tail as one entry, then each op the loop chose."""
    tail = sum(op == "decode tail" for _, op in kept)
    return ([f"the heads and the {tail} op(s) from them on"] if tail else []) + \
        [short_name(k) for k, op in kept if op != "decode tail"]
