"""Issue 11, items 2, 3, 9 and 13: no damaged array, edited record or race yields a
plausible number. Each case damages a copy of a real archive and asserts a loud error."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner

import mlarch
from mlarch.store import catalog
from mlarch.cli import cli
from mlarch.errors import MlarchError
from mlarch.store.arrays import ArrayDamaged

from fixtures import one_error

HERE = Path(__file__).parent


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def _first(archive, sql):
    return archive.sql(sql).row(0, named=True)


def _en_math(archive):
    return _first(archive, "SELECT run_id, arrays_group, model FROM runs WHERE lang = 'en' AND role = 'math'")


def _module(archive):
    return _first(archive, "SELECT module FROM modules ORDER BY position LIMIT 1")["module"]


def _edit(root, sql, params=()):
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute(sql, list(params))
    con.close()


def _assert_loud(result, *words):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.stderr or word in result.stdout, (word, result.output)


def test_missing_levels_chunk_fails_every_read_verify_and_rm(archive_copy):
    archive = mlarch.open(archive_copy)
    run_ = _en_math(archive)
    module = _module(archive)
    assert archive.levels(run_["run_id"], module).any()  # readable before the damage
    chunk = archive.arrays_path / run_["arrays_group"] / "levels" / "c" / "0"
    assert chunk.is_file()
    chunk.unlink()
    fresh = mlarch.open(archive_copy)
    with pytest.raises(ArrayDamaged, match="chunk c/0 is missing"):
        fresh.levels(run_["run_id"], module)
    with pytest.raises(ArrayDamaged, match="missing"):
        fresh.selection("tiny-llama", "en", 0.01, module, seed=1)
    result = run(archive_copy, "verify")
    _assert_loud(result, "checks failed", f"{run_['arrays_group']}/levels")
    assert "chunk c/0 is missing" in result.stdout
    # rm of other runs re-derives from the damaged one: it must refuse, not archive zeros
    before = archive.sql("SELECT * FROM overlap_global ORDER BY ALL")
    de_runs = archive.sql("SELECT run_id FROM runs WHERE lang = 'de'")["run_id"].to_list()
    _assert_loud(run(archive_copy, "rm", *de_runs), "missing")
    assert archive.sql("SELECT * FROM overlap_global ORDER BY ALL").equals(before)
    assert archive.sql("SELECT count(*) FROM runs WHERE lang = 'de'").item() == 2


def test_missing_norms_and_magnitudes_chunks_fail(archive_copy):
    archive = mlarch.open(archive_copy)
    run_ = _en_math(archive)
    module = _module(archive)
    (archive.arrays_path / run_["arrays_group"] / "norms" / "c" / "0").unlink()
    group = _first(archive, "SELECT magnitudes_group FROM models")["magnitudes_group"]
    (archive.arrays_path / group / "magnitudes" / "c" / "0").unlink()
    fresh = mlarch.open(archive_copy)
    with pytest.raises(ArrayDamaged, match="missing"):
        fresh.norms(run_["run_id"])
    with pytest.raises(ArrayDamaged, match="missing"):
        fresh.magnitudes("tiny-llama", module)
    with pytest.raises(ArrayDamaged, match="missing"):
        fresh.selection("tiny-llama", "en", 0.02, module, seed=1)  # not archived: re-thresholds the factors


def test_edited_dtype_in_zarr_json_fails(archive_copy):
    archive = mlarch.open(archive_copy)
    run_ = _en_math(archive)
    meta = archive.arrays_path / run_["arrays_group"] / "norms" / "zarr.json"
    spec = json.loads(meta.read_text())
    assert spec["data_type"] == "float32"
    spec["data_type"] = "int32"  # same width: zarr would happily reinterpret the bytes
    meta.write_text(json.dumps(spec))
    with pytest.raises(ArrayDamaged, match="zarr.json differs"):
        mlarch.open(archive_copy).norms(run_["run_id"])
    _assert_loud(run(archive_copy, "verify"), "zarr.json differs")


def test_chunk_copied_from_another_run_fails(archive_copy):
    archive = mlarch.open(archive_copy)
    a = _en_math(archive)
    b = _first(archive, "SELECT arrays_group FROM runs WHERE lang = 'de' AND role = 'math'")
    source = archive.arrays_path / b["arrays_group"] / "levels" / "c" / "0"
    target = archive.arrays_path / a["arrays_group"] / "levels" / "c" / "0"
    assert source.read_bytes() != target.read_bytes()
    shutil.copyfile(source, target)  # a valid chunk (its crc32c passes), of the wrong run
    with pytest.raises(ArrayDamaged, match="differs from the one written"):
        mlarch.open(archive_copy).levels(a["run_id"], _module(archive))
    _assert_loud(run(archive_copy, "verify"), "differs from the one written")


@pytest.mark.parametrize("edit, detail", [
    ("UPDATE runs SET n_samples = n_samples + 1 WHERE run_id = $id", "n_samples"),
    ("UPDATE run_samples SET item_index = item_index + 1 WHERE run_id = $id AND position = 0", "drawn item"),
    ("UPDATE runs SET lang = CASE lang WHEN 'en' THEN 'bn' ELSE 'en' END "
     "WHERE lang IN ('en', 'bn') AND role = 'math'", "swapped labels"),
    ("UPDATE runs SET provenance = replace(provenance::VARCHAR, '\"seed\": 1', '\"seed\": 2')::JSON "
     "WHERE run_id = $id", "provenance"),
    ("UPDATE arrays SET sha256 = repeat('0', 64) WHERE owner = $id AND kind = 'norms'", "array digest"),
    # valid JSON to DuckDB, past Python's recursion limit: verify reported nothing (a RecursionError)
    ("UPDATE runs SET provenance = (repeat('[', 100000) || repeat(']', 100000))::JSON WHERE run_id = $id",
     "deep provenance"),
])
def test_edited_run_records_fail_verify(archive_copy, edit, detail):
    archive = mlarch.open(archive_copy)
    run_id = _en_math(archive)["run_id"]
    assert run(archive_copy, "verify").exit_code == 0
    _edit(archive_copy, edit.replace("$id", "?"), [run_id] * edit.count("$id"))
    result = run(archive_copy, "verify", "--format", "json")
    _assert_loud(result, f"run {run_id}")
    rows = [r for r in json.loads(result.stdout) if r["check"] == "record digest" and r["status"] == "FAIL"]
    assert any(r["object"] == f"run {run_id}" for r in rows), rows


@pytest.mark.parametrize("edit, owner", [
    # which level code is which k: reordered, the 0.05 set reads the 0.01 one
    ("UPDATE runs SET k_values = [0.05, 0.01, 0.25] WHERE lang = 'en' AND role = 'math'", "run"),
    # where a matrix lies in the arrays: shifted, another matrix's codes read as this one's
    ("UPDATE modules SET param_offset = param_offset + 7 WHERE position = 1", "model"),
    ("UPDATE modules SET n_rows = 10000 WHERE position = (SELECT max(position) FROM modules)", "model"),
])
def test_array_reads_refuse_rows_edited_since_they_were_sealed(archive_copy, edit, owner):
    """The paths that read arrays through catalog rows (selection, levels, compare at a k
    not archived) check the run's and model's record digests first: an edit read another set
    (Jaccard 0.2803 became 0.2893, exit 0) or failed with a bare ValueError."""
    archive = mlarch.open(archive_copy)
    run_id, module = _en_math(archive)["run_id"], _module(archive)
    before = archive.selection("tiny-llama", "en", 0.05, module)
    _edit(archive_copy, edit)
    archive = mlarch.open(archive_copy)
    name = f"run {run_id}" if owner == "run" else "model tiny-llama"
    words = f"the catalog rows of {name} changed since it was archived"
    with pytest.raises(MlarchError, match=words):
        archive.selection("tiny-llama", "en", 0.05, module)
    with pytest.raises(MlarchError, match=words):
        archive.levels(run_id, module)
    line = one_error(run(archive_copy, "compare", "--model", "tiny-llama", "--langs", "en,de", "--k", "0.1"), 1)
    assert words in line, line
    assert before.sum() > 0  # the set the edit would have changed was there to read


def test_unreadable_provenance_is_one_line_from_show(archive_copy):
    run_id = _en_math(mlarch.open(archive_copy))["run_id"]
    _edit(archive_copy, "UPDATE runs SET provenance = (repeat('[', 100000) || repeat(']', 100000))::JSON "
                        "WHERE run_id = ?", [run_id])
    assert one_error(run(archive_copy, "show", run_id), 1) == (
        f"Error: run {run_id}'s provenance is not JSON mlarch can read (an edited catalog?): run `mlarch verify` to "
        "list damage")


def test_edited_model_record_fails_verify(archive_copy):
    _edit(archive_copy, "UPDATE modules SET layer = layer + 1 WHERE position = 0")
    _assert_loud(run(archive_copy, "verify"), "model tiny-llama")


def test_topk_set_of_the_wrong_size_fails_verify(archive_copy, model_dir, data, monkeypatch, tmp_path):
    """A selection bug that keeps one entry too many in a top-k set: the digests agree (they
    were taken of the wrong codes) but verify counts the sets in the stored codes."""
    from mlarch import selection

    real = selection.model_levels

    def one_too_many(spans, magnitudes, norms, ks):
        levels = real(spans, magnitudes, norms, ks)
        levels[np.flatnonzero(levels == 0)[0]] = 1  # first module, top-k_values[0] one larger
        return levels

    monkeypatch.setattr(selection, "model_levels", one_too_many)
    root = tmp_path / "arch"
    mlarch.open(root).ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=3,
                             top_k=[0.05, 0.25], device="cpu")
    result = run(root, "verify", "--format", "json")
    _assert_loud(result)
    failed = {r["check"] for r in json.loads(result.stdout) if r["status"] == "FAIL"}
    assert failed == {"top-k sizes", "set_sizes recount"}, failed


SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlarch
    from mlarch.ingest import pipeline

    root, model, math, control, lang, barrier = sys.argv[1:7]
    real = pipeline._commit

    def commit_after_both(*args, **kwargs):
        # both processes have scored and found no archived model before either commits
        Path(barrier, lang).touch()
        deadline = time.monotonic() + 120
        while len(list(Path(barrier).iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(*args, **kwargs)

    pipeline._commit = commit_after_both
    mlarch.open(root).ingest(model, [lang], math, control, samples=3, top_k=[0.05], device="cpu")
    print("done", lang)
""")


@pytest.mark.slow
def test_two_ingests_of_a_new_model_at_once_both_complete(model_dir, data, tmp_path):
    root, barrier = tmp_path / "arch", tmp_path / "barrier"
    barrier.mkdir()
    script = tmp_path / "ingest_one.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(model_dir["llama"]), data["math"],
                               data["control"], lang, str(barrier)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for lang in ("en", "de")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(e.name for e in barrier.iterdir()) == ["de", "en"]  # both reached the commit
    archive = mlarch.open(root)
    assert archive.sql("SELECT count(*) FROM models").item() == 1
    assert archive.sql("SELECT count(*) FROM runs WHERE status = 'FINISHED'").item() == 4
    assert archive.sql("SELECT count(*) FROM runs WHERE status <> 'FINISHED'").item() == 0
    assert archive.sql("SELECT count(DISTINCT lang) FROM set_sizes").item() == 2
    assert run(root, "verify").exit_code == 0


def _downgrade_to_schema_1(root):
    """The archive as mlarch 0.1 (schema version 1) wrote it: same arrays, no digest columns."""
    from old_archives import downgrade_to_schema_3

    downgrade_to_schema_3(root)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    for view in ("intervention_effects", "accuracy", "evaluations_current"):  # version 3
        con.execute(f"DROP VIEW {view}")
    for table in ("evaluation_items", "evaluations"):
        con.execute(f"DROP TABLE {table}")
    for table, column in (("arrays", "meta_sha256"), ("arrays", "chunk_sha256"), ("runs", "record_sha256"),
                          ("models", "record_sha256")):
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute("DELETE FROM schema_migrations WHERE version > 1")
    con.close()


def test_schema_1_archive_is_sealed_on_upgrade_and_still_checked(archive_copy):
    _downgrade_to_schema_1(archive_copy)
    archive = mlarch.open(archive_copy)
    before = archive.sql("SELECT * FROM overlap_global ORDER BY ALL")  # first read migrates
    assert archive.sql("SELECT max(version) FROM schema_migrations").item() == catalog.latest_version()
    assert archive.sql("SELECT count(*) FROM runs WHERE record_sha256 IS NULL").item() == 0
    assert archive.sql("SELECT count(*) FROM arrays WHERE chunk_sha256 IS NOT NULL").item() == 0
    assert run(archive_copy, "verify").exit_code == 0
    run_ = _en_math(archive)
    module = _module(archive)
    assert archive.levels(run_["run_id"], module).shape == archive.magnitudes("tiny-llama", module).shape
    # a chunk copied from another run: no chunk digests to catch it on a partial read, but
    # verify's whole-array sha256 does, and derive checks whole legacy arrays before use
    other = _first(archive, "SELECT arrays_group FROM runs WHERE lang = 'de' AND role = 'math'")["arrays_group"]
    shutil.copyfile(archive.arrays_path / other / "levels" / "c" / "0",
                    archive.arrays_path / run_["arrays_group"] / "levels" / "c" / "0")
    _assert_loud(run(archive_copy, "verify"), f"{run_['arrays_group']}/levels")
    de_runs = archive.sql("SELECT run_id FROM runs WHERE lang = 'de'")["run_id"].to_list()
    _assert_loud(run(archive_copy, "rm", *de_runs), "does not match its recorded sha256")
    assert archive.sql("SELECT * FROM overlap_global ORDER BY ALL").equals(before)
    # and a missing chunk is refused on any read
    (archive.arrays_path / run_["arrays_group"] / "levels" / "c" / "0").unlink()
    with pytest.raises(ArrayDamaged, match="missing"):
        mlarch.open(archive_copy).levels(run_["run_id"], module)


def test_schema_6_archive_keeps_its_whole_array_digests_beside_new_chunked_ones(archive_copy, model_dir, data):
    """Arrays written before schema 7 keep their sha256 of the whole array (sha256_scheme NULL):
    verify recounts those as such, new arrays get chunked digests, and both verify side by side."""
    from old_archives import downgrade_to_schema_6

    downgrade_to_schema_6(archive_copy)
    catalog._CHECKED.clear()
    archive = mlarch.open(archive_copy)
    before = archive.sql("SELECT * FROM overlap_global ORDER BY ALL")  # first read migrates
    assert archive.sql("SELECT max(version) FROM schema_migrations").item() == catalog.latest_version() == 7
    old = archive.sql("SELECT count(*) FROM arrays").item()
    assert archive.sql("SELECT count(*) FROM arrays WHERE sha256_scheme IS NULL").item() == old > 0
    assert run(archive_copy, "verify").exit_code == 0
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=6, seeds=[2],
                   top_k=[0.01, 0.05, 0.25], device="cpu")
    schemes = archive.sql("SELECT sha256_scheme AS s, count(*) AS n FROM arrays GROUP BY ALL ORDER BY ALL")
    assert schemes.rows() == [("chunks", 4), (None, old)]  # the new math and control runs' levels and norms
    assert run(archive_copy, "verify").exit_code == 0
    assert archive.sql("SELECT * FROM overlap_global WHERE seed = 1 ORDER BY ALL").equals(before)
    # an old array's recorded digest edited (its run's record digest resealed to match): verify's whole recount says so
    en = _en_math(archive)["run_id"]
    _edit(archive_copy, "UPDATE arrays SET sha256 = ? WHERE owner = ? AND kind = 'levels'", ["0" * 64, en])
    from mlarch.store import records

    con = duckdb.connect(str(archive_copy / "catalog.duckdb"))
    con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?", [records.run_digest_in(con, en), en])
    con.close()
    _assert_loud(run(archive_copy, "verify"), "levels")


def test_rm_of_a_rerun_promotes_the_earlier_run_through_checked_reads(model_dir, data, tmp_path):
    root = tmp_path / "arch"
    archive = mlarch.open(root)
    options = dict(samples=3, top_k=[0.05, 0.25], device="cpu")
    archive.ingest(str(model_dir["llama"]), ["en", "de"], data["math"], data["control"], **options)
    first = archive.sql("SELECT * FROM set_sizes ORDER BY ALL")
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], force=True, **options)
    newest = archive.sql("SELECT run_id FROM runs WHERE lang = 'en' AND in_use")["run_id"].to_list()
    assert len(newest) == 2 and archive.sql("SELECT count(*) FROM runs").item() == 6
    assert run(root, "rm", *newest).exit_code == 0
    promoted = archive.sql("SELECT * FROM set_sizes ORDER BY ALL")
    # same sets, now read back from the earlier runs' checked arrays
    assert promoted.drop("math_run_id", "control_run_id").equals(first.drop("math_run_id", "control_run_id"))
    assert set(promoted["math_run_id"]) == set(first["math_run_id"])
    assert run(root, "verify").exit_code == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_any_run(model_dir, tmp_path, data, bad):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(model_dir["llama"], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = bad
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert not torch.isfinite(load_file(folder / "model.safetensors")[name]).all()
    result = run(tmp_path / "arch", "ingest", "--model", str(folder), "--langs", "en", "--math", data["math"],
                 "--control", data["control"], "--samples", "2", "--device", "cpu", "-q")
    _assert_loud(result, "inf or NaN weights", "model.layers.1.mlp.up_proj")
    assert not (tmp_path / "arch" / "catalog.duckdb").exists()  # refused before any run row


def test_local_edits_verify_catches(archive_copy, model_dir, data):
    """Edits that no digest covers: which run is in use, derived rows of no run, a view."""
    archive = mlarch.open(archive_copy)
    assert run(archive_copy, "verify").exit_code == 0
    en = _en_math(archive)["run_id"]
    _edit(archive_copy, "UPDATE runs SET in_use = false WHERE run_id = ?", [en])
    _assert_loud(run(archive_copy, "verify"), "runs in use")
    _edit(archive_copy, "UPDATE runs SET in_use = true WHERE run_id = ?", [en])
    _edit(archive_copy, "INSERT INTO selections SELECT model, analysis, k, 7, lang, module, n_math_top, n_control_top, "
                        "n_selected + 5, math_run_id, control_run_id FROM selections")
    _assert_loud(run(archive_copy, "verify"), "derived rows")
    _edit(archive_copy, "DELETE FROM selections WHERE seed = 7")
    _edit(archive_copy, "CREATE OR REPLACE VIEW set_sizes AS SELECT s.model, s.analysis, s.k, s.seed, s.lang, s.module, m.layer, "
                        "m.n_params, s.n_math_top, s.n_control_top, 2 * s.n_selected AS n_selected, s.math_run_id, "
                        "s.control_run_id FROM selections s JOIN modules m ON m.model = s.model AND m.module = s.module")
    _assert_loud(run(archive_copy, "verify"), "catalog schema")
    _edit(archive_copy, "DROP VIEW set_sizes")
    from old_archives import view_sql

    _edit(archive_copy, next(v for version in range(catalog.latest_version(), 0, -1) for v in view_sql(version)
                             if "VIEW set_sizes" in v))  # as the newest migration that (re)creates it
    assert run(archive_copy, "verify").exit_code == 0  # the migration's own text again
    # a macro shadowing a function the views call turns every Jaccard into 1.0
    _edit(archive_copy, "CREATE MACRO list_contains(a, b) AS true")
    _assert_loud(run(archive_copy, "verify"), "catalog schema", "list_contains")


def test_selection_never_pairs_runs_of_two_seeds(archive_copy, model_dir, data):
    archive = mlarch.open(archive_copy)
    module = _module(archive)
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=6, seeds=[2],
                   top_k=[0.01, 0.05, 0.25], device="cpu")
    control_1 = archive.sql("SELECT run_id FROM runs WHERE lang = 'en' AND role = 'control' AND seed = 1").item()
    assert run(archive_copy, "rm", control_1).exit_code == 0
    # seed 1 has no complete pair any more: the default seed is 2, math and control of seed 2
    chosen = archive.selection("tiny-llama", "en", 0.05, module)
    assert np.array_equal(chosen, archive.selection("tiny-llama", "en", 0.05, module, seed=2))
    math_2 = archive.sql("SELECT run_id FROM runs WHERE lang = 'en' AND role = 'math' AND seed = 2").item()
    control_2 = archive.sql("SELECT run_id FROM runs WHERE lang = 'en' AND role = 'control' AND seed = 2").item()
    from mlarch.selection import in_top

    by_hand = in_top(archive.levels(math_2, module), 1) & ~in_top(archive.levels(control_2, module), 1)
    assert np.array_equal(chosen, by_hand) and chosen.any()
    with pytest.raises(MlarchError, match="at seed 1"):
        archive.selection("tiny-llama", "en", 0.05, module, seed=1)


def test_commit_lock_is_never_followed_through_a_link(archive_copy, tmp_path):
    outside = tmp_path / "outside-lock"
    lock = archive_copy / ".commit.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(outside)
    _assert_loud(run(archive_copy, "gc"), "commit lock")
    assert not outside.exists()


def test_a_run_overtaken_by_a_newer_one_is_archived_but_not_used(model_dir, data, tmp_path, monkeypatch):
    """Two ingests of one language at once: the one whose runs finished first may commit
    last. The newest finished run stays in use, as import-bundle and verify have it."""
    from datetime import datetime

    from mlarch.ingest import units  # the clock of scored runs

    root = tmp_path / "arch"
    archive = mlarch.open(root)
    options = dict(samples=3, top_k=[0.05, 0.25], device="cpu")
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], **options)
    before = archive.sql("SELECT * FROM set_sizes ORDER BY ALL")
    monkeypatch.setattr(units, "_now", lambda: datetime(2001, 1, 1))  # finished before the archived runs
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], force=True, samples=3,
                   top_k=[0.05, 0.25], device="cpu")  # same analysis: another --samples is another analysis
    assert archive.sql("SELECT count(*) FROM runs WHERE status = 'FINISHED'").item() == 4
    assert archive.sql("SELECT count(*) FROM runs WHERE in_use AND finished_at > TIMESTAMP '2002-01-01'").item() == 2
    assert archive.sql("SELECT * FROM set_sizes ORDER BY ALL").equals(before)
    assert run(root, "verify").exit_code == 0


def test_rm_refuses_the_runs_a_live_ingest_is_scoring_and_a_commit_refuses_removed_runs(archive_copy, model_dir,
                                                                                        data, monkeypatch):
    """`rm --model` while an ingest of the model scores: refused, as gc spares live runs (it
    removed the RUNNING rows and arrays, and the commit then archived rows naming them). A run
    row gone all the same (an edit, an older mlarch's rm) makes the commit archive nothing."""
    from mlarch.ingest import pipeline

    real, seen = pipeline._commit, []

    def rm_first(work, *args, **kwargs):
        archive = mlarch.open(archive_copy)
        running = archive.sql("SELECT run_id FROM runs WHERE status = 'RUNNING' ORDER BY run_id")["run_id"].to_list()
        seen.append(running)
        with pytest.raises(MlarchError, match=r"^run \w+ is RUNNING \(process \d+ on this machine\) and 1 more: wait "
                                              r"for it to finish, or stop it and run Archive.gc\(\); nothing was removed"):
            archive.rm(model="tiny-llama")
        with pytest.raises(MlarchError, match="is RUNNING"):
            archive.rm(running[:1])
        if len(seen) == 2:  # the second ingest: the rows go behind its back
            archive.sql("DELETE FROM runs WHERE status = 'RUNNING'", write=True)
        return real(work, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_commit", rm_first)
    archive = mlarch.open(archive_copy)
    options = dict(samples=3, top_k=[0.01, 0.05, 0.25], device="cpu")
    archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], analysis="a2", **options)
    assert len(seen[0]) == 2 and archive.sql("SELECT count(*) FROM runs WHERE analysis = 'a2' AND status = 'FINISHED'"
                                             ).item() == 2
    before = archive.sql("SELECT * FROM arrays ORDER BY ALL")
    with pytest.raises(MlarchError, match=r"was removed or changed while it was scored .*: this commit archived "
                                          "nothing; ingest again"):
        archive.ingest(str(model_dir["llama"]), ["de"], data["math"], data["control"], analysis="a3", **options)
    assert len(seen[1]) == 2 and archive.sql("SELECT count(*) FROM runs WHERE analysis = 'a3'").item() == 0
    assert archive.sql("SELECT * FROM arrays ORDER BY ALL").equals(before)  # no row naming the removed runs
    assert archive.sql("SELECT count(*) FROM run_samples WHERE run_id NOT IN (SELECT run_id FROM runs)").item() == 0
    assert archive.gc() == [f"arrays runs/{run_id}" for run_id in seen[1]]  # their arrays: orphans gc removes
    assert run(archive_copy, "verify").exit_code == 0


def test_a_scoring_clock_running_fast_does_not_keep_its_runs_in_use(model_dir, data, tmp_path, monkeypatch):
    """The run in use is the newest finished one, by times the scoring process reports (a Ray
    node's clock): a node 6 h fast would keep its runs in use over every later --force rerun.
    Those times are never later than the committing process's clock."""
    from datetime import datetime, timedelta

    from mlarch.ingest import units

    root = tmp_path / "arch"
    archive = mlarch.open(root)
    options = dict(samples=3, top_k=[0.05, 0.25], device="cpu")
    monkeypatch.setattr(units, "_now", lambda: datetime.now() + timedelta(hours=6))
    fast = archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], **options).written
    monkeypatch.undo()
    assert archive.sql("SELECT max(finished_at) FROM runs").item() < datetime.now()
    rerun = archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], force=True,
                           **options).written
    assert archive.sql("SELECT run_id FROM runs WHERE in_use ORDER BY run_id")["run_id"].to_list() == sorted(rerun)
    assert set(fast).isdisjoint(rerun) and run(root, "verify").exit_code == 0


@pytest.mark.parametrize("same_object", [True, False])
def test_an_open_archive_reads_a_model_removed_and_ingested_again_afresh(model_dir, data, tmp_path, same_object):
    """An Archive caches a model's module offsets and |W| record. `rm --model` and an ingest of
    other weights under the name (what mlarch's errors advise), by this object or another
    process, must not leave it cutting the new runs at the old offsets."""
    from fixtures import build_model

    wider = build_model("llama", tmp_path / "wider", intermediate_size=64)  # later modules move
    options = dict(samples=2, top_k=[0.01, 0.05], device="cpu", progress=False, name="tiny")
    root = tmp_path / "arch"
    archive = mlarch.open(root)
    archive.ingest(str(model_dir["llama"]), ["en", "de"], data["math"], data["control"], **options)
    module = "model.layers.1.self_attn.q_proj"  # same shape in both models, another offset
    before = archive.selection("tiny", "en", 0.05, module), archive.magnitudes("tiny", module)
    other = archive if same_object else mlarch.open(root)
    other.rm(model="tiny")
    other.ingest(str(wider), ["en", "de"], data["math"], data["control"], **options)
    fresh = mlarch.open(root)
    assert np.array_equal(archive.selection("tiny", "en", 0.05, module), fresh.selection("tiny", "en", 0.05, module))
    magnitudes = archive.magnitudes("tiny", module)
    assert np.array_equal(magnitudes, fresh.magnitudes("tiny", module))
    assert not np.array_equal(magnitudes, before[1])  # the case happened: other weights at that module


def _edit_catalog(archive_root, *statements):
    con = duckdb.connect(str(archive_root / "catalog.duckdb"))
    for statement in statements:
        con.execute(statement)
    con.close()


def test_a_catalog_view_cannot_read_another_file_or_load_an_extension(archive_copy, tmp_path, monkeypatch):
    """A catalog nobody vetted (copied from elsewhere, or a published snapshot) may hold views
    that read local files or URLs: readers run in a DuckDB that can open only the catalog."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LOCAL-FILE")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # where DuckDB would install an extension it fetched

    def runs_reading(source):  # bound against a stand-in macro, so the stored view calls DuckDB's read_text
        _edit_catalog(archive_copy, "CREATE MACRO read_text(u) AS TABLE SELECT 'x' AS content",
                      "DROP VIEW IF EXISTS runs",
              f"CREATE VIEW runs AS SELECT * REPLACE ((SELECT string_agg(content, '') FROM read_text('{source}')) "
              "AS dataset) FROM runs_t", "DROP MACRO TABLE read_text")

    _edit_catalog(archive_copy, "ALTER TABLE runs RENAME TO runs_t")
    runs_reading("http://127.0.0.1:9/leak.txt")  # httpfs would be installed from the internet to read it
    with pytest.raises(MlarchError, match="reaches outside the file"):
        mlarch.open(archive_copy).runs()
    assert list(home.iterdir()) == []  # nothing installed (nor tried: no ~/.duckdb)
    runs_reading(secret)
    with pytest.raises(MlarchError, match="reaches outside the file") as refused:
        mlarch.open(archive_copy).runs()
    assert "TOP-SECRET" not in str(refused.value)
    line = one_error(run(archive_copy, "runs"), 1)
    assert "reaches outside the file" in line and "TOP-SECRET" not in line and "verify" in line


def test_a_catalog_macro_cannot_make_a_writer_read_another_file(archive_copy, model_dir, data, tmp_path):
    """Writers open the file itself, where a macro named like a built-in they call takes its
    place: now(), when an ingest records a new analysis, would read a local file into the
    catalog. Writers reach no other file either; the ingest fails whole, with one line."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LOCAL-FILE")
    _edit_catalog(archive_copy, "CREATE MACRO now() AS (TIMESTAMP '2001-01-01' + "
                  f"length((SELECT string_agg(content, '') FROM read_text('{secret}'))) * INTERVAL 1 DAY)")
    con = duckdb.connect(str(archive_copy / "catalog.duckdb"), read_only=True)
    assert con.execute("SELECT now()").fetchone()[0].year == 2001  # the macro shadows the built-in
    con.close()
    archive = mlarch.open(archive_copy)
    before = archive.sql("SELECT run_id, status FROM runs ORDER BY ALL")
    with pytest.raises(MlarchError, match="reaches outside the file") as refused:
        archive.ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=4,
                       top_k=[0.05, 0.25], device="cpu", analysis="other")
    assert "TOP-SECRET" not in str(refused.value)
    archive = mlarch.open(archive_copy)
    assert archive.sql("SELECT count(*) FROM analyses WHERE analysis = 'other'").item() == 0
    assert archive.sql("SELECT run_id, status FROM runs WHERE status = 'FINISHED' ORDER BY ALL").equals(
        before.filter(before["status"] == "FINISHED"))
    # sql --write is the user's own SQL and may read files; still no extension behind its back
    assert archive.sql("SELECT count(*) FROM read_text(?)", [str(secret)], write=True).item() == 1


def test_a_catalog_macro_cannot_make_a_migration_read_another_file(archive_copy, tmp_path):
    """Migrating an older catalog records each step with now(): a macro in the file named so
    reaches no other file, and the catalog stays at its old version."""
    from old_archives import downgrade_to_schema_6

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-LOCAL-FILE")
    downgrade_to_schema_6(archive_copy)
    _edit_catalog(archive_copy, f"CREATE MACRO now() AS (SELECT string_agg(content, '') FROM read_text('{secret}'))")
    with pytest.raises(MlarchError, match="reaches outside the file") as refused:
        mlarch.open(archive_copy).runs()
    assert "TOP-SECRET" not in str(refused.value)
    con = duckdb.connect(str(archive_copy / "catalog.duckdb"), read_only=True)
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == 6
    con.close()


def _reseal(root, run_id):
    """Give a run's edited rows a matching record digest, as anyone can (records.py says so)."""
    from mlarch.store import records

    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?", [records.run_digest_in(con, run_id), run_id])
    con.close()


def test_an_array_row_naming_another_runs_path_is_never_read(archive_copy):
    """A row of run A naming run B's levels (and their digests) would hand back B's sets as A's;
    a path of the row's choosing would be a request for any key: both refused before any read."""
    archive = mlarch.open(archive_copy)
    en = _en_math(archive)
    de = _first(archive, "SELECT run_id FROM runs WHERE lang = 'de' AND role = 'math'")["run_id"]
    module = archive.sql("SELECT module FROM modules LIMIT 1").item()
    _edit_catalog(archive_copy, f"CREATE TEMP TABLE b AS SELECT * FROM arrays WHERE owner = '{de}' AND kind = 'levels'",
          f"DELETE FROM arrays WHERE owner IN ('{en['run_id']}', '{de}') AND kind = 'levels'",  # paths are unique
          f"INSERT INTO arrays SELECT * REPLACE ('{en['run_id']}' AS owner) FROM b")
    with pytest.raises(MlarchError, match=f"the catalog rows of run {en['run_id']} changed"):
        mlarch.open(archive_copy).levels(en["run_id"], module)
    _reseal(archive_copy, en["run_id"])  # as a forger can: the path check still refuses
    with pytest.raises(ArrayDamaged, match=f"names 'runs/{de}/levels', not 'runs/{en['run_id']}/levels'"):
        mlarch.open(archive_copy).levels(en["run_id"], module)
    failed = [r for r in mlarch.open(archive_copy).verify().rows(named=True)
              if r["status"] != "ok" and r["object"] == f"runs/{de}/levels"]
    assert any("not 'runs/" in r["detail"] for r in failed), failed
    _edit_catalog(archive_copy, "UPDATE arrays SET path = 'runs/544f502d5345435245/levels' "
                  f"WHERE owner = '{en['run_id']}' AND kind = 'levels'")
    _reseal(archive_copy, en["run_id"])
    with pytest.raises(ArrayDamaged, match="not 'runs/"):
        mlarch.open(archive_copy).levels(en["run_id"], module)


def test_derived_rows_naming_another_languages_runs_are_never_read(archive_copy):
    """selection(), compare's re-threshold and analysis-overlap take a language's (math,
    control) runs from its derived rows: rows edited to name bn's runs would hand back bn's set
    as en's, every array digest intact. Refused unless they are en's runs in use."""
    archive = mlarch.open(archive_copy)
    module = archive.sql("SELECT module FROM modules LIMIT 1").item()
    en, bn = (archive.selection("tiny-llama", lang, 0.05, module) for lang in ("en", "bn"))
    assert not np.array_equal(en, bn)
    _edit_catalog(archive_copy, "UPDATE selections SET math_run_id = b.math_run_id, control_run_id = b.control_run_id "
                  "FROM (SELECT DISTINCT math_run_id, control_run_id FROM selections WHERE lang = 'bn') b "
                  "WHERE selections.lang = 'en'")
    archive = mlarch.open(archive_copy)
    refused = r"the derived tables of 'tiny-llama', 'en' .* name runs .* which are not its math and control runs in use"
    with pytest.raises(MlarchError, match=refused):
        archive.selection("tiny-llama", "en", 0.05, module)
    with pytest.raises(MlarchError, match=refused):
        archive.compare("tiny-llama", "en,bn", k=0.03, by="global")  # a k not archived: re-thresholded


def test_an_oversized_chunk_is_refused_without_reading_it_whole(archive_copy):
    """A chunk object far larger than any chunk of its array can be (planted in a bucket or a
    folder) is refused after reading one byte past that bound, not after reading it all."""
    import tracemalloc

    archive = mlarch.open(archive_copy)
    en = _en_math(archive)
    module = archive.sql("SELECT module FROM modules LIMIT 1").item()
    chunk = archive_copy / "arrays.zarr" / en["arrays_group"] / "levels" / "c" / "0"
    assert chunk.is_file()
    with open(chunk, "r+b") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB that takes no disk
    tracemalloc.start()
    try:
        with pytest.raises(ArrayDamaged, match="c/0 is larger than any of its objects can be"):
            mlarch.open(archive_copy).levels(en["run_id"], module)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_a_chunk_that_is_a_named_pipe_is_refused_not_waited_on(archive_copy):
    """A folder copied or untarred from elsewhere may hold a FIFO where a chunk belongs: opening
    it would block verify and every read (rm's under the commit lock) for ever."""
    archive = mlarch.open(archive_copy)
    en = _en_math(archive)
    module = archive.sql("SELECT module FROM modules LIMIT 1").item()
    chunk = archive_copy / "arrays.zarr" / en["arrays_group"] / "levels" / "c" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    # in processes of their own: a read that blocks is killed by the timeout, failing the test
    read = f"import mlarch; mlarch.open({str(archive_copy)!r}).levels({en['run_id']!r}, {module!r})"
    done = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "ArrayDamaged" in done.stderr and "c/0 is not a plain file" in done.stderr
    done = subprocess.run([sys.executable, "-m", "mlarch", "--archive", str(archive_copy), "verify", "--format", "tsv"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "c/0 is not a plain file" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize("edit", ["DROP TABLE modules CASCADE", "ALTER TABLE modules DROP COLUMN n_rows"])
def test_a_table_or_column_dropped_from_the_catalog_is_one_line(archive_copy, edit):
    _edit_catalog(archive_copy, edit)
    line = one_error(run(archive_copy, "compare", "--model", "tiny-llama", "--langs", "en,de", "--k", "0.02"), 1)
    assert "differs from mlarch's schema" in line and "altered" in line, line
