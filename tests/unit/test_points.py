"""Drops print with the digits that tell them from the limit (issue 16: 0.3004 must not print as 0.30)."""
from edgeport.tables import points


def test_a_drop_at_the_limit_shows_its_digits():
    assert points(0.3004, 0.3) == "0.3004"
    assert points(0.29996, 0.3) == "0.29996"
    assert points(-0.3004, -0.3, signed=True) == "-0.3004"


def test_a_drop_far_from_the_limit_keeps_two_decimals():
    assert points(0.12, 0.3) == "0.12"
    assert points(0.3, 0.3) == "0.30"
    assert points(1.234) == "1.23"
    assert points(0.5, signed=True) == "+0.50"
