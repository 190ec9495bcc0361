"""Issue 17: analyses as first-class records. Two configurations of one model side by side,
earlier rows untouched, |W| stored once per weights digest, upgrades and bundles."""

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from mlarch.errors import UsageError
from mlarch.store import catalog, maintenance, records

from old_archives import downgrade_to_schema_3

KS = [0.05, 0.25]
READING = {"en": ["The bus to the harbour leaves every hour from the main square.",
                  "Children read stories about dragons and brave sailors at school.",
                  "Rain fell on the roofs of the village all through the night."],
           "de": ["Der Bus zum Hafen fährt jede Stunde vom Marktplatz ab.",
                  "Kinder lesen in der Schule Geschichten über Drachen und Seeleute.",
                  "Die ganze Nacht fiel Regen auf die Dächer des Dorfes."]}


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def _reading(folder: Path) -> str:
    """A second control set (another `{lang}` template): other texts than data["control"]."""
    for lang, lines in READING.items():
        (folder / "reading").mkdir(parents=True, exist_ok=True)
        (folder / "reading" / f"{lang}.txt").write_text("\n".join(lines * 3) + "\n", encoding="utf-8")
    return str(folder / "reading" / "{lang}.txt")


def _ingest(archive, model_dir, data, control, **options):
    return archive.ingest(str(model_dir["llama"]), ["en", "de"], data["math"], control, samples=4, top_k=KS,
                          device="cpu", **options)


def _model_groups(root):
    """Zarr groups under arrays.zarr/models: one per stored |W| array."""
    return [e.name for e in os.scandir(Path(root) / "arrays.zarr" / "models") if e.is_dir()]


def _derived(archive, analysis):
    return {table: archive.sql(f"SELECT * FROM {table} WHERE analysis = ? ORDER BY ALL", [analysis])
            for table in ("selections", "patterns")}


@pytest.fixture(scope="module")
def two(tmp_path_factory, model_dir, data):
    """tiny-llama (en, de) in analysis A (data's control) and then B (a reading control)."""
    folder = tmp_path_factory.mktemp("two")
    archive = mlarch.open(folder / "arch")
    first = _ingest(archive, model_dir, data, data["control"])
    before = _derived(archive, first.analysis)
    second = _ingest(archive, model_dir, data, _reading(folder))
    return {"root": folder / "arch", "a": first.analysis, "b": second.analysis, "before": before,
            "reading": str(folder / "reading" / "{lang}.txt"), "control": data["control"]}


def test_two_analyses_are_queryable_side_by_side_with_earlier_rows_unchanged(two):
    archive = mlarch.open(two["root"])
    a, b = two["a"], two["b"]
    assert (a, b) == ("math-vs-control", "math-vs-reading")  # readable, derived from the sources
    after = _derived(archive, a)
    for table, frame in two["before"].items():
        assert frame.height and after[table].equals(frame), table  # byte-identical after B's ingest
    # every view carries the analysis, and both are there
    for view in ("set_sizes", "overlap_by_module", "overlap_by_layer", "overlap_global", "language_unique"):
        found = archive.sql(f"SELECT DISTINCT analysis FROM {view} ORDER BY 1")["analysis"].to_list()
        assert found == [a, b], view
    sizes = archive.sql("SELECT analysis, sum(n_selected) AS n FROM set_sizes WHERE k = 0.25 AND lang = 'en' "
                        "GROUP BY ALL ORDER BY analysis")
    assert sizes["n"].to_list()[0] != sizes["n"].to_list()[1]  # another control, another set
    # the API, side by side
    ca = archive.compare("tiny-llama", "en,de", analysis=a, by="global")
    cb = archive.compare("tiny-llama", "en,de", analysis=b, by="global")
    assert ca["analysis"].to_list() == [a] and cb["analysis"].to_list() == [b]
    view = archive.sql("SELECT analysis, n_intersection FROM overlap_global WHERE k = ? AND seed = 1 ORDER BY 1",
                       [ca["k"][0]])
    assert view["n_intersection"].to_list() == [ca["n_intersection"][0], cb["n_intersection"][0]]
    listed = archive.analyses()
    assert listed["analysis"].to_list() == [a, b]
    assert listed["control"].to_list() == [two["control"], two["reading"]]
    assert set(listed["samples"].to_list()) == {4} and listed["langs"].to_list() == ["de,en", "de,en"]
    # one |W| array for the model, however many analyses
    assert archive.sql("SELECT count(*) AS n FROM arrays WHERE kind = 'magnitudes'")["n"][0] == 1
    assert len(_model_groups(archive.root)) == 1
    assert all(c.ok for c in maintenance.verify(archive.root))


def test_ambiguous_analysis_is_an_error_listing_them(two):
    archive = mlarch.open(two["root"])
    with pytest.raises(UsageError, match="has 2 analyses \\(math-vs-control, math-vs-reading\\)"):
        archive.compare("tiny-llama", "en,de")
    with pytest.raises(UsageError, match="math-vs-control, math-vs-reading"):
        archive.selection("tiny-llama", "en", 0.25, "model.layers.0.mlp.up_proj")
    with pytest.raises(UsageError, match="no analysis 'nope'"):
        archive.compare("tiny-llama", "en,de", analysis="nope")
    for args in (["compare", "--model", "tiny", "--langs", "en,de"],
                 ["chart", "overlap", "--model", "tiny", "-o", str(two["root"].parent / "x.svg")],
                 ["report", "--model", "tiny", "-o", str(two["root"].parent / "rep")]):
        result = run(two["root"], *args)
        assert result.exit_code == 2, (args, result.output)
        assert "math-vs-control, math-vs-reading" in result.output and "--analysis" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert run(two["root"], "compare", "--model", "tiny", "--langs", "en,de", "--analysis",
               two["b"]).exit_code == 0
    shown = run(two["root"], "analyses", "--format", "csv")
    assert shown.exit_code == 0 and "math-vs-reading" in shown.output and "0.05,0.25" in shown.output


def test_analysis_overlap_matches_the_masks(two):
    archive = mlarch.open(two["root"])
    a, b = two["a"], two["b"]
    frame = archive.analysis_overlap("tiny-llama", "en", [a, b], k=0.25, by="global")
    inter = union = n_a = 0
    for module in archive.sql("SELECT module FROM modules")["module"]:
        ma = archive.selection("tiny-llama", "en", 0.25, module, analysis=a)
        mb = archive.selection("tiny-llama", "en", 0.25, module, analysis=b)
        inter, union, n_a = inter + int((ma & mb).sum()), union + int((ma | mb).sum()), n_a + int(ma.sum())
    row = frame.row(0, named=True)
    assert (row["n_intersection"], row["n_union"], row["n_a"]) == (inter, union, n_a)
    assert 0 < row["jaccard"] < 1  # other controls, overlapping but different sets
    by_layer = archive.analysis_overlap("tiny-llama", "en", f"{a},{b}", k=0.25)
    assert by_layer["n_intersection"].sum() == inter
    # a set compared with itself is the same set, by definition
    same = run(two["root"], "compare", "--model", "tiny", "--langs", "en", "--analyses", f"{a},{b}",
               "--by", "global", "--k", "0.25", "--format", "csv")
    assert same.exit_code == 0 and str(inter) in same.output
    assert run(two["root"], "compare", "--model", "tiny", "--langs", "en", "--analyses", f"{a},{a}").exit_code == 2


def test_rerun_reuses_and_another_config_under_a_name_is_refused(two, model_dir, data):
    archive = mlarch.open(two["root"])
    runs = archive.sql("SELECT count(*) AS n FROM runs")["n"][0]
    again = _ingest(archive, model_dir, data, data["control"])  # default name, same settings
    assert again.analysis == two["a"] and not again.written and len(again.skipped) == 4
    result = run(two["root"], "ingest", "--model", str(model_dir["llama"]), "--langs", "en",
                 "--math", data["math"], "--control", data["control"], "--samples", "5", "--top-k", "0.05,0.25",
                 "--device", "cpu", "--analysis", two["a"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: analysis 'math-vs-control' of model 'tiny-llama' was ingested with "
                                    "another configuration (samples 4, not 5)")
    assert len(result.output.strip().splitlines()) == 1
    assert archive.sql("SELECT count(*) AS n FROM runs")["n"][0] == runs  # nothing written
    with pytest.raises(UsageError, match="another configuration"):  # the reading control under A's name
        _ingest(archive, model_dir, data, two["reading"], analysis=two["a"])
    assert archive.sql("SELECT count(*) AS n FROM runs")["n"][0] == runs


def test_schema_3_archive_upgrades_into_one_analysis(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["prune:de@0.05"],
                     device="cpu", limit=3)
    views = ("set_sizes", "overlap_global", "overlap_by_layer", "language_unique", "intervention_effects")
    before = {v: archive.sql(f"SELECT * EXCLUDE (analysis) FROM {v} ORDER BY ALL") for v in views}
    downgrade_to_schema_3(archive_copy)
    catalog._CHECKED.clear()
    con = duckdb.connect(str(archive_copy / "catalog.duckdb"))  # a damaged row from before the upgrade
    damaged = con.execute("SELECT run_id FROM runs WHERE lang = 'bn' AND role = 'math'").fetchone()[0]
    con.execute("UPDATE runs SET n_samples = n_samples + 1 WHERE run_id = ?", [damaged])
    con.close()
    archive = mlarch.open(archive_copy)
    assert archive.sql("SELECT max(version) AS v FROM schema_migrations")["v"][0] == catalog.latest_version()
    assert archive.sql("SELECT DISTINCT analysis FROM runs")["analysis"].to_list() == ["math-vs-control"]
    listed = archive.analyses()
    assert listed.height == 1 and listed["samples"][0] == 6 and listed["top_k"][0] == "0.01,0.05,0.25"
    for v in views:
        assert archive.sql(f"SELECT DISTINCT analysis FROM {v}")["analysis"].to_list() == ["math-vs-control"]
        assert archive.sql(f"SELECT * EXCLUDE (analysis) FROM {v} ORDER BY ALL").equals(before[v]), v
    assert archive.sql("SELECT intervention, analysis FROM evaluations ORDER BY 1").rows() == [
        ("none", None), ("prune", "math-vs-control")]  # the baseline serves every analysis
    failed = [c for c in maintenance.verify(archive.root) if not c.ok]
    # the upgrade re-sealed every run whose digest verified, and only those: the edited one
    # stays flagged (its row, now with an analysis, can no longer match the digest of then)
    assert [(c.check, c.object) for c in failed] == [("record digest", f"run {damaged}")]
    assert archive.sql("SELECT count(*) AS n FROM runs WHERE record_sha256 IS NULL")["n"][0] == 0
    # a rerun with the settings of the runs archived before reuses them
    again = archive.ingest(str(model_dir["llama"]), ["en", "de", "bn"], data["math"], data["control"], samples=6,
                           top_k=[0.01, 0.05, 0.25], device="cpu")
    assert again.analysis == "math-vs-control" and not again.written and len(again.skipped) == 6


def _export(root, target):
    result = run(root, "export-bundle", "--model", "tiny-llama", "-o", str(target))
    assert result.exit_code == 0, result.output
    return target


def test_bundle_round_trip_carries_analyses(two, tmp_path):
    bundle = _export(two["root"], tmp_path / "two.tar")
    target = tmp_path / "imported"
    assert run(target, "import-bundle", str(bundle)).exit_code == 0
    source, copy = mlarch.open(two["root"]), mlarch.open(target)
    for query in ("SELECT model, analysis, config, config_digest FROM analyses ORDER BY ALL",
                  "SELECT * FROM selections ORDER BY ALL", "SELECT * FROM overlap_global ORDER BY ALL",
                  "SELECT run_id, analysis, in_use FROM runs ORDER BY ALL"):
        assert copy.sql(query).equals(source.sql(query)), query
    assert all(c.ok for c in maintenance.verify(target))


def _legacy_manifest(tar_path: Path, out: Path) -> Path:
    """The bundle as mlarch before analyses exported it: format version 2, no analyses table,
    runs without an analysis and with the record digests of then."""
    def legacy(manifest):
        manifest["version"] = 2
        del manifest["tables"]["analyses"]
        runs, samples, arrays_ = (manifest["tables"][t] for t in ("runs", "run_samples", "arrays"))
        at = runs["columns"].index("analysis")
        runs["columns"].pop(at)
        for row in runs["rows"]:
            row.pop(at)
            run_row = dict(zip(runs["columns"], row))
            drawn = sorted((dict(zip(samples["columns"], s)) for s in samples["rows"] if s[0] == run_row["run_id"]),
                           key=lambda s: s["position"])
            mine = [dict(zip(arrays_["columns"], a)) for a in arrays_["rows"]
                    if a[arrays_["columns"].index("owner")] == run_row["run_id"]]
            run_row["started_at"], run_row["finished_at"] = (datetime_of(run_row["started_at"]),
                                                             datetime_of(run_row["finished_at"]))
            row[runs["columns"].index("record_sha256")] = records.run_digest(
                run_row, [s["item_index"] for s in drawn], mine)

    return _rewrite(tar_path, out, legacy)


def datetime_of(value):
    from datetime import datetime

    return datetime.fromisoformat(value["$ts"]) if isinstance(value, dict) else value


def test_a_bundle_made_before_analyses_still_imports(llama_archive, tmp_path):
    bundle = _legacy_manifest(_export(llama_archive, tmp_path / "new.tar"), tmp_path / "old.tar")
    target = tmp_path / "imported"
    result = run(target, "import-bundle", str(bundle))
    assert result.exit_code == 0, result.output
    copy, source = mlarch.open(target), mlarch.open(llama_archive)
    assert copy.sql("SELECT DISTINCT analysis FROM runs")["analysis"].to_list() == ["math-vs-control"]
    assert copy.sql("SELECT * FROM overlap_global ORDER BY ALL").equals(
        source.sql("SELECT * FROM overlap_global ORDER BY ALL"))
    assert all(c.ok for c in maintenance.verify(target))
    # and an edit of such a bundle is still refused (its digests of then are checked)
    def edit(manifest):
        runs = manifest["tables"]["runs"]
        runs["rows"][0][runs["columns"].index("n_samples")] += 1

    edited = _rewrite(bundle, tmp_path / "edited.tar", edit)
    result = run(tmp_path / "again", "import-bundle", str(edited))
    assert result.exit_code == 1 and "differ from its record digest" in result.output, result.output


def test_weights_stored_once_across_model_names(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    group = archive.sql("SELECT magnitudes_group FROM models")["magnitudes_group"][0]
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=3, top_k=[0.05],
                   name="llama-copy", device="cpu")
    models = archive.sql("SELECT model, magnitudes_group FROM models ORDER BY model")
    assert models["magnitudes_group"].to_list() == [group, group]
    assert archive.sql("SELECT count(*) AS n FROM arrays WHERE kind = 'magnitudes'")["n"][0] == 1
    assert len(_model_groups(archive.root)) == 1
    module = archive.sql("SELECT module FROM modules LIMIT 1")["module"][0]
    assert (archive.magnitudes("llama-copy", module) == archive.magnitudes("tiny-llama", module)).all()
    assert all(c.ok for c in maintenance.verify(archive.root))
    # verify: a group shared by models of other weights (or dtype) is loud
    archive.sql("UPDATE models SET dtype = 'float16' WHERE model = 'llama-copy'", write=True)
    bad = {c.object for c in maintenance.verify(archive.root) if not c.ok and c.check == "shared magnitudes"}
    assert bad == {"tiny-llama", "llama-copy"}
    archive.sql("UPDATE models SET dtype = 'float32' WHERE model = 'llama-copy'", write=True)
    assert all(c.ok for c in maintenance.verify(archive.root))
    # removing the model that archived |W| first keeps the array the other one uses
    assert run(archive_copy, "rm", "--model", "tiny-llama").exit_code == 0
    assert run(archive_copy, "gc").exit_code == 0
    fresh = mlarch.open(archive_copy)
    assert fresh.sql("SELECT count(*) AS n FROM arrays WHERE kind = 'magnitudes'")["n"][0] == 1
    assert fresh.magnitudes("llama-copy", module).shape == archive.magnitudes("llama-copy", module).shape
    assert all(c.ok for c in maintenance.verify(archive_copy))
    # the bundle of the remaining model carries the array it shares
    bundle = tmp = archive_copy.parent / "copy.tar"
    assert run(archive_copy, "export-bundle", "--model", "llama-copy", "-o", str(tmp)).exit_code == 0
    assert run(archive_copy.parent / "other", "import-bundle", str(bundle)).exit_code == 0
    assert all(c.ok for c in maintenance.verify(archive_copy.parent / "other"))
    # the last user removed: the array goes
    assert run(archive_copy, "rm", "--model", "llama-copy").exit_code == 0
    assert fresh.sql("SELECT count(*) AS n FROM arrays")["n"][0] == 0
    assert _model_groups(archive_copy) == []
    assert all(c.ok for c in maintenance.verify(archive_copy))


def test_evaluations_carry_the_analysis_of_their_sets(two, model_dir, data, tmp_path):
    root = tmp_path / "eval"
    shutil.copytree(two["root"], root)
    archive = mlarch.open(root)
    with pytest.raises(UsageError, match="math-vs-control, math-vs-reading"):
        archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["prune:de@0.25"],
                         device="cpu")
    assert archive.sql("SELECT count(*) AS n FROM evaluations")["n"][0] == 0
    result = archive.evaluate(str(model_dir["llama"]), ["en"], "nll", data["math"], interventions=["prune:de@0.25"],
                              device="cpu", analysis=two["b"])
    rows = archive.sql("SELECT intervention, analysis, math_run_id FROM evaluations ORDER BY intervention")
    assert rows["analysis"].to_list() == [None, two["b"]] and len(result.written) == 2
    b_run = archive.sql("SELECT run_id FROM runs WHERE analysis = ? AND lang = 'de' AND role = 'math'",
                        [two["b"]])["run_id"][0]
    assert rows["math_run_id"][1] == b_run
    effects = archive.sql("SELECT analysis FROM intervention_effects")
    assert effects["analysis"].to_list() == [two["b"]]
    assert all(c.ok for c in maintenance.verify(root))


def _rewrite(tar_path: Path, out: Path, edit) -> Path:
    """The bundle with its manifest changed by edit(manifest) (the arrays as they were)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    manifest = json.loads(members[0][1])
    edit(manifest)
    data = json.dumps(manifest).encode()
    with tarfile.open(out, "w") as tar:
        info = tarfile.TarInfo(members[0][0].name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for member, payload in members[1:]:
            tar.addfile(member, io.BytesIO(payload))
    return out


def _edit_config(manifest):
    table = manifest["tables"]["analyses"]
    at = table["columns"].index("config")
    config = json.loads(table["rows"][0][at])
    config["samples"] += 1
    table["rows"][0][at] = json.dumps(config)


def _drop_analysis_row(manifest):
    manifest["tables"]["analyses"]["rows"].pop()


def _drop_runs_analysis(manifest):
    runs = manifest["tables"]["runs"]
    at = runs["columns"].index("analysis")
    for row in runs["rows"]:
        row[at] = None


@pytest.mark.parametrize("edit, words", [
    (_edit_config, "configuration does not match its digest"),
    (_drop_analysis_row, "names an analysis the bundle does not carry"),
    (_drop_runs_analysis, "names no analysis"),
])
def test_a_bundle_with_edited_analyses_is_refused_whole(two, tmp_path, edit, words):
    bundle = _rewrite(_export(two["root"], tmp_path / "two.tar"), tmp_path / "edited.tar", edit)
    result = run(tmp_path / "target", "import-bundle", str(bundle))
    assert result.exit_code == 1 and words in result.output and "refusing all of it" in result.output, result.output
    assert not (tmp_path / "target").exists()  # a refused import into a new path creates nothing


def test_importing_an_analysis_name_with_another_configuration_is_refused(two, model_dir, data, tmp_path):
    bundle = _export(two["root"], tmp_path / "two.tar")
    target = mlarch.open(tmp_path / "target")
    target.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=5, top_k=KS, device="cpu")
    result = run(target.root, "import-bundle", str(bundle))
    assert result.exit_code == 1 and "has another configuration than the archive's" in result.output, result.output
    assert target.sql("SELECT count(*) AS n FROM runs")["n"][0] == 2
    assert all(c.ok for c in maintenance.verify(target.root))


def test_an_imported_model_of_archived_weights_shares_their_array(llama_archive, model_dir, data, tmp_path):
    bundle = _export(llama_archive, tmp_path / "llama.tar")
    target = mlarch.open(tmp_path / "target")
    target.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=3, top_k=[0.05],
                  name="llama-here", device="cpu")
    result = run(target.root, "import-bundle", str(bundle))
    assert result.exit_code == 0, result.output
    groups = target.sql("SELECT magnitudes_group FROM models ORDER BY model")["magnitudes_group"].to_list()
    assert len(groups) == 2 and groups[0] == groups[1]
    assert target.sql("SELECT count(*) AS n FROM arrays WHERE kind = 'magnitudes'")["n"][0] == 1
    assert len(_model_groups(target.root)) == 1
    module = target.sql("SELECT module FROM modules LIMIT 1")["module"][0]
    assert (target.magnitudes("tiny-llama", module) == mlarch.open(llama_archive).magnitudes("tiny-llama", module)).all()
    assert target.sql("SELECT * FROM overlap_global ORDER BY ALL").equals(
        mlarch.open(llama_archive).sql("SELECT * FROM overlap_global ORDER BY ALL"))
    assert all(c.ok for c in maintenance.verify(target.root))


def test_one_analysis_may_take_each_language_from_its_own_source(model_dir, data, tmp_path):
    """The paper's set-up: English math from one source, the other languages from another, in
    one analysis; a language keeps its sources, and a setting cannot change."""
    archive = mlarch.open(tmp_path / "arch")
    other = tmp_path / "other-math"
    other.mkdir()
    for lang in ("en", "de"):
        shutil.copy(Path(data["math"].replace("{lang}", lang)), other / f"{lang}.jsonl")
    options = dict(samples=3, top_k=KS, device="cpu", analysis="paper")
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], **options)
    archive.ingest(str(model_dir["llama"]), ["de"], str(other / "{lang}.jsonl"), data["control"], **options)
    listed = archive.analyses()
    assert listed["analysis"].to_list() == ["paper"] and listed["langs"][0] == "de,en"
    assert set(listed["math"][0].split("; ")) == {f"{other / '{lang}.jsonl'} (de)", f"{data['math']} (en)"}
    assert archive.compare("tiny-llama", "en,de").height  # one analysis: no --analysis needed
    with pytest.raises(UsageError, match=r"math data for en .*, not .*other-math"):
        archive.ingest(str(model_dir["llama"]), ["en"], str(other / "{lang}.jsonl"), data["control"], **options)
    with pytest.raises(UsageError, match="top_k 0.05,0.25, not 0.05"):
        archive.ingest(str(model_dir["llama"]), ["bn"], data["math"], data["control"],
                       **{**options, "top_k": [0.05]})
    assert all(c.ok for c in maintenance.verify(archive.root))


def _edit_analysis(root, change, reseal: bool):
    """Rewrite one analysis row's configuration; with reseal, its config_digest too (an edit
    that keeps the row self-consistent)."""
    from mlarch.store import analyses

    con = duckdb.connect(str(Path(root) / "catalog.duckdb"))
    model, name, text = con.execute("SELECT model, analysis, config FROM analyses ORDER BY analysis LIMIT 1").fetchone()
    config = json.loads(text)
    change(config)
    digest = analyses.config_digest(config) if reseal else con.execute(
        "SELECT config_digest FROM analyses WHERE model = ? AND analysis = ?", [model, name]).fetchone()[0]
    con.execute("UPDATE analyses SET config = ?, config_digest = ? WHERE model = ? AND analysis = ?",
                [json.dumps(config), digest, model, name])
    con.close()
    catalog._CHECKED.clear()
    return f"{model} {name}"


@pytest.mark.parametrize("change, reseal, words", [
    (lambda c: c.update(samples=c["samples"] + 1), False, "does not give its recorded config_digest"),
    (lambda c: c.update(samples=c["samples"] + 1), True, "other samples"),
    (lambda c: c.update(top_k=[0.5]), True, "other top_k"),
    (lambda c: c["control"].update(en="other/{lang}.txt"), True, "the analysis says 'other/{lang}.txt'"),
    (lambda c: c.update(method="mathneuro-bf16"), True, "other method"),
])
def test_verify_flags_an_edited_analysis_row(two, tmp_path, change, reseal, words):
    """An analysis row is what `compare`/`analyses` describe a set by: an edit of it (even one
    that recomputes its digest) must be loud in verify, not a silently relabelled set."""
    root = tmp_path / "arch"
    shutil.copytree(two["root"], root)
    assert all(c.ok for c in maintenance.verify(root))
    where = _edit_analysis(root, change, reseal)
    failed = [c for c in maintenance.verify(root) if not c.ok]
    assert failed and all(c.check == "analysis record" and c.object == where for c in failed), failed
    assert any(words in c.detail for c in failed), [c.detail for c in failed]


def test_a_legacy_bundle_whose_analysis_name_is_taken_lands_beside_it(llama_archive, model_dir, data, tmp_path):
    """A bundle from before analyses names none: its runs form the analysis their sources name
    (math-vs-control). When the archive already has that name with another configuration, they
    land in a suffixed one beside it, and neither analysis's rows change."""
    bundle = _legacy_manifest(_export(llama_archive, tmp_path / "new.tar"), tmp_path / "old.tar")
    target = mlarch.open(tmp_path / "target")
    target.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=5, top_k=KS, device="cpu")
    before = target.sql("SELECT * FROM selections ORDER BY ALL")
    assert before["analysis"].unique().to_list() == ["math-vs-control"]
    result = run(target.root, "import-bundle", str(bundle))
    assert result.exit_code == 0, result.output
    names = target.analyses()["analysis"].to_list()
    assert len(names) == 2 and "math-vs-control" in names, names
    placed = next(n for n in names if n != "math-vs-control")
    assert placed.startswith("math-vs-control-") and len(placed) == len("math-vs-control-") + 8, placed
    assert target.sql("SELECT * FROM selections WHERE analysis = 'math-vs-control' ORDER BY ALL").equals(before)
    source = mlarch.open(llama_archive)
    assert target.sql("SELECT * EXCLUDE (analysis) FROM overlap_global WHERE analysis = ? ORDER BY ALL",
                      [placed]).equals(source.sql("SELECT * EXCLUDE (analysis) FROM overlap_global ORDER BY ALL"))
    assert all(c.ok for c in maintenance.verify(target.root))
