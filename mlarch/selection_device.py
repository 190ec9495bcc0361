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

Ingest runs `weights_levels` when scoring runs on CUDA: from each module's weight where it
lives, one module at a time, only its uint8 codes copied to the host (see
ingest.context.selection_path).

Two float details the numpy path gets from its comparisons for free: -0.0 and +0.0 are equal
there, but a radix sort (CUDA's) orders -0.0 first, so candidates are canonicalised (x + 0
turns -0.0 into +0.0); and NaN has no place in the order (numpy's partitions then give sets
of the wrong size), so NaN is refused, as ingest refuses non-finite norms and weights before
selection. +-inf are ordinary values on both paths.
"""

from __future__ import annotations

from contextlib import nullcontext
from math import sqrt
from typing import Iterable, Sequence

import numpy as np
import torch

from mlarch import selection
from mlarch.selection import _SAMPLE, _set_sizes, sample_step


def scores_torch(magnitudes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """score[i, j] = |W[i, j]| * norms[j] in float32: selection.scores with torch ops.

    One IEEE float32 multiply per entry (norms rounded to float32 first, as numpy's
    astype does), which CPU and CUDA both round correctly: the same bits as numpy."""
    if magnitudes.dtype != torch.float32:
        raise ValueError(f"magnitudes must be float32 (as ingest stores |W|), not {magnitudes.dtype}")
    return magnitudes * norms.to(device=magnitudes.device, dtype=torch.float32)[None, :]


def level_codes_torch(scores: torch.Tensor, ks: Sequence[float], counts: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 tensor shaped like `scores`, on its device: selection.level_codes's output."""
    counts = _set_sizes(scores.numel(), ks, counts)  # as selection.level_codes sizes them
    return _levels(scores.numel(), list(_candidate_values(scores, counts)), counts).reshape(scores.shape)


def _candidate_values(scores: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ascending flat indices of a superset of the largest set, their scores with -0.0 made
    +0.0): all that ranking needs, so the caller may free `scores` before the sort."""
    flat = scores.reshape(-1)
    n = flat.numel()
    largest = min(max(counts, default=0), n)  # a count above n selects everything, as in numpy
    if largest == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=flat.device)
        return empty, flat[empty]
    if flat.is_floating_point() and bool(torch.isnan(flat).any()):
        raise ValueError("scores contain NaN: there is no top-k of NaN (ingest refuses non-finite norms and weights)")
    cols = scores.shape[-1] if scores.dim() > 1 else 1
    candidates = _candidates(flat, largest, cols)
    values = flat[candidates]
    if values.is_floating_point():
        values.add_(0.0)  # -0.0 -> +0.0, so that no sort can tell them apart
    return candidates, values


def _levels(n: int, found: list, counts: list[int]) -> torch.Tensor:
    """Flat uint8 level codes of n entries from `found` = [candidates, their values], which
    it empties: each is freed as soon as it has been used (the sort is the peak)."""
    candidates, values = found.pop(0), found.pop(0)
    device = candidates.device
    largest = min(max(counts, default=0), n)
    if largest == 0:
        return torch.zeros(n, dtype=torch.uint8, device=device)
    order = torch.sort(values, descending=True, stable=True).indices[:largest]  # ties: ascending index
    del values
    placed = candidates[order]  # flat index of rank 0, 1, ...
    del candidates, order
    ranks = torch.arange(largest, device=device)
    # rank r enters at the first j with r < counts[j]: level 1 + #{j: counts[j] <= r}
    bounds = torch.tensor(counts, dtype=torch.int64, device=device)
    levels = torch.zeros(n, dtype=torch.uint8, device=device)
    levels[placed] = (torch.searchsorted(bounds, ranks, right=True) + 1).to(torch.uint8)
    return levels


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


def module_scores_torch(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W| * norms of a weight as scored (out x in, any float dtype, possibly a transposed
    view), in one new float32 buffer on the weight's device: the bits of selection.scores
    on the |W| ingest archives (widening to float32 is exact and commutes with abs)."""
    scores = torch.empty(tuple(weight.shape), dtype=torch.float32, device=weight.device)
    scores.copy_(weight)  # row-major whatever the weight's strides
    scores.abs_()
    scores.mul_(norms.to(device=weight.device, dtype=torch.float32)[None, :])
    return scores


@torch.no_grad()  # the weights are parameters; nothing here is differentiated
def weights_levels(weights: Iterable[torch.Tensor], spans, norms: np.ndarray, ks: Sequence[float],
                   host_magnitudes: np.ndarray | None = None) -> np.ndarray:
    """selection.model_levels computed where each module's weight lives: scores and level
    codes there, one module at a time, and only the module's uint8 codes copied to the host.
    `weights` are the scored modules' weights as scored (out x in), in the order of `spans`;
    `norms` the run's concatenated float32 norms. With `host_magnitudes` (the |W| buffer),
    modules whose weight is not on CUDA (offloaded to the CPU by a device map) take the
    numpy path instead: on the CPU it is many times faster than torch's sort.

    On CUDA the work runs on a stream of its own, so that ingest's forward pass on the
    default stream (beside which this runs, in a background thread) neither waits for it
    nor makes it wait. Device memory it takes beyond the model: about one module's float32
    scores and a bit (by estimate ~1.6x at the paper's largest k: the scores with the mask
    and indices of their candidates, then the candidates' sort, after the scores are freed;
    tests/test_selection_device_modules.py measures it on CUDA)."""
    weights = list(weights)
    if len(weights) != len(spans):
        raise ValueError(f"{len(weights)} weights for {len(spans)} spans")
    levels = np.empty(sum(span.n_params for span in spans), dtype=np.uint8)
    streams: dict = {}
    for weight, span in zip(weights, spans):
        if tuple(weight.shape) != (span.n_rows, span.n_cols):
            raise ValueError(f"weight of {span.module} is {tuple(weight.shape)}, its span says "
                             f"{(span.n_rows, span.n_cols)}")
        if host_magnitudes is not None and weight.device.type != "cuda":
            module = host_magnitudes[span.params].reshape(span.n_rows, span.n_cols)
            levels[span.params] = selection.module_levels(module, norms[span.norms], ks).reshape(-1)
            continue
        with _stream_for(weight.device, streams):
            counts = _set_sizes(span.n_params, ks, None)
            scores = module_scores_torch(weight, torch.from_numpy(norms[span.norms]))
            found = list(_candidate_values(scores, counts))
            del scores  # the sort's memory comes from the scores', not on top of them
            codes = _levels(span.n_params, found, counts)
            torch.from_numpy(levels[span.params]).copy_(codes)  # waits for this stream only
    return levels


def _stream_for(device: torch.device, streams: dict):
    """A side stream on a CUDA device (made once per call, after the work already queued on
    the device's current stream, which loaded the weights); a no-op context on the CPU."""
    if device.type != "cuda":
        return nullcontext()
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
    return torch.cuda.stream(stream)
