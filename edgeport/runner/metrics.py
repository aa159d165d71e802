"""Output comparison metrics and tolerances: one implementation for host parity and --selftest.

Python 3.6 syntax, numpy only (embedded into runner.py).
"""
import numpy as np

from edgeport.runner.task import task_part


def task_agreement(ref, got, task):
    """The share of the reference's decisions that ``got`` repeats, by task ``task``'s own measure (top-1
    agreement, pixel agreement, ...); both raw outputs in the same layout."""
    return task_part(task).agreement(ref, got)


def class_argmax(arr, axis):
    """np.argmax over a class axis, ties to the first class.

    For a few classes on a non-last axis (NCHW maps) a running maximum over the class planes gives
    the same result several times faster than numpy's strided reduction (docs/benchmarks/code-figures.md), which
    matters at a thousand frames a second and on whole validation sets.
    """
    axis = axis % arr.ndim
    n = arr.shape[axis]
    if n > 64 or axis == arr.ndim - 1:
        return np.argmax(arr, axis)
    planes = np.moveaxis(arr, axis, 0)
    best = planes[0].copy()
    ids = np.zeros(best.shape, np.uint8)
    for c in range(1, n):
        ids[planes[c] > best] = c
        np.maximum(best, planes[c], out=best)
    return ids


def class_axis(arr):
    """The class axis of a segmentation output: 1 for NCHW, -1 for NHWC (fewer classes than pixels)."""
    if arr.ndim == 4 and arr.shape[-1] < arr.shape[1] and arr.shape[-1] < arr.shape[2]:
        return -1
    return 1


def compare(ref, got, task, tol):
    """Compare one output; returns a dict of metrics with 'ok' and 'failed' (the checks that failed).

    tol keys: max_abs, max_rel (max |ref-got| over ref's range), min_cosine, min_sqnr_db,
    min_agreement; a missing or None key is not checked. ``task`` None (an intermediate tensor, not a
    model output) measures no agreement.
    """
    # float32 arithmetic with float64 accumulation: the same figures as a float64 copy at a quarter of
    # the memory traffic (a validation set's outputs are hundreds of MB in float64).
    ref = np.asarray(ref, np.float32)
    got = np.asarray(got, np.float32)
    if ref.shape != got.shape:
        return {"ok": False, "failed": ["shape %s != %s" % (list(got.shape), list(ref.shape))]}
    err = ref - got
    diff = np.abs(err)
    span = float(ref.max()) - float(ref.min()) or 1.0
    power = float(np.sum(np.square(ref), dtype=np.float64))
    denom = float(np.sqrt(power * float(np.sum(np.square(got), dtype=np.float64))))
    noise = float(np.sum(np.square(err), dtype=np.float64))
    m = {
        "max_abs": float(diff.max()),
        "mean_abs": float(np.mean(diff, dtype=np.float64)),
        "max_rel": float(diff.max()) / span,
        "cosine": float(np.sum(ref * got, dtype=np.float64) / denom) if denom else (1.0 if noise == 0 else 0.0),
        "sqnr_db": float(10 * np.log10(power / noise)) if noise > 0 else float("inf"),
    }
    agreement = None if task is None else task_agreement(ref, got, task)
    if agreement is not None:  # None: a task whose single outputs carry no decisions (detection)
        m["agreement"] = agreement
        m.update(task_part(task).extra_agreement(ref, got))
    failed = []
    if tol.get("max_abs") is not None and m["max_abs"] > tol["max_abs"]:
        failed.append("max_abs %.3g > %.3g" % (m["max_abs"], tol["max_abs"]))
    if tol.get("max_rel") is not None and m["max_rel"] > tol["max_rel"]:
        failed.append("max_rel %.3g > %.3g" % (m["max_rel"], tol["max_rel"]))
    if tol.get("min_cosine") is not None and m["cosine"] < tol["min_cosine"]:
        failed.append("cosine %.7f < %.7f" % (m["cosine"], tol["min_cosine"]))
    if tol.get("min_sqnr_db") is not None and m["sqnr_db"] < tol["min_sqnr_db"]:
        failed.append("sqnr %.1f dB < %.1f dB" % (m["sqnr_db"], tol["min_sqnr_db"]))
    if tol.get("min_agreement") is not None and "agreement" in m and m["agreement"] < tol["min_agreement"]:
        failed.append("agreement %.4f < %.4f" % (m["agreement"], tol["min_agreement"]))
    m["ok"] = not failed
    m["failed"] = failed
    return m


CHANNEL_FLOOR = 0.01  # of the median channel energy: channel_error's least denominator


def channel_error(got, ref, axis):
    """Mean over channels (``axis``) of each channel's relative squared error: a tensor whose small channels
    were rounded away by a shared INT8 scale scores near 1, however well its one large channel came through
    (a whole-tensor relative error hides exactly that). A channel's energy counts as at least 1 % of the
    tensor's median channel energy (the median: one huge channel does not raise it): a nearly dead channel (a
    squeeze-excite block's pooled value of 1e-5 beside others of 1) moved by one INT8 step would otherwise
    score 1e4 and more, and rank its layer first, though nothing downstream feels it."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if ref.ndim < 2:
        return float(np.sum((got - ref) ** 2) / (np.sum(ref ** 2) or 1e-30))
    axes = tuple(a for a in range(ref.ndim) if a != axis % ref.ndim)
    num = np.sum((got - ref) ** 2, axis=axes)
    den = np.sum(ref ** 2, axis=axes)
    live = den > 1e-12 * (den.max() if den.size else 0.0)  # channels that carry nothing are left out
    if not np.any(live):
        return 0.0
    floor = CHANNEL_FLOOR * float(np.median(den[live]))
    return float(np.mean(num[live] / np.maximum(den[live], floor)))
