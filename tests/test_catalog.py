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
    with pytest.raises(MlarchError, match="no catalog at"):
        count_runs(tmp_path / "missing" / "catalog.duckdb")


def test_a_reader_migrates_an_older_catalog_first(tmp_path):
    import duckdb

    path = tmp_path / "catalog.duckdb"
    con = duckdb.connect(str(path))  # schema version 0: a DuckDB file without mlarch's tables
    con.execute("CREATE TABLE notes (x INTEGER)")
    con.close()
    assert count_runs(path) == 0  # migrated to the latest schema, then read
    with catalog.reading(path) as con:
        assert catalog.schema_version(con) == catalog.latest_version()
        assert con.execute("SELECT count(*) FROM notes").fetchall() == [(0,)]
    assert catalog._READERS.attached == {}
