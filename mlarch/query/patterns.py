"""Membership-pattern histograms: for one (model, k, seed) and module, how many parameters
were selected by exactly each subset of languages. The numpy core lives in
mlarch/pattern_counts.py (the store's derive uses it too); these are its names for queries."""

from __future__ import annotations

from mlarch.pattern_counts import code_dtype, count_codes, histogram, merge_counts, named

__all__ = ["code_dtype", "count_codes", "histogram", "merge_counts", "named"]
