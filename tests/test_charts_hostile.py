"""Charts and reports of archives whose names and numbers were chosen to break them: a model
name that closes the HTML chart's <script>, model names that slug alike, k values that 6
digits cannot tell apart, and the paths a supplement must not give away."""

import html
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from click.testing import CliRunner

import mlarch
from fixtures import one_error
from mlarch import charts
from mlarch.charts import data, report
from mlarch.charts.kinds import fmt_k
from mlarch.cli import cli
from mlarch.errors import UsageError

HOSTILE = "</script><script>alert(1)</script>"
CLOSE_KS = [0.0123456788, 0.0123456789]  # the same k to 6 significant digits (0.0123457)


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def ingest(root, model_dir, data_files, **options):
    mlarch.open(root).ingest(str(model_dir["llama"]), ["en", "de"], data_files["math"], data_files["control"],
                             samples=2, device="cpu", **options)


# --- finding 2: the .html chart format -------------------------------------------------------
@pytest.fixture(scope="module")
def xss_root(tmp_path_factory, model_dir, data):
    root = tmp_path_factory.mktemp("xss") / "arch"
    ingest(root, model_dir, data, name=HOSTILE, top_k=[0.01])
    return root


def embedded_spec(page: str) -> dict:
    """The spec of altair's inline page: `const spec = {...};` up to the embed options."""
    return json.loads(re.search(r"const spec = (.*?);\n\s*const embedOpt", page, re.S).group(1))


def test_html_chart_keeps_a_hostile_model_name_inside_its_json(xss_root, tmp_path):
    target = tmp_path / "overlap.html"
    result = run(xss_root, "chart", "overlap", "--model", "script", "--langs", "en,de", "-o", str(target))
    assert result.exit_code == 0, result.output
    page = target.read_text()
    assert HOSTILE not in page and "<script>alert" not in page
    # the script element holding the spec is whole: it ends after the vegaEmbed call
    assert "vegaEmbed(" in page[page.index("const spec ="):].split("</script>")[0]
    spec = embedded_spec(page)
    assert spec == charts.build(xss_root, "overlap", model="script", langs="en,de").to_dict()
    assert HOSTILE in spec["title"]["subtitle"][0]
    assert {r["model"] for values in spec["datasets"].values() for r in values} == {HOSTILE}


def test_script_safe_json_is_the_same_json():
    value = {"a</b>": ["x & y", "<!--", "line\u2028sep\u2029", "\\<"], "n": 1.5}
    text = json.dumps(value, cls=charts._ScriptSafeJSON)
    assert not re.search("[<>&\u2028\u2029]", text)
    assert json.loads(text) == value


# --- finding 6: report file stems ------------------------------------------------------------
@pytest.fixture(scope="module")
def slug_root(tmp_path_factory, model_dir, data):
    """Models Tiny.A and tiny-a (one slug), each in an exact and a paper-compatible analysis."""
    root = tmp_path_factory.mktemp("slug") / "arch"
    for name in ("Tiny.A", "tiny-a"):
        for method in ("mathneuro", "mathneuro-bf16"):
            ingest(root, model_dir, data, name=name, method=method, dtype="bfloat16", top_k=[0.01, 0.05])
    return root


def test_report_files_of_models_whose_names_slug_alike_stay_apart(slug_root, tmp_path):
    out = tmp_path / "rep"
    result = run(slug_root, "report", "--model", "tiny", "--analysis", "math-vs-control", "--langs", "en",
                 "-o", str(out))
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    stems = re.findall(r'<figure id="([^"]+)"', page)
    assert len(stems) == len(set(stems)) == 6  # sizes, layers, and 2 analyses charts per model
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{s}.{f}" for s in stems for f in ("svg", "png")]
                                                           + ["index.html"])
    for stem in stems:
        assert page.count(f'href="{stem}.svg"') == 1
    drawn = {name: [s for s in stems if s.startswith("analyses") and name in (out / f"{s}.svg").read_text()]
             for name in ("Tiny.A", "tiny-a")}
    assert len(drawn["Tiny.A"]) == len(drawn["tiny-a"]) == 2 and not set(drawn["Tiny.A"]) & set(drawn["tiny-a"])


def test_stems_are_unique_whatever_the_names():
    assert report._slug("tiny-a") == "tiny-a" and report._slug("Tiny.A").startswith("tiny-a-")
    assert report._slug("Tiny.A") != report._slug("tiny.a")
    # model 'x' by layer and model 'layer-x' by k both make analyses-layer-x
    plans = [SimpleNamespace(model=m, analyses=("e", "e-paper"), langs=["en"], seed=1) for m in ("x", "layer-x")]
    figures = report.analysis_figures(plans)
    assert [f[0] for f in figures].count("analyses-layer-x") == 2
    stems = [f[0] for f in report._unique_stems(figures)]
    assert stems == ["analyses-layer-x", "analyses-x", "analyses-layer-layer-x", "analyses-layer-x-2"]
    assert [f[0] for f in report._unique_stems([("a",), ("a-2",), ("A",)])] == ["a", "a-2", "A-3"]


# --- findings 9 and 10: k printed exactly, paths as given --------------------------------------
@pytest.fixture(scope="module")
def k_root(tmp_path_factory, model_dir, data):
    root = tmp_path_factory.mktemp("close-k") / "arch"
    ingest(root, model_dir, data, top_k=CLOSE_KS)
    return root


@pytest.fixture(scope="module")
def k_report(k_root, tmp_path_factory):
    """The report of k_root, asked for with the archive's relative path, the data files (whose
    templates the runs record) under the home folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(k_root.parent)
        patch.setenv("HOME", str(tmp_path_factory.getbasetemp()))
        result = run("arch", "report", "--model", "tiny", "-o", "rep")
        assert result.exit_code == 0, result.output
    return (k_root.parent / "rep" / "index.html").read_text()


def reproduce(page: str) -> list[str]:
    return shlex.split(html.unescape(re.search(r"Reproduce: <code>(.*?)</code>", page).group(1)))


def test_report_prints_k_exactly_and_its_command_runs(k_root, k_report, monkeypatch):
    words = reproduce(k_report)
    assert words[words.index("--k") + 1] == "0.0123456788"
    for k in CLOSE_KS:  # one column per k in the sizes and Jaccard tables
        assert k_report.count(f"<th>k = {k!r}</th>") == 2
    monkeypatch.chdir(k_root.parent)
    words[words.index("DIR")] = "again"
    result = CliRunner().invoke(cli, words[1:])
    assert result.exit_code == 0, result.output


def test_heatmap_columns_keep_close_k_apart(k_root):
    spec = charts.build(k_root, "heatmap", model="tiny", langs="en,de").to_dict()
    columns = {r["column"] for values in spec["datasets"].values() for r in values}
    assert columns == {repr(k) for k in CLOSE_KS}


def test_fmt_k_is_short_when_exact_and_exact_always():
    assert [fmt_k(k) for k in (0.01, 1e-05, 0.25, 0.0123456789)] == ["0.01", "1e-05", "0.25", "0.0123456789"]
    values = [0.1 + i * 1e-12 for i in range(50)] + [1 / 3, 2 ** -30, 0.05]
    assert all(float(fmt_k(v)) == v for v in values) and len({fmt_k(v) for v in values}) == len(values)
    assert data._fmt([0.5, 0.123456789]) == "0.5, 0.123456789"  # listed choices can be typed back


def test_report_names_the_archive_as_given_and_hides_home(k_root, k_report, tmp_path_factory):
    assert "Archive <code>arch</code>" in k_report and reproduce(k_report)[:3] == ["mlarch", "--archive", "arch"]
    assert str(tmp_path_factory.getbasetemp()) not in k_report  # nor the resolved archive, nor the data files
    assert "<td>~/data" in k_report  # the runs' dataset templates, home as ~
    assert data.shown_path("rel/x") == "rel/x" and data.shown_path(str(Path.home() / "x")) == "~/x"


def test_reproduce_command_quotes_what_catalogs_name():
    archive = SimpleNamespace(root=Path("my archive"))  # no snapshot marker there: a plain folder
    scope = SimpleNamespace(analyses=("gsm; rm -rf ~",), langs=["en", "de"], seed=3)
    command = report.reproduce_command(archive, HOSTILE, scope, SimpleNamespace(k=CLOSE_KS[1]))
    assert shlex.split(command) == ["mlarch", "--archive", "my archive", "report", "--model", HOSTILE,
                                    "--analysis", "gsm; rm -rf ~", "--langs", "en,de", "--k", "0.0123456789",
                                    "--seed", "3", "-o", "DIR"]


def test_report_names_a_fetched_published_archive_by_its_url(tmp_path):
    from mlarch.store import remote_catalog

    (tmp_path / remote_catalog.MARKER).write_text(json.dumps({"url": "s3://bucket/prefix"}))
    assert report._archive_shown(SimpleNamespace(root=tmp_path)) == "s3://bucket/prefix"  # not the cache folder


# --- evaluations: factors exact, data set paths with home as ~ (no eval run: the rows faked) ---
def test_evaluated_factor_and_data_path_as_the_report_shows_them(monkeypatch, tmp_path):
    from mlarch.charts import kinds

    monkeypatch.setenv("HOME", str(tmp_path))
    path, factor = str(tmp_path / "evals" / "{lang}.jsonl"), 0.123456789
    groups = pl.DataFrame({"task": ["nll"], "dataset": [path], "role": ["math"], "intervention": ["scale"],
                           "factor": [factor], "n_models": [1], "seeds": [[1]], "ks": [[0.01]], "langs": [["en"]]})
    effects = pl.DataFrame({"model": ["m"], "analysis": ["a"], "task": ["nll"], "dataset": [path], "role": ["math"],
                            "seed": [1], "intervention": ["scale"], "factor": [factor], "target_lang": ["en"],
                            "lang": ["en"], "k": [0.01], "baseline": [2.0], "value": [2.5],
                            "relative_change": [0.25], "n_params_changed": [10]})
    monkeypatch.setattr(data, "evaluated_models", lambda archive, models, analyses: list(models))
    monkeypatch.setattr(data, "evaluation_groups", lambda archive, models, analyses: groups)
    monkeypatch.setattr(data, "effects", lambda archive, models, analyses: effects)
    scope = SimpleNamespace(analyses=("a",), langs=["en"], k=0.01, seed=1)
    [(stem, kind, options, caption)] = report.intervention_figures(None, ["m"], "m", scope)
    assert options["intervention"] == "scale=0.123456789" and options["dataset"] == f"{path}:math"
    assert "on ~/evals/{lang}.jsonl (math)" in caption
    table = report.effects_table(None, ["m"], ["a"])
    assert "data ~/evals/{lang}.jsonl:math" in report._effects_caption(None, ["m"], ["a"], table)
    assert "factor 0.123456789" in report._effects_caption(None, ["m"], ["a"], table)
    eval_scope = SimpleNamespace(models=["m"], task="nll", dataset=path, role="math", intervention="scale",
                                 factor=factor, k=0.01, seed=1)
    two = pl.concat([effects, effects.with_columns(dataset=pl.lit("mgsm"))])  # dataset varies: a column
    monkeypatch.setattr(data, "effects", lambda archive, models, analyses: two)
    assert report.effects_table(None, ["m"], ["a"])["dataset"].to_list() == ["~/evals/{lang}.jsonl:math", "mgsm:math"]
    where = kinds._eval_where(eval_scope)
    assert "~/evals/{lang}.jsonl" in where and "scale 0.123456789" in where and str(tmp_path) not in where


def test_an_empty_report_folder_is_refused(llama_archive, tmp_path, monkeypatch):
    """-o '' was Path(''), the current folder: the report's 17 files landed among the caller's."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--archive", str(llama_archive), "report", "--model", "llama", "-o", ""])
    assert one_error(result, 2) == "Error: the report folder is empty: pass one, e.g. -o supplement/"
    with pytest.raises(UsageError, match=r"^the report folder is empty: pass one, e\.g\. folder='supplement/'$"):
        mlarch.open(llama_archive).report(" ", "llama")
    assert list(tmp_path.iterdir()) == []
