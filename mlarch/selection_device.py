"""selection.level_codes with torch ops, so selection can run where the scores are (CUDA).

Same rule, same output, byte for byte: for a matrix of n entries the top-ks[j] set is the
counts[j] largest scores (counts default to selection.top_count(n, k)), ties broken by the
lowest flat (row-major) index; the uint8 level of an entry is 1 + the index of the smallest
k whose set holds it, or 0. Only the uint8 codes need to leave the device.

How: a strided sample gives a bound just below the largest set's threshold (as the numpy
path does); the entries at or above it (the candidates, a small superset of the largest
set, in ascending index order) are sorted by score, descending and *stable*, so equal
scores keep ascending index order and the rank of a candidate is its rank under the tie
rule; the rank says at which k it enters. If the sample's bound misses (fewer candidates
than the largest set), an exact k-th value gives the bound instead.

Two float details the numpy path gets from its comparisons for free: -0.0 and +0.0 are equal
there, but a radix sort (CUDA's) orders -0.0 first, so candidates are canonicalised (x + 0
turns -0.0 into +0.0); and NaN has no place in the order (numpy's partitions then give sets
of the wrong size), so NaN is refused, as ingest refuses non-finite norms and weights before
selection. +-inf are ordinary values on both paths.
"""

from __future__ import annotations

from math import sqrt
from typing import Sequence

import torch

from mlarch.selection import _SAMPLE, sample_step, top_count


def scores_torch(magnitudes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """score[i, j] = |W[i, j]| * norms[j] in float32: selection.scores with torch ops.

    One IEEE float32 multiply per entry (norms rounded to float32 first, as numpy's
    astype does), which CPU and CUDA both round correctly: the same bits as numpy."""
    if magnitudes.dtype != torch.float32:
        raise ValueError(f"magnitudes must be float32 (as ingest stores |W|), not {magnitudes.dtype}")
    return magnitudes * norms.to(device=magnitudes.device, dtype=torch.float32)[None, :]


def level_codes_torch(scores: torch.Tensor, ks: Sequence[float], counts: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 tensor shaped like `scores`, on its device: selection.level_codes's output."""
    ks = list(ks)
    if ks != sorted(ks) or len(ks) > 254:
        raise ValueError("ks must be ascending and at most 254 values")
    flat = scores.reshape(-1)
    n = flat.numel()
    counts = [top_count(n, k) for k in ks] if counts is None else [int(c) for c in counts]
    if len(counts) != len(ks) or counts != sorted(counts):
        raise ValueError("counts must give one non-decreasing set size per k")
    levels = torch.zeros(n, dtype=torch.uint8, device=flat.device)
    largest = min(max(counts, default=0), n)  # a count above n selects everything, as in numpy
    if largest == 0:
        return levels.reshape(scores.shape)
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise ValueError("scores contain NaN: there is no top-k of NaN (ingest refuses non-finite norms and weights)")
    cols = scores.shape[-1] if scores.dim() > 1 else 1
    candidates = _candidates(flat, largest, cols)  # ascending flat indices, a superset of the largest set
    values = flat[candidates]
    if values.is_floating_point():
        values = values + 0.0  # -0.0 -> +0.0, so that no sort can tell them apart
    order = torch.sort(values, descending=True, stable=True).indices[:largest]  # ties: ascending index
    ranks = torch.arange(largest, device=flat.device)
    # rank r enters at the first j with r < counts[j]: level 1 + #{j: counts[j] <= r}
    bounds = torch.tensor(counts, dtype=torch.int64, device=flat.device)
    codes = (torch.searchsorted(bounds, ranks, right=True) + 1).to(torch.uint8)
    levels[candidates[order]] = codes
    return levels.reshape(scores.shape)


def _candidates(flat: torch.Tensor, count: int, cols: int) -> torch.Tensor:
    """Ascending indices of at least the `count` largest entries (all ties included): the
    numpy path's strided-sample bound, or an exact k-th value when that bound misses."""
    n = flat.numel()
    if count >= n:
        return torch.arange(n, device=flat.device)
    if n >= 4 * _SAMPLE:
        sample = flat[:: sample_step(n, cols)][:_SAMPLE]
        m = sample.numel()
        expected = count * m / n
        above = int(expected + 4 * sqrt(expected) + 16)
        if above < m:
            bound = torch.kthvalue(sample, m - above).values  # the (m-1-above)-th smallest, 0-based
            candidates = torch.nonzero(flat >= bound).view(-1)
            if candidates.numel() >= count:
                return candidates
    bound = torch.kthvalue(flat, n - count + 1).values  # the count-th largest
    return torch.nonzero(flat >= bound).view(-1)


def model_levels_torch(spans, magnitudes: torch.Tensor, norms: torch.Tensor, ks: Sequence[float]) -> torch.Tensor:
    """selection.model_levels on the tensors' device: |W| (concatenated, float32) and norms
    (concatenated) laid out by `spans`; returns the model's uint8 level codes there."""
    levels = torch.empty(magnitudes.numel(), dtype=torch.uint8, device=magnitudes.device)
    for span in spans:
        module_scores = scores_torch(magnitudes[span.params].view(span.n_rows, span.n_cols), norms[span.norms])
        levels[span.params] = level_codes_torch(module_scores, ks).view(-1)
    return levels
