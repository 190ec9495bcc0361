"""The Python API fits Python: `mlarch.Archive` (a cheap import), `Archive.sql` frames from
DuckDB's Arrow stream (every column type, 1 M rows), charts with real signatures and errors
that name arguments, progress in interactive sessions, `rm` dry runs, and read commands that
never create an archive."""

import hashlib
import inspect
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

import mlarch
from mlarch import charts
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- mlarch.Archive ----------------------------------------------------------------------

def test_archive_is_exported_and_import_stays_light():
    code = ("import sys, mlarch; assert 'duckdb' not in sys.modules and 'polars' not in sys.modules; "
            "assert 'Archive' in mlarch.__all__ and 'Archive' in dir(mlarch); "
            "from mlarch import Archive; from mlarch.archive import Archive as A; assert Archive is A; "
            "assert isinstance(mlarch.open('x'), mlarch.Archive)\n"
            "try:\n    mlarch.Nope\nexcept AttributeError as e:\n    assert 'Nope' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# --- Archive.sql through Arrow -------------------------------------------------------------

def test_sql_returns_every_column_type(llama_archive):
    archive = mlarch.open(llama_archive)
    frame = archive.sql("""
        SELECT uuid() AS u, MAP {'a': 1, 'b': 2} AS m, {'x': 1, 'y': [1, 2]} AS s, [[1, 2], [3]] AS l,
               170141183460469231731687303715884105727::HUGEINT AS big, 5::HUGEINT AS small, sum(n_tokens) AS total,
               1.25::DECIMAL(10, 2) AS d, INTERVAL 3 DAY AS iv, '101'::BIT AS bits, DATE '2024-05-01' AS day,
               340282366920938463463374607431768211455::UHUGEINT AS uhuge, count(*) AS n
        FROM runs""")
    row = frame.row(0, named=True)
    assert len(row["u"]) == 36 and row["u"].count("-") == 4
    # polars 2 has a Map type; polars 1 (our floor) shows an Arrow map as its key/value structs
    as_map = {"a": 1, "b": 2} if hasattr(pl, "Map") else [{"key": "a", "value": 1}, {"key": "b", "value": 2}]
    assert row["m"] == as_map and row["s"] == {"x": 1, "y": [1, 2]} and row["l"] == [[1, 2], [3]]
    wide = getattr(pl, "Int128", pl.Decimal(38, 0))  # polars without Int128 keeps the exact Decimal
    assert row["big"] == 2 ** 127 - 1 and frame.schema["big"] == wide  # beyond int64: kept exact
    assert frame.schema["small"] == pl.Int64 and row["small"] == 5  # HUGEINT that fits: a plain int
    total = archive.sql("SELECT n_tokens FROM runs")["n_tokens"].sum()
    assert frame.schema["total"] == pl.Int64 and row["total"] == total  # sum(BIGINT) is HUGEINT in DuckDB
    assert frame.schema["d"] == pl.Float64 and row["d"] == 1.25
    assert row["iv"] == "3 days" and row["bits"] == "101"  # DuckDB's text where Arrow has no faithful form
    assert row["uhuge"] == str(2 ** 128 - 1) and row["day"] == date(2024, 5, 1) and row["n"] == 6
    empty = archive.sql("SELECT run_id, n_tokens FROM runs WHERE false")
    assert empty.is_empty() and empty.columns == ["run_id", "n_tokens"]


def test_sql_million_rows_through_arrow(llama_archive):
    frame = mlarch.open(llama_archive).sql(
        "SELECT range AS i, range * 0.5 AS half, 'r' || range AS label, range % 7 = 0 AS sevens "
        "FROM range($n) ORDER BY i", {"n": 1_000_000})
    assert frame.height == 1_000_000 and frame.schema["i"] == pl.Int64
    assert frame["i"].sum() == 999_999 * 1_000_000 // 2
    assert frame["half"][999_999] == 499_999.5 and frame["label"][123_456] == "r123456"
    assert frame["sevens"].sum() == len(range(0, 1_000_000, 7))


def test_sql_parameters_are_checked_before_running(archive_copy):
    archive = mlarch.open(archive_copy)
    before = tree(archive_copy)
    with pytest.raises(UsageError, match=r"no value for the SQL parameter\(s\) \$lang"):
        archive.sql("DELETE FROM runs; SELECT $lang", write=True)
    with pytest.raises(UsageError, match="does not use the parameter"):
        archive.sql("DELETE FROM runs WHERE lang = 'en'", {"lang": "en"}, write=True)
    assert tree(archive_copy) == before  # nothing ran
    assert archive.sql("SELECT ? + 1 AS x", [1])["x"].item() == 2  # positional parameters still work
    with pytest.raises(MlarchError, match="more than one column named 'a'"):
        archive.sql("SELECT 1 AS a, 2 AS a")


def test_write_results_still_frames(archive_copy):
    archive = mlarch.open(archive_copy)
    frame = archive.sql("UPDATE runs SET dataset = $d WHERE lang = 'en' RETURNING run_id, dataset",
                        {"d": "x"}, write=True)
    assert frame.height == 2 and set(frame["dataset"]) == {"x"}
    assert archive.sql("SELECT count(*) AS n FROM runs WHERE dataset = 'x'")["n"].item() == 2  # ran once


# --- charts ---------------------------------------------------------------------------------

def test_chart_functions_have_real_signatures():
    for kind in charts.KINDS:
        function = getattr(charts, kind)
        params = inspect.signature(function).parameters
        assert list(params)[:5] == ["archive", "model", "langs", "k", "seed"], kind
        assert function.__doc__ and kind in charts.__all__
    assert "by" in inspect.signature(charts.heatmap).parameters
    assert {"task", "intervention", "dataset"} <= set(inspect.signature(charts.interventions).parameters)


def test_chart_options_are_checked_by_name(llama_archive):
    archive = mlarch.open(llama_archive)
    with pytest.raises(TypeError, match=r"takes no option 'lang' \(did you mean 'langs'\?\): it takes model, langs"):
        archive.chart("layers", model="llama", lang=["en"])
    with pytest.raises(UsageError, match="'task' applies to the interventions chart only"):
        archive.chart("overlap", model="llama", task="nll")
    with pytest.raises(UsageError, match="'by' applies to the heatmap and analyses charts only"):
        archive.chart("sizes", model="llama", by="layer")
    with pytest.raises(TypeError, match="needs model="):
        archive.chart("sizes", langs="en")
    with pytest.raises(UsageError, match="unknown chart kind 'pie'"):
        archive.chart("pie", model="llama")
    direct = charts.layers(archive, "llama", langs=["en", "bn"]).to_dict()
    via_api = archive.chart("layers", model="llama", langs="en,bn").to_dict()
    assert json.dumps(direct, sort_keys=True) == json.dumps(via_api, sort_keys=True)


def test_chart_options_follow_the_resolver(llama_archive, monkeypatch):
    """Options the data resolvers take (another module's) pass through without a list here."""
    from mlarch.charts import data

    def resolve(archive, model, langs=None, k=None, seed=None, *, multi_k=False, min_langs=1, kind="chart",
                flavour=None):
        raise MlarchError(f"resolved with flavour={flavour}")

    monkeypatch.setattr(data, "resolve", resolve)
    assert "flavour" in charts.options_of("layers") and "flavour" not in charts.options_of("interventions")
    with pytest.raises(MlarchError, match="resolved with flavour=sweet"):
        charts.chart(llama_archive, "layers", model="m", flavour="sweet")  # reached the resolver
    with pytest.raises(UsageError, match="did you mean 'flavour'"):
        charts.chart(llama_archive, "layers", model="m", flavor="sweet")


def test_html_chart_works_offline(llama_archive, tmp_path):
    page = charts.save(charts.overlap(llama_archive, "llama"), tmp_path / "o.html").read_text()
    assert "vega-embed" in page and "vegaEmbed(" in page
    assert not [src for src in page.split("<script")[1:] if "src=" in src.split(">")[0]]  # every script inline


# --- progress ---------------------------------------------------------------------------------

def test_progress_follows_the_session(monkeypatch):
    from mlarch import progress
    from mlarch.cli.progress import RichReporter

    assert RichReporter is progress.RichReporter  # the CLI shows the library's bar
    mine = object()
    assert progress.reporter_for(None, mine) is mine
    assert isinstance(progress.reporter_for(True), RichReporter) and progress.reporter_for(False) is None
    monkeypatch.setattr(progress, "interactive", lambda: False)
    assert progress.reporter_for(None) is None  # scripts, CI: quiet
    monkeypatch.setattr(progress, "interactive", lambda: True)
    assert isinstance(progress.reporter_for(None), RichReporter)  # a terminal or a notebook


def test_notebook_counts_as_interactive(monkeypatch):
    from rich import console

    from mlarch import progress

    monkeypatch.setattr(console, "_is_jupyter", lambda: False)
    assert progress.interactive() is False  # pytest captures stderr: no terminal
    monkeypatch.setattr(console, "_is_jupyter", lambda: True)
    assert progress.interactive() is True


def test_ingest_shows_progress_when_asked(tmp_path, model_dir, data, capfd):
    archive = mlarch.open(tmp_path / "a")
    args = (str(model_dir["llama"]), ["en"], data["math"], data["control"])
    archive.ingest(*args, samples=2, top_k=[0.25], device="cpu")
    assert "samples" not in capfd.readouterr().err  # not interactive: quiet by default
    archive.ingest(*args, samples=2, top_k=[0.25], seeds=[2], device="cpu", progress=True)
    err = capfd.readouterr().err
    assert "en math seed 2" in err and "2/2" in err and "tok/s" in err


# --- rm --dry-run -------------------------------------------------------------------------------

def test_rm_dry_run_lists_exactly_what_rm_removes(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["prune:de@0.25"],
                     limit=2, device="cpu")
    archive.ingest(str(model_dir["qwen2"]), ["en", "de"], data["math"], data["control"], samples=2,
                   top_k=[0.25], device="cpu")
    model = "tiny-llama"
    before = tree(archive_copy)
    plan = archive.rm(model=model, dry_run=True)
    result = run(archive_copy, "rm", "--model", model, "--dry-run")
    assert result.exit_code == 0, result.output
    assert tree(archive_copy) == before  # byte for byte: nothing removed, nothing rewritten
    assert result.stdout.splitlines() == [f"would remove {x}" for x in plan[:-1]] + [
        f"Dry run, nothing removed: {plan[-1]}"]

    rows = {table: set(archive.sql(f"SELECT {key} AS key FROM {table}")["key"]) for table, key in
            [("runs", "run_id"), ("evaluations", "eval_id"), ("analyses", "model || '/' || analysis")]}
    planned = {
        "runs": {x.split()[1] for x in plan if x.startswith("run ")},
        "evaluations": {x.split()[1] for x in plan if x.startswith("evaluation ")},
        "analyses": {f"{x.split()[3]}/{x.split()[1]}" for x in plan if x.startswith("analysis ")},
    }
    folders = {x.split()[1]: int(x.split("(")[1].split()[0].replace(",", "")) for x in plan if x.startswith("arrays ")}
    assert planned["runs"] and planned["evaluations"] and planned["analyses"]
    assert all((archive_copy / f).is_dir() for f in folders)
    assert sum(folders.values()) == int(plan[-1].split(", ")[-1].split()[0].replace(",", ""))
    assert folders == {f: sum(p.stat().st_size for p in (archive_copy / f).rglob("*") if p.is_file()) for f in folders}

    archive.rm(model=model)
    after = {table: set(archive.sql(f"SELECT {key} AS key FROM {table}")["key"]) for table, key in
             [("runs", "run_id"), ("evaluations", "eval_id"), ("analyses", "model || '/' || analysis")]}
    for table in rows:
        assert rows[table] - after[table] == planned[table], table  # exactly what was listed went
    gone = set(before) - set(tree(archive_copy))
    assert gone == {f for f in before if any(f.startswith(folder + "/") for folder in folders)}  # files too
    assert not any((archive_copy / f).exists() for f in folders)


def test_rm_dry_run_of_runs(archive_copy):
    archive = mlarch.open(archive_copy)
    run_id = archive.runs()["run_id"][0]
    before = tree(archive_copy)
    plan = archive.rm(run_id, dry_run=True)
    assert plan[0].startswith(f"run {run_id} (tiny-llama ") and plan[1].startswith(f"arrays arrays.zarr/runs/{run_id} (")
    assert plan[-1].startswith("1 run(s), 1 array folder(s), ") and tree(archive_copy) == before
    with pytest.raises(UsageError, match="one of them"):
        archive.rm(dry_run=True)
    with pytest.raises(MlarchError, match="no run feedbeef"):
        archive.rm(["feedbeef"], dry_run=True)


# --- read commands on a missing archive ------------------------------------------------------

NO_ARCHIVE = ("Error: no mlarch archive at typo: check --archive (or MLARCH_ARCHIVE); "
              "`mlarch ingest` or `mlarch import-bundle` creates one")
READERS = [["runs"], ["models"], ["show", "feedbeef"], ["compare", "--model", "x", "--langs", "en,de"],
           ["sql", "SELECT 1"], ["sql", "-", "-p", "x=1"], ["chart", "sizes", "--model", "x", "-o", "c.png"],
           ["report", "--model", "x", "-o", "rep"], ["evals"], ["verify"], ["export", "pq"],
           ["export-bundle", "feedbeef", "-o", "b.tar"], ["rm", "feedbeef", "--dry-run"], ["gc"]]


@pytest.mark.parametrize("args", READERS, ids=[" ".join(a[:3]) for a in READERS])
def test_read_commands_on_a_missing_archive_create_nothing(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLARCH_ARCHIVE", raising=False)
    stdin = "SELECT $x" if args[:2] == ["sql", "-"] else None
    result = CliRunner().invoke(cli, ["--archive", "typo", *args], input=stdin)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == NO_ARCHIVE
    assert list(tmp_path.iterdir()) == []


def test_api_reads_on_a_missing_archive_create_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    archive = mlarch.Archive("typo")
    calls = [archive.runs, archive.models, archive.evaluations, lambda: archive.sql("SELECT 1"),
             lambda: archive.chart("sizes", model="x"), lambda: archive.rm(model="x", dry_run=True)]
    for call in calls:
        with pytest.raises(MlarchError, match="^no mlarch archive at typo"):
            call()
    assert list(tmp_path.iterdir()) == []



def test_a_notebook_without_ipywidgets_gets_a_line_per_pass():
    import io

    from rich.console import Console

    from mlarch.progress import RichReporter

    reporter = RichReporter()
    reporter.console = Console(file=io.StringIO(), width=200)
    reporter.live = False  # what a notebook without ipywidgets gets (rich cannot redraw there)
    reporter.start_pass("en math seed 1", 4)
    reporter.advance(3, 300)
    reporter.advance(1, 100)
    reporter.end_pass()
    reporter.end_pass()  # a second end prints nothing more
    lines = reporter.console.file.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("en math seed 1: 4/4 samples · ") and "tok/s" in lines[0]
