"""Wilson score intervals, checked by value."""

from __future__ import annotations

import pytest

from atlas_vla.eval.intervals import format_rate, wilson_interval


@pytest.mark.parametrize("successes,episodes,low,high", [
    (0, 20, 0.0, 0.1611), (9, 20, 0.2582, 0.6579), (20, 20, 0.8389, 1.0), (36, 60, 0.4737, 0.7143),
    (57, 60, 0.8630, 0.9829), (1, 1, 0.2065, 1.0),
])
def test_wilson_interval_by_value(successes, episodes, low, high):
    assert wilson_interval(successes, episodes) == pytest.approx((low, high), abs=1e-4)


def test_the_interval_never_leaves_0_to_1():
    # 9/9 and 0/21 are where the unclamped formula rounds to 1 + 2e-16 and -1e-17
    assert wilson_interval(9, 9)[1] == 1.0 and wilson_interval(0, 21)[0] == 0.0


def test_confidence_widens_the_interval():
    assert wilson_interval(9, 20, confidence=0.5) == pytest.approx((0.3769, 0.5253), abs=1e-4)  # z = 0.6745
    assert wilson_interval(9, 20, confidence=0.99) == pytest.approx((0.2138, 0.7111), abs=1e-4)  # z = 2.5758


def test_format_and_bad_counts():
    assert format_rate(9, 20) == "9/20 45.0% [26-66%]"
    assert format_rate(36, 60) == "36/60 60.0% [47-71%]"
    assert format_rate(0, 0) == "0/0 0.0% [0-100%]"
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for successes, episodes in [(21, 20), (1, 0), (-1, 5), (0, -1)]:
        with pytest.raises(ValueError) as raised:
            wilson_interval(successes, episodes)
        assert str(raised.value) == f"expected 0 <= successes <= episodes, got {successes} of {episodes}"
    for confidence in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError) as raised:
            wilson_interval(9, 20, confidence)
        assert str(raised.value) == f"confidence must be in (0, 1), got {confidence}"
