"""Top-k selection: floor(n*k) per matrix, ties by lowest flat index, nested level codes."""

from fractions import Fraction
from math import floor

import numpy as np
import pytest
import torch

from mlarch.selection import in_top, level_codes, math_only, top_count
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
    from mlarch import selection

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


ARCHIVED_KS = [0.01, 0.05, 0.25]


@pytest.fixture(scope="module")
def tied_archive(tmp_path_factory):
    """en scored with a tiny llama whose weights are rounded to multiples of 0.01, as
    dequantised weights are: equal |W| in a column give equal scores, so ties cross the
    top-k thresholds."""
    import mlarch
    from fixtures import build_model, write_data
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tied")
    path = build_model("llama", folder)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.round(param * 100) / 100)
    model.save_pretrained(path)
    math_data, control = write_data(folder / "data")
    archive = mlarch.open(folder / "archive")
    archive.ingest(str(path), ["en"], math_data, control, samples=4, top_k=ARCHIVED_KS, device="cpu")
    return archive


def brute_top(magnitudes, norms, k):
    """floor(numel * k) largest float32 scores |W| * norms; equal scores by lowest flat index."""
    flat = (magnitudes * norms[None, :]).reshape(-1)
    assert flat.dtype == np.float32
    count = floor(Fraction(str(k)) * flat.size)
    order = np.lexsort((np.arange(flat.size), -flat))  # score descending, then index ascending
    mask = np.zeros(flat.size, bool)
    mask[order[:count]] = True
    return mask.reshape(magnitudes.shape), flat[order[count - 1]] == flat[order[count]] if 0 < count < flat.size else False


def test_selection_at_any_k_equals_a_brute_force_from_the_stored_factors(tied_archive):
    archive = tied_archive
    model = archive.models()["model"][0]
    runs = {r["role"]: r for r in archive.sql("SELECT role, run_id, k_values FROM runs").iter_rows(named=True)}
    assert runs["math"]["k_values"] == runs["control"]["k_values"] == ARCHIVED_KS
    norms = {role: archive.norms(run["run_id"]) for role, run in runs.items()}
    straddled = set()
    # 0.02 and 0.1 lie between archived values, 0.003 below and 0.3, 0.5 above them; 0.05 is
    # archived (read from the level codes) and must agree as well
    for k in [0.003, 0.02, 0.05, 0.1, 0.3, 0.5]:
        for module in archive.sql("SELECT module FROM modules ORDER BY position")["module"]:
            magnitudes = archive.magnitudes(model, module)
            math_top, tie_math = brute_top(magnitudes, norms["math"][module], k)
            control_top, tie_control = brute_top(magnitudes, norms["control"][module], k)
            if k not in ARCHIVED_KS and (tie_math or tie_control):
                straddled.add((module, k))
            np.testing.assert_array_equal(archive.selection(model, "en", k, module), math_top & ~control_top,
                                          err_msg=f"{module} k={k}")
    # the tie rule was needed: equal scores on both sides of a re-thresholded cut
    assert len(straddled) >= 10, straddled


def _spy_fallbacks(monkeypatch):
    """Counts module_levels' falls back to the whole score matrix (level_codes)."""
    from mlarch import selection

    calls = []
    real = selection.level_codes

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(selection, "level_codes", spy)
    return calls


@pytest.mark.parametrize("case", ["lognormal", "ties", "zeros", "many-blocks", "default-blocks"])
def test_module_levels_equal_level_codes_of_the_scores(case, monkeypatch):
    # the blocked path (no score matrix) gives the bytes level_codes gives on scores(), and
    # really runs: it must not fall back to the whole matrix
    from mlarch import selection

    rng = np.random.default_rng(11)
    shape = (2000, 300) if case == "default-blocks" else (401, 333)
    magnitudes = rng.lognormal(size=shape).astype(np.float32)
    norms = rng.lognormal(size=shape[1]).astype(np.float32)
    if case == "ties":  # bf16 |W| and repeated norms: equal scores across the thresholds
        magnitudes = torch.from_numpy(magnitudes).to(torch.bfloat16).float().numpy()
        magnitudes = np.round(magnitudes * 4) / 4
        norms = np.repeat(norms[:3], -(-shape[1] // 3))[: shape[1]]
    if case == "zeros":  # dead columns and pruned weights
        norms[::7] = 0
        magnitudes[rng.random(shape) < 0.5] = 0
    if case == "many-blocks":  # 7 rows per block, the last one short
        monkeypatch.setattr(selection, "_BLOCK_BYTES", 4 * shape[1] * 7)
    monkeypatch.setattr(selection, "_BLOCKED_FROM", 0)  # the blocked path on small matrices too
    fallbacks = _spy_fallbacks(monkeypatch)
    expected = _argsort_levels(magnitudes * norms[None, :], PAPER_KS)
    np.testing.assert_array_equal(selection.module_levels(magnitudes, norms, PAPER_KS), expected)
    assert fallbacks == []
    assert selection.sample_step(magnitudes.size, shape[1]) > 1  # the sampled path, not a full partition


def test_module_levels_fall_back_when_the_sample_misses(monkeypatch):
    from mlarch import selection

    n, cols = 300 * 300, 300
    magnitudes = np.zeros(n, np.float32)
    magnitudes[np.arange(0, n, selection.sample_step(n, cols))[: selection._SAMPLE]] = 10.0
    magnitudes += np.linspace(0, 1, n, dtype=np.float32)
    magnitudes = magnitudes.reshape(300, cols)
    norms = np.ones(cols, np.float32)
    monkeypatch.setattr(selection, "_BLOCKED_FROM", 0)
    fallbacks = _spy_fallbacks(monkeypatch)
    got = selection.module_levels(magnitudes, norms, PAPER_KS)
    assert fallbacks == [1]
    np.testing.assert_array_equal(got, _argsort_levels(magnitudes * norms[None, :], PAPER_KS))


def test_small_modules_take_the_whole_scores(monkeypatch):
    from mlarch import selection

    rng = np.random.default_rng(3)
    magnitudes = rng.lognormal(size=(300, 300)).astype(np.float32)
    norms = rng.lognormal(size=300).astype(np.float32)
    fallbacks = _spy_fallbacks(monkeypatch)
    got = selection.module_levels(magnitudes, norms, PAPER_KS)
    assert magnitudes.size < selection._BLOCKED_FROM and fallbacks == [1]
    np.testing.assert_array_equal(got, _argsort_levels(magnitudes * norms[None, :], PAPER_KS))
