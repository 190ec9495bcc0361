"""`mlarch chart` / `mlarch report` and mlarch.charts: every kind in every format, the
plotted values against the SQL views, stable colours, bad inputs, and the report."""

import json
import re
import struct
import subprocess
import sys
from collections import defaultdict
from itertools import combinations

import pytest
from click.testing import CliRunner

import mlarch
from mlarch import charts
from mlarch.charts import colors
from mlarch.cli import cli

KINDS = ["sizes", "overlap", "heatmap", "layers", "upset"]
FORMATS = ["svg", "png", "pdf", "html", "json"]
LANGS = ["en", "de", "bn"]


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def rows(spec):
    """Every inline data row of a Vega-Lite spec (altair moves them to `datasets`)."""
    found = [row for values in spec.get("datasets", {}).values() for row in values]

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("data"), dict) and "values" in node["data"]:
                found.extend(node["data"]["values"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({k: v for k, v in spec.items() if k != "datasets"})
    return found


def svg_size(svg: str):
    match = re.search(r'<svg[^>]*\bwidth="([\d.]+)"[^>]*\bheight="([\d.]+)"', svg)
    return float(match.group(1)), float(match.group(2))


def png_size(payload: bytes):
    assert payload[:8] == b"\x89PNG\r\n\x1a\n" and payload[12:16] == b"IHDR"
    return struct.unpack(">II", payload[16:24])


def lang_colors(spec):
    """language -> colour from the first `lang` colour scale found in the spec."""
    def walk(node):
        if isinstance(node, dict):
            color = node.get("color")
            if isinstance(color, dict) and color.get("field") == "lang" and "scale" in color:
                return dict(zip(color["scale"]["domain"], color["scale"]["range"]))
            for value in node.values():
                if (hit := walk(value)) is not None:
                    return hit
        elif isinstance(node, list):
            for value in node:
                if (hit := walk(value)) is not None:
                    return hit
        return None

    return walk(spec)


# --- every kind, every format -------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_kind_renders_to_every_format(llama_archive, tmp_path, kind):
    written = {}
    for fmt in FORMATS:
        target = tmp_path / f"{kind}.{fmt}"
        result = run(llama_archive, "chart", kind, "--model", "llama", "--langs", ",".join(LANGS), "-o", str(target))
        assert result.exit_code == 0, result.output
        assert f"Wrote {target}" in result.stdout
        written[fmt] = target.read_bytes()
    svg = written["svg"].decode()
    assert svg.startswith("<svg") and "</svg>" in svg
    width, height = svg_size(svg)
    assert png_size(written["png"]) == (round(width * charts.PNG_SCALE), round(height * charts.PNG_SCALE))
    assert width > 300 and height > 150  # the panel plus axes, legend and title
    assert written["pdf"].startswith(b"%PDF")
    spec = json.loads(written["json"])
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite/") and rows(spec)
    page = written["html"].decode()
    assert page.lstrip().lower().startswith("<!doctype html>") and "vega-embed" in page
    assert "cdn.jsdelivr" not in page and not re.search(r"<script[^>]+src=", page)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{kind}.{f}" for f in FORMATS)  # no temp files


def test_by_layer_heatmap_renders(llama_archive, tmp_path):
    target = tmp_path / "h.png"
    result = run(llama_archive, "chart", "heatmap", "--model", "llama", "--by", "layer", "--k", "0.05", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert png_size(target.read_bytes())[0] > 400


# --- plotted values equal the SQL views -----------------------------------------------------
def test_sizes_values_match_set_sizes(llama_archive):
    archive = mlarch.open(llama_archive)
    spec = charts.build(archive, "sizes", model="llama", langs=LANGS).to_dict()
    plotted = {(r["lang"], r["k"]): r["n_selected"] for r in rows(spec)}
    expected = archive.sql("SELECT lang, k, sum(n_selected)::BIGINT AS n FROM set_sizes WHERE seed = 1 "
                           "GROUP BY lang, k")
    assert plotted == {(r["lang"], r["k"]): r["n"] for r in expected.iter_rows(named=True)}
    assert len(plotted) == 9 and spec["layer"][0]["encoding"]["x"]["scale"]["type"] == "log"
    title = spec["title"]
    assert "top-k" in title["text"] and "seed 1" in " ".join(title["subtitle"])


def test_heatmap_values_match_overlap_global(llama_archive):
    archive = mlarch.open(llama_archive)
    spec = charts.build(archive, "heatmap", model="llama", langs=LANGS).to_dict()
    plotted = {(r["row"], r["column"]): r["jaccard"] for r in rows(spec)}
    view = archive.sql("SELECT lang_a, lang_b, k, jaccard, chance_jaccard FROM overlap_global WHERE seed = 1")
    expected = {}
    for r in view.iter_rows(named=True):
        a, b = sorted((r["lang_a"], r["lang_b"]), key=LANGS.index)
        expected[(f"{a}–{b}", f"{r['k']:g}")] = r["jaccard"]
        expected[("chance", f"{r['k']:g}")] = r["chance_jaccard"]
    assert plotted.keys() == expected.keys() and len(plotted) == 12
    for key, value in expected.items():
        assert plotted[key] == pytest.approx(value)
    layer = charts.build(archive, "heatmap", model="llama", langs=LANGS, k=0.05, by="layer").to_dict()
    by_layer = {(r["row"], r["column"]): r["jaccard"] for r in rows(layer)}
    view = archive.sql("SELECT lang_a, lang_b, coalesce(layer::VARCHAR, 'lm_head') AS col, jaccard "
                       "FROM overlap_by_layer WHERE k = 0.05 AND seed = 1")
    for r in view.iter_rows(named=True):
        a, b = sorted((r["lang_a"], r["lang_b"]), key=LANGS.index)
        assert by_layer[(f"{a}–{b}", r["col"])] == pytest.approx(r["jaccard"])
    assert {c for (row, c) in by_layer if row == "chance"} == {"0", "1", "lm_head"}
    assert "k = 0.05" in " ".join(layer["title"]["subtitle"])


def test_overlap_and_layers_values_match_views(llama_archive):
    archive = mlarch.open(llama_archive)
    spec = charts.build(archive, "overlap", model="llama", langs=LANGS).to_dict()
    plotted = {(r["pair"], r["layer"]): r["jaccard"] for r in rows(spec)}
    view = archive.sql("SELECT lang_a, lang_b, layer, jaccard, chance_jaccard FROM overlap_by_layer "
                       "WHERE k = 0.01 AND seed = 1 AND layer IS NOT NULL")
    assert len(plotted) == view.height == 6
    for r in view.iter_rows(named=True):
        a, b = sorted((r["lang_a"], r["lang_b"]), key=LANGS.index)
        assert plotted[(f"{a}–{b}", r["layer"])] == pytest.approx(r["jaccard"])
    assert {round(r["chance_jaccard"], 12) for r in rows(spec)} == {round(view["chance_jaccard"][0], 12)}
    assert any(layer.get("mark", {}).get("strokeDash") for layer in spec["layer"])  # the chance rule
    layers = charts.build(archive, "layers", model="llama", langs=LANGS, k=0.25).to_dict()
    plotted = {(r["lang"], r["layer"]): r["n_selected"] for r in rows(layers)}
    view = archive.sql("SELECT lang, layer, sum(n_selected)::BIGINT AS n FROM set_sizes "
                       "WHERE k = 0.25 AND seed = 1 AND layer IS NOT NULL GROUP BY ALL")
    assert plotted == {(r["lang"], r["layer"]): r["n"] for r in view.iter_rows(named=True)}


def test_upset_bars_are_pattern_sums(llama_archive):
    archive = mlarch.open(llama_archive)
    langs = ["bn", "en", "de"]  # display order differs from the stored (sorted) patterns
    spec = charts.build(archive, "upset", model="llama", langs=langs, k=0.05).to_dict()
    bars = [r for r in rows(spec) if "n_params" in r]
    expected = defaultdict(int)
    for r in archive.sql("SELECT langs, n_params FROM patterns WHERE k = 0.05 AND seed = 1").iter_rows(named=True):
        expected[frozenset(r["langs"]) & set(langs)] += r["n_params"]
    expected.pop(frozenset(), None)
    for size in (1, 3):  # 'unique to each' and 'shared by all' are always drawn
        for members in combinations(langs, size):
            expected.setdefault(frozenset(members), 0)
    assert {frozenset(r["langs"]): r["n_params"] for r in bars} == dict(expected)
    heights = [r["n_params"] for r in bars]
    assert heights == sorted(heights, reverse=True)
    dots = [r for r in rows(spec) if "member" in r]
    assert len(dots) == len(bars) * len(langs)
    totals = archive.sql("SELECT lang, sum(n_selected)::BIGINT AS n FROM set_sizes WHERE k = 0.05 AND seed = 1 "
                         "GROUP BY lang")
    labels = {r["lang"]: r["label"] for r in dots}
    for r in totals.iter_rows(named=True):
        assert labels[r["lang"]] == f"{r['lang']} ({r['n']:,})"


def test_colours_are_stable_per_language(llama_archive):
    archive = mlarch.open(llama_archive)
    sizes = lang_colors(charts.build(archive, "sizes", model="llama", langs="en,de,bn").to_dict())
    layers = lang_colors(charts.build(archive, "layers", model="llama", langs="bn,en").to_dict())
    assert sizes == {"en": colors.color("en"), "de": colors.color("de"), "bn": colors.color("bn")}
    assert layers == {"bn": sizes["bn"], "en": sizes["en"]}
    assert len(set(colors.LANGUAGE_COLORS.values())) == len(colors.LANGUAGE_COLORS)
    assert colors.color("xx") == colors.color("xx") and re.fullmatch(r"#[0-9A-F]{6}", colors.color("xx"))
    assert colors.color("xx") in colors.FALLBACK_COLORS
    upset = charts.build(archive, "upset", model="llama", langs=LANGS).to_dict()
    assert {r["lang"]: r["fill"] for r in rows(upset) if r.get("member")} == sizes


def test_archive_chart_api_and_light_import(llama_archive):
    chart = mlarch.open(llama_archive).chart("overlap", model="llama", langs=["en", "bn"])
    assert chart.to_dict()["title"]["text"].startswith("Overlap")
    code = ("import sys, mlarch.charts; assert 'altair' not in sys.modules, 'altair'; import mlarch; "
            f"c = mlarch.charts.build(mlarch.open({str(llama_archive)!r}), 'sizes', model='llama'); "
            "mlarch.charts.render(c, 'svg'); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_several_models_share_faceted_panels(archive_copy, model_dir, data, tmp_path):
    archive = mlarch.open(archive_copy)
    archive.ingest(str(model_dir["qwen2"]), LANGS, data["math"], data["control"], samples=4,
                   top_k=[0.01, 0.05, 0.25], device="cpu")
    spec = charts.build(archive, "sizes", model="tiny", langs=LANGS).to_dict()
    assert spec["facet"]["field"] == "model" and spec.get("resolve") is None  # shared scales
    assert {r["model"] for r in rows(spec)} == {"tiny-llama", "tiny-qwen2"}
    upset = charts.build(archive, "upset", model="tiny", langs=LANGS).to_dict()
    assert len(upset["hconcat"]) == 2
    domains = {json.dumps(block["vconcat"][0]["layer"][0]["encoding"]["y"]["scale"]["domain"])
               for block in upset["hconcat"]}
    assert len(domains) == 1  # one y scale for both models' bars
    result = run(archive_copy, "chart", "overlap", "--model", "tiny", "--langs", "en,bn", "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 0, result.output


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,args,code,message", [
    ("kind", ["chart", "pie", "--model", "llama", "-o", "{out}/x.png"], 2, "unknown chart kind 'pie'"),
    ("suffix", ["chart", "sizes", "--model", "llama", "-o", "{out}/x.gif"], 2, "suffix .gif"),
    ("no suffix", ["chart", "sizes", "--model", "llama", "-o", "{out}/x"], 2, "no suffix"),
    ("upset langs", ["chart", "upset", "--model", "llama", "--langs", "en,de", "-o", "{out}/x.png"], 2,
     "upset needs at least 3 languages"),
    ("overlap langs", ["chart", "overlap", "--model", "llama", "--langs", "en", "-o", "{out}/x.png"], 2,
     "overlap needs at least 2 languages"),
    ("by", ["chart", "sizes", "--model", "llama", "--by", "layer", "-o", "{out}/x.png"], 2, "--by layer"),
    ("two k", ["chart", "overlap", "--model", "llama", "--k", "0.01,0.05", "-o", "{out}/x.png"], 2, "single --k"),
    ("model", ["chart", "sizes", "--model", "gpt9", "-o", "{out}/x.png"], 1, "no archived model matches 'gpt9'"),
    ("lang", ["chart", "sizes", "--model", "llama", "--langs", "en,fr", "-o", "{out}/x.png"], 1,
     "language fr is not archived"),
    ("k", ["chart", "overlap", "--model", "llama", "--k", "0.02", "-o", "{out}/x.png"], 1, "k = 0.02 is not archived"),
    ("unwritable", ["chart", "sizes", "--model", "llama", "-o", "{out}/file.txt/x.png"], 1, "cannot write"),
    ("directory", ["chart", "sizes", "--model", "llama", "-o", "{out}/dir.png"], 1, "cannot write"),
    ("report into file", ["report", "--model", "llama", "-o", "{out}/file.txt"], 1, "it is a file"),
    ("report model", ["report", "--model", "gpt9", "-o", "{out}/rep"], 1, "no archived model"),
])
def test_bad_input(llama_archive, tmp_path, name, args, code, message):
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "dir.png").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = run(llama_archive, *[a.replace("{out}", str(tmp_path)) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.stderr and result.stderr.startswith("Error: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no temp file


def test_failed_write_leaves_no_file(llama_archive, tmp_path, monkeypatch):
    chart = charts.build(mlarch.open(llama_archive), "sizes", model="llama")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(charts.os, "replace", refuse)
    with pytest.raises(mlarch.errors.MlarchError, match="No space left"):
        charts.save(chart, tmp_path / "sizes.svg")
    assert list(tmp_path.iterdir()) == []


def test_help_has_examples():
    for command in ["chart", "report"]:
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and "Examples:" in result.output and f"mlarch {command}" in result.output


# --- report ---------------------------------------------------------------------------------
def test_report(llama_archive, tmp_path):
    out = tmp_path / "supplement"
    result = run(llama_archive, "report", "--model", "llama", "-o", str(out))
    assert result.exit_code == 0, result.output
    stems = ["sizes", "heatmap", "overlap", "heatmap-layer", "layers", "unique", "upset"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.{f}" for s in stems for f in ("svg", "png")] + ["index.html"])
    for stem in stems:
        png_size((out / f"{stem}.png").read_bytes())
    page = (out / "index.html").read_text()
    for stem in stems:
        assert f'href="{stem}.svg"' in page and f'href="{stem}.png"' in page
    assert page.count("data:image/svg+xml;base64,") == len(stems)  # charts inline: one file is enough
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"https?://", page)
    archive = mlarch.open(llama_archive)
    sizes = archive.sql("SELECT lang, sum(n_selected)::BIGINT AS n FROM set_sizes WHERE k = 0.05 GROUP BY lang")
    assert "Math-specific parameters per language and k" in page and "<th>k = 0.05</th>" in page
    for r in sizes.iter_rows(named=True):
        assert f'<td class="num">{r["n"]:,}</td>' in page
    jaccard = archive.sql("SELECT jaccard FROM overlap_global WHERE k = 0.25 AND lang_a = 'bn' AND lang_b = 'en'")
    assert "Jaccard overlap per language pair and k" in page and "<td>en–bn</td>" in page
    assert f'<td class="num">{jaccard["jaccard"][0]:.3f}</td>' in page
    runs = archive.runs()
    provenance = archive.run(runs["run_id"][0])["provenance"]
    for run_id in runs["run_id"]:
        assert f"<td>{run_id}</td>" in page
    assert f"<td>{provenance['torch']}</td>" in page and f"<td>{provenance['mlarch']}</td>" in page
    assert "Runs used" in page and "<th>n_tokens</th>" in page and "<th>dataset</th>" in page


def test_report_two_languages_skips_upset(llama_archive, tmp_path):
    result = run(llama_archive, "report", "--model", "llama", "--langs", "en,bn", "--k", "0.25", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    names = {p.name for p in tmp_path.iterdir()}
    assert "upset.svg" not in names and "overlap.png" in names
    assert "k = 0.25 for the per-layer charts" in (tmp_path / "index.html").read_text()
