"""Error bars for success rates: the Wilson score interval, the one every printed success rate carries.

A success rate over a few dozen episodes is a noisy estimate; the normal approximation collapses to
zero width at 0/n and n/n. Wilson's interval does not, and it is what LIBERO reports with
seeds and standard errors should be compared with.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(successes: int, episodes: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of `successes` out of `episodes` at `confidence`."""
    if episodes < 0 or not 0 <= successes <= max(episodes, 0):
        raise ValueError(f"expected 0 <= successes <= episodes, got {successes} of {episodes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if episodes == 0:
        return 0.0, 1.0  # nothing observed: every rate is possible
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    rate = successes / episodes
    scale = 1 + z * z / episodes
    centre = (rate + z * z / (2 * episodes)) / scale
    half = z * math.sqrt(rate * (1 - rate) / episodes + z * z / (4 * episodes * episodes)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


def format_rate(successes: int, episodes: int) -> str:
    """`9/20 45.0% [26-66%]`: the count, the rate and its 95% Wilson interval."""
    low, high = wilson_interval(successes, episodes)
    rate = successes / episodes if episodes else 0.0
    return f"{successes}/{episodes} {100 * rate:.1f}% [{100 * low:.0f}-{100 * high:.0f}%]"
