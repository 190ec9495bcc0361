"""Top-k selection: floor(n*k) per matrix, ties by lowest flat index, nested level codes."""

import numpy as np
import pytest

from mlarch.ingest.selection import in_top, level_codes, math_only, top_count
from mlarch.query.patterns import histogram


def test_top_count_reads_k_as_typed():
    assert top_count(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in binary floating point
    assert top_count(100, 0.07) == 7
    assert top_count(1536, 0.05) == 76
    assert top_count(99, 0.01) == 0


def test_ties_broken_by_lowest_flat_index():
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 2.0], [3.0, 2.0, 0.5, 3.0, 1.5]], dtype=np.float32)
    # order: 3.0 at 1, 2, 3, 5, 8; then 2.0 at 4, 6; then 1.5 at 9; 1.0 at 0; 0.5 at 7
    levels = level_codes(scores, [0.1, 0.2, 0.4, 0.6, 0.7])
    assert levels.reshape(-1).tolist() == [0, 1, 2, 3, 4, 3, 5, 0, 4, 0]


@pytest.mark.parametrize("seed", range(12))
def test_level_codes_match_stable_argsort(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 60)), int(rng.integers(1, 70)))
    if seed % 2:  # few distinct values: many ties, as with dequantised 4-bit weights
        scores = rng.integers(0, int(rng.integers(1, 8)), size=shape).astype(np.float32)
    else:
        scores = rng.random(shape).astype(np.float32)
    ks = sorted(rng.choice([0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 0.99], size=int(rng.integers(1, 6)), replace=False))
    levels = level_codes(scores, ks)
    order = np.argsort(-scores.reshape(-1), kind="stable")
    for j, k in enumerate(ks):
        expected = np.zeros(scores.size, bool)
        expected[order[: top_count(scores.size, k)]] = True
        np.testing.assert_array_equal(in_top(levels, j).reshape(-1), expected)


def test_math_only_and_histogram():
    math_levels = np.array([1, 2, 0, 1, 2], dtype=np.uint8)
    control_levels = np.array([0, 1, 1, 2, 0], dtype=np.uint8)
    assert math_only(math_levels, control_levels, 0).tolist() == [True, False, False, True, False]
    assert math_only(math_levels, control_levels, 1).tolist() == [True, False, False, False, True]
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert sorted(histogram([a, b], ["de", "en"])) == [(["de"], 1), (["de", "en"], 1), (["en"], 1)]


def _argsort_levels(scores, ks):
    """Slow reference: level codes from one stable sort (score descending, lowest index first)."""
    order = np.argsort(-scores.reshape(-1), kind="stable")
    levels = np.zeros(scores.size, np.uint8)
    for j in reversed(range(len(ks))):
        levels[order[: top_count(scores.size, ks[j])]] = j + 1
    return levels.reshape(scores.shape)


PAPER_KS = [0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.15]


@pytest.mark.parametrize("distinct", [None, 3, 40])
def test_large_matrices_take_the_sampled_path_exactly(distinct):
    # >= 4 * 2**14 entries: the candidates come from a sampled bound, not a full partition
    rng = np.random.default_rng(7)
    shape = (400, 333)
    if distinct is None:
        scores = (rng.lognormal(size=shape) * rng.lognormal(size=shape[1])).astype(np.float32)
    else:  # crowded ties at the thresholds, as dequantised weights give
        scores = (rng.integers(0, distinct, size=shape) * rng.integers(1, 3, size=shape[1])).astype(np.float32)
    np.testing.assert_array_equal(level_codes(scores, PAPER_KS), _argsort_levels(scores, PAPER_KS))


def test_sampled_bound_that_misses_falls_back_to_an_exact_partition():
    from mlarch.ingest import selection

    n = 300 * 300
    scores = np.zeros(n, np.float32)
    positions = np.arange(0, n, selection.sample_step(n, 300))[: selection._SAMPLE]  # the sample's places
    scores[positions] = 10.0  # the sample sees only large values: its bound admits too few entries
    scores += np.linspace(0, 1, n, dtype=np.float32)
    scores = scores.reshape(300, 300)
    np.testing.assert_array_equal(level_codes(scores, PAPER_KS), _argsort_levels(scores, PAPER_KS))


@pytest.mark.parametrize("jm, jc", [
    (list(range(7)), list(range(7))),  # the paper's 7 k: the run-of-bits path
    (list(range(8, 16)), list(range(8, 16))),  # a second byte of k values
    ([0, 2, 5], [1, 2, 4]),  # runs with different k lists: the per-k path
])
def test_math_only_bits_equal_the_set_algebra(jm, jc):
    from mlarch.store.derive import _selected_bits

    rng = np.random.default_rng(len(jm) + jm[0])
    n, top = 50_000, max(jm + jc) + 1
    math_levels = np.where(rng.random(n) < 0.3, rng.integers(1, top + 1, n), 0).astype(np.uint8)
    control_levels = np.where(rng.random(n) < 0.3, rng.integers(1, top + 1, n), 0).astype(np.uint8)
    bits = _selected_bits(math_levels, control_levels, jm, jc)
    expected = np.zeros(n, np.uint8)
    for t, (a, b) in enumerate(zip(jm, jc)):
        expected |= (in_top(math_levels, a) & ~in_top(control_levels, b)).astype(np.uint8) << t
    np.testing.assert_array_equal(bits, expected)
