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


def top_order(scores: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the `count` largest scores: score descending, then index ascending."""
    flat = scores.reshape(-1)
    n = flat.size
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    if count >= n:
        candidates = np.arange(n)
    else:
        # argpartition finds the threshold; entries equal to it are taken lowest index first
        part = np.argpartition(flat, n - count)[n - count :]
        threshold = flat[part].min()
        above = np.flatnonzero(flat > threshold)
        equal = np.flatnonzero(flat == threshold)[: count - above.size]
        candidates = np.concatenate([above, equal])
    order = np.lexsort((candidates, -flat[candidates]))
    return candidates[order]


def top_set(flat: np.ndarray, count: int) -> np.ndarray:
    """Flat indices (ascending) of the top-`count` set, ties at the threshold lowest index first."""
    n = flat.size
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    if count >= n:
        return np.arange(n)
    threshold = np.partition(flat, n - count)[n - count]
    chosen = flat > threshold
    need = count - int(np.count_nonzero(chosen))
    if need:
        chosen[np.flatnonzero(flat == threshold)[:need]] = True
    return np.flatnonzero(chosen)


def level_codes(scores: np.ndarray, ks: Sequence[float]) -> np.ndarray:
    """uint8 array shaped like `scores`: 1 + index of the smallest k in `ks` (ascending)
    whose top-k holds the entry, or 0.

    One partition finds the largest set; the smaller sets' thresholds come from one
    multi-pivot partition of its values, so no sort is needed."""
    ks = list(ks)
    if ks != sorted(ks) or len(ks) > 254:
        raise ValueError("ks must be ascending and at most 254 values")
    flat = scores.reshape(-1)
    counts = [top_count(flat.size, k) for k in ks]
    levels = np.zeros(flat.size, dtype=np.uint8)
    candidates = top_set(flat, max(counts, default=0))  # ascending flat indices
    m = candidates.size
    if m == 0:
        return levels.reshape(scores.shape)
    values = flat[candidates]
    pivots = sorted({m - c for c in counts if 0 < c < m})
    ordered = np.partition(values, pivots) if pivots else values
    sub = np.zeros(m, dtype=np.uint8)
    for j in range(len(ks) - 1, -1, -1):  # largest k first; smaller sets overwrite with lower levels
        count = counts[j]
        if count == 0:
            continue
        if count == m:
            sub[:] = j + 1
            continue
        threshold = ordered[m - count]
        above = values > threshold
        sub[above] = j + 1
        need = count - int(above.sum())
        if need:  # candidates are in ascending index order: the first `need` ties win
            sub[np.flatnonzero(values == threshold)[:need]] = j + 1
    levels[candidates] = sub
    return levels.reshape(scores.shape)


def in_top(levels: np.ndarray, j: int) -> np.ndarray:
    """Boolean mask of the top-ks[j] set from level codes."""
    return (levels != 0) & (levels <= j + 1)


def math_only(math_levels: np.ndarray, control_levels: np.ndarray, j: int) -> np.ndarray:
    """Top-k on math and not top-k on control, same matrix, same k (ks[j])."""
    return in_top(math_levels, j) & ~in_top(control_levels, j)


def scores(magnitudes: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """score[i, j] = |W[i, j]| * norms[j], in float32 (the rank-1 structure of MathNeuro)."""
    return magnitudes * norms.astype(np.float32, copy=False)[None, :]
