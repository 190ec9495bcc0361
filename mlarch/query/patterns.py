"""Membership-pattern histograms: for one (model, k, seed) and module, how many parameters
were selected by exactly each subset of languages. Every intersection, union and
"unique to" count is a sum over these rows, so queries never reread masks."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def histogram(masks: Sequence[np.ndarray], langs: Sequence[str]) -> list[tuple[list[str], int]]:
    """(languages, count) for each non-empty membership pattern of the boolean `masks`."""
    if len(masks) != len(langs):
        raise ValueError("one mask per language")
    if not masks:
        return []
    width = len(langs)
    dtype = np.uint8 if width <= 8 else np.uint16 if width <= 16 else np.int64
    codes = np.zeros(masks[0].size, dtype=dtype)
    for bit, mask in enumerate(masks):
        codes |= mask.reshape(-1).astype(dtype) << dtype(bit)
    if width <= 16:
        counts = np.bincount(codes, minlength=1 << width)
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(codes, return_counts=True)
    rows = []
    for value, count in zip(values.tolist(), counts.tolist()):
        if value == 0:
            continue
        rows.append(([lang for bit, lang in enumerate(langs) if value >> bit & 1], count))
    return rows
