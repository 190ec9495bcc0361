"""Membership-pattern counting, numpy only: for one (model, k, seed) and module, how many
parameters were selected by exactly each subset of languages. The store's derive writes
these counts as the `patterns` rows; every intersection, union and "unique to" count is a
sum over them, so queries never reread masks. Neutral math beside mlarch/selection.py, so
the store need not import mlarch.query.

A pattern is coded as an integer with bit l set when the l-th language (in the order
given) selected the parameter; 0 (no language) is never a row."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def code_dtype(width: int) -> np.dtype:
    """The smallest unsigned integer that holds one bit per language."""
    if width > 64:
        raise ValueError("at most 64 languages per pattern")
    return np.dtype(np.uint8 if width <= 8 else np.uint16 if width <= 16 else np.uint32 if width <= 32 else np.uint64)


def count_codes(codes: np.ndarray, width: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, counts) of the non-zero pattern codes, values ascending; `weights` counts
    each code that many times (codes already deduplicated)."""
    if width <= 16:  # a dense table of 2**width counts
        counts = np.bincount(codes, weights=weights, minlength=1 << width)
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, inverse = np.unique(codes, return_inverse=True)
        counts = np.bincount(inverse.reshape(-1), weights=weights, minlength=values.size)
    if weights is not None:  # float sums of integer weights: exact below 2**53
        counts = np.rint(counts)
    keep = values != 0
    return values[keep].astype(np.int64), counts[keep].astype(np.int64)


def merge_counts(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One (values, counts) from several (the pieces of a module read in several ranges)."""
    if len(parts) == 1:
        return parts[0]
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    merged, inverse = np.unique(values, return_inverse=True)
    total = np.zeros(merged.size, np.int64)
    np.add.at(total, inverse.reshape(-1), counts)
    return merged, total


def named(values: np.ndarray, counts: np.ndarray, langs: Sequence[str]) -> list[tuple[list[str], int]]:
    """(languages, count) rows of coded patterns, in ascending code order."""
    return [([lang for bit, lang in enumerate(langs) if value >> bit & 1], count)
            for value, count in zip(values.tolist(), counts.tolist()) if value and count]


def histogram(masks: Sequence[np.ndarray], langs: Sequence[str]) -> list[tuple[list[str], int]]:
    """(languages, count) for each non-empty membership pattern of the boolean `masks`."""
    if len(masks) != len(langs):
        raise ValueError("one mask per language")
    if not masks:
        return []
    width = len(langs)
    dtype = code_dtype(width)
    codes = np.zeros(masks[0].size, dtype=dtype)
    for bit, mask in enumerate(masks):
        codes |= mask.reshape(-1).astype(dtype) << dtype.type(bit)
    return named(*count_codes(codes, width), langs)
