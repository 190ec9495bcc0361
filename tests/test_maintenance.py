"""verify, gc and rm: integrity checks, leftovers of interrupted ingests, removal."""

import errno
import os
import shutil
import socket

import duckdb
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from fixtures import one_error


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def test_verify_clean_archive(archive_copy):
    result = run(archive_copy, "verify", "--format", "json")
    assert result.exit_code == 0, result.output
    assert '"status": "FAIL"' not in result.stdout
    assert '"check": "patterns recount"' in result.stdout and '"check": "array digest"' in result.stdout


def test_verify_names_tampered_and_corrupt_arrays(archive_copy):
    archive = mlarch.open(archive_copy)
    path = archive.sql("SELECT path FROM arrays WHERE kind = 'levels' ORDER BY path LIMIT 1").item()
    array = zarr.open_array(str(archive.arrays_path), path=path, mode="r+")
    values = array[:]
    values[np.argmax(values == 0)] = 1  # one more parameter "selected"
    array[:] = values
    result = run(archive_copy, "verify")
    assert result.exit_code == 1
    assert f"{path}" in result.stderr and "checks failed" in result.stderr
    assert "set_sizes recount" in result.stdout and "FAIL" in result.stdout
    norms = next((archive.arrays_path / path.replace("levels", "norms") / "c").iterdir())
    raw = bytearray(norms.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    norms.write_bytes(bytes(raw))
    result = run(archive_copy, "verify")
    assert result.exit_code == 1 and "unreadable" in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_gc_removes_interrupted_ingest_leftovers(archive_copy):
    con = duckdb.connect(str(archive_copy / "catalog.duckdb"))
    con.execute("INSERT INTO runs (run_id, model, lang, role, dataset, seed, n_samples, status, started_at, k_values, "
                "config_digest, arrays_group, host, pid) VALUES ('deadbeef0000', 'tiny-llama', 'fr', 'math', 'x', 1, 4, "
                "'RUNNING', now()::TIMESTAMP, [0.01], 'd', 'runs/deadbeef0000', ?, 999999999)", [socket.gethostname()])
    con.close()
    (archive_copy / "arrays.zarr" / "runs" / "deadbeef0000").mkdir()
    (archive_copy / "arrays.zarr" / "runs" / "orphan000000").mkdir()
    before = mlarch.open(archive_copy).sql("SELECT * FROM overlap_global ORDER BY ALL")
    assert run(archive_copy, "verify").exit_code == 1
    result = run(archive_copy, "gc")
    assert result.exit_code == 0, result.output
    assert "removed run deadbeef0000" in result.stdout and "removed arrays runs/orphan000000" in result.stdout
    assert run(archive_copy, "verify").exit_code == 0
    assert mlarch.open(archive_copy).sql("SELECT * FROM overlap_global ORDER BY ALL").equals(before)
    assert run(archive_copy, "gc").stdout.strip() == "Nothing to remove."


def test_verify_and_gc_find_rows_of_no_run(archive_copy):
    """`arrays` and `run_samples` rows whose run is gone (a removal racing a commit) point at
    nothing: verify names them, gc removes them."""
    con = duckdb.connect(str(archive_copy / "catalog.duckdb"))
    run_id = con.execute("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").fetchone()[0]
    con.execute("CREATE TEMP TABLE a AS SELECT * FROM arrays WHERE owner = ?", [run_id])
    con.execute("UPDATE a SET owner = 'deadbeef0000', path = replace(path, ?, 'deadbeef0000')", [run_id])
    con.execute("INSERT INTO arrays SELECT * FROM a")
    con.execute("INSERT INTO run_samples SELECT 'deadbeef0000', position, item_index FROM run_samples WHERE run_id = ?",
                [run_id])
    con.close()
    result = run(archive_copy, "verify", "--format", "tsv")
    assert result.exit_code == 1
    failed = [line.split("\t")[:2] for line in result.stdout.splitlines() if "\tFAIL\t" in line or "FAIL" in line]
    assert sorted(failed) == [["no leftovers", "arrays runs/deadbeef0000/levels"],
                              ["no leftovers", "arrays runs/deadbeef0000/norms"],
                              ["no leftovers", "run_samples deadbeef0000"]], result.stdout
    removed = mlarch.open(archive_copy).gc()
    assert removed == ["arrays rows of runs/deadbeef0000/levels (no run or model)",
                       "arrays rows of runs/deadbeef0000/norms (no run or model)",
                       "run_samples rows of deadbeef0000 (no run or model)"]
    assert run(archive_copy, "verify").exit_code == 0


def test_rm_dry_run_with_arrays_zarr_a_link(archive_copy, tmp_path):
    """arrays.zarr may be a link to a folder elsewhere (mlarch advises it over links inside):
    rm --dry-run lists arrays.zarr/runs/<id>, not an error about leaving the archive."""
    shutil.move(archive_copy / "arrays.zarr", tmp_path / "elsewhere")
    (archive_copy / "arrays.zarr").symlink_to(tmp_path / "elsewhere")
    run_id = mlarch.open(archive_copy).sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    result = run(archive_copy, "rm", "--dry-run", run_id)
    assert result.exit_code == 0, result.output
    assert f"arrays.zarr/runs/{run_id} (" in result.output


def test_rm_language_keeps_overlaps_true(archive_copy):
    archive = mlarch.open(archive_copy)
    keep = "SELECT * FROM overlap_global WHERE lang_a <> 'bn' AND lang_b <> 'bn' ORDER BY ALL"
    expected = archive.sql(keep)
    sizes = archive.sql("SELECT * FROM set_sizes WHERE lang <> 'bn' ORDER BY ALL")
    bn_runs = archive.sql("SELECT run_id FROM runs WHERE lang = 'bn'")["run_id"].to_list()
    result = run(archive_copy, "rm", *bn_runs)
    assert result.exit_code == 0, result.output
    assert archive.sql("SELECT DISTINCT lang FROM set_sizes ORDER BY lang")["lang"].to_list() == ["de", "en"]
    assert archive.sql("SELECT * FROM overlap_global ORDER BY ALL").equals(expected)
    assert archive.sql("SELECT * FROM set_sizes ORDER BY ALL").equals(sizes)
    assert archive.sql("SELECT count(*) FROM language_unique WHERE lang = 'bn'").item() == 0
    assert not any((archive_copy / "arrays.zarr" / "runs" / rid).exists() for rid in bn_runs)
    assert run(archive_copy, "verify").exit_code == 0


def test_rm_model_and_bad_ids(archive_copy):
    assert run(archive_copy, "rm", "nosuchrun").exit_code == 1
    assert run(archive_copy, "rm").exit_code == 2
    result = run(archive_copy, "rm", "--model", "tiny-llama")
    assert result.exit_code == 0 and "removed model tiny-llama" in result.stdout
    archive = mlarch.open(archive_copy)
    for table in ("runs", "models", "modules", "selections", "patterns", "arrays", "run_samples"):
        assert archive.sql(f"SELECT count(*) FROM {table}").item() == 0, table
    assert [p for p in (archive_copy / "arrays.zarr" / "runs").iterdir() if p.is_dir()] == []
    assert run(archive_copy, "verify").exit_code == 0


def test_verify_recompute_reproduces_a_run(archive_copy):
    run_id = mlarch.open(archive_copy).sql("SELECT run_id FROM runs WHERE role = 'control' LIMIT 1").item()
    result = run(archive_copy, "verify", "--recompute", run_id, "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {row["metric"]: row["value"] for row in __import__("json").loads(result.stdout)}
    assert rows["max relative norm difference"] == "0"
    assert [v for m, v in rows.items() if m.startswith("Jaccard")] == ["1.000000"] * 3


def test_verify_recompute_refuses_changed_data(archive_copy, tmp_path):
    archive = mlarch.open(archive_copy)
    run_id = archive.sql("SELECT run_id FROM runs WHERE role = 'math' LIMIT 1").item()
    (path,) = archive.run(run_id)["provenance"]["data"]["files"]
    original = open(path, "rb").read()
    try:
        with open(path, "ab") as handle:
            handle.write(b'{"text": "an extra line"}\n')
        result = run(archive_copy, "verify", "--recompute", run_id)
        assert result.exit_code == 1 and "changed since the run" in result.stderr
    finally:
        open(path, "wb").write(original)


def test_gc_leaves_a_planted_link_alone_and_still_removes_real_leftovers(archive_copy, tmp_path):
    """A link (or, in a shared bucket, a key no mlarch makes) among the run groups must not stop
    gc for good, nor be followed: gc removes the real leftovers, verify names the stranger."""
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (archive_copy / "arrays.zarr" / "runs" / "planted").symlink_to(outside, target_is_directory=True)
    (archive_copy / "arrays.zarr" / "runs" / "orphan000000").mkdir()
    result = run(archive_copy, "gc")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["removed arrays runs/orphan000000", "1 leftover(s) removed."]
    assert (outside / "keep.txt").read_text() == "mine"
    assert (archive_copy / "arrays.zarr" / "runs" / "planted").is_symlink()
    checks = mlarch.open(archive_copy).verify()
    failed = checks.filter(checks["status"] != "ok").rows(named=True)
    assert [(r["object"], "gc leaves alone" in r["detail"]) for r in failed] == [("runs/planted", True)], failed


def test_verify_lists_a_link_loop_in_arrays_zarr_and_goes_on(archive_copy, tmp_path):
    """arrays.zarr/runs/<id> a link to itself (owned by a finished run), and a second loop no
    run owns: verify names each array of the first as a FAIL row and the second as an orphan,
    and checks everything else, instead of stopping at the first loop."""
    run_id = mlarch.open(archive_copy).sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    runs = archive_copy / "arrays.zarr" / "runs"
    shutil.rmtree(runs / run_id)
    (runs / run_id).symlink_to(runs / run_id)
    (runs / "loop00000000").symlink_to(runs / "loop00000000")
    for link in (runs / run_id, runs / "loop00000000"):
        try:
            link.stat()
            raise AssertionError(f"{link} is no link loop")
        except OSError as exc:
            assert exc.errno == errno.ELOOP
    result = run(archive_copy, "verify", "--format", "tsv")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.stderr.splitlines()) == 1 and "checks failed" in result.stderr, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:]]
    failed = {(row[0], row[1]) for row in rows if row[2] == "FAIL"}
    assert {("array digest", f"runs/{run_id}/norms"), ("array digest", f"runs/{run_id}/levels"),
            ("no orphan arrays", "runs/loop00000000")} <= failed, result.stdout
    assert ("runs checked", "6") in {(row[0], row[1]) for row in rows}  # it went on to the end
    other = mlarch.open(archive_copy).sql("SELECT path FROM arrays WHERE owner <> ? ORDER BY path", [run_id])
    assert {(row[0], row[1]) for row in rows if row[2] == "ok"} >= {("array digest", p) for p in other["path"]}


@pytest.mark.parametrize("args", [["rm", "RUN"], ["gc"]], ids=["rm", "gc"])
def test_a_read_only_archive_says_so_and_a_dry_run_needs_no_lock(archive_copy, monkeypatch, args):
    """root ignores chmod: the read-only file system is simulated where the commit lock is
    opened. rm and gc name the folder as not writable (as ingest does); rm --dry-run changes
    nothing, so it opens no lock at all and lists what rm would remove."""
    run_id = mlarch.open(archive_copy).sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    real_open, tried = os.open, []

    def read_only(path, flags, *rest, **kwargs):
        if os.fspath(path).endswith(".commit.lock"):
            tried.append(path)
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *rest, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    before = sorted(str(p.relative_to(archive_copy)) for p in archive_copy.rglob("*"))
    dry = run(archive_copy, "rm", "--dry-run", run_id)
    assert dry.exit_code == 0 and f"would remove run {run_id}" in dry.stdout, dry.output
    assert tried == []  # no lock for a dry run
    line = one_error(run(archive_copy, *[run_id if a == "RUN" else a for a in args]), 1)
    assert tried, "the commit lock was never opened"
    assert line.startswith(f"Error: archive folder {archive_copy} is not writable (Read-only file system): "), line
    assert "--archive DIR" in line and "remove whatever is there" not in line, line
    assert sorted(str(p.relative_to(archive_copy)) for p in archive_copy.rglob("*")) == before
    assert mlarch.open(archive_copy).sql("SELECT count(*) FROM runs").item() == 6
