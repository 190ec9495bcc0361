"""Questions across models (issue 17): two tiny models of different depth in one archive.
Relative depth in the layer-wise views, sizes as shares of scored parameters, language-unique
shares, `compare` and the layers/overlap/unique charts over both models, and the upgrade of
a schema-4 archive. Expected values are recomputed here from the tables (modules,
selections, patterns), never from the views under test."""

import json
import shutil
from collections import defaultdict

import duckdb
import pytest
from click.testing import CliRunner

import mlarch
from mlarch import charts
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError
from mlarch.store import catalog, maintenance

from fixtures import build_model
from old_archives import downgrade_to_schema_4

LANGS = ["en", "de", "bn"]
KS = [0.05, 0.25]
DEPTH = {"tiny-llama": 2, "tiny-qwen2": 3}  # blocks per model: different depths on purpose


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, data):
    """tiny-llama (2 blocks, untied lm_head outside blocks) and tiny-qwen2 (3 blocks)."""
    folder = tmp_path_factory.mktemp("cross")
    root = folder / "arch"
    archive = mlarch.open(root)
    for kind, name in (("llama", "tiny-llama"), ("qwen2", "tiny-qwen2")):
        (folder / kind).mkdir()
        path = build_model(kind, folder / kind, layers=DEPTH[name])
        archive.ingest(str(path), LANGS, data["math"], data["control"], samples=4, top_k=KS, device="cpu")
    return root


@pytest.fixture
def copy(two_models, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(two_models, target)
    return target


def run(root, *args):
    return CliRunner().invoke(cli, ["--archive", str(root), *args])


def _tables(archive):
    """modules, selections and patterns rows as plain Python (the ground truth)."""
    modules = {(m, mod): (layer, n) for m, mod, layer, n in
               archive.sql("SELECT model, module, layer, n_params FROM modules").rows()}
    selections = archive.sql("SELECT model, k, seed, lang, module, n_selected FROM selections").rows()
    patterns = archive.sql("SELECT model, k, seed, module, langs, n_params FROM patterns").rows()
    return modules, selections, patterns


def _depth(modules) -> dict[tuple[str, int], float]:
    blocks = defaultdict(set)
    for (model, _), (layer, _) in modules.items():
        if layer is not None:
            blocks[model].add(layer)
    return {(model, layer): (layer / (len(ls) - 1) if len(ls) > 1 else 0.0)
            for model, ls in blocks.items() for layer in ls}


# --- views -----------------------------------------------------------------------------------

def test_depth_is_layer_over_blocks_minus_one_in_every_layer_wise_view(two_models):
    archive = mlarch.open(two_models)
    modules, _, _ = _tables(archive)
    expected = _depth(modules)
    # the literal values: 2 blocks -> 0, 1; 3 blocks -> 0, 0.5, 1
    assert {k: v for k, v in expected.items()} == {("tiny-llama", 0): 0.0, ("tiny-llama", 1): 1.0,
                                                   ("tiny-qwen2", 0): 0.0, ("tiny-qwen2", 1): 0.5,
                                                   ("tiny-qwen2", 2): 1.0}
    got = {(m, layer): d for m, layer, d in archive.sql("SELECT model, layer, depth FROM layer_depth").rows()}
    assert got == expected
    for view in ("set_sizes", "overlap_by_module", "overlap_by_layer", "language_unique"):
        rows = archive.sql(f"SELECT model, layer, depth FROM {view}").rows()
        assert {m for m, _, _ in rows} == set(DEPTH), view
        for model, layer, depth in rows:
            assert depth == (None if layer is None else expected[(model, layer)]), (view, model, layer)
    # lm_head of tiny-llama sits outside the blocks: its depth is NULL, not 0 or 1
    assert archive.sql("SELECT DISTINCT depth FROM set_sizes WHERE module = 'lm_head'").rows() == [(None,)]
    # new columns come after the existing ones (the SQL contract: "more columns may follow")
    assert archive.sql("SELECT * FROM set_sizes LIMIT 1").columns[-2:] == ["depth", "share"]
    assert archive.sql("SELECT * FROM overlap_by_layer LIMIT 1").columns[-1] == "depth"


def test_depth_of_a_one_block_model_is_zero():
    """n_layers - 1 = 0 would divide by zero: a one-block model's block is at depth 0.0."""
    con = duckdb.connect()
    con.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
                "applied_at TIMESTAMP NOT NULL)")
    for _, _, sql in catalog.migrations():  # the shipped migrations, as a new catalog gets them
        con.execute(sql)
    for model, module, layer in (("one", "h.0.mlp", 0), ("one", "h.0.attn", 0), ("one", "lm_head", None),
                                 ("five", "h.3.mlp", 3), ("five", "h.0.mlp", 0), ("five", "h.1.mlp", 1),
                                 ("five", "h.2.mlp", 2), ("five", "h.4.mlp", 4)):
        con.execute("INSERT INTO modules VALUES (?, ?, ?, 'linear', 2, 2, 4, 0, 0, 0)", [model, module, layer])
    assert con.execute("SELECT model, layer, n_layers, depth FROM layer_depth ORDER BY ALL").fetchall() == [
        ("five", 0, 5, 0.0), ("five", 1, 5, 0.25), ("five", 2, 5, 0.5), ("five", 3, 5, 0.75), ("five", 4, 5, 1.0),
        ("one", 0, 1, 0.0)]
    con.close()


def test_shares_are_sizes_over_the_scored_parameters(two_models):
    archive = mlarch.open(two_models)
    modules, selections, _ = _tables(archive)
    for model, k, seed, lang, module, share in archive.sql(
            "SELECT model, k, seed, lang, module, share FROM set_sizes").rows():
        n_selected = next(s[5] for s in selections if s[:5] == (model, k, seed, lang, module))
        assert share == pytest.approx(n_selected / modules[(model, module)][1])
    scored = dict(archive.sql("SELECT model, n_scored_params FROM models").rows())
    totals = archive.sql("SELECT model, k, seed, lang, n_selected, n_params, share FROM set_totals").rows()
    assert len(totals) == 2 * len(KS) * len(LANGS)
    for model, k, seed, lang, n_selected, n_params, share in totals:
        want = sum(s[5] for s in selections if s[:4] == (model, k, seed, lang))
        assert n_selected == want and n_params == scored[model]
        assert share == pytest.approx(want / scored[model])
    assert scored["tiny-llama"] != scored["tiny-qwen2"]  # the shares differ from the counts' ratio


def test_language_unique_share_equals_a_count_from_the_patterns(two_models):
    archive = mlarch.open(two_models)
    _, selections, patterns = _tables(archive)
    rows = archive.sql("SELECT model, analysis, k, seed, lang, n_unique, n_selected, share "
                       "FROM language_unique_share").rows()
    assert {(m, k, lang) for m, _, k, _, lang, *_ in rows} == {(m, k, lang) for m in DEPTH for k in KS
                                                                for lang in LANGS}
    for model, analysis, k, seed, lang, n_unique, n_selected, share in rows:
        assert analysis == "math-vs-control"
        unique = sum(n for m, k_, s, _, langs, n in patterns if (m, k_, s) == (model, k, seed) and langs == [lang])
        selected = sum(s[5] for s in selections if s[:4] == (model, k, seed, lang))
        assert (n_unique, n_selected) == (unique, selected) and 0 < unique < selected
        assert share == pytest.approx(unique / selected)


# --- compare -----------------------------------------------------------------------------------

def test_compare_puts_both_models_side_by_side_with_shares_and_depth(two_models):
    archive = mlarch.open(two_models)
    modules, selections, patterns = _tables(archive)
    depth = _depth(modules)
    frame = archive.compare("llama,qwen", "en,bn", k=0.05, by="layer")
    assert frame.columns[:14] == ["model", "analysis", "layer", "k", "seed", "lang_a", "lang_b", "n_a", "n_b",
                                  "n_intersection", "n_union", "jaccard", "chance_jaccard", "unique_a"]
    assert frame["model"].unique(maintain_order=True).to_list() == ["tiny-llama", "tiny-qwen2"]
    for row in frame.iter_rows(named=True):
        model = row["model"]
        in_scope = [mod for (m, mod), (layer, _) in modules.items() if m == model and (
            row["layer"] == "all" or (layer is None and row["layer"] == "none") or str(layer) == row["layer"])]
        n_params = sum(modules[(model, mod)][1] for mod in in_scope)
        n_en = sum(s[5] for s in selections if s[0] == model and s[1] == 0.05 and s[3] == "en" and s[4] in in_scope)
        assert (row["n_params"], row["n_a"]) == (n_params, n_en), row
        assert row["n_a_share"] == pytest.approx(n_en / n_params)
        assert row["n_b_share"] == pytest.approx(row["n_b"] / n_params)
        assert row["depth"] == (depth[(model, int(row["layer"]))] if row["layer"].isdigit() else None)
    qwen = frame.filter(frame["model"] == "tiny-qwen2")
    assert qwen["depth"].to_list() == [0.0, 0.5, 1.0, None]  # 3 blocks, then 'all'
    # a pattern matching both gives the same rows; global shares equal set_totals'
    assert archive.compare("tiny", "en,bn", k=0.05, by="layer").equals(frame)
    overall = archive.compare("qwen,llama", ["en", "bn"], k=0.05, by="global")
    assert overall["model"].to_list() == ["tiny-qwen2", "tiny-llama"]  # in the order asked
    totals = {(m, lang): share for m, lang, share in archive.sql(
        "SELECT model, lang, share FROM set_totals WHERE k = 0.05").rows()}
    for row in overall.iter_rows(named=True):
        assert row["n_a_share"] == pytest.approx(totals[(row["model"], "en")])
        assert row["n_b_share"] == pytest.approx(totals[(row["model"], "bn")])
        unique_en = 0
        for m, k, _, _, langs, n in patterns:  # en and not bn, among the compared languages
            if m == row["model"] and k == 0.05 and "en" in langs and "bn" not in langs:
                unique_en += n
        assert row["unique_a"] == unique_en
        assert row["unique_a_share"] == pytest.approx(unique_en / row["n_params"])
    assert "depth" not in overall.columns


def test_compare_cli_across_models_and_errors(two_models):
    result = run(two_models, "compare", "--model", "llama,qwen", "--langs", "en,bn", "--k", "0.05",
                 "--by", "global", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["model"] for r in rows] == ["tiny-llama", "tiny-qwen2"]
    assert all(0 < r["n_a_share"] < 1 and r["n_params"] > 0 for r in rows)
    # one part matching nothing is an error naming it, never a comparison without that model
    result = run(two_models, "compare", "--model", "llama,gemma", "--langs", "en,bn")
    assert result.exit_code != 0 and "no archived model matches 'gemma'" in result.output
    with pytest.raises(MlarchError, match="no archived model matches 'gemma'"):
        mlarch.open(two_models).compare("llama,gemma", "en,bn")
    # --analysis must exist for every matched model
    with pytest.raises(UsageError, match="model 'tiny-llama' has no analysis 'other'"):
        mlarch.open(two_models).compare("llama,qwen", "en,bn", analysis="other")


# --- charts ------------------------------------------------------------------------------------

def _rows(spec):
    return [row for values in spec.get("datasets", {}).values() for row in values]


def _x_fields(node, found=None):
    found = set() if found is None else found
    if isinstance(node, dict):
        enc = node.get("encoding", {})
        if isinstance(enc.get("x"), dict) and "field" in enc["x"]:
            found.add(enc["x"]["field"])
        for value in node.values():
            _x_fields(value, found)
    elif isinstance(node, list):
        for value in node:
            _x_fields(value, found)
    return found


@pytest.mark.parametrize("kind", ["layers", "overlap"])
def test_layer_charts_of_two_models_use_relative_depth(two_models, kind):
    archive = mlarch.open(two_models)
    modules, _, _ = _tables(archive)
    depth = _depth(modules)
    spec = charts.chart(archive, kind, model="llama,qwen", langs="en,bn", k=0.05).to_dict()
    rows = _rows(spec)
    assert {r["model"] for r in rows} == set(DEPTH)
    assert {(r["model"], r["layer"]) for r in rows} == set(depth)  # every block of both models
    assert all(r["depth"] == depth[(r["model"], r["layer"])] for r in rows)
    assert _x_fields(spec) == {"depth"} and spec["facet"]["field"] == "model"
    if kind == "layers":  # the plotted counts equal set_sizes summed per block
        want = dict(((m, lang, layer), n) for m, lang, layer, n in archive.sql(
            "SELECT model, lang, layer, sum(n_selected) FROM set_sizes WHERE k = 0.05 AND layer IS NOT NULL "
            "GROUP BY ALL").rows())
        assert {(r["model"], r["lang"], r["layer"]): r["n_selected"] for r in rows} == {
            key: n for key, n in want.items() if key[1] in ("en", "bn")}
    by_layer = charts.chart(archive, kind, model="llama,qwen", langs="en,bn", k=0.05, x="layer").to_dict()
    assert _x_fields(by_layer) == {"layer"}
    single = charts.chart(archive, kind, model="qwen", langs="en,bn", k=0.05).to_dict()
    assert _x_fields(single) == {"layer"}  # one model: block indices, as before


def test_unique_chart_shows_each_models_language_unique_share(two_models):
    archive = mlarch.open(two_models)
    spec = charts.chart(archive, "unique", model="tiny", langs="en,de,bn", k=0.25).to_dict()
    view = {(m, lang): share for m, lang, share in archive.sql(
        "SELECT model, lang, share FROM language_unique_share WHERE k = 0.25").rows()}
    rows = _rows(spec)
    assert len(rows) == len(view) == 6
    assert {(r["model"], r["lang"]): r["share"] for r in rows} == pytest.approx(view)


@pytest.mark.parametrize("fmt", ["svg", "png", "pdf", "html", "json"])
def test_cross_model_charts_render_in_every_format(two_models, tmp_path, fmt):
    for kind in ("layers", "overlap", "unique"):
        out = tmp_path / f"{kind}.{fmt}"
        result = run(two_models, "chart", kind, "--model", "llama,qwen", "--langs", "en,bn", "--k", "0.05",
                     "-o", str(out))
        assert result.exit_code == 0, result.output
        payload = out.read_bytes()
        assert len(payload) > 1000
        if fmt == "svg":
            text = payload.decode()
            assert "tiny-llama" in text and "tiny-qwen2" in text
            if kind != "unique":
                assert "relative depth" in text
        elif fmt == "json":
            assert {r["model"] for r in _rows(json.loads(payload))} == set(DEPTH)


def test_layer_heatmap_of_two_models_places_blocks_at_their_depth(two_models, tmp_path):
    archive = mlarch.open(two_models)
    modules, _, _ = _tables(archive)
    depth = _depth(modules)
    spec = charts.heatmap(archive, "llama,qwen", langs="en,bn", k=0.05, by="layer").to_dict()
    rows = _rows(spec)
    blocks = {m: len({layer for model, layer in depth if model == m}) for m in DEPTH}
    assert {(r["model"], r["layer"]) for r in rows} == set(depth)  # every block, nothing outside blocks
    for r in rows:  # each cell spans depth ± half a block step of its own model
        half = 0.5 / (blocks[r["model"]] - 1)
        assert r["depth"] == depth[(r["model"], r["layer"])]
        assert r["x0"] == pytest.approx(r["depth"] - half) and r["x1"] == pytest.approx(r["depth"] + half)
    want = dict(((m, layer), j) for m, layer, j in archive.sql(
        "SELECT model, layer, jaccard FROM overlap_by_layer WHERE k = 0.05 AND lang_a = 'bn' AND lang_b = 'en' "
        "AND layer IS NOT NULL").rows())
    assert {(r["model"], r["layer"]): r["jaccard"] for r in rows if r["row"] != "chance"} == pytest.approx(want)
    assert _x_fields(spec) == {"x0"}
    by_index = charts.heatmap(archive, "llama,qwen", langs="en,bn", k=0.05, by="layer", x="layer").to_dict()
    assert _x_fields(by_index) == {"column"}
    out = tmp_path / "hm.svg"
    result = run(two_models, "chart", "heatmap", "--model", "llama,qwen", "--by", "layer", "--k", "0.05",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "relative depth" in out.read_text()


def test_x_option_is_checked(two_models, tmp_path):
    result = run(two_models, "chart", "sizes", "--model", "tiny", "--x", "depth", "-o", str(tmp_path / "s.svg"))
    assert result.exit_code == 2 and "applies to the layers and overlap charts and to heatmap" in result.output
    result = run(two_models, "chart", "heatmap", "--model", "tiny", "--x", "depth", "-o", str(tmp_path / "h.svg"))
    assert result.exit_code == 2 and "not to heatmap by k" in result.output
    with pytest.raises(TypeError, match="'x' applies to the overlap, heatmap, layers and analyses charts only"):
        mlarch.open(two_models).chart("unique", model="tiny", x="depth")
    with pytest.raises(UsageError, match="x .--x. must be one of layer, depth"):
        charts.layers(two_models, "tiny", x="height")


# --- upgrade -----------------------------------------------------------------------------------

OLD_COLUMNS = {  # the views 0004 made, with their columns then
    "set_sizes": "model, analysis, k, seed, lang, module, layer, n_params, n_math_top, n_control_top, n_selected, "
                 "math_run_id, control_run_id",
    "overlap_by_module": "model, analysis, k, seed, lang_a, lang_b, module, layer, n_intersection, n_union",
    "overlap_by_layer": "model, analysis, k, seed, lang_a, lang_b, layer, n_intersection, n_union, jaccard, "
                        "chance_jaccard",
    "overlap_global": "model, analysis, k, seed, lang_a, lang_b, n_intersection, n_union, jaccard, chance_jaccard",
    "language_unique": "model, analysis, k, seed, lang, layer, n_unique",
}


def test_schema_4_archive_upgrades_and_keeps_its_columns_and_values(copy):
    downgrade_to_schema_4(copy)
    catalog._CHECKED.clear()
    con = duckdb.connect(str(copy / "catalog.duckdb"), read_only=True)
    before = {}
    for view, columns in OLD_COLUMNS.items():
        result = con.execute(f"SELECT * FROM {view} ORDER BY ALL")
        assert ", ".join(d[0] for d in result.description) == columns  # schema 4 as it was
        before[view] = result.fetchall()
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == 4
    con.close()
    archive = mlarch.open(copy)
    assert archive.sql("SELECT max(version) AS v FROM schema_migrations")["v"][0] == catalog.latest_version() == 7
    for view, columns in OLD_COLUMNS.items():
        frame = archive.sql(f"SELECT * FROM {view} ORDER BY ALL")
        assert ", ".join(frame.columns[:len(columns.split(", "))]) == columns, view  # old columns first
        assert archive.sql(f"SELECT {columns} FROM {view} ORDER BY ALL").rows() == before[view], view
    assert archive.sql("SELECT count(*) FROM language_unique_share").item() == 2 * len(KS) * len(LANGS)
    failed = [c for c in maintenance.verify(archive.root) if not c.ok]
    assert failed == []  # catalog schema equal to the migrations' after the upgrade
    assert run(copy, "verify").exit_code == 0
