"""Issue 15, "a report of the difference": the Jaccard of the math-only sets of an exact analysis
and a paper-compatible (mathneuro-bf16) analysis of one tiny model, per language, k and layer,
in one call (Archive.analysis_overlap, `compare --analyses`), its chart kind `analyses` in every
format, the report's figures and table, and bad input. Expected values come from
Archive.selection's masks, module by module, never from the code under test."""

import json
import shutil
from collections import defaultdict

import polars as pl
import pytest
from click.testing import CliRunner

import mlarch
from mlarch import charts
from mlarch.charts.kinds import fmt_k
from mlarch.cli import cli
from mlarch.errors import UsageError
from mlarch.query import analysis_overlap as overlap_module
from mlarch.store import arrays

from fixtures import math_items, one_error

MODEL = "tiny-llama"
EXACT, PAPER, NARROW = "gsm-vs-control", "gsm-vs-control-paper", "narrow"
EXACT_KS, PAPER_KS, NARROW_KS = [0.05, 0.1, 0.25], [0.05, 0.25], [0.25]
SEED = 2
FORMATS = ["svg", "png", "pdf", "html", "json"]


def run(root, *args):
    return CliRunner().invoke(cli, ["--archive", str(root), *args])


@pytest.fixture(scope="module")
def archive_root(tmp_path_factory, model_dir, data):
    """tiny-llama in three analyses: exact (en, de; k 0.05, 0.1, 0.25), --paper-compat (en, de;
    k 0.05, 0.25) and another exact one, `narrow` (en; k 0.25 only)."""
    folder = tmp_path_factory.mktemp("analysis-diff")
    (folder / "gsm").mkdir()
    for lang in ("en", "de"):
        with open(folder / "gsm" / f"{lang}.jsonl", "w", encoding="utf-8") as handle:
            for i, item in enumerate(math_items(lang, n=9)):
                handle.write(json.dumps({**item, "solution": f"x = {i + 2}\nprint(x * {i + 3})"}) + "\n")
    math = str(folder / "gsm" / "{lang}.jsonl")
    root = folder / "arch"
    archive = mlarch.open(root)
    common = dict(samples=4, seeds=[SEED], device="cpu")
    path = str(model_dir["llama"])
    assert archive.ingest(path, ["en", "de"], math, data["control"], dtype="bfloat16", top_k=EXACT_KS,
                          **common).analysis == EXACT
    assert archive.ingest(path, ["en", "de"], math, data["control"], paper_compat=True, top_k=PAPER_KS,
                          **common).analysis == PAPER
    archive.ingest(path, ["en"], math, data["control"], dtype="bfloat16", top_k=NARROW_KS, analysis=NARROW, **common)
    return root


_MASK_COUNTS = {}  # (root, pair, lang, k) -> {module: counts}: each computed once per session


def _mask_counts(archive, pair, lang, k):
    key = (str(archive.root), pair, lang, k)
    if key not in _MASK_COUNTS:
        counts = {}
        for module in archive.sql("SELECT module FROM modules WHERE model = ?", [MODEL])["module"]:
            a = archive.selection(MODEL, lang, k, module, seed=SEED, analysis=pair[0])
            b = archive.selection(MODEL, lang, k, module, seed=SEED, analysis=pair[1])
            counts[module] = (int(a.sum()), int(b.sum()), int((a & b).sum()), int((a | b).sum()))
        _MASK_COUNTS[key] = counts
    return _MASK_COUNTS[key]


def expected(archive, pair, langs, ks, by):
    """{(lang, k, key): (n_a, n_b, n_intersection, n_union)} from Archive.selection's masks;
    key: the module, the layer, or None (global)."""
    layer_of = dict(archive.sql("SELECT module, layer FROM modules WHERE model = ?", [MODEL]).rows())
    out = defaultdict(lambda: [0, 0, 0, 0])
    for lang in langs:
        for k in ks:
            for module, counts in _mask_counts(archive, pair, lang, k).items():
                key = {"module": module, "layer": layer_of[module], "global": None}[by]
                for i, n in enumerate(counts):
                    out[(lang, k, key)][i] += n
    return {key: tuple(v) for key, v in out.items()}


def got(frame, by):
    key = {"module": "module", "layer": "layer", "global": None}[by]
    return {(r["lang"], r["k"], r[key] if key else None): (r["n_a"], r["n_b"], r["n_intersection"], r["n_union"])
            for r in frame.iter_rows(named=True)}


# --- values ---------------------------------------------------------------------------------
# counted by one joint histogram per module (all k archived), in one window or one per module (700
# elements), and by boolean masks per k (the path of re-thresholded k)
@pytest.mark.parametrize("window, histogram_codes", [(overlap_module.WINDOW, 15), (700, 15), (overlap_module.WINDOW, 0)])
def test_defaults_are_exact_vs_paper_every_shared_language_and_its_archived_k(archive_root, monkeypatch, window,
                                                                              histogram_codes):
    monkeypatch.setattr(overlap_module, "WINDOW", window)
    monkeypatch.setattr(overlap_module, "HISTOGRAM_CODES", histogram_codes)
    archive = mlarch.open(archive_root)
    for by in ("module", "layer", "global"):
        frame = archive.analysis_overlap(MODEL, by=by)
        assert set(frame["analysis_a"]) == {EXACT} and set(frame["analysis_b"]) == {PAPER}
        assert frame["lang"].unique(maintain_order=True).to_list() == ["de", "en"]
        assert sorted(set(frame["k"])) == PAPER_KS  # the bf16 analysis's k, not the exact one's 0.1
        assert set(frame["seed"]) == {SEED}
        want = expected(archive, (EXACT, PAPER), ["de", "en"], PAPER_KS, by)
        assert got(frame, by) == want, by
        for r in frame.iter_rows(named=True):
            assert r["jaccard"] == (r["n_intersection"] / r["n_union"] if r["n_union"] else None)
        if by == "global":  # bf16 sets differ from the exact ones, but overlap
            assert 0 < frame["jaccard"].min() and frame["jaccard"].max() < 1
    layers = archive.analysis_overlap(MODEL, by="layer")
    assert layers.columns[-2:] == ["jaccard", "depth"]
    assert {r["layer"]: r["depth"] for r in layers.iter_rows(named=True)} == {0: 0.0, 1: 1.0, None: None}


def test_exact_side_is_rethresholded_at_the_paper_k_and_two_exact_analyses_share_archived_k(archive_root):
    archive = mlarch.open(archive_root)
    frame = archive.analysis_overlap(MODEL, None, [NARROW, PAPER], by="global")  # narrow archived 0.25 only
    assert frame["lang"].to_list() == ["en", "en"] and frame["k"].to_list() == PAPER_KS  # narrow has no de
    assert got(frame, "global") == expected(archive, (NARROW, PAPER), ["en"], PAPER_KS, "global")
    assert archive.analysis_overlap(MODEL, "en", [NARROW, PAPER], k="all", by="global").equals(frame)
    both_exact = archive.analysis_overlap(MODEL, analyses=f"{EXACT},{NARROW}", by="global")
    assert both_exact["lang"].to_list() == ["en"] and both_exact["k"].to_list() == NARROW_KS
    rethresholded = archive.analysis_overlap(MODEL, "en", [EXACT, NARROW], k=[0.03, 0.1], by="global")
    assert got(rethresholded, "global") == expected(archive, (EXACT, NARROW), ["en"], [0.03, 0.1], "global")


def test_one_language_and_one_k_as_before(archive_root):
    archive = mlarch.open(archive_root)
    one = archive.analysis_overlap(MODEL, "en", [EXACT, PAPER], k=0.25, by="global")
    assert one.height == 1 and one.row(0, named=True)["k"] == 0.25
    smallest = archive.analysis_overlap(MODEL, "en", f"{EXACT},{PAPER}", k=0.05, by="global")  # codes 2, 3: never
    assert got(smallest, "global") == expected(archive, (EXACT, PAPER), ["en"], [0.05], "global")
    every = archive.analysis_overlap(MODEL, by="global").filter((pl.col("lang") == "en") & (pl.col("k") == 0.25))
    assert one.equals(every)


def test_level_codes_are_read_once_per_run_and_window_whatever_the_number_of_k(archive_root, monkeypatch):
    archive = mlarch.open(archive_root)
    reads = []
    real = arrays.read

    def counted(root, record, start=None, stop=None):
        reads.append(record.path)
        return real(root, record, start, stop)

    monkeypatch.setattr(arrays, "read", counted)
    archive.analysis_overlap(MODEL, "en", [EXACT, PAPER], k=0.25)
    one_k = len(reads)
    reads.clear()
    archive.analysis_overlap(MODEL, "en", [EXACT, PAPER], k=[0.05, 0.25])
    assert len(reads) == one_k == 4  # 4 runs, one window: each run's level codes read once


def test_cli_several_languages_and_k(archive_root):
    result = run(archive_root, "compare", "--model", MODEL, "--langs", "all", "--analyses", f"{EXACT},{PAPER}",
                 "--k", "all", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    archive = mlarch.open(archive_root)
    frame = archive.analysis_overlap(MODEL, ["de", "en"], [EXACT, PAPER])
    assert rows == frame.to_dicts()
    assert {(r["lang"], r["k"]) for r in rows} == {(x, k) for x in ("de", "en") for k in PAPER_KS}
    listed = run(archive_root, "compare", "--model", MODEL, "--langs", "en,de", "--analyses", f"{EXACT},{PAPER}",
                 "--k", "0.25,0.05", "--by", "global", "--format", "csv")
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 5 and [line.split(",")[1:3] for line in lines[1:]] == [
        ["en", "0.05"], ["en", "0.25"], ["de", "0.05"], ["de", "0.25"]]  # languages as given, k ascending


@pytest.mark.parametrize("args, needle", [
    (["--langs", "en", "--analyses", EXACT], "two different analyses"),
    (["--langs", "en", "--analyses", f"{EXACT},{EXACT}"], "two different analyses"),
    (["--langs", "fr", "--analyses", f"{EXACT},{PAPER}"], "no math-only set for 'fr'"),
    (["--langs", "en,de", "--analyses", f"{PAPER},{NARROW}"], f"analysis '{NARROW}' of model '{MODEL}' has no math-only set for 'de'; it has en"),
    (["--langs", "en", "--analyses", f"{EXACT},{PAPER}", "--k", "0.1"], "has sets only at the k it archived (0.05, 0.25)"),
    (["--langs", "en", "--analyses", f"{EXACT},{PAPER}", "--k", "0.05,1.5"], "k must be in (0, 1)"),
    (["--langs", "en", "--analyses", f"{EXACT},{PAPER}", "--k", "lots"], "k must be numbers"),
    (["--langs", "en", "--analyses", f"{EXACT},{PAPER}", "--seed", "9"], "seed 9 has no sets"),
    (["--langs", "en", "--analyses", f"{EXACT},nope"], "no analysis 'nope'"),
    (["--langs", "en,de", "--k", "0.05,0.25", "--analysis", EXACT], "is not a valid float: pass one number when comparing languages"),
])
def test_bad_input_is_one_line_exit_2(archive_root, args, needle):
    line = one_error(run(archive_root, "compare", "--model", MODEL, *args), 2)
    assert needle in line, line


def test_no_paper_twin_is_an_error_naming_the_analyses(tmp_path, archive_root):
    copy = tmp_path / "copy"
    shutil.copytree(archive_root, copy)
    mlarch.open(copy).sql("DELETE FROM analyses WHERE analysis = ?", [PAPER], write=True)
    line = one_error(run(copy, "chart", "analyses", "--model", MODEL, "-o", str(tmp_path / "x.svg")), 2)
    assert "has no paper-compatible analysis beside an exact one" in line and "--analysis A,B" in line
    assert f"{EXACT}, {NARROW}" in line
    assert not (tmp_path / "x.svg").exists()
    with pytest.raises(UsageError, match="pass two analyses to compare, analyses='A,B'"):
        mlarch.open(copy).analysis_overlap(MODEL)


# --- the chart ------------------------------------------------------------------------------
def rows_of(spec):
    found = [row for values in spec.get("datasets", {}).values() for row in values]
    return found


@pytest.mark.parametrize("by", ["layer", "global"])
def test_chart_renders_to_every_format_with_the_values(archive_root, tmp_path, by):
    for fmt in FORMATS if by == "layer" else ["json"]:  # every format once: rendering does not depend on --by
        target = tmp_path / f"analyses-{by}.{fmt}"
        result = run(archive_root, "chart", "analyses", "--model", MODEL, "--by", by, "-o", str(target))
        assert result.exit_code == 0, result.output
        payload = target.read_bytes()
        assert payload, fmt
    if by == "layer":
        assert (tmp_path / f"analyses-{by}.svg").read_text().startswith("<svg")
        assert (tmp_path / f"analyses-{by}.pdf").read_bytes().startswith(b"%PDF")
        assert (tmp_path / f"analyses-{by}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "vega-embed" in (tmp_path / f"analyses-{by}.html").read_text()
    spec = json.loads((tmp_path / f"analyses-{by}.json").read_text())
    plotted = rows_of(spec)
    archive = mlarch.open(archive_root)
    want = expected(archive, (EXACT, PAPER), ["de", "en"], PAPER_KS, by)
    if by == "layer":
        want = {key: v for key, v in want.items() if key[2] is not None}  # blocks only on a layer axis
    assert {(r["lang"], r["k"], r["layer"] if by == "layer" else None): (r["n_a"], r["n_b"], r["n_intersection"],
                                                                         r["n_union"]) for r in plotted} == want
    assert len(plotted) == len(want)
    for r in plotted:
        assert r["jaccard"] == pytest.approx(r["n_intersection"] / r["n_union"])
    text = json.dumps(spec)
    assert EXACT in text and PAPER in text and f"seed {SEED}" in text
    if by == "layer":
        assert spec["facet"]["field"] == "lang" and spec["spec"]["layer"][0]["encoding"]["color"]["field"] == "k_label"
        assert spec["spec"]["layer"][0]["encoding"]["color"]["scale"]["domain"] == [fmt_k(k) for k in PAPER_KS]
        assert "Not shown: modules outside transformer blocks" in text  # the untied lm_head
    else:
        assert spec["layer"][0]["encoding"]["x"]["field"] == "k" and spec["layer"][0]["encoding"]["color"]["field"] == "lang"


def test_chart_api(archive_root):
    archive = mlarch.open(archive_root)
    assert charts.options_of("analyses") == ["model", "langs", "k", "seed", "by", "x", "analysis"]
    direct = charts.analyses(archive, MODEL, langs=["en"], k=[0.25], by="layer", x="depth",
                             analysis=f"{NARROW},{PAPER}").to_dict()
    via_api = archive.chart("analyses", model=MODEL, langs="en", k=[0.25], by="layer", x="depth",
                            analysis=[NARROW, PAPER]).to_dict()
    assert json.dumps(direct, sort_keys=True) == json.dumps(via_api, sort_keys=True)
    assert "facet" not in direct and direct["layer"][0]["encoding"]["x"]["field"] == "depth"
    assert {(r["k"], r["lang"]) for r in rows_of(direct)} == {(0.25, "en")}
    with pytest.raises(UsageError, match="x \\(--x\\) applies"):
        charts.analyses(archive, MODEL, x="depth")  # by global: a k axis
    with pytest.raises(UsageError, match="has sets only at the k it archived"):
        charts.analyses(archive, MODEL, k=[0.1])


# --- the report -----------------------------------------------------------------------------
def test_report_adds_the_comparison_beside_an_exact_analysis(archive_root, tmp_path):
    out = tmp_path / "report"
    result = run(archive_root, "report", "--model", MODEL, "--analysis", EXACT, "--langs", "en,de", "-o", str(out))
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"analyses-layer.svg", "analyses-layer.png", "analyses.svg", "analyses.png"} <= names
    page = (out / "index.html").read_text()
    assert 'href="analyses-layer.svg"' in page and "Jaccard of the math-only sets in analysis A vs B" in page
    frame = mlarch.open(archive_root).analysis_overlap(MODEL, ["en", "de"], [EXACT, PAPER], by="global")
    for r in frame.iter_rows(named=True):
        assert f'<td class="num">{r["jaccard"]:.3f}</td>' in page
    assert "<th>k = 0.05</th>" in page and "<th>k = 0.25</th>" in page
    # an analysis without a paper-compatible twin: no such figures
    plain = tmp_path / "plain"
    assert run(archive_root, "report", "--model", MODEL, "--analysis", NARROW, "-o", str(plain)).exit_code == 0
    assert not any(p.name.startswith("analyses") for p in plain.iterdir())
