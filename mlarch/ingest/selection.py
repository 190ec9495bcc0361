"""Per-matrix top-k selection (numpy only; the query side re-thresholds with it too).

Rule: for a matrix with n entries and fraction k, the selected set is the
floor(n * k) largest scores, with k read as the decimal the user typed (so 0.07 of
100 is exactly 7). Ties are broken by the lowest flat (row-major, out x in) index
first. The sets for increasing k are then nested prefixes of one ordering, so one
partition + one sort per matrix serves every k, and a single uint8 "level" per entry
encodes all of them: level j + 1 means "first selected at ks[j]", 0 means "never".
"""

from __future__ import annotations

from decimal import Decimal
from math import floor
from typing import Sequence

import numpy as np


def top_count(n: int, k: float) -> int:
    """floor(n * k), exact for the decimal k as written (0.29 * 100 = 29, not 28)."""
    return floor(Decimal(repr(float(k))) * n)


def level_codes(scores: np.ndarray, ks: Sequence[float]) -> np.ndarray:
    """uint8 array shaped like `scores`: 1 + index of the smallest k in `ks` (ascending)
    whose top-k holds the entry, or 0.

    One partition of the matrix finds the largest set's values; partitions of ever smaller
    arrays find the other thresholds; entries strictly above a threshold get their level
    by counting, and entries equal to one are ranked by index (the tie rule)."""
    ks = list(ks)
    if ks != sorted(ks) or len(ks) > 254:
        raise ValueError("ks must be ascending and at most 254 values")
    flat = scores.reshape(-1)
    n = flat.size
    counts = [top_count(n, k) for k in ks]
    levels = np.zeros(n, dtype=np.uint8)
    largest = max(counts, default=0)
    if largest == 0:
        return levels.reshape(scores.shape)
    if largest >= n:
        candidates, values = np.arange(n), flat
    else:
        part = np.partition(flat, n - largest)
        candidates = np.flatnonzero(flat >= part[n - largest])  # ascending; may hold extra ties
        values = flat[candidates]
    thresholds = _thresholds(values if largest >= n else part[n - largest:], counts)
    # thresholds fall as k grows, so x > t_j exactly for j >= j*: level j* + 1 = K + 1 - #{j: x > t_j}
    above = np.zeros(values.size, dtype=np.uint8)
    for t in thresholds.values():
        above += values > t
    sub = np.where(above > 0, np.uint8(len(ks) + 1) - above, np.uint8(0)).astype(np.uint8)
    ranked = np.array(counts)
    for t in sorted(set(thresholds.values())):  # entries equal to a threshold: rank, then place
        tied = np.flatnonzero(values == t)
        ranks = np.count_nonzero(values > t) + np.arange(tied.size)
        sub[tied] = np.where(ranks < largest, np.searchsorted(ranked, ranks, side="right") + 1, 0)
    levels[candidates] = sub
    return levels.reshape(scores.shape)


def _thresholds(top_values: np.ndarray, counts: list[int]) -> dict[int, float]:
    """{j: the counts[j]-th largest value} from the `max(counts)` largest values."""
    thresholds, current = {}, top_values
    for j in sorted(range(len(counts)), key=lambda j: -counts[j]):
        if counts[j] == 0:
            continue
        if counts[j] < current.size:
            current = np.partition(current, current.size - counts[j])[current.size - counts[j]:]
        thresholds[j] = current.min()
    return thresholds


def in_top(levels: np.ndarray, j: int) -> np.ndarray:
    """Boolean mask of the top-ks[j] set from level codes."""
    return (levels != 0) & (levels <= j + 1)


def math_only(math_levels: np.ndarray, control_levels: np.ndarray, j: int) -> np.ndarray:
    """Top-k on math and not top-k on control, same matrix, same k (ks[j])."""
    return in_top(math_levels, j) & ~in_top(control_levels, j)


def scores(magnitudes: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """score[i, j] = |W[i, j]| * norms[j], in float32 (the rank-1 structure of MathNeuro)."""
    return magnitudes * norms.astype(np.float32, copy=False)[None, :]
