"""Evidence for INT8 choices: sequences from file names, the bootstrap's units, and the paired interval."""
from __future__ import annotations

import numpy as np

from edgeport.quantize.evidence import paired_gain, sequence_of, units


def test_sequences_from_file_names() -> None:
    assert sequence_of("val/0016E5_08070.png") == "0016E5"
    assert sequence_of("Seq05VD_f00120.png") == "Seq05VD"
    assert sequence_of("000123.png") == ""
    assert sequence_of("street.jpg") == "street"


def test_units_are_sequences_when_there_are_enough_else_blocks_of_neighbours() -> None:
    names = [f"{s}_{i:05d}.png" for s in ("0001TP", "0006R0", "0016E5", "Seq05VD") for i in range(3)]
    groups, how = units(names)
    assert how == "4 sequences" and sorted(map(len, groups)) == [3, 3, 3, 3]
    names = [f"0016E5_{i:05d}.png" for i in range(50)]
    groups, how = units(names)
    assert how == "7 blocks of up to 8 neighbouring frames" and [len(g) for g in groups] == [8] * 6 + [2]
    assert groups[0] == list(range(8))  # neighbours stay together


def test_a_consistent_gain_clears_and_noise_does_not() -> None:
    rng = np.random.default_rng(1)
    names = [f"0016E5_{i:05d}.png" for i in range(60)]
    default = 95 + rng.normal(0, 1, 60)
    better = paired_gain(default + 0.3 + rng.normal(0, 0.05, 60), default, names)
    assert better.clears and 0.2 < better.low < better.mean < better.high < 0.4
    noise = paired_gain(default + rng.normal(0, 1, 60), default, names)
    assert not noise.clears and noise.low < 0 < noise.high
    # a gain carried by one block of neighbours is not a gain
    one_block = default.copy()
    one_block[:8] += 3.0
    assert not paired_gain(one_block, default, names).clears


def test_the_drop_has_its_interval_and_the_spread_with_each_sequence_left_out() -> None:
    """Top-1 on 3 sequences of 8 frames; INT8 is wrong on 4 frames of sequence B only: 4/24 = 16.7 points on the
    whole set, 0 with B left out, 25 with A or C left out; the interval (3 sequences: blocks) holds the drop."""
    from edgeport.evaluate import LabelledSet
    from edgeport.quantize.evidence import drop_evidence

    labels = np.array([0, 1, 2, 3] * 6)
    names = [f"{s}_{i:03d}.png" for s in "ABC" for i in range(8)]
    ds = LabelledSet("test", "classification", np.zeros((24, 1), np.float32), labels, [{}] * 24, names, "0" * 64)
    ref = np.eye(4, dtype=np.float32)[labels]
    got = ref.copy()
    got[[8, 10, 12, 14]] = np.eye(4, dtype=np.float32)[(labels[[8, 10, 12, 14]] + 1) % 4]
    ev = drop_evidence(ref, got, ds, "NCHW")
    assert ev["leave_one_sequence_out"]["drops"] == {"A": 25.0, "B": 0.0, "C": 25.0}
    assert ev["leave_one_sequence_out"]["spread"] == [0.0, 25.0]
    low, high = ev["interval"]
    assert low < 4 / 24 * 100 < high and low >= 0.0 and ev["resampled"].endswith("neighbouring frames")
    one = drop_evidence(ref[8:16], got[8:16], ds.subset(list(range(8, 16))), "NCHW")  # one sequence: no spread
    assert "leave_one_sequence_out" not in one and one["interval"][1] > 0


def test_a_quarter_of_the_calibration_set_is_held_back_to_judge_int8_choices() -> None:
    """CalibrationSet.hold_back keeps the last quarter (at most 100) apart from the ranges, with its own identity;
    the held frames join the selection set's for agreement, after them (LabelledSet.joined)."""
    from edgeport.calibration import HELD_FROM, CalibrationSet
    from edgeport.evaluate import LabelledSet, unlabelled

    data = np.arange(120, dtype=np.float32).reshape(120, 1)
    cs = CalibrationSet("calib", data, "a" * 64)
    held = cs.hold_back()
    assert len(held) == 90 and held.held is not None and held.held[:, 0].tolist() == list(range(90, 120))
    assert held.sha256 != cs.sha256 and held.hold_back() is held
    small = CalibrationSet("calib", data[:HELD_FROM - 1], "b" * 64)
    assert small.hold_back() is small and small.held is None
    big = CalibrationSet("calib", np.zeros((1000, 1), np.float32), "c" * 64).hold_back()
    assert len(big.held) == 100 and len(big) == 900
    val = LabelledSet("val", "classification", np.ones((4, 1), np.float32), np.array([0, 1, 0, 1]), [{}] * 4,
                      [f"0016E5_{i:05d}.png" for i in range(4)], "d" * 64)
    extra = unlabelled("held", "classification", held.held, "e" * 64, None, "calibration")
    both = val.joined(extra)
    assert len(both) == 34 and not both.labelled and both.names[3] == "0016E5_00003.png"
    assert both.names[4] == "calibration_00000" and both.inputs[4, 0] == 90.0
