"""Errors speak the caller's language (issue 13): raised to Python they name arguments
(k=, by=, langs=), printed by the CLI they name its flags (--k, --by, --langs)."""

import pytest
from click.testing import CliRunner

import mlarch
from mlarch import charts
from mlarch.cli import cli
from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, error, for_cli


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_an_argument_reads_as_python_or_as_a_flag():
    exc = error(UsageError, Arg("langs"), " is empty: e.g. ", Arg("langs", ["en", "de"]), " or ",
                Arg("k", 0.05), ", ", Arg("max_length", None), ", ", Arg("x", flag="--x-axis"))
    assert isinstance(exc, UsageError) and exc.exit_code == 2
    assert str(exc) == "langs= is empty: e.g. langs=['en', 'de'] or k=0.05, max_length=None, x="
    assert exc.cli_message == "--langs is empty: e.g. --langs en,de or --k 0.05, --max-length None, --x-axis"
    assert for_cli(exc) == exc.cli_message and for_cli(MlarchError("plain")) == "plain"
    assert error(MlarchError, "pass ", Arg("seed")).exit_code == 1  # the class decides the exit status


def test_compare_names_arguments_in_python_and_flags_in_the_cli(llama_archive):
    archive = mlarch.open(llama_archive)
    with pytest.raises(UsageError) as caught:
        archive.compare("tiny", ["en"])
    assert str(caught.value) == "compare needs at least two languages, e.g. langs=['en', 'de']"
    assert "--" not in str(caught.value)
    with pytest.raises(UsageError) as caught:
        archive.compare("tiny", ["en", "de"], by="row")
    assert str(caught.value) == "by= must be one of layer, module, global, got 'row'"
    line = one_line(run(llama_archive, "compare", "--model", "tiny", "--langs", "en"), 2)
    assert line == "Error: compare needs at least two languages, e.g. --langs en,de"


def test_charts_name_arguments_in_python_and_flags_in_the_cli(llama_archive, tmp_path):
    archive = mlarch.open(llama_archive)
    cases = [  # (python call, CLI args, python wording, CLI wording)
        (lambda: charts.layers(archive, "tiny", k=[0.01, 0.05]),
         ["chart", "layers", "--model", "tiny", "--k", "0.01,0.05"], "pass a single k=", "pass a single --k"),
        (lambda: charts.upset(archive, "tiny", langs=["en", "de"]),
         ["chart", "upset", "--model", "tiny", "--langs", "en,de"],
         "pass e.g. langs=['en', 'de', 'bn']", "pass e.g. --langs en,de,bn"),
        (lambda: charts.interventions(archive, "tiny", intervention="prune=2"),
         ["chart", "interventions", "--model", "tiny", "--intervention", "prune=2"],
         "pass intervention='prune'", "pass --intervention prune"),
        (lambda: charts.interventions(archive, "tiny", intervention="scale=x"),
         ["chart", "interventions", "--model", "tiny", "--intervention", "scale=x"],
         "e.g. intervention='scale=0.5'", "e.g. --intervention scale=0.5"),
        (lambda: charts.interventions(archive, "tiny", dataset=" "),
         ["chart", "interventions", "--model", "tiny", "--dataset", " "],
         "dataset= is empty: name the evaluated data set, e.g. dataset='mgsm'",
         "--dataset is empty: name the evaluated data set, e.g. --dataset mgsm"),
        (lambda: charts.layers(archive, " "), ["chart", "layers", "--model", " "],
         "model= is required: a substring of archived model names, e.g. model='gemma'",
         "--model is required: a substring of archived model names, e.g. --model gemma"),
    ]
    for call, args, python, flags in cases:
        with pytest.raises(UsageError) as caught:
            call()
        assert python in str(caught.value) and " --" not in str(caught.value), str(caught.value)
        line = one_line(run(llama_archive, *args, "-o", str(tmp_path / "c.svg")), 2)
        assert flags in line and python not in line, line
    assert not (tmp_path / "c.svg").exists()


def test_archive_methods_name_arguments_in_python_and_flags_in_the_cli(archive_copy):
    archive = mlarch.open(archive_copy)
    module = "model.layers.0.mlp.up_proj"
    cases = [  # (python call, python wording, CLI args or None, CLI wording)
        (lambda: archive.sql("DROP TABLE runs"),
         "DROP statements change the archive or reach beyond it: refused without write=True (pass write=True if "
         "you mean it)", ["sql", "DROP TABLE runs"], "refused without --write (pass --write if you mean it)"),
        (lambda: archive.sql("SELECT * FROM read_csv('/etc/hostname')"),
         "without write=True sql() reads the catalog and nothing else; pass write=True",
         ["sql", "SELECT * FROM read_csv('/etc/hostname')"],
         "without --write `mlarch sql` reads the catalog and nothing else; pass --write"),
    ]
    # the derived rows of en gone (runs of both roles still there): selection names top_k=
    en_math, = archive.sql("SELECT run_id FROM runs WHERE lang = 'en' AND role = 'math'")["run_id"]
    archive.sql("DELETE FROM selections WHERE lang = 'en'", write=True)
    cases.append((lambda: archive.selection("tiny-llama", "en", 0.05, module),
                  "share no k value, so no math-only set was derived from them: ingest both roles with the same "
                  "top_k=", None, None))
    # a run recorded as mathneuro-bf16 has no |W| x norms scores: scores() names method=
    archive.sql("UPDATE runs SET provenance = json_merge_patch(provenance, '{\"method\": {\"name\": "
                "\"mathneuro-bf16\"}}') WHERE run_id = $r", {"r": en_math}, write=True)
    import duckdb

    from mlarch.store import records

    with duckdb.connect(str(archive_copy / "catalog.duckdb")) as con:  # sealed, as an ingested bf16 run is
        con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?", [records.run_digest_in(con, en_math), en_math])
    cases.append((lambda: archive.scores(en_math, module),
                  f"run {en_math} used method='mathneuro-bf16', whose bf16 scores are not |W| x norms", None, None))
    for call, python, args, flags in cases:
        with pytest.raises(MlarchError) as caught:
            call()
        assert python in str(caught.value) and "--" not in str(caught.value), str(caught.value)
        if args:
            line = one_line(run(archive_copy, *args), caught.value.exit_code)
            assert flags in line and "write=" not in line, line
