"""The CLI through click's CliRunner: outputs, formats, reruns, and bad inputs."""

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli

from fixtures import RecordingReporter


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def ingest_args(model_dir, data, langs="en,de", *extra):
    return ["ingest", "--model", str(model_dir["llama"]), "--langs", langs, "--math", data["math"],
            "--control", data["control"], "--samples", "6", "--top-k", "0.01,0.05,0.25", "--quiet", *extra]


def test_help_has_examples():
    for command in ["ingest", "compare", "sql", "runs", "models", "show"]:
        result = CliRunner().invoke(cli, [command, "--help"])
        assert result.exit_code == 0
        assert "Examples:" in result.output and "mlarch " + command in result.output


def test_compare_table_csv_json_markdown(llama_archive):
    table = run(llama_archive, "compare", "--model", "llama", "--langs", "en,bn")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:15] == ["model", "analysis", "layer", "k", "seed", "lang_a", "lang_b", "n_a", "n_b", "n_intersection",
                                "n_union", "jaccard", "chance_jaccard", "unique_a", "unique_b"]
    assert [line.split()[2] for line in lines[2:]] == ["0", "1", "none", "all"]
    assert "k = 0.01 (default" in table.stderr
    rows = list(csv.DictReader(io.StringIO(run(llama_archive, "compare", "--model", "llama", "--langs", "en,bn",
                                               "--format", "csv").stdout)))
    view = mlarch.open(llama_archive).sql(
        "SELECT * FROM overlap_global WHERE k = 0.01 AND lang_a = 'bn' AND lang_b = 'en'").row(0, named=True)
    total = rows[-1]
    assert total["layer"] == "all"
    assert int(total["n_intersection"]) == view["n_intersection"] and int(total["n_union"]) == view["n_union"]
    assert float(total["jaccard"]) == pytest.approx(view["jaccard"])
    data = json.loads(run(llama_archive, "compare", "--model", "llama", "--langs", "en,de,bn", "--by", "global",
                          "--format", "json").stdout)
    assert [(r["lang_a"], r["lang_b"]) for r in data] == [("en", "de"), ("en", "bn"), ("de", "bn")]
    markdown = run(llama_archive, "compare", "--model", "llama", "--langs", "en,de", "--format", "markdown").stdout
    assert markdown.splitlines()[0].startswith("| model | analysis | layer | k |")
    assert markdown.splitlines()[1].startswith("|---|---|---|---:|")


def test_sql_runs_models_show(llama_archive):
    result = run(llama_archive, "sql", "SELECT lang, sum(n_selected) AS n FROM set_sizes WHERE k = 0.05 GROUP BY lang ORDER BY lang",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["lang"] for r in rows] == ["bn", "de", "en"] and all(isinstance(r["n"], int) and r["n"] > 0 for r in rows)
    runs = json.loads(run(llama_archive, "runs", "--format", "json").stdout)
    assert len(runs) == 6 and {r["status"] for r in runs} == {"FINISHED"}
    assert set(runs[0]) >= {"run_id", "model", "lang", "role", "dataset", "seed", "n_samples", "n_tokens", "status",
                            "started_at", "finished_at"}
    models = run(llama_archive, "models").stdout
    assert "tiny-llama" in models and "bn,de,en" in models
    shown = dict(csv.reader(io.StringIO(run(llama_archive, "show", runs[0]["run_id"], "--format", "csv").stdout)))
    for key in ["mlarch", "python", "torch", "transformers", "duckdb", "zarr", "device_name", "host", "started_at",
                "finished_at", "duration_s", "n_tokens", "config_digest", "model.weights_sha256", "texts_sha256",
                "data.templates", "seed", "sample_indices", "config.top_k", "n_truncated"]:
        assert key in shown, key
    assert len(shown["model.weights_sha256"]) == 64


def test_sql_contract_columns(llama_archive):
    archive = mlarch.open(llama_archive)
    contract = {
        "runs": "run_id, model, lang, role, dataset, seed, n_samples, n_tokens, status, started_at, finished_at",
        "run_samples": "run_id, position, item_index",
        "modules": "model, module, layer, n_rows, n_cols, n_params",
        "set_sizes": "model, k, seed, lang, module, layer, n_params, n_math_top, n_control_top, n_selected",
        "overlap_by_layer": "model, k, seed, lang_a, lang_b, layer, n_intersection, n_union, jaccard, chance_jaccard",
        "overlap_global": "model, k, seed, lang_a, lang_b, n_intersection, n_union, jaccard, chance_jaccard",
        "language_unique": "model, k, seed, lang, layer, n_unique",
    }
    for view, columns in contract.items():
        frame = archive.sql(f"SELECT {columns} FROM {view}")
        assert len(frame) > 0, view
    assert archive.sql("SELECT DISTINCT k FROM set_sizes ORDER BY k")["k"].to_list() == [0.01, 0.05, 0.25]


def test_rerun_is_skipped_force_reruns_and_languages_extend(model_dir, data, tmp_path):
    root = tmp_path / "arch"
    first = run(root, *ingest_args(model_dir, data, "en,de"))
    assert first.exit_code == 0, first.output
    again = run(root, *ingest_args(model_dir, data, "en,de"))
    assert again.exit_code == 0 and "Nothing to do" in again.stdout
    assert len(mlarch.open(root).runs()) == 4
    # the reuse message names the way to rerun in the reader's words: the CLI's flag, the API's argument
    shown = run(root, *[a for a in ingest_args(model_dir, data, "en,de") if a != "--quiet"])
    assert shown.exit_code == 0 and "reusing them (--force reruns)" in shown.stderr, shown.output

    heard = RecordingReporter()
    result = mlarch.open(root).ingest(str(model_dir["llama"]), ["en", "de"], data["math"], data["control"], samples=6,
                                      top_k=[0.01, 0.05, 0.25], reporter=heard)
    assert len(result.skipped) == 4 and not result.written
    assert any("reusing them (force=True reruns)" in line for line in heard.lines), heard.lines
    before = mlarch.open(root).sql("SELECT * FROM overlap_global ORDER BY ALL")
    forced = run(root, *ingest_args(model_dir, data, "de", "--force"))
    assert forced.exit_code == 0 and "Archived 2 run(s)" in forced.stdout
    archive = mlarch.open(root)
    assert len(archive.runs()) == 6
    assert archive.sql("SELECT count(*) FROM runs WHERE in_use").item() == 4
    assert archive.sql("SELECT * FROM overlap_global ORDER BY ALL").equals(before)  # same data, same sets
    added = run(root, *ingest_args(model_dir, data, "en,de,bn"))
    assert added.exit_code == 0 and "Archived 2 run(s)" in added.stdout  # only bn was new
    pairs = archive.sql("SELECT DISTINCT lang_a, lang_b FROM overlap_global ORDER BY ALL").rows()
    assert pairs == [("bn", "de"), ("bn", "en"), ("de", "en")]
    assert run(root, "compare", "--model", "llama", "--langs", "en,bn").exit_code == 0


def test_sql_write_needs_flag(archive_copy):
    refused = run(archive_copy, "sql", "DELETE FROM runs")
    assert refused.exit_code == 2 and "--write" in refused.stderr
    allowed = run(archive_copy, "sql", "--write", "UPDATE runs SET dataset = 'x'")
    assert allowed.exit_code == 0, allowed.output
    assert set(mlarch.open(archive_copy).sql("SELECT dataset FROM runs")["dataset"]) == {"x"}


def test_newer_schema_is_refused(archive_copy):
    con = duckdb.connect(str(archive_copy / "catalog.duckdb"))
    con.execute("INSERT INTO schema_migrations VALUES (999, 'future', now()::TIMESTAMP)")
    con.close()
    result = run(archive_copy, "runs")
    assert result.exit_code == 1
    assert "schema version 999, newer than this mlarch understands" in result.stderr


BAD_INPUTS = [
    ("missing model path", lambda m, d, t: ["ingest", "--model", str(t / "nope"), "--langs", "en", "--math", d["math"],
                                             "--control", d["control"]], 1, "does not exist"),
    ("hub id offline", lambda m, d, t: ["ingest", "--model", "mlarch-test/no-such-model", "--langs", "en", "--math",
                                         d["math"], "--control", d["control"]], 1, "could not fetch 'mlarch-test/no-such-model'"),
    ("missing language file", lambda m, d, t: ingest_args(m, d, "en,fr"), 1, "for language 'fr' does not exist"),
    ("malformed data file", lambda m, d, t: ingest_args(m, {**d, "math": str(t / "{lang}.jsonl")}, "en"), 1,
     "en.jsonl, line 2: invalid JSON"),
    ("empty data file", lambda m, d, t: ingest_args(m, {**d, "control": str(t / "{lang}-empty.txt")}, "en"), 1,
     "has no items"),
    ("k above 1", lambda m, d, t: ingest_args(m, d, "en") + ["--top-k", "1.5"], 2, "outside (0, 1)"),
    ("k zero", lambda m, d, t: ingest_args(m, d, "en") + ["--top-k", "0"], 2, "outside (0, 1)"),
    ("k not a number", lambda m, d, t: ingest_args(m, d, "en") + ["--top-k", "abc"], 2, "comma-separated float"),
    ("samples zero", lambda m, d, t: ingest_args(m, d, "en") + ["--samples", "0"], 2, "--samples must be positive"),
    ("template without lang", lambda m, d, t: ingest_args(m, {**d, "math": str(t / "en.jsonl")}, "en"), 2,
     "nor a path template containing {lang}"),
    ("duplicate languages", lambda m, d, t: ingest_args(m, d, "en,en"), 2, "languages repeat"),
    ("negative batch size", lambda m, d, t: ingest_args(m, d, "en") + ["--batch-size", "-1"], 2, "--batch-size must be positive"),
    ("unknown model pattern", lambda m, d, t: ["compare", "--model", "gpt-9", "--langs", "en,de"], 1,
     "no archived model matches 'gpt-9'; archived models: tiny-llama"),
    ("unknown language", lambda m, d, t: ["compare", "--model", "llama", "--langs", "en,sw"], 1,
     "language sw is not archived for model 'tiny-llama' at k = 0.01, seed 1; archived: bn, de, en"),
    ("one language", lambda m, d, t: ["compare", "--model", "llama", "--langs", "en"], 2, "at least two languages"),
    ("k outside (0, 1)", lambda m, d, t: ["compare", "--model", "llama", "--langs", "en,de", "--k", "1.5"], 2,
     "k must be a fraction in (0, 1), got 1.5: e.g. --k 0.01"),  # a k in (0, 1) not archived is re-thresholded
    ("sql write", lambda m, d, t: ["sql", "DROP TABLE runs"], 2, "DROP statements change the archive"),
    ("sql syntax", lambda m, d, t: ["sql", "SELEC 1"], 1, "SQL error: Parser Error"),
    ("sql unknown table", lambda m, d, t: ["sql", "SELECT * FROM nowhere"], 1, "SQL error: Catalog Error"),
    ("unknown run", lambda m, d, t: ["show", "feedbeef"], 1, "no run 'feedbeef'"),
    ("unknown device", lambda m, d, t: ingest_args(m, d, "en") + ["--device", "tpu"], 2, "unknown device 'tpu'"),
    ("unknown dtype", lambda m, d, t: ingest_args(m, d, "en") + ["--dtype", "float8"], 2, "'float8' is not one of"),
    ("samples not a number", lambda m, d, t: ingest_args(m, d, "en") + ["--samples", "many"], 2, "is not a valid integer"),
    ("max length zero", lambda m, d, t: ingest_args(m, d, "en") + ["--max-length", "0"], 2, "--max-length must be positive"),
    ("negative seed", lambda m, d, t: ingest_args(m, d, "en") + ["--seeds", "-1"], 2, "--seeds must be distinct"),
    ("duplicate seeds", lambda m, d, t: ingest_args(m, d, "en") + ["--seeds", "1,1"], 2, "--seeds must be distinct"),
    ("duplicate k", lambda m, d, t: ingest_args(m, d, "en") + ["--top-k", "0.01,0.01"], 2, "top-k values repeat"),
    ("empty languages", lambda m, d, t: ingest_args(m, d, ","), 2, "expected a comma-separated list"),
    ("bad language code", lambda m, d, t: ingest_args(m, d, "e n"), 2, "language code 'e n' is not valid"),
    ("model is a plain file", lambda m, d, t: ["ingest", "--model", str(t / "en-empty.txt"), "--langs", "en",
                                                "--math", d["math"], "--control", d["control"]], 2, "is a file but not a .gguf"),
    ("model folder without config", lambda m, d, t: ["ingest", "--model", str(t), "--langs", "en", "--math", d["math"],
                                                      "--control", d["control"]], 1, "has no config.json or weight files"),
    ("unknown named source language", lambda m, d, t: ingest_args(m, {**d, "math": "gsm8k"}, "bn"), 1,
     "data source 'gsm8k' has no language 'bn'; it has: en, de, hi"),
    ("compare bad grouping", lambda m, d, t: ["compare", "--model", "llama", "--langs", "en,de", "--by", "head"], 2,
     "'head' is not one of"),
    ("compare seed not archived", lambda m, d, t: ["compare", "--model", "llama", "--langs", "en,de", "--seed", "7"], 1,
     "seed 7 is not archived"),
    ("compare duplicate languages", lambda m, d, t: ["compare", "--model", "llama", "--langs", "en,en"], 2,
     "languages repeat"),
    ("compare k not a number", lambda m, d, t: ["compare", "--model", "llama", "--langs", "en,de", "--k", "1%"], 2,
     "is not a valid float"),
    ("sql empty", lambda m, d, t: ["sql", "  "], 2, "no SQL statement given"),
    ("sql attach", lambda m, d, t: ["sql", f"ATTACH '{t / 'x.db'}' AS x"], 2, "ATTACH statements change the archive"),
    ("sql copy to file", lambda m, d, t: ["sql", f"COPY runs TO '{t / 'x.csv'}'"], 2, "COPY statements change"),
    ("sql insert after select", lambda m, d, t: ["sql", "SELECT 1; DELETE FROM models"], 2, "DELETE statements"),
    ("show without run id", lambda m, d, t: ["show"], 2, "Missing argument 'RUN_ID'"),
    ("unknown format", lambda m, d, t: ["runs", "--format", "xml"], 2, "'xml' is not one of"),
    ("unknown command", lambda m, d, t: ["plot"], 2, "No such command 'plot'"),
    ("verify unknown run", lambda m, d, t: ["verify", "feedbeef"], 1, "no run feedbeef"),
    ("rm unknown run", lambda m, d, t: ["rm", "feedbeef"], 1, "no run feedbeef"),
    ("rm unknown model", lambda m, d, t: ["rm", "--model", "gpt-9"], 1, "no model 'gpt-9' in the archive"),
    ("rm run and model", lambda m, d, t: ["rm", "feedbeef", "--model", "tiny-llama"], 2, "one of them"),
    ("export unknown run", lambda m, d, t: ["export-bundle", "feedbeef", "-o", str(t / "b.tar")], 1, "no finished run feedbeef"),
    ("export bad suffix", lambda m, d, t: ["export-bundle", "--model", "tiny-llama", "-o", str(t / "b.zip")], 1,
     "must end in .tar"),
    ("import missing bundle", lambda m, d, t: ["import-bundle", str(t / "nope.tar")], 1, "does not exist"),
    ("import not a bundle", lambda m, d, t: ["import-bundle", str(t / "en.jsonl")], 1, "is not a readable mlarch bundle"),
    ("parquet into a file", lambda m, d, t: ["export", str(t / "en.jsonl")], 2, "is a file"),
]


@pytest.mark.parametrize("name,args,code,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(archive_copy, model_dir, data, tmp_path, name, args, code, message):
    (tmp_path / "en.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "en-empty.txt").write_text("\n")
    before = tree_digest(archive_copy)
    result = run(archive_copy, *args(model_dir, data, tmp_path))
    assert result.exit_code == code, result.output
    assert message in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert tree_digest(archive_copy) == before


def test_corrupted_catalog_and_missing_chunk(archive_copy):
    (archive_copy / "catalog.duckdb").write_bytes(b"this is not a database" * 100)
    for args in (["runs"], ["sql", "SELECT 1"], ["compare", "--model", "x", "--langs", "en,de"], ["verify"]):
        result = run(archive_copy, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output


def test_missing_zarr_chunk_is_named(archive_copy):
    archive = mlarch.open(archive_copy)
    run_id, path = archive.sql("SELECT owner, path FROM arrays WHERE kind = 'levels' ORDER BY path LIMIT 1").row(0)
    for chunk in (archive.arrays_path / path / "c").iterdir():
        chunk.unlink()
    result = run(archive_copy, "verify", run_id)
    assert result.exit_code == 1 and path in result.stderr
    assert "FAIL" in result.stdout


def test_unwritable_archive_folder(model_dir, data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run(blocker / "archive", *ingest_args(model_dir, data, "en"))
    assert result.exit_code == 1
    assert "cannot be created" in result.stderr and "--archive" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def test_query_commands_do_not_import_torch(llama_archive):
    run_id = mlarch.open(llama_archive).sql("SELECT run_id FROM runs LIMIT 1").item()
    code = f"""
import sys
from mlarch.cli import cli
for args in (["compare", "--model", "llama", "--langs", "en,de"], ["sql", "SELECT 1"], ["runs"], ["models"],
             ["show", "{run_id}"]):
    try:
        cli(["--archive", {str(llama_archive)!r}, *args])
    except SystemExit as exc:
        assert not exc.code, exc.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_provenance_matches_the_shipped_json_schema(llama_archive):
    import json as _json
    from importlib import resources

    import jsonschema

    schema = _json.loads((resources.files("mlarch.schemas") / "run_provenance.schema.json").read_text())
    archive = mlarch.open(llama_archive)
    for run_id in archive.sql("SELECT run_id FROM runs")["run_id"]:
        jsonschema.validate(archive.run(run_id)["provenance"], schema)
    broken = archive.run(run_id)["provenance"]
    del broken["texts_sha256"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_model_without_scorable_modules(archive_copy, model_dir, data, monkeypatch):
    from mlarch.ingest import scoring

    monkeypatch.setattr(scoring, "scored_modules", lambda model: [])  # as for a model with no Linear layers
    before = tree_digest(archive_copy)
    result = run(archive_copy, *ingest_args(model_dir, data, "en", "--force"))
    assert result.exit_code == 1
    assert result.stderr.strip().endswith("has no nn.Linear or Conv1D modules to score")
    assert tree_digest(archive_copy) == before


def test_store_and_query_never_import_ingest():
    import subprocess
    import sys

    code = ("import sys, importlib, pkgutil, mlarch.store, mlarch.query\n"
            "for pkg in (mlarch.store, mlarch.query):\n"
            "    for m in pkgutil.iter_modules(pkg.__path__):\n"
            "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
            "print(sorted(n for n in sys.modules if n.startswith('mlarch.ingest')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
