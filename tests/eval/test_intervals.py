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


def test_format_and_bad_counts():
    assert format_rate(9, 20) == "9/20 45.0% [26-66%]"
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= successes <= episodes"):
        wilson_interval(21, 20)
