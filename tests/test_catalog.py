"""The catalog's connections: readers attach the file to one shared in-memory DuckDB per
process and detach it afterwards; a writer elsewhere makes them wait, then fail clearly."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mlarch.errors import MlarchError
from mlarch.store import catalog


@pytest.fixture()
def catalog_path(tmp_path):
    path = tmp_path / "catalog.duckdb"
    catalog.ensure_schema(path)
    return path


def count_runs(path) -> int:
    with catalog.reading(path) as con:
        return con.execute("SELECT count(*) FROM runs").fetchall()[0][0]


def test_readers_in_threads_and_nested_leave_nothing_attached(catalog_path):
    def nested(_):
        with catalog.reading(catalog_path) as outer:
            with catalog.reading(catalog_path) as inner:
                return (outer.execute("SELECT count(*) FROM schema_migrations").fetchall()[0][0],
                        inner.execute("SELECT count(*) FROM runs").fetchall()[0][0])

    with ThreadPoolExecutor(8) as pool:
        results = set(pool.map(nested, range(64)))
    assert results == {(catalog.latest_version(), 0)}
    assert catalog._READERS.attached == {}
    with catalog.writing(catalog_path) as con:  # the file is free for a writer in this process
        con.execute("CREATE TABLE scratch (x INTEGER)")
        con.execute("INSERT INTO scratch VALUES (1)")
    with catalog.reading(catalog_path) as con:  # and the next reader sees the write
        assert con.execute("SELECT x FROM scratch").fetchall() == [(1,)]


def test_two_catalogs_at_once_stay_apart(tmp_path):
    first, second = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    for path in (first, second):
        catalog.ensure_schema(path)
    with catalog.writing(second) as con:
        con.execute("CREATE TABLE only_in_b (x INTEGER)")
    with catalog.reading(first) as a, catalog.reading(second) as b:
        assert catalog.schema_version(a) == catalog.schema_version(b) == catalog.latest_version()
        assert b.execute("SELECT count(*) FROM only_in_b").fetchall() == [(0,)]
        with pytest.raises(Exception, match="only_in_b"):
            a.execute("SELECT count(*) FROM only_in_b").fetchall()


def test_a_writer_elsewhere_makes_readers_wait_then_fail_clearly(catalog_path, monkeypatch):
    hold = ("import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); print('held', flush=True); "
            "time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(catalog_path), "1.5"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        started = time.monotonic()
        assert count_runs(catalog_path) == 0  # waited for the writer to finish
        assert time.monotonic() - started > 0.2
    finally:
        holder.wait(timeout=30)
    monkeypatch.setattr(catalog, "_BUSY_WAIT_S", 0.5)
    holder = subprocess.Popen([sys.executable, "-c", hold, str(catalog_path), "5"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(MlarchError, match="another process may hold it for writing") as failed:
            count_runs(catalog_path)
        assert "\n" not in str(failed.value)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert catalog._READERS.attached == {}
    assert count_runs(catalog_path) == 0


def test_unreadable_or_missing_catalog(tmp_path):
    bad = tmp_path / "catalog.duckdb"
    bad.write_bytes(b"not duckdb" * 1000)
    with pytest.raises(MlarchError, match="cannot open catalog .*not a valid DuckDB"):
        count_runs(bad)
    assert bad.read_bytes() == b"not duckdb" * 1000
    with pytest.raises(MlarchError, match="no mlarch archive at .*missing: check the folder given to mlarch.open"):
        count_runs(tmp_path / "missing" / "catalog.duckdb")
    with pytest.raises(MlarchError, match="no mlarch archive at .*missing"):  # nor does a writer create it
        with catalog.writing(tmp_path / "missing" / "catalog.duckdb"):
            pass
    assert not (tmp_path / "missing").exists()


def test_a_reader_migrates_an_older_catalog_first(tmp_path):
    import duckdb

    path = tmp_path / "catalog.duckdb"
    con = duckdb.connect(str(path))  # schema version 0: what an interrupted first ensure_schema leaves
    con.execute("CREATE TABLE schema_migrations "
                "(version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)")
    con.close()
    assert count_runs(path) == 0  # migrated to the latest schema, then read
    with catalog.reading(path) as con:
        assert catalog.schema_version(con) == catalog.latest_version()
    assert catalog._READERS.attached == {}


FOREIGN = [
    ("tables, no schema_migrations", ["CREATE TABLE notes (x INTEGER)", "INSERT INTO notes VALUES (7)"],
     "it holds notes but no schema_migrations table"),
    ("another tool's schema_migrations", ["CREATE TABLE schema_migrations (version VARCHAR PRIMARY KEY)",
                                          "INSERT INTO schema_migrations VALUES ('20240101')"],
     "its schema_migrations table has columns version VARCHAR, not mlarch's"),
    ("rows that are not ours", ["CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
                                "applied_at TIMESTAMP NOT NULL)",
                                "INSERT INTO schema_migrations VALUES (1, 'create_users', now()::TIMESTAMP)",
                                "CREATE TABLE users (id INTEGER)"],
     "its schema_migrations lists version 1 as 'create_users', not mlarch's 'initial'"),
    ("our empty schema_migrations beside other tables",
     ["CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, "
      "applied_at TIMESTAMP NOT NULL)", "CREATE TABLE users (id INTEGER)"],
     "it holds users but no applied mlarch migration"),
]


@pytest.mark.parametrize("name,setup,why", FOREIGN, ids=[f[0] for f in FOREIGN])
def test_a_foreign_duckdb_file_is_refused_untouched(tmp_path, name, setup, why):
    import duckdb

    from mlarch.query.api import Archive

    path = tmp_path / "catalog.duckdb"
    con = duckdb.connect(str(path))
    for statement in setup:
        con.execute(statement)
    con.close()
    before = path.read_bytes()
    attempts = [lambda: count_runs(path), lambda: catalog.ensure_schema(path),
                lambda: Archive(tmp_path).sql("SELECT 1"), lambda: Archive(tmp_path).runs()]
    for attempt in attempts:
        with pytest.raises(MlarchError) as refused:
            attempt()
        assert str(refused.value) == (f"{path} is not an mlarch catalog ({why}): "
                                      "point mlarch.open(DIR) at an mlarch archive folder")
        assert path.read_bytes() == before
    assert catalog._READERS.attached == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.duckdb"]  # no WAL, no arrays.zarr


def test_reads_are_named_after_the_file(tmp_path):
    first, second = tmp_path / "a" / "catalog.duckdb", tmp_path / "b" / "catalog.duckdb"
    for path in (first, second):
        path.parent.mkdir()
        catalog.ensure_schema(path)
    with catalog.reading(first) as a, catalog.reading(second) as b:
        # one DuckDB per catalog file (sandboxed to it), so both keep the file's name
        assert a.execute("SELECT current_database()").fetchall() == [("catalog",)]
        assert b.execute("SELECT current_database()").fetchall() == [("catalog",)]
        assert a.execute("SELECT count(*) FROM catalog.main.runs").fetchall() == [(0,)]
        assert "catalog_2" not in {r[0] for r in a.execute("SELECT database_name FROM duckdb_databases()").fetchall()}


def test_a_writer_in_another_thread_waits_for_readers(catalog_path):
    import threading

    inside, release = threading.Event(), threading.Event()

    def reader():
        with catalog.reading(catalog_path) as con:
            con.execute("SELECT count(*) FROM runs").fetchall()
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=reader)
    thread.start()
    assert inside.wait(10)
    threading.Timer(0.3, release.set).start()
    with catalog.writing(catalog_path) as con:  # waits until the reader has detached
        con.execute("CREATE TABLE written (x INTEGER)")
    thread.join(10)
    assert catalog._READERS.attached == {}
    with catalog.reading(catalog_path) as con:
        assert con.execute("SELECT count(*) FROM written").fetchall() == [(0,)]


FORKED_READERS = """
import multiprocessing, sys
from pathlib import Path
from mlarch.store import catalog

path = Path(sys.argv[1])

def count(_):
    with catalog.reading(path) as con:
        return con.execute("SELECT count(*) FROM runs").fetchall()[0][0]

if __name__ == "__main__":
    count(0)  # the parent has a DuckDB instance now
    with multiprocessing.get_context("fork").Pool(2) as pool:
        print(pool.map_async(count, range(4), chunksize=1).get(timeout=30), count(0), flush=True)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_workers_read_after_the_parent_did(catalog_path, tmp_path):
    script = tmp_path / "forked_readers.py"
    script.write_text(FORKED_READERS)
    # a child that inherits (and closes) the parent's DuckDB instance hangs: time out instead
    done = subprocess.run([sys.executable, str(script), str(catalog_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[0, 0, 0, 0] 0"


def test_threads_reading_an_older_catalog_at_once_migrate_it_once(tmp_path):
    import threading

    import duckdb

    for trial in range(5):
        path = tmp_path / f"t{trial}" / "catalog.duckdb"
        path.parent.mkdir()
        con = duckdb.connect(str(path))  # schema version 0 (an interrupted first ensure_schema)
        con.execute("CREATE TABLE schema_migrations "
                    "(version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)")
        con.close()
        start = threading.Barrier(4)

        def first_read(n):
            start.wait(10)
            if n % 2:  # the sandbox of `mlarch sql` checks (and migrates) the schema the same way
                with catalog.sandboxed(path) as con:
                    return con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
            return count_runs(path)

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(first_read, range(4))) == [0, 0, 0, 0]
        assert catalog._READERS.attached == {}
