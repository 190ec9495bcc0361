"""`mlarch sql` without --write reads the catalog and nothing else; a path without an
archive is an error that creates nothing; a foreign DuckDB file is refused untouched; a file
system that refuses (full, read-only, no permission) reads as one line with a fix.

The read-only guarantee has two layers, each tested alone: the statement checks in
mlarch.query.api (`_refusal`) and the sandboxed connection (catalog.SANDBOX)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from mlarch.errors import MlarchError
from mlarch.query import api
from mlarch.store import catalog

SECRET = "mlarch-secret-4f1d"


def run(archive, *args, env=None):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args], env=env)


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture
def scene(archive_copy, tmp_path, monkeypatch):
    """A real archive, a real levels chunk of one run, a target that must stay absent, a
    secret file, and a HOME of its own (where INSTALL would create .duckdb/extensions)."""
    path = mlarch.open(archive_copy).sql(
        "SELECT path FROM arrays WHERE kind = 'levels' ORDER BY path LIMIT 1").item()
    chunk = archive_copy / "arrays.zarr" / path / "c" / "0"
    assert chunk.is_file() and chunk.stat().st_size > 0  # the array file the attack aims at exists
    secret = tmp_path / "secret.csv"
    secret.write_text(f"word\n{SECRET}\n")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return {"root": archive_copy, "chunk": chunk, "target": tmp_path / "written", "profile": tmp_path / "profile.json",
            "secret": secret, "home": home}


# (name, SQL, which layer stops it: "both", "checks" (statement checks only: harmless to the
# sandbox, or something the sandbox cannot stop) or "sandbox" (only the sandbox can))
ATTACKS = [
    ("explain analyze copy onto a run's array", "EXPLAIN ANALYZE COPY (SELECT 'x') TO '{chunk}' (FORMAT csv)", "both"),
    ("explain analyze copy to any file", "EXPLAIN ANALYZE COPY (SELECT 'x') TO '{target}'", "both"),
    ("explain with options", "EXPLAIN (ANALYZE, FORMAT json) COPY (SELECT 'x') TO '{target}'", "both"),
    ("explain behind comments", "/* a */ EXPLAIN /* b /* nested */ */ ANALYZE -- c\n COPY (SELECT 1) TO '{target}'",
     "both"),
    ("explain analyze install", "EXPLAIN ANALYZE INSTALL httpfs", "both"),
    ("copy to", "COPY runs TO '{target}'", "both"),
    ("copy onto a run's array", "COPY (SELECT 'x') TO '{chunk}' (FORMAT csv)", "both"),
    ("attach", "ATTACH '{target}' AS elsewhere", "both"),
    ("install", "INSTALL httpfs", "both"),
    ("load", "LOAD httpfs", "both"),
    ("set", "SET enable_external_access = true", "both"),
    ("export database", "EXPORT DATABASE '{target}'", "both"),
    ("pragma enable_profiling", "PRAGMA enable_profiling", "both"),
    ("pragma profiling_output", "PRAGMA profiling_output = '{target}'", "both"),
    ("profile written by a later select", "PRAGMA enable_profiling = 'json'; PRAGMA profiling_output = '{profile}'; "
                                          "SELECT 1", "both"),
    ("pragma hidden in nested comment", "/* /* */ PRAGMA version */ PRAGMA enable_profiling", "both"),
    ("multi-statement hides a copy", "SELECT 1; COPY (SELECT 'x') TO '{chunk}' (FORMAT csv)", "both"),
    ("insert", "INSERT INTO models SELECT * FROM models", "both"),
    ("read another file", "SELECT * FROM read_csv('{secret}')", "sandbox"),
    ("read /etc/hostname", "SELECT * FROM read_csv('/etc/hostname', header = false)", "sandbox"),
    ("list a folder", "SELECT * FROM glob('{home}/../*')", "sandbox"),
    ("call", "CALL pragma_version()", "checks"),
]


def assert_stopped(scene, before, result, code):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and SECRET not in result.output
    # the real assertions: nothing written anywhere
    assert scene["chunk"].read_bytes() == before["chunk"]
    assert digest(scene["root"]) == before["tree"]
    assert not scene["target"].exists() and not scene["profile"].exists()
    assert list(scene["home"].iterdir()) == []  # INSTALL creates ~/.duckdb/extensions before downloading


def attack(scene, sql):
    text = sql.format(**{k: v for k, v in scene.items() if k != "root"})
    before = {"chunk": scene["chunk"].read_bytes(), "tree": digest(scene["root"])}
    return before, run(scene["root"], "sql", text)


@pytest.mark.parametrize("name,sql,layer", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_read_only_sql_reaches_nothing(scene, name, sql, layer):
    before, result = attack(scene, sql)
    assert_stopped(scene, before, result, 1 if layer == "sandbox" else 2)
    if layer == "sandbox":
        assert "reads the catalog and nothing else" in result.stderr
    else:
        assert "refused without --write" in result.stderr


@pytest.mark.parametrize("name,sql,layer", [a for a in ATTACKS if a[2] in ("both", "checks")],
                         ids=[a[0] for a in ATTACKS if a[2] in ("both", "checks")])
def test_statement_checks_alone_stop_them(scene, monkeypatch, name, sql, layer):
    monkeypatch.setattr(catalog, "SANDBOX", {})  # planted: an ordinary read-only connection
    before, result = attack(scene, sql)
    assert_stopped(scene, before, result, 2)


@pytest.mark.parametrize("name,sql,layer", [a for a in ATTACKS if a[2] in ("both", "sandbox")],
                         ids=[a[0] for a in ATTACKS if a[2] in ("both", "sandbox")])
def test_sandbox_alone_stops_them(scene, monkeypatch, name, sql, layer):
    monkeypatch.setattr(api, "_refusal", lambda *a, **k: None)  # planted: every statement passes the checks
    before, result = attack(scene, sql)
    assert_stopped(scene, before, result, 1)


def test_without_either_layer_the_attacks_are_real(scene, monkeypatch):
    """The planted bug of the issue: what the tests above would see without the fix."""
    monkeypatch.setattr(catalog, "SANDBOX", {})
    monkeypatch.setattr(api, "_refusal", lambda *a, **k: None)
    before = scene["chunk"].read_bytes()
    sql = f"EXPLAIN ANALYZE COPY (SELECT 'x') TO '{scene['chunk']}' (FORMAT csv)"
    assert run(scene["root"], "sql", sql).exit_code == 0
    assert scene["chunk"].read_bytes() != before  # a run's array destroyed by a "read-only" query
    assert run(scene["root"], "sql", f"COPY (SELECT 1) TO '{scene['target']}'").exit_code == 0
    assert scene["target"].exists()
    profile = f"PRAGMA enable_profiling = 'json'; PRAGMA profiling_output = '{scene['profile']}'; SELECT 1"
    assert run(scene["root"], "sql", profile).exit_code == 0
    assert scene["profile"].exists()
    leaked = run(scene["root"], "sql", f"SELECT * FROM read_csv('{scene['secret']}')")
    assert leaked.exit_code == 0 and SECRET in leaked.stdout


READS = ["SELECT count(*) AS n FROM runs", "FROM models", "WITH r AS (SELECT * FROM runs) SELECT count(*) FROM r",
         "SELECT 1; SELECT 2 AS two", "EXPLAIN SELECT * FROM runs", "EXPLAIN ANALYZE SELECT * FROM runs",
         "explain analyse select 1", "EXPLAIN (FORMAT json) SELECT 1", "EXPLAIN (SELECT 1)",
         "\n-- a comment\nEXPLAIN ANALYZE /* and another */ SELECT 1", "PRAGMA table_info('runs')",
         "PRAGMA show_tables", "PRAGMA database_size", "PRAGMA version", "SHOW TABLES", "DESCRIBE runs",
         "SELECT * FROM duckdb_settings() WHERE name = 'enable_external_access'"]


def test_reads_still_work(archive_copy):
    for sql in READS:
        result = run(archive_copy, "sql", sql)
        assert result.exit_code == 0, (sql, result.output)
    setting = mlarch.open(archive_copy).sql(READS[-1])
    assert setting["value"].to_list() == ["false"]  # the sandbox really is in place
    rows = mlarch.open(archive_copy).sql("SELECT count(*) AS n FROM runs WHERE lang = $lang", {"lang": "en"})
    assert rows["n"].item() == 2
    last = mlarch.open(archive_copy).sql("SELECT 1 AS one; SELECT $x AS two", {"x": 2})  # as documented: the last
    assert last.columns == ["two"] and last["two"].to_list() == [2]


@pytest.mark.parametrize("sql,params,write", [("SELECT $x AS a; SELECT 1 AS b", [], False),
                                               ("SELECT $x AS a; SELECT 1 AS b", ["-p", "x=1"], False),
                                               ("CREATE TABLE t AS SELECT ? AS a; SELECT 1 AS b", [], True)])
def test_parameters_of_an_earlier_statement_are_a_usage_error(archive_copy, sql, params, write):
    """Values bind in the last statement only: one in an earlier one is refused before anything
    runs (it was DuckDB's 'Values were not provided', exit 1, or a misleading 'not used')."""
    result = run(archive_copy, "sql", *(["--write"] if write else []), sql, *params)
    assert result.exit_code == 2, result.output
    assert "statement 1 of 2 uses parameters" in result.stderr and "bind in the last statement only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    tables = mlarch.open(archive_copy).sql("SELECT table_name FROM information_schema.tables")["table_name"]
    assert "t" not in tables.to_list()  # the CREATE never ran


# --- a path that holds no archive -----------------------------------------------------

NO_ARCHIVE = ("Error: no mlarch archive at typo: check --archive (or MLARCH_ARCHIVE); "
              "`mlarch ingest` or `mlarch import-bundle` creates one")
READERS = [["runs"], ["models"], ["compare", "--model", "x", "--langs", "en,de"], ["sql", "SELECT 1"],
           ["sql", "--write", "CREATE TABLE t (x INTEGER)"], ["verify"], ["show", "feedbeef"], ["gc"],
           ["rm", "feedbeef"], ["export-bundle", "feedbeef", "-o", "b.tar"], ["export", "pq"]]


@pytest.mark.parametrize("args", READERS, ids=[" ".join(a[:2]) for a in READERS])
def test_a_typo_is_no_archive_and_creates_nothing(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLARCH_ARCHIVE", raising=False)
    result = CliRunner().invoke(cli, ["--archive", "typo", *args])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == NO_ARCHIVE
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("MLARCH_ARCHIVE", "typo")  # the same through the environment
    assert CliRunner().invoke(cli, args).stderr.strip() == NO_ARCHIVE
    assert list(tmp_path.iterdir()) == []


def test_a_typo_in_the_api_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stray").mkdir()  # an existing folder that is no archive stays as it is
    for path in ("typo", "stray"):
        archive = mlarch.open(path)
        for call in (archive.runs, archive.models, lambda: archive.sql("SELECT 1"),
                     lambda: archive.sql("CREATE TABLE t (x INTEGER)", write=True),
                     lambda: archive.compare("x", ["en", "de"]), lambda: archive.run("feedbeef")):
            with pytest.raises(MlarchError, match=f"^no mlarch archive at {path}: check the folder given to mlarch.open"):
                call()
    assert [p.name for p in tmp_path.iterdir()] == ["stray"] and list((tmp_path / "stray").iterdir()) == []


def test_ingest_and_import_bundle_still_create_an_archive(llama_archive, archive_copy, tmp_path):
    assert (llama_archive / "catalog.duckdb").is_file()  # conftest: mlarch.open(fresh path).ingest(...)
    bundle = tmp_path / "b.tar"
    assert run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(bundle)).exit_code == 0
    fresh = tmp_path / "new" / "archive"
    result = run(fresh, "import-bundle", str(bundle))
    assert result.exit_code == 0, result.output
    assert len(mlarch.open(fresh).runs()) == len(mlarch.open(archive_copy).runs()) > 0


def test_a_foreign_catalog_is_refused_untouched_by_the_cli(tmp_path):
    con = duckdb.connect(str(tmp_path / "catalog.duckdb"))
    con.execute("CREATE TABLE invoices (id INTEGER); INSERT INTO invoices VALUES (1)")
    con.close()
    before = digest(tmp_path)
    for args in (["runs"], ["sql", "SELECT 1"], ["sql", "--write", "SELECT 1"], ["verify"]):
        result = run(tmp_path, *args)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip() == (
            f"Error: {tmp_path / 'catalog.duckdb'} is not an mlarch catalog (it holds invoices but no "
            "schema_migrations table): point --archive at an mlarch archive folder")
        assert digest(tmp_path) == before


# --- a file system that refuses -----------------------------------------------------

FAILURES = [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/arrays.zarr/x"),
     f"Error: {os.strerror(errno.ENOSPC)}: /full/arrays.zarr/x: free some space there"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/.commit.lock"),
     f"Error: {os.strerror(errno.EROFS)}: /ro/.commit.lock: choose a writable --archive"),
    (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/locked/catalog.duckdb"),
     f"Error: {os.strerror(errno.EACCES)}: /locked/catalog.duckdb: check the permissions"),
    (duckdb.IOException('IO Error: Could not write file "/full/catalog.duckdb.wal": No space left on device'),
     'Error: IO Error: Could not write file "/full/catalog.duckdb.wal": No space left on device: free some space there'),
    (duckdb.IOException('IO Error: Async write failed: {"exception_type":"IO","exception_message":'
                        '"Could not write file \\"/x.parquet\\": disk full","errno":"28"}'),
     'Error: IO Error: Could not write file "/x.parquet": disk full: free some space there'),
]


@pytest.mark.parametrize("failure,expected", FAILURES, ids=["ENOSPC", "EROFS", "EACCES", "duckdb", "duckdb-json"])
def test_a_refusing_file_system_reads_as_one_line(archive_copy, monkeypatch, failure, expected):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(api.Archive, "runs", fail)
    result = run(archive_copy, "runs")
    assert result.exit_code == 1
    assert result.stderr.startswith(expected) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "unexpected" not in result.stderr
    debug = run(archive_copy, "runs", env={"MLARCH_DEBUG": "1"})  # still shows the traceback when asked
    assert debug.exception is failure


def _in_a_mount_namespace(script: str) -> subprocess.CompletedProcess:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small or read-only file system")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    if "MOUNT-FAILED" in done.stdout:
        pytest.skip(f"cannot mount here: {done.stderr.strip()[:200]}")
    return done


def test_a_real_full_disk_and_read_only_mount(archive_copy, tmp_path):
    """Real ENOSPC (a 8 KiB tmpfs) and EROFS (the same remounted read-only), in a mount
    namespace of a child process, so nothing changes outside this test."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    mlarch_cli = f"{sys.executable} -m mlarch --archive {archive_copy}"
    done = _in_a_mount_namespace(f"""
        mount -t tmpfs -o size=8k tmpfs {mount} || {{ echo MOUNT-FAILED; exit 0; }}
        {mlarch_cli} export {mount}/parquet; echo "rc=$?"
        mount -o remount,ro {mount} || {{ echo MOUNT-FAILED; exit 0; }}
        {mlarch_cli} export-bundle --model tiny-llama -o {mount}/b.tar; echo "rc=$?"
    """)
    assert done.stdout.split() == ["rc=1", "rc=1"], (done.stdout, done.stderr)
    full, read_only = done.stderr.strip().splitlines()
    assert full.startswith("Error: IO Error: Could not write file") and full.endswith(
        "No space left on device: free some space there, or choose another --archive or output path"), full
    assert read_only == (f"Error: {os.strerror(errno.EROFS)}: {mount}/b.tar.partial: "
                         "choose a writable --archive or output path"), read_only
