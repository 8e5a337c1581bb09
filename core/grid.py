"""The log-spaced sample-count grid shared by the harness's evaluation schedule and the offline
baselines' dataset prefixes, so an offline curve is evaluated exactly at its prefix sizes."""
from __future__ import annotations

import math


def log_point(k: int, per_decade: int) -> int:
    """The k-th grid point ceil(10^(k / per_decade)): 1, 2, 2, 2, 3, 4, 4, 6, 7, 8, 10, ... for 10 per decade."""
    return math.ceil(10 ** (k / per_decade) - 1e-9)
