"""derive's chunked pattern counting against a slow, obvious reference: per parameter, per
language, per k, Python-level set membership read off the level codes, counted in a Counter.

The level arrays are real zarr arrays (arrays.write) or a real ingest's; derive is made to
work in ranges far smaller than a module (READ_ALIGN, GROUP_BUDGET), so modules are split
across range edges at odd places."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import mlarch
from mlarch.selection import top_count
from mlarch.store import arrays, catalog, derive
from mlarch.store.derive import RunRef, levels_path
from mlarch.store.spans import Span, layout, read_spans, total_params

PAPER_KS = (0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.15)
# module shapes that no small range size divides, a 1-parameter module and an empty one
MODULES = [("a", 0, 37, 23), ("b", 0, 5, 7), ("one", 1, 1, 1), ("c", 1, 64, 40), ("none", 1, 0, 3), ("d", None, 13, 11)]


def reference(spans: list[Span], levels: dict, k_values: dict, count_tops: bool):
    """(selection rows, pattern rows) as sets, parameter by parameter."""
    langs = sorted(lang for lang, role in levels if role == "math" and (lang, "control") in levels)
    selections, patterns = set(), Counter()
    for span in spans:
        shared = {lang: sorted(set(k_values[(lang, "math")]) & set(k_values[(lang, "control")])) for lang in langs}
        for lang in langs:
            km, kc = k_values[(lang, "math")], k_values[(lang, "control")]
            math, control = levels[(lang, "math")], levels[(lang, "control")]
            for k in shared[lang]:
                jm, jc = km.index(k), kc.index(k)
                n_math = n_control = n_selected = 0
                for p in range(span.param_offset, span.param_offset + span.n_params):
                    in_math = 1 <= int(math[p]) <= jm + 1  # level j + 1: first in the top-k_values[j] set
                    in_control = 1 <= int(control[p]) <= jc + 1
                    n_math += in_math
                    n_control += in_control
                    n_selected += in_math and not in_control
                if not count_tops:
                    n_math = n_control = top_count(span.n_params, k)
                selections.add((k, lang, span.module, n_math, n_control, n_selected, f"{lang}-m", f"{lang}-c"))
        for k in sorted({k for ks in shared.values() for k in ks}):
            for p in range(span.param_offset, span.param_offset + span.n_params):
                pattern = []
                for lang in langs:
                    if k not in shared[lang]:
                        continue
                    jm, jc = k_values[(lang, "math")].index(k), k_values[(lang, "control")].index(k)
                    m, c = int(levels[(lang, "math")][p]), int(levels[(lang, "control")][p])
                    if 1 <= m <= jm + 1 and not 1 <= c <= jc + 1:
                        pattern.append(lang)
                if pattern:
                    patterns[(k, span.module, tuple(pattern))] += 1
    return selections, {key + (n,) for key, n in patterns.items()}


def as_sets(frames):
    selections, patterns = frames
    sel = {(r["k"], r["lang"], r["module"], r["n_math_top"], r["n_control_top"], r["n_selected"], r["math_run_id"],
            r["control_run_id"]) for r in selections.iter_rows(named=True)}
    pat = {(r["k"], r["module"], tuple(r["langs"]), r["n_params"]) for r in patterns.iter_rows(named=True)}
    assert len(sel) == len(selections) and len(pat) == len(patterns)  # no row twice
    return sel, pat


def synthetic_levels(rng, n: int, n_k: int, base: np.ndarray | None = None) -> np.ndarray:
    """Level codes 0..n_k; with `base`, a run that agrees with it often (equal levels: a
    parameter in the math and the control set from the same k on) or is one level off."""
    levels = np.where(rng.random(n) < 0.5, rng.integers(1, n_k + 1, n), 0)
    if base is not None:
        pick = rng.random(n)
        levels = np.where(pick < 0.3, np.clip(base, 0, n_k), levels)  # ties: same level in both runs
        levels = np.where((pick >= 0.3) & (pick < 0.45), np.clip(base.astype(int) + 1, 0, n_k), levels)
        levels = np.where((pick >= 0.45) & (pick < 0.55), np.clip(base.astype(int) - 1, 0, n_k), levels)
    return levels.astype(np.uint8)


def store_runs(root, spans, k_values: dict, seed: int = 0):
    """Random level arrays for each (lang, role) written with arrays.write; the RunRefs derive takes."""
    rng = np.random.default_rng(seed)
    n = total_params(spans)
    levels, refs = {}, {}
    for (lang, role) in sorted(k_values, key=lambda key: (key[0], key[1] != "math")):
        base = levels.get((lang, "math"))
        codes = synthetic_levels(rng, n, len(k_values[(lang, role)]), base)
        codes[:40] = 0  # a stretch that no language selects
        group = f"runs/{lang}-{role[0]}"
        record = arrays.write(root, levels_path(group), codes)
        levels[(lang, role)] = codes
        refs[(lang, role)] = RunRef(f"{lang}-{role[0]}", lang, role, group, tuple(k_values[(lang, role)]), record)
    return levels, refs


def both_roles(langs, ks):
    return {(lang, role): ks for lang in langs for role in ("math", "control")}


CASES = {
    # the paper's 7 k values, 4 languages: the packed-word path
    "4 langs x 7 k": both_roles(["bn", "de", "en", "zh"], PAPER_KS),
    "1 lang": both_roles(["en"], PAPER_KS),
    # runs with different k lists (interleaved indices: the exact support test), a language
    # whose math and control runs share no k, a language with only a math run
    "mixed k lists": {("de", "math"): (0.01, 0.05, 0.1), ("de", "control"): (0.001, 0.01, 0.02, 0.05, 0.1, 0.2),
                      ("en", "math"): (0.001, 0.005, 0.01, 0.1), ("en", "control"): (0.01, 0.05, 0.1),
                      ("fr", "math"): (0.2,), ("fr", "control"): (0.3,),
                      ("hi", "math"): (0.01,)},
    # > 8 languages: pattern codes per parameter (uint16), not packed words
    "10 langs": both_roles([f"l{i}" for i in range(10)], (0.01, 0.1, 0.2)),
    # > 14 k values: levels above a nibble; > 8 k: rows in two groups of 8
    "16 k": both_roles(["de", "en"], tuple(round(0.01 * (i + 1), 2) for i in range(16))),
}


@pytest.mark.parametrize("count_tops", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_derive_equals_the_reference(tmp_path, monkeypatch, case, count_tops):
    spans = layout(MODULES)
    levels, refs = store_runs(tmp_path, spans, CASES[case])
    expected = reference(spans, levels, {key: ref.k_values for key, ref in refs.items()}, count_tops)
    whole = derive.derive(tmp_path, "m", "a", 1, spans, refs, count_tops=count_tops)
    assert as_sets(whole) == expected
    # ranges of 700 parameters: modules a, c and d split, at no module edge
    monkeypatch.setattr(derive, "READ_ALIGN", 700)
    monkeypatch.setattr(derive, "GROUP_BUDGET", 1)
    assert derive.read_ranges(total_params(spans))[1:3] == [(700, 1400), (1400, 2100)]
    pieces = derive.derive(tmp_path, "m", "a", 1, spans, refs, count_tops=count_tops)
    assert whole[0].equals(pieces[0]) and whole[1].equals(pieces[1])  # same rows, same order


def test_the_reference_sees_every_kind_of_parameter(tmp_path):
    """The synthetic levels hold ties (equal math and control levels), one-level
    differences and both orders, so the comparison above covers every case of the test."""
    spans = layout(MODULES)
    levels, _ = store_runs(tmp_path, spans, CASES["4 langs x 7 k"])
    math, control = levels[("en", "math")].astype(int), levels[("en", "control")].astype(int)
    both = (math > 0) & (control > 0)
    assert (both & (math == control)).sum() > 100
    assert (both & (control == math + 1)).sum() > 50 and (both & (control == math - 1)).sum() > 50
    assert ((math > 0) & (control == 0)).sum() > 100 and ((math == 0) & (control > 0)).sum() > 100


def test_preloaded_codes_are_used_as_read(tmp_path, monkeypatch):
    """A run being committed is counted from memory, range by range like a stored one."""
    spans = layout(MODULES)
    levels, refs = store_runs(tmp_path, spans, CASES["4 langs x 7 k"])
    stored = derive.derive(tmp_path, "m", "a", 1, spans, refs)
    pending = refs[("de", "control")]
    refs[("de", "control")] = RunRef(pending.run_id, "de", "control", "runs/pending", pending.k_values, None)
    monkeypatch.setattr(derive, "READ_ALIGN", 640)
    monkeypatch.setattr(derive, "GROUP_BUDGET", 1)
    loaded = derive.derive(tmp_path, "m", "a", 1, spans, refs, preloaded={"runs/pending": levels[("de", "control")]})
    assert stored[0].equals(loaded[0]) and stored[1].equals(loaded[1])


def test_each_run_is_read_once_in_bounded_ranges(tmp_path, monkeypatch):
    """Memory bounded by the range, not the largest module: every read is at most one range
    of whole chunks, and each run's codes are read exactly once."""
    spans = layout(MODULES)
    _, refs = store_runs(tmp_path, spans, CASES["4 langs x 7 k"])
    monkeypatch.setattr(derive, "READ_ALIGN", 128)
    monkeypatch.setattr(derive, "GROUP_BUDGET", 200)  # rounded up to 2 chunks of 128
    reads, real = [], arrays.read
    monkeypatch.setattr(arrays, "read", lambda root, record, start, stop: reads.append((record.path, start, stop))
                        or real(root, record, start, stop))
    derive.derive(tmp_path, "m", "a", 1, spans, refs)
    n = total_params(spans)
    assert {stop - start for _, start, stop in reads} <= {256, n % 256}
    for ref in refs.values():
        covered = sorted((start, stop) for path, start, stop in reads if path == ref.levels.path)
        assert covered[0][0] == 0 and covered[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # contiguous, no overlap


def test_real_archive_in_small_ranges_equals_the_reference(llama_archive, monkeypatch):
    """A real ingest's stored level codes, derived in ranges of 1000 parameters, give the rows
    of the slow reference, and the rows the catalog holds from the ingest's own derive."""
    archive = mlarch.open(llama_archive)
    with catalog.reading(archive.catalog_path) as con:
        runs, spans = derive.current_runs(con, "tiny-llama", "math-vs-control", 1), read_spans(con, "tiny-llama")
    levels = {key: arrays.read(archive.arrays_path, ref.levels) for key, ref in runs.items()}
    k_values = {key: ref.k_values for key, ref in runs.items()}
    monkeypatch.setattr(derive, "READ_ALIGN", 1000)  # modules of 512, 1024, 1536 and 12288 parameters
    monkeypatch.setattr(derive, "GROUP_BUDGET", 1)
    frames = derive.derive(archive.arrays_path, "tiny-llama", "math-vs-control", 1, spans, runs)
    sel, pat = as_sets(frames)
    ids = {(ref.lang, ref.role): ref.run_id for ref in runs.values()}
    ref_sel, ref_pat = reference(spans, levels, k_values, count_tops=False)
    ref_sel = {row[:6] + (ids[(row[1], "math")], ids[(row[1], "control")]) for row in ref_sel}
    assert (sel, pat) == (ref_sel, ref_pat)
    assert {p for p in pat if len(p[2]) == 3}, "some parameters are math-only in all three languages"
    stored = archive.sql("SELECT k, module, langs, n_params FROM patterns WHERE model = 'tiny-llama'")
    assert {(r[0], r[1], tuple(r[2]), r[3]) for r in stored.rows()} == pat


def test_pattern_codes_name_languages_in_bit_order():
    from mlarch.query.patterns import count_codes, merge_counts, named

    values, counts = count_codes(np.array([0, 1, 2, 3, 3, 5], np.uint8), 3)
    assert named(values, counts, ["de", "en", "fr"]) == [(["de"], 1), (["en"], 1), (["de", "en"], 2), (["de", "fr"], 1)]
    merged = merge_counts([(np.array([1, 3]), np.array([2, 1])), (np.array([3, 4]), np.array([5, 1]))])
    assert [m.tolist() for m in merged] == [[1, 3, 4], [2, 6, 1]]
    wide = count_codes(np.array([1 << 20, 1 << 20, 7], np.uint32), 21, weights=np.array([2.0, 3.0, 1.0]))
    assert [w.tolist() for w in wide] == [[7, 1 << 20], [1, 5]]
