"""One model rule and one k rule (issue 13): every API entry point that takes a model resolves
it the same way (exact name first, else a unique substring; several or none: a one-line
error listing them), compare's pattern keeps every model a non-exact part names, and compare
takes any k, re-thresholded from the stored |W| x norms where it was not archived."""

import shutil
from itertools import combinations

import numpy as np
import pytest
from click.testing import CliRunner

import mlarch
from mlarch import charts
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError

LANGS = ["en", "de", "bn"]
MODULE = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def named(llama_archive, model_dir, data, tmp_path_factory):
    """The llama archive plus the same weights as 'tiny-llama-2' (en, de at k = 0.05, 0.1):
    the name 'tiny-llama' is exact for one model and a substring of both."""
    root = tmp_path_factory.mktemp("named") / "arch"
    shutil.copytree(llama_archive, root)
    mlarch.open(root).ingest(str(model_dir["llama"]), ["en", "de"], data["math"], data["control"], samples=6,
                             top_k=[0.05, 0.1], device="cpu", name="tiny-llama-2")
    return root


def test_every_entry_point_takes_an_exact_name_or_a_unique_part(named):
    archive = mlarch.open(named)
    # 'llama-2' is part of one name only: the same model as its full name, everywhere
    assert archive.resolve_model("llama-2") == "tiny-llama-2"
    assert archive.resolve_model("TINY-LLAMA-2") == "tiny-llama-2"
    assert archive.resolve_model("tiny-llama") == "tiny-llama"  # exact beats the two substring matches
    assert archive.resolve_analysis("llama-2") == archive.resolve_analysis("tiny-llama-2")
    assert archive.sizes("llama-2", k=0.05).equals(archive.sizes("tiny-llama-2", k=0.05))
    assert np.array_equal(archive.selection("llama-2", "en", 0.05, MODULE),
                          archive.selection("tiny-llama-2", "en", 0.05, MODULE))
    assert np.array_equal(archive.magnitudes("llama-2", MODULE), archive.magnitudes("tiny-llama-2", MODULE))
    # the exact name selects that model, not tiny-llama-2 (whose sets differ: 2 languages, k 0.1)
    assert sorted(archive.sizes("tiny-llama", k=0.05)["lang"]) == sorted(LANGS)


def test_several_or_no_matches_are_one_line_errors_listing_them(named):
    archive = mlarch.open(named)
    calls = [lambda m: archive.resolve_model(m), lambda m: archive.sizes(m),
             lambda m: archive.selection(m, "en", 0.05, MODULE), lambda m: archive.resolve_analysis(m),
             lambda m: archive.magnitudes(m, MODULE), lambda m: archive.analysis_overlap(m)]
    for call in calls:
        with pytest.raises(UsageError) as caught:
            call("tiny")
        assert str(caught.value) == ("'tiny' matches 2 archived models (tiny-llama, tiny-llama-2): pass one of "
                                     "them in full")
        with pytest.raises(MlarchError) as caught:
            call("gpt-9")
        assert str(caught.value) == "no archived model matches 'gpt-9'; archived models: tiny-llama, tiny-llama-2"
        assert not isinstance(caught.value, UsageError)  # not archived: exit 1, as an unknown run
    result = CliRunner().invoke(cli, ["--archive", str(named), "chart", "analyses", "--model", "tiny",
                                      "-o", str(named.parent / "x.svg")])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "Error: 'tiny' matches 2 archived models (tiny-llama, tiny-llama-2): pass one of them in full"]


def test_compare_keeps_every_model_a_pattern_names_and_only_the_exact_one(named):
    archive = mlarch.open(named)
    both = archive.compare("tiny", "en,de", k=0.05, by="global")
    assert both["model"].to_list() == ["tiny-llama", "tiny-llama-2"]
    exact = archive.compare("tiny-llama", "en,de", k=0.05, by="global")
    assert exact["model"].to_list() == ["tiny-llama"]
    assert archive.compare("llama-2,tiny-llama", "en,de", k=0.05, by="global")["model"].to_list() == [
        "tiny-llama-2", "tiny-llama"]
    # same weights, same data: both models' sets are the same at k = 0.05
    assert both.drop("model", "analysis").row(0) == both.drop("model", "analysis").row(1)
    data = charts.data.resolve(archive, "tiny-llama", k=0.05)
    assert data.models == ["tiny-llama"]


def _selection_counts(archive, model, langs, k):
    """(n_a, n_b, n_intersection, unique_a, unique_b) per language pair over all modules, from
    Archive.selection's masks (its own reads, not compare's)."""
    modules = archive.sql("SELECT module FROM modules WHERE model = $m ORDER BY module", {"m": model})["module"]
    totals = {}
    for module in modules:
        masks = {lang: archive.selection(model, lang, k, module) for lang in langs}
        for a, b in combinations(langs, 2):
            others_a = np.zeros_like(masks[a])
            for lang in langs:
                if lang != a:
                    others_a |= masks[lang]
            others_b = np.zeros_like(masks[b])
            for lang in langs:
                if lang != b:
                    others_b |= masks[lang]
            got = (masks[a].sum(), masks[b].sum(), (masks[a] & masks[b]).sum(), (masks[a] & ~others_a).sum(),
                   (masks[b] & ~others_b).sum())
            totals[(a, b)] = tuple(int(x) + y for x, y in zip(got, totals.get((a, b), (0,) * 5)))
    return totals


COLUMNS = ["n_a", "n_b", "n_intersection", "unique_a", "unique_b"]


def test_compare_at_a_k_not_archived_equals_the_selection_sets(llama_archive):
    archive = mlarch.open(llama_archive)
    frame = archive.compare("tiny-llama", LANGS, k=0.1, by="global")
    assert frame["k"].to_list() == [0.1] * 3
    expected = _selection_counts(archive, "tiny-llama", LANGS, 0.1)
    for row in frame.iter_rows(named=True):
        assert tuple(row[c] for c in COLUMNS) == expected[(row["lang_a"], row["lang_b"])]
    assert frame["n_a"].min() > 0 and frame["n_intersection"].min() > 0  # something was counted
    # at an archived k the patterns table answers, and agrees with the same masks
    archived = archive.compare("tiny-llama", LANGS, k=0.05, by="global")
    expected = _selection_counts(archive, "tiny-llama", LANGS, 0.05)
    for row in archived.iter_rows(named=True):
        assert tuple(row[c] for c in COLUMNS) == expected[(row["lang_a"], row["lang_b"])]


def test_compare_re_thresholded_equals_a_fresh_ingest_at_that_k(llama_archive, model_dir, data, tmp_path):
    fresh = mlarch.open(tmp_path / "fresh")
    fresh.ingest(str(model_dir["llama"]), LANGS, data["math"], data["control"], samples=6, top_k=[0.1],
                 device="cpu")
    archive = mlarch.open(llama_archive)
    for by in ("layer", "module", "global"):
        assert archive.compare("tiny-llama", LANGS, k=0.1, by=by).equals(
            fresh.compare("tiny-llama", LANGS, k=0.1, by=by)), by


def test_compare_across_models_mixes_archived_and_re_thresholded_k(named):
    archive = mlarch.open(named)
    # k = 0.1: archived by tiny-llama-2 only; tiny-llama's side is re-thresholded
    frame = archive.compare("tiny", "en,de", k=0.1, by="layer")
    one, two = (frame.filter(frame["model"] == m).drop("model", "analysis") for m in ("tiny-llama", "tiny-llama-2"))
    alone = archive.compare("tiny-llama-2", "en,de", k=0.1, by="layer")  # archived: the patterns table
    assert two.equals(alone.drop("model", "analysis"))
    assert one.equals(two)  # same weights and data: the re-thresholded sets are the archived ones


def test_bad_k_is_a_usage_error_naming_the_argument(llama_archive):
    archive = mlarch.open(llama_archive)
    for bad in (0, 1, 1.5, -0.1, "x"):
        with pytest.raises(UsageError) as caught:
            archive.compare("tiny-llama", LANGS, k=bad)
        assert str(caught.value) == f"k must be a fraction in (0, 1), got {bad!r}: e.g. k=0.01"
    result = CliRunner().invoke(cli, ["--archive", str(llama_archive), "compare", "--model", "llama", "--langs",
                                      "en,de", "--k", "1.5"])
    assert result.exit_code == 2 and "--k" in result.stderr and "k=" not in result.stderr


def test_sizes_at_a_k_not_archived_are_the_selection_sets(llama_archive):
    archive = mlarch.open(llama_archive)
    sizes = archive.sizes("tiny-llama", k=0.1)
    assert sizes.columns == ["lang", "n_selected", "n_params", "percent"]
    modules = archive.sql("SELECT module FROM modules ORDER BY module")["module"]
    expected = {lang: sum(int(archive.selection("tiny-llama", lang, 0.1, m).sum()) for m in modules) for lang in LANGS}
    assert dict(zip(sizes["lang"], sizes["n_selected"])) == expected
    assert sizes["n_selected"].to_list() == sorted(expected.values(), reverse=True)
    n_params = archive.models()["n_scored_params"][0]
    assert set(sizes["n_params"]) == {n_params}
    assert sizes["percent"][0] == pytest.approx(100 * sizes["n_selected"][0] / n_params, abs=1e-3)
    # an archived k: the set_sizes view answers, with the same columns and types
    assert archive.sizes("tiny-llama", k=0.05).schema == sizes.schema


def test_a_bf16_run_refuses_a_k_it_did_not_archive_before_reading_arrays(archive_copy):
    archive = mlarch.open(archive_copy)
    archive.sql("UPDATE runs SET provenance = json_merge_patch(provenance, '{\"method\": {\"name\": "
                "\"mathneuro-bf16\"}}') WHERE lang = 'de'", write=True)
    shutil.rmtree(archive_copy / "arrays.zarr")  # nothing may be read before the refusal
    for call in (lambda: archive.compare("tiny-llama", LANGS, k=0.1), lambda: archive.sizes("tiny-llama", k=0.1)):
        with pytest.raises(UsageError, match="mathneuro-bf16.*not at 0.1"):
            call()
