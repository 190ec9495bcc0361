"""level_codes_torch / scores_torch (mlarch.selection_device) give the numpy path's output,
byte for byte, on CPU and (where present) CUDA: ties, cuts inside runs of ties, tiny
matrices, explicit counts, a sample that misses, infinities and signed zeros."""

import numpy as np
import pytest
import torch

from mlarch import selection
from mlarch.selection import level_codes, top_count
from mlarch.selection_device import level_codes_torch, model_levels_torch, scores_torch
from mlarch.store.spans import layout

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
PAPER_KS = [0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.15]
KS_LISTS = [PAPER_KS, [0.5], [0.01, 0.3, 0.9, 0.99], [0.001, 1.0], [0.2, 0.2000001]]


def both(scores: np.ndarray, ks, device: str, counts=None) -> tuple[np.ndarray, np.ndarray]:
    ours = level_codes_torch(torch.from_numpy(scores).to(device), ks, counts=counts)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == scores.shape and ours.device.type == device
    return ours.cpu().numpy(), level_codes(scores, ks, counts=counts)


def by_argsort(scores: np.ndarray, counts) -> np.ndarray:
    """Independent oracle: stable argsort of -score gives the tie rule's order directly."""
    order = np.argsort(-scores.reshape(-1), kind="stable")
    levels = np.zeros(scores.size, np.uint8)
    for j in reversed(range(len(counts))):
        levels[order[:counts[j]]] = j + 1
    return levels.reshape(scores.shape)


def assert_same(scores, ks, device, counts=None):
    ours, numpy_levels = both(scores, ks, device, counts)
    np.testing.assert_array_equal(ours, numpy_levels)
    expected_counts = [top_count(scores.size, k) for k in ks] if counts is None else counts
    np.testing.assert_array_equal(ours, by_argsort(scores, [min(c, scores.size) for c in expected_counts]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_random_matrices_match_numpy(device, seed):
    rng = np.random.default_rng(seed)
    # both sides of the sampling threshold (4 * 2**14 entries): exact path and sampled bound
    shape = [(37, 53), (300, 401), (1, 70_000), (70_000, 1), (513, 257), (64, 2048)][seed]
    scores = rng.standard_normal(shape).astype(np.float32) ** 2
    for ks in KS_LISTS:
        assert_same(scores, ks, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distinct", [1, 2, 3, 7, 16])
def test_heavy_ties_dequantised_like(device, distinct):
    """Few distinct values (4-bit-like weights times a few norms): nearly every cut falls
    inside a run of equal scores, so the lowest-index rule decides who is in."""
    rng = np.random.default_rng(distinct)
    for shape in [(40, 30), (260, 300)]:
        levels = np.linspace(0.0, 1.0, distinct, dtype=np.float32)
        magnitudes = rng.choice(levels, size=shape)
        norms = rng.choice(np.array([1.0, 2.0], np.float32), size=shape[1])
        scores = selection.scores(magnitudes, norms)
        for ks in KS_LISTS:
            assert_same(scores, ks, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [997, 90_000])
def test_ties_straddling_every_cut(device, n):
    """Each set size lands in the middle of a run of 7 equal scores, placed at random."""
    rng = np.random.default_rng(n)
    counts = [top_count(n, k) for k in PAPER_KS]
    ranked = np.arange(n, 0, -1, dtype=np.float32)  # distinct, descending by rank
    for c in counts:
        if 3 <= c <= n - 4:
            ranked[c - 3:c + 4] = ranked[c - 3]
    scores = ranked[rng.permutation(n)].reshape(1, n) if n < 5000 else ranked[rng.permutation(n)].reshape(300, 300)
    assert_same(scores, PAPER_KS, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (5, 1), (3, 3), (8,), (300, 300)])
def test_all_equal(device, shape):
    scores = np.full(shape, 0.25, np.float32)
    for ks in KS_LISTS:
        assert_same(scores, ks, device)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_matrices_select_nothing_or_everything(device):
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (1, 3), (3, 1), (2, 2), (7, 13)]:
        scores = rng.random(shape).astype(np.float32)
        for ks in KS_LISTS + [[0.01, 0.02]]:  # n * k < 1: empty sets, all-zero codes
            assert_same(scores, ks, device)
        ours, _ = both(scores, [0.01], device)
        assert not ours.any()
        ours, _ = both(scores, [], device)
        assert not ours.any()


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_counts(device):
    rng = np.random.default_rng(9)
    for shape in [(10, 10), (200, 400)]:
        scores = rng.integers(0, 5, size=shape).astype(np.float32)
        n = scores.size
        for counts in ([1, 1, 2], [0, n // 3, n // 3], [n // 10, n], [0, 0, 0], [n - 1, n], [3, 3 * n]):
            ks = [0.1, 0.2, 0.3][:len(counts)] if len(counts) == 3 else [0.1, 0.2]
            ours, numpy_levels = both(scores, ks, device, counts)
            np.testing.assert_array_equal(ours, numpy_levels)
        np.testing.assert_array_equal(both(scores, [0.1], device, [7])[0], by_argsort(scores, [7]))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_that_misses_falls_back_to_exact(device):
    """Large scores exactly at the sampled positions: the sample's bound sits far above the
    largest set's threshold, too few candidates clear it, and the exact bound must be used."""
    rows, cols = 200, 400
    n = rows * cols
    step = selection.sample_step(n, cols)
    rng = np.random.default_rng(3)
    flat = rng.random(n).astype(np.float32)
    flat[::step] += 10.0
    scores = flat.reshape(rows, cols)
    count = top_count(n, 0.15)
    sample = flat[::step][:selection._SAMPLE]
    assert count > sample.size // 2  # the premise: the sample's margin cannot cover the set
    assert_same(scores, PAPER_KS, device)


@pytest.mark.parametrize("device", DEVICES)
def test_infinities_and_signed_zeros(device):
    rng = np.random.default_rng(11)
    for shape in [(30, 40), (300, 300)]:
        scores = rng.random(shape).astype(np.float32)
        flat = scores.reshape(-1)
        flat[rng.choice(flat.size, 20, replace=False)] = np.inf  # overflowed products
        zeros = rng.choice(flat.size, flat.size // 2, replace=False)
        flat[zeros] = np.where(rng.random(zeros.size) < 0.5, -0.0, 0.0)  # equal under the rule
        for ks in KS_LISTS:
            assert_same(scores, ks, device)
        assert_same(scores, [0.9], device)  # the cut inside the zeros, -0.0 and +0.0 interleaved


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_bad_arguments_refused(device):
    scores = torch.rand(20, 20, device=device)
    scores[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        level_codes_torch(scores, [0.1])
    with pytest.raises(ValueError, match="ascending"):
        level_codes_torch(torch.rand(4, 4, device=device), [0.5, 0.1])
    with pytest.raises(ValueError, match="non-decreasing"):
        level_codes_torch(torch.rand(4, 4, device=device), [0.1, 0.5], counts=[5, 2])


@pytest.mark.parametrize("device", DEVICES)
def test_scores_and_model_levels_match_numpy(device):
    """scores_torch: the bits of selection.scores; model_levels_torch: selection.model_levels."""
    rng = np.random.default_rng(4)
    spans = layout([("a", 0, 64, 48), ("b", 0, 300, 250), ("c", 1, 1, 96), ("d", 1, 96, 1)])
    n = spans[-1].param_offset + spans[-1].n_params
    # bf16-like magnitudes (few mantissa bits: ties) and float64-accumulated norms
    magnitudes = (rng.standard_normal(n).astype(np.float32).view(np.uint32) & np.uint32(0x7FFF0000)).view(np.float32)
    norms = rng.random(spans[-1].norm_offset + spans[-1].n_cols) * 1e3
    norms32 = norms.astype(np.float32)
    for span in spans:
        w = magnitudes[span.params].reshape(span.n_rows, span.n_cols)
        ours = scores_torch(torch.from_numpy(w).to(device), torch.from_numpy(norms[span.norms]).to(device))
        expected = selection.scores(w, norms32[span.norms])
        np.testing.assert_array_equal(ours.cpu().numpy().view(np.uint32), expected.view(np.uint32))
    ours = model_levels_torch(spans, torch.from_numpy(magnitudes).to(device), torch.from_numpy(norms32).to(device),
                              PAPER_KS)
    np.testing.assert_array_equal(ours.cpu().numpy(), selection.model_levels(spans, magnitudes, norms32, PAPER_KS))
    with pytest.raises(ValueError, match="float32"):
        scores_torch(torch.ones(2, 2, dtype=torch.float64, device=device), torch.ones(2, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_candidates_reach_the_sort_without_negative_zeros(device):
    """CUDA's radix sort orders -0.0 before +0.0 (the CPU's comparison sort does not), so the
    candidates' values are canonicalised before any sort: checked here on every device,
    since on the CPU the codes alone could not show the difference."""
    from mlarch.selection_device import _candidate_values

    scores = torch.zeros(40, 50, device=device)
    scores.view(-1)[::3] = -0.0
    scores[0, :5] = 1.0
    candidates, values = _candidate_values(scores, [top_count(scores.numel(), 0.5)])
    assert candidates.numel() == scores.numel() and not torch.signbit(values).any()
    assert torch.signbit(scores).any()  # the input keeps its signs: only the copy is changed
