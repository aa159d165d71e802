"""Output comparison: every metric and tolerance key can fail, on arrays built to fail it."""
from __future__ import annotations

import numpy as np

from edgeport.runner.metrics import compare


def test_metrics_and_each_tolerance_key():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 10)).astype(np.float32)
    noisy = ref + rng.normal(scale=0.05, size=ref.shape).astype(np.float32)
    m = compare(ref, noisy, "classification", {})
    assert m["ok"] and m["failed"] == []
    assert 0 < m["mean_abs"] < m["max_abs"] and m["cosine"] > 0.99 and 20 < m["sqnr_db"] < 40
    assert m["agreement"] > 0.9 and m["top5_agreement"] >= m["agreement"]
    for key, value, word in (("max_abs", 1e-3, "max_abs"), ("max_rel", 1e-4, "max_rel"),
                             ("min_cosine", 0.9999999, "cosine"), ("min_sqnr_db", 60.0, "sqnr"),
                             ("min_agreement", 1.01, "agreement")):
        r = compare(ref, noisy, "classification", {key: value})
        assert not r["ok"] and r["failed"][0].startswith(word), (key, r["failed"])
    shuffled = ref[:, ::-1]
    r = compare(ref, shuffled, "classification", {"min_agreement": 0.5})
    assert not r["ok"] and r["agreement"] < 0.5 and r["top5_agreement"] < 1.0
    assert compare(ref, ref, "classification", {"max_abs": 0.0})["sqnr_db"] == float("inf")
    assert compare(ref, ref[:, :5], "classification", {})["failed"] == ["shape [64, 5] != [64, 10]"]


def test_fast_segment_equals_argmax_including_ties():
    from edgeport.tasks.segmentation.runner import segment

    rng = np.random.default_rng(3)
    for shape in [(1, 7, 120, 160), (1, 11, 9, 13), (1, 2, 4, 4)]:
        a = rng.normal(size=shape).astype(np.float32)
        ties = np.round(a * 2)  # many equal scores: the first class must win, as in np.argmax
        for arr in (a, ties):
            assert (segment(arr, False) == np.argmax(arr[0], 0)).all()
            assert (segment(arr.transpose(0, 2, 3, 1), True) == np.argmax(arr[0], 0)).all()


def test_channel_error_sees_rounded_away_channels_but_not_nearly_dead_ones():
    from edgeport.runner.metrics import channel_error

    ref = np.ones((2, 4, 3, 3))
    ref[:, 0] = 100.0  # one large channel: a shared INT8 scale rounds the other three away
    got = ref.copy()
    got[:, 1:] = 0.0
    assert abs(channel_error(got, ref, 1) - 0.75) < 1e-9
    dead = np.ones((2, 4, 3, 3))
    dead[:, 2] = 1e-5  # nearly dead (a squeeze-excite pooled value): one INT8 step there is harmless
    step = dead.copy()
    step[:, 2] = 0.04
    assert channel_error(step, dead, 1) < 0.05  # without the floor: (0.04 / 1e-5) ** 2 / 4 = 4e6
