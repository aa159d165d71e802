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
