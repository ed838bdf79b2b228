"""The trainer workload shared by the test-side trainer process and the tests that check it.

Values are deterministic in (seed, step), use every bit of a float64, and include NaN and
infinities, so that "arrived bit-exact" can be checked value by value.
"""
from __future__ import annotations

import math
import random
import struct

FRAMES_PER_EPOCH = 4096 * 32


def metric_names(count: int) -> list[str]:
    groups = ["losses", "info", "rewards", "performance"]
    return ["%s/m%02d" % (groups[i % len(groups)], i) for i in range(count)]


def row(seed: int, step: int, count: int) -> dict:
    rng = random.Random(seed * 1_000_003 + step)
    values = {name: rng.uniform(-1e3, 1e3) * 10.0 ** rng.randint(-12, 12) for name in metric_names(count)}
    names = metric_names(count)
    if step % 97 == 5:
        values[names[1]] = math.nan
    if step % 89 == 7:
        values[names[2]] = math.inf if step % 2 else -math.inf
    values[names[3]] = step  # an int stays an int
    return values


def frame(step: int) -> int:
    return (step + 1) * FRAMES_PER_EPOCH


def same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b and type(a) is type(b)
