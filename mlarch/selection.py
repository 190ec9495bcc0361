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
from math import floor, gcd
from typing import Sequence

import numpy as np

from mlarch import parallel


def top_count(n: int, k: float) -> int:
    """floor(n * k), exact for the decimal k as written (0.29 * 100 = 29, not 28)."""
    return floor(Decimal(repr(float(k))) * n)


def level_codes(scores: np.ndarray, ks: Sequence[float], counts: Sequence[int] | None = None) -> np.ndarray:
    """uint8 array shaped like `scores`: 1 + index of the smallest k in `ks` (ascending)
    whose top-k holds the entry, or 0.

    `counts` (one per k, non-decreasing) replaces top_count's set sizes: the mathneuro-bf16
    method sizes its sets as the authors' code does, int(n * k) in floating point.

    A sample gives a value just below the largest set's threshold, so one compare finds a
    small superset of that set (the candidates); in-place partitions of their values find
    every threshold exactly; one compare per k counts the thresholds an entry clears.
    Entries equal to a threshold are ranked by index (the tie rule) only when there are
    more of them than the set has room for."""
    flat = scores.reshape(-1)
    counts = _set_sizes(flat.size, ks, counts)
    largest = max(counts, default=0)
    if largest == 0:
        return np.zeros(scores.shape, dtype=np.uint8)
    cols = scores.shape[-1] if scores.ndim > 1 else 1
    candidates = _candidates(flat, largest, cols)  # ascending flat indices of a superset of the largest set
    return _place(flat.size, candidates, np.take(flat, candidates), counts).reshape(scores.shape)


def module_levels(magnitudes: np.ndarray, norms: np.ndarray, ks: Sequence[float]) -> np.ndarray:
    """level_codes(scores(magnitudes, norms), ks), the same bytes, without the module's
    float32 score matrix: the candidates' scores are made a block of rows at a time, in
    cache. Peak memory per module about halves (a 32000 x 2048 head: 243 MiB above its |W|
    instead of 490, by tracemalloc) and large modules select ~10% faster (paired runs on four
    Llama-3.2-1B blocks and that head); modules under _BLOCKED_FROM parameters take the whole
    scores."""
    rows, cols = magnitudes.shape
    n = magnitudes.size
    counts = _set_sizes(n, ks, None)
    largest = max(counts, default=0)
    if largest == 0:
        return np.zeros((rows, cols), dtype=np.uint8)
    norms = norms.astype(np.float32, copy=False)
    bound = None
    if n >= max(4 * _SAMPLE, _BLOCKED_FROM) and largest < n and magnitudes.dtype == np.float32:
        flat = magnitudes.reshape(-1)
        at = np.arange(0, n, sample_step(n, cols))[:_SAMPLE]
        bound = _sampled_bound(flat[at] * norms[at % cols], largest, n)  # the same sample level_codes takes
    if bound is None:
        return level_codes(scores(magnitudes, norms), ks)
    step = max(1, _BLOCK_BYTES // (4 * cols))
    block = np.empty((min(step, rows), cols), np.float32)
    above = np.empty(block.shape, bool)
    found, values = [], []
    for start in range(0, rows, step):
        part = magnitudes[start:start + step]
        s, a = block[:part.shape[0]], above[:part.shape[0]]
        np.multiply(part, norms[None, :], out=s)  # the same float32 products as scores()
        np.greater_equal(s, bound, out=a)
        at = np.flatnonzero(a)
        values.append(np.take(s.reshape(-1), at))
        at += start * cols
        found.append(at)
    candidates = np.concatenate(found)
    del found  # the pieces go before the values are joined: one copy of each at a time
    if candidates.size < largest:  # the sample's bound missed: the exact path
        return level_codes(scores(magnitudes, norms), ks)
    values = np.concatenate(values)
    return _place(n, candidates, values, counts).reshape(rows, cols)


_BLOCK_BYTES = 1 << 21  # a block of rows' scores fits a core's L2 (2 MiB on the bench host)
_BLOCKED_FROM = 1 << 23  # smaller modules' scores (< 32 MiB) are formed whole: they stay in cache,
# where the blocked loop is slower (~13% on Gemma-3-270M's shapes; ~10% faster on Llama-3.2-1B's blocks)


def _set_sizes(n: int, ks: Sequence[float], counts: Sequence[int] | None) -> list[int]:
    ks = list(ks)
    if ks != sorted(ks) or len(ks) > 254:
        raise ValueError("ks must be ascending and at most 254 values")
    counts = [top_count(n, k) for k in ks] if counts is None else [int(c) for c in counts]
    if len(counts) != len(ks) or counts != sorted(counts):
        raise ValueError("counts must give one non-decreasing set size per k")
    return counts


def _place(n: int, candidates: np.ndarray, values: np.ndarray, counts: list[int]) -> np.ndarray:
    """Flat level codes from the candidates (ascending flat indices of a superset of the
    largest set, all its ties included) and their scores."""
    levels = np.zeros(n, dtype=np.uint8)
    largest = max(counts)
    thresholds = _thresholds(values.copy(), counts)  # lowest threshold (largest k) first
    # an entry is in top-ks[j] iff it is >= t_j, unless more entries equal t_j than the set
    # has room for (then the tie rule decides, below); thresholds fall as k grows, so an
    # entry clearing b of them first enters at level K + 1 - b (b = 0: never)
    cleared = np.zeros(values.size, dtype=np.uint8)
    crowded = []  # thresholds with more entries equal to them than places left
    inside = None  # clears the lowest threshold: in some set at all
    for j, t in thresholds.items():
        at_least = values >= t
        cleared += at_least
        inside = at_least if inside is None else inside
        if np.count_nonzero(at_least) > counts[j]:
            crowded.append(t)
    sub = np.subtract(np.uint8(len(counts) + 1), cleared, dtype=np.uint8)
    np.multiply(sub, inside, out=sub)  # b = 0 -> level 0
    ranked = np.array(counts)
    for t in sorted(set(crowded)):  # rank the entries equal to t by index, then place them
        tied = np.flatnonzero(values == t)
        ranks = np.count_nonzero(values > t) + np.arange(tied.size)
        sub[tied] = np.where(ranks < largest, np.searchsorted(ranked, ranks, side="right") + 1, 0)
    levels[candidates] = sub
    return levels


_SAMPLE = 1 << 14


def sample_step(n: int, cols: int) -> int:
    """Stride of the sample: about n / _SAMPLE and coprime to the row length, so the
    sample visits every column and row evenly (a stride that is a multiple of the row
    length would see one column only)."""
    step = max(1, n // _SAMPLE)
    while gcd(step, cols) != 1:
        step += 1
    return step


def _sampled_bound(sample: np.ndarray, count: int, n: int):
    """A value just below the count-th largest of n entries, by a sample of them, with a
    margin of about four standard deviations; None where the sample cannot tell."""
    m = sample.size
    expected = count * m / n
    above = int(expected + 4 * np.sqrt(expected) + 16)
    return np.partition(sample, m - 1 - above)[m - 1 - above] if above < m else None


def _candidates(flat: np.ndarray, count: int, cols: int) -> np.ndarray:
    """Ascending indices of at least the `count` largest entries (all ties included), and
    few others: the bound comes from a fixed, strided sample (_sampled_bound); if it
    misses, one exact partition finds the bound."""
    n = flat.size
    bound = None
    if n >= 4 * _SAMPLE and count < n:
        # strided: cache-friendly, unlike random picks
        bound = _sampled_bound(flat[:: sample_step(n, cols)][:_SAMPLE], count, n)
    if bound is not None:
        candidates = np.flatnonzero(flat >= bound)
        if candidates.size >= count:
            return candidates
    if count >= n:
        return np.arange(n)
    return np.flatnonzero(flat >= np.partition(flat, n - count)[n - count])


def _thresholds(values: np.ndarray, counts: list[int]) -> dict[int, float]:
    """{j: the counts[j]-th largest of `values`} for every non-zero count; partitions
    `values` in place, on ever smaller views (the sets are nested)."""
    thresholds, view = {}, values
    for j in sorted(range(len(counts)), key=lambda j: -counts[j]):
        if counts[j] == 0:
            continue
        if counts[j] < view.size:
            view.partition(view.size - counts[j])
            view = view[view.size - counts[j]:]
            thresholds[j] = view[0]  # the partition put the view's smallest value first
        else:
            thresholds[j] = view.min()
    return thresholds


def in_top(levels: np.ndarray, j: int) -> np.ndarray:
    """Boolean mask of the top-ks[j] set from level codes."""
    return (levels != 0) & (levels <= j + 1)


def math_only(math_levels: np.ndarray, control_levels: np.ndarray, j: int) -> np.ndarray:
    """Top-k on math and not top-k on control, same matrix, same k (ks[j])."""
    return in_top(math_levels, j) & ~in_top(control_levels, j)


def model_levels(spans, magnitudes: np.ndarray, norms: np.ndarray, ks: Sequence[float]) -> np.ndarray:
    """Level codes of every module of a model, from its concatenated |W| and norms (laid
    out by `spans`), modules spread over a few threads, largest first so they end together."""
    levels = np.empty(magnitudes.size, dtype=np.uint8)

    def one(span) -> None:
        module = magnitudes[span.params].reshape(span.n_rows, span.n_cols)
        levels[span.params] = module_levels(module, norms[span.norms], ks).reshape(-1)

    with parallel.pool() as pool:
        list(pool.map(one, sorted(spans, key=lambda span: -span.n_params)))  # re-raises a worker's error
    return levels


def scores(magnitudes: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """score[i, j] = |W[i, j]| * norms[j], in float32 (the rank-1 structure of MathNeuro)."""
    return magnitudes * norms.astype(np.float32, copy=False)[None, :]
