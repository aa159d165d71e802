"""Honest selection's split: a video's neighbouring frames stay on one side, classes on both."""
from __future__ import annotations

import numpy as np
import pytest

from edgeport.config import ConfigError, ValidationConfig
from edgeport.evaluate import LabelledSet, halves, split_halves


def _set(names: list[str]) -> LabelledSet:
    n = len(names)
    return LabelledSet("test", "classification", np.zeros((n, 1), np.float32), np.zeros(n, np.int64),
                       [{}] * n, names, "0" * 64)


def test_blocks_keep_a_sequence_together_and_alternate_interleaves():
    h = halves(101)
    assert h["selection"] == list(range(51)) and h["report"] == list(range(51, 101))
    a = halves(101, "alternate")
    assert a["selection"] == list(range(0, 101, 2)) and a["report"] == list(range(1, 101, 2))
    assert halves(1) == {"selection": [0], "report": [0]}
    with pytest.raises(ValueError, match="unknown split"):
        halves(4, "random")


def test_blocks_split_each_class_folder_so_both_halves_see_every_class():
    names = [f"{c}/{i:03d}.jpg" for c in ("cat", "dog", "eel") for i in range(5)]
    h = split_halves(_set(names))
    for c in ("cat", "dog", "eel"):
        sel = [names[i] for i in h["selection"] if names[i].startswith(c)]
        rep = [names[i] for i in h["report"] if names[i].startswith(c)]
        assert len(sel) == 3 and len(rep) == 2 and max(sel) < min(rep), (c, sel, rep)
    assert sorted(h["selection"] + h["report"]) == list(range(len(names)))
    # groups of one sample each cannot be split within: the groups alternate instead
    single = split_halves(_set(["a/1.jpg", "b/1.jpg", "c/1.jpg", "d/1.jpg"]))
    assert single == {"selection": [0, 2], "report": [1, 3]}


def test_a_subset_has_its_own_identity_so_a_new_split_is_a_new_cache_key():
    ds = _set([f"f{i}.png" for i in range(6)])
    first, second = ds.subset([0, 1, 2]), ds.subset([0, 2, 4])
    assert first.sha256 != second.sha256 != ds.sha256
    assert ds.subset([0, 1, 2]).sha256 == first.sha256


def test_config_refuses_an_unknown_split():
    ValidationConfig(split="alternate").validate()
    with pytest.raises(ConfigError, match="'validation.split' = 'blocs'.*blocks"):
        ValidationConfig(split="blocs").validate()


def test_the_loops_hold_the_worse_half_of_the_selection_set():
    """DropGauge: 2 of 8 wrong, both in the first half: 25 points on the whole set, 50 on the first half."""
    from edgeport.quantize.loop import DropGauge

    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ds = LabelledSet("test", "classification", np.zeros((8, 1), np.float32), labels, [{}] * 8,
                     [f"f{i}.png" for i in range(8)], "0" * 64)
    fp32 = np.eye(3, dtype=np.float32)[labels] * 5.0
    got = fp32.copy()
    got[[0, 1]] = np.eye(3, dtype=np.float32)[[2, 2]] * 5.0  # two first-half samples now wrong
    gauge = DropGauge(fp32, ds, "NCHW")
    assert gauge.key == "top1" and gauge.reference == pytest.approx(100.0)
    whole, held = gauge(got)
    assert whole == pytest.approx(25.0) and held == pytest.approx(50.0)
    assert gauge(fp32) == (pytest.approx(0.0), pytest.approx(0.0))


def test_the_loops_record_keeps_a_trial_only_when_it_holds_less_and_its_gain_clears():
    """Tuning: a group tried at once (a detector's heads) is kept only if it lowers the drop held and its
    agreement gain over the step before has an interval above zero; a gain on one frame of 12 (one block of
    four) does not clear, a gain on every block does. The report gives the first step's drops as 'before', the
    last kept step's as 'after', each step's interval and the steps put back."""
    from edgeport.quantize.loop import DropGauge, Tuning

    labels = np.array([0, 1, 2] * 4)
    ds = LabelledSet("test", "classification", np.zeros((12, 1), np.float32), labels, [{}] * 12,
                     [f"f{i:02d}.png" for i in range(12)], "0" * 64)
    fp32 = np.eye(3, dtype=np.float32)[labels] * 5.0

    def wrong(*idx: int) -> np.ndarray:
        got = fp32.copy()
        got[list(idx)] = np.eye(3, dtype=np.float32)[[(labels[i] + 1) % 3 for i in idx]] * 5.0
        return got

    every_block = (0, 1, 4, 5, 8, 9)  # two frames of each block of four neighbours
    t = Tuning(DropGauge(fp32, ds, "NCHW"), 10.0, wrong(*every_block, 2), 12, True)
    assert t.over and t.drop == pytest.approx(7 / 12 * 100)
    assert not t.trial(["heads"], wrong(*every_block, 2, 3)) and len(t.steps) == 1  # worse: not kept
    assert not t.trial(["heads"], wrong(*every_block)) and len(t.steps) == 1  # one frame better: not shown
    assert t.rejected[-1]["gain"]["interval"][0] <= 0.0
    assert t.trial(["heads"], wrong(0, 4, 8, 2)) and t.steps[-1]["gain"]["interval"][0] > 0.0
    assert t.step(["heads", "conv"], fp32)
    r = t.report(["heads", "conv"])
    assert r["drop_before"] == pytest.approx(7 / 12 * 100)
    assert r["drop_after"] == pytest.approx(0.0) and r["met"] and [s["kept"] for s in r["steps"]] == \
        [[], ["heads"], ["heads", "conv"]]
    assert len(r["rejected"]) == 2 and r["kept_by"] == "agreement interval"
