"""Every view's numbers equal brute-force numpy set operations on the stored level codes."""

from itertools import combinations

import numpy as np
import pytest

import mlarch

LANGS = ["bn", "de", "en"]
KS = [0.01, 0.05, 0.25]


@pytest.fixture(scope="module")
def brute(llama_archive):
    archive = mlarch.open(llama_archive)
    runs = archive.sql("SELECT lang, role, run_id FROM runs WHERE in_use")
    ids = {(r["lang"], r["role"]): r["run_id"] for r in runs.iter_rows(named=True)}
    modules = archive.sql("SELECT module, layer FROM modules ORDER BY module")
    masks = {}
    for module in modules["module"]:
        for lang in LANGS:
            m = archive.levels(ids[(lang, "math")], module)
            c = archive.levels(ids[(lang, "control")], module)
            for j, k in enumerate(KS):
                masks[(lang, k, module)] = ((m > 0) & (m <= j + 1)) & ~((c > 0) & (c <= j + 1))
    layers = dict(zip(modules["module"], modules["layer"]))
    return archive, masks, layers


def test_set_sizes(brute):
    archive, masks, _ = brute
    rows = archive.sql("SELECT lang, k, module, n_selected FROM set_sizes")
    assert len(rows) == len(masks)
    for lang, k, module, n in rows.iter_rows():
        assert n == masks[(lang, k, module)].sum()


def test_overlap_by_layer_and_global(brute):
    archive, masks, layers = brute
    by_layer = archive.sql("SELECT * FROM overlap_by_layer")
    assert len(by_layer) == len(KS) * 3 * len(set(layers.values()))
    for row in by_layer.iter_rows(named=True):
        mods = [m for m, layer in layers.items() if layer == row["layer"]]
        a = [masks[(row["lang_a"], row["k"], m)] for m in mods]
        b = [masks[(row["lang_b"], row["k"], m)] for m in mods]
        inter = sum(int((x & y).sum()) for x, y in zip(a, b))
        union = sum(int((x | y).sum()) for x, y in zip(a, b))
        assert row["lang_a"] < row["lang_b"]
        assert (row["n_intersection"], row["n_union"]) == (inter, union)
        assert row["jaccard"] == pytest.approx(inter / union)
        p = row["k"] * (1 - row["k"])
        assert row["chance_jaccard"] == pytest.approx(p / (2 - p))
    glob = archive.sql("SELECT * FROM overlap_global")
    assert len(glob) == len(KS) * 3
    for row in glob.iter_rows(named=True):
        inter = sum(int((masks[(row["lang_a"], row["k"], m)] & masks[(row["lang_b"], row["k"], m)]).sum()) for m in layers)
        union = sum(int((masks[(row["lang_a"], row["k"], m)] | masks[(row["lang_b"], row["k"], m)]).sum()) for m in layers)
        assert (row["n_intersection"], row["n_union"]) == (inter, union)
        assert row["jaccard"] == pytest.approx(inter / union)


def test_language_unique(brute):
    archive, masks, layers = brute
    rows = archive.sql("SELECT * FROM language_unique")
    assert len(rows) == len(KS) * len(LANGS) * len(set(layers.values()))
    for row in rows.iter_rows(named=True):
        total = 0
        for m, layer in layers.items():
            if layer != row["layer"]:
                continue
            others = np.zeros_like(masks[(row["lang"], row["k"], m)])
            for lang in LANGS:
                if lang != row["lang"]:
                    others |= masks[(lang, row["k"], m)]
            total += int((masks[(row["lang"], row["k"], m)] & ~others).sum())
        assert row["n_unique"] == total


@pytest.mark.parametrize("langs", [["en", "bn"], ["en", "de", "bn"]])
@pytest.mark.parametrize("k", KS)
def test_compare_matches_brute_force(brute, langs, k):
    archive, masks, layers = brute
    frame = archive.compare("LLAMA", langs, k=k, by="layer")
    assert frame["layer"].to_list()[-len(list(combinations(langs, 2))):] == ["all"] * len(list(combinations(langs, 2)))
    for row in frame.iter_rows(named=True):
        if row["layer"] == "all":
            mods = list(layers)
        else:
            want = None if row["layer"] == "none" else int(row["layer"])
            mods = [m for m, layer in layers.items() if layer == want]
        a, b = row["lang_a"], row["lang_b"]
        others = [x for x in langs if x not in (a, b)]
        exp = dict(n_a=0, n_b=0, n_intersection=0, n_union=0, unique_a=0, unique_b=0)
        for m in mods:
            ma, mb = masks[(a, k, m)], masks[(b, k, m)]
            rest = np.zeros_like(ma)
            for x in others:
                rest |= masks[(x, k, m)]
            exp["n_a"] += int(ma.sum())
            exp["n_b"] += int(mb.sum())
            exp["n_intersection"] += int((ma & mb).sum())
            exp["n_union"] += int((ma | mb).sum())
            exp["unique_a"] += int((ma & ~mb & ~rest).sum())
            exp["unique_b"] += int((mb & ~ma & ~rest).sum())
        assert {key: row[key] for key in exp} == exp, row
        assert row["jaccard"] == pytest.approx(exp["n_intersection"] / exp["n_union"])
        assert (row["k"], row["seed"]) == (k, 1)


def test_compare_by_module_and_global_agree(brute):
    archive, _, layers = brute
    by_module = archive.compare("llama", ["en", "de"], by="module")
    glob = archive.compare("llama", ["en", "de"], by="global")
    assert set(by_module.filter(by_module["module"] != "all")["module"]) == set(layers)
    summed = by_module.filter(by_module["module"] != "all")["n_intersection"].sum()
    assert summed == glob["n_intersection"].item() == by_module.filter(by_module["module"] == "all")["n_intersection"].item()
    view = archive.sql("SELECT n_intersection, n_union FROM overlap_global WHERE k = 0.01 AND lang_a = 'de' AND lang_b = 'en'")
    assert (glob["n_intersection"].item(), glob["n_union"].item()) == view.row(0)


def test_derive_in_many_small_reads_equals_one(llama_archive, monkeypatch):
    """Modules are read in groups; a group per module must give the same rows."""
    from mlarch.store import catalog, derive
    from mlarch.store.spans import read_spans

    archive = mlarch.open(llama_archive)
    with catalog.reading(archive.catalog_path) as con:
        runs, spans = derive.current_runs(con, "tiny-llama", "math-vs-control", 1), read_spans(con, "tiny-llama")
    whole = derive.derive(archive.arrays_path, "tiny-llama", "math-vs-control", 1, spans, runs)
    monkeypatch.setattr(derive, "GROUP_BUDGET", 1)
    pieces = derive.derive(archive.arrays_path, "tiny-llama", "math-vs-control", 1, spans, runs)
    assert whole[0].equals(pieces[0]) and whole[1].equals(pieces[1])
    assert len(whole[0]) == len(archive.sql("SELECT * FROM selections"))
