"""The DuckDB catalog: numbered migrations, short-lived connections, one writer at a time.

DuckDB lets one process write a file, and a read-write connection blocks every other
process from opening it. So nothing here keeps a catalog open: readers attach it read-only
for one query, writers open it read-write only for the final commit (MLflow-style
lifecycle). Readers share one in-memory DuckDB per catalog and process, sandboxed to that
file, and ATTACH the file to it: ~2 ms a read instead of ~20 ms for a new DuckDB instance
per connection.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from contextlib import ExitStack, contextmanager
from importlib import resources
from pathlib import Path

import duckdb

from mlarch.errors import MlarchError
from mlarch.wording import Phrase, error
from mlarch.store.rows import dicts  # noqa: F401 - catalog.dicts, as before (records.py shares it)

_MIGRATION_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
_BUSY_WAIT_S = 30.0  # a commit takes well under a second; wait this long before giving up


@functools.lru_cache(maxsize=1)
def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped in mlarch/schemas/migrations."""
    folder = resources.files("mlarch.schemas") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found)


def latest_version() -> int:
    """The schema version of the newest migration mlarch ships."""
    return migrations()[-1][0]


_SHAPE = """
    SELECT 'table ' || table_name || ': ' || string_agg(column_name || ' ' || data_type, ', ' ORDER BY column_index)
    FROM duckdb_columns() WHERE database_name = current_database() AND schema_name = 'main'
      AND table_name IN (SELECT table_name FROM duckdb_tables() WHERE database_name = current_database())
    GROUP BY table_name
    UNION ALL
    SELECT 'view ' || view_name || ': ' || sql FROM duckdb_views()
    WHERE database_name = current_database() AND schema_name = 'main' AND NOT internal
    UNION ALL  -- a macro may shadow a function the views call (list_contains -> true)
    SELECT 'function ' || function_name || ': ' || coalesce(macro_definition, function_type) FROM duckdb_functions()
    WHERE database_name = current_database() AND NOT internal
    UNION ALL
    SELECT 'schema ' || schema_name FROM duckdb_schemas() WHERE database_name = current_database() AND NOT internal
    UNION ALL
    SELECT 'sequence ' || sequence_name FROM duckdb_sequences() WHERE database_name = current_database()
    UNION ALL
    SELECT 'type ' || type_name FROM duckdb_types() WHERE database_name = current_database() AND NOT internal
"""


def replayed(then):
    """then(con) for an in-memory catalog made by every migration."""
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE schema_migrations "
                    "(version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)")
        for _, _, sql in migrations():
            con.execute(sql)
        return then(con)
    finally:
        con.close()


def _creation_order(con) -> tuple[str, ...]:
    """The CREATE VIEW statements of `con`'s views, in an order in which each binds (a view
    that a later migration made again comes after those made earlier that read it)."""
    pending = [r[0] for r in con.execute("SELECT sql FROM duckdb_views() WHERE NOT internal AND schema_name = 'main' "
                                         "ORDER BY view_oid").fetchall()]
    for (name,) in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'"
                               ).fetchall():
        con.execute(f"DROP VIEW {_name(name)}")
    order = []
    while pending:
        failed = []
        for sql in pending:
            try:
                con.execute(sql)
                order.append(sql)
            except duckdb.CatalogException:
                failed.append(sql)
        if len(failed) == len(pending):
            con.execute(failed[0])  # raises why: a migration bug
        pending = failed
    return tuple(order)


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[frozenset[str], tuple[str, ...], tuple[str, ...]]:
    """What the migrations make, from one replay: the shape (tables' columns and types, view
    definitions) that checks compare with; the CREATE VIEW statements in an order that binds
    (the migrations make no macro); every table, then every view, name, each sorted."""
    def read(con):
        shape = frozenset(r[0] for r in con.execute(_SHAPE).fetchall())
        names = tuple(r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database() "
            "AND table_schema = 'main' ORDER BY table_type, table_name").fetchall())
        return shape, _creation_order(con), names  # _creation_order last: it remakes the views

    return replayed(read)


def _reference_shape() -> frozenset[str]:
    """Tables (columns, types) and view definitions exactly as the migrations create them."""
    return _reference()[0]


def _reference_views() -> tuple[str, ...]:
    """The CREATE VIEW statement of every view the migrations leave, in an order that binds."""
    return _reference()[1]


def reference_names() -> tuple[str, ...]:
    """Every table, then every view, the migrations make (a new archive's), each sorted: names
    from mlarch's schema, never from a catalog file."""
    return _reference()[2]


def rebuild_views(con: duckdb.DuckDBPyConnection) -> None:
    """Replace every view and macro of the catalog behind `con` (read-write, at the latest
    schema) by the migrations' views, in one transaction: a published snapshot is someone
    else's file, and a view rewritten there (or a macro shadowing a function the views call)
    would change every number read through it. DuckDB errors pass (tables not mlarch's)."""
    con.execute("BEGIN TRANSACTION")
    try:
        for schema, name in con.execute("SELECT schema_name, view_name FROM duckdb_views() "
                                        "WHERE database_name = current_database() AND NOT internal").fetchall():
            con.execute(f"DROP VIEW {_name(schema)}.{_name(name)}")
        for schema, name, kind in con.execute(
                "SELECT DISTINCT schema_name, function_name, function_type FROM duckdb_functions() "
                "WHERE database_name = current_database() AND NOT internal").fetchall():
            con.execute(f"DROP MACRO {'TABLE ' if kind == 'table_macro' else ''}{_name(schema)}.{_name(name)}")
        for sql in _reference_views():
            con.execute(sql)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def schema_drift(con: duckdb.DuckDBPyConnection) -> list[str]:
    """How the catalog's tables and views differ from the migrations' (a view rewritten with
    `sql --write` would change every number read through it): empty when they do not."""
    actual = frozenset(r[0] for r in con.execute(_SHAPE).fetchall())
    reference = _reference_shape()
    return ([f"{item.split(':')[0]} altered or added" for item in sorted(actual - reference)] +
            [f"{item.split(':')[0]} missing or altered" for item in sorted(reference - actual)
             if item.split(":")[0] not in {a.split(":")[0] for a in actual}])


def _drift_or_none(con) -> list[str] | None:
    try:
        return schema_drift(con)
    except duckdb.Error:
        return None


def _connect(path: Path, read_only: bool, reach_files: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection of its own to the catalog, waiting while another holds its lock: confined
    to the file (see _CONFINED) unless `reach_files` (SQL a user wrote for `sql --write`)."""
    config = _NO_EXTENSIONS if reach_files else _CONFINED
    return _opening(path, lambda: duckdb.connect(str(path), read_only=read_only, config=dict(config)))


def _opening(path: Path, open_it):
    """open_it(), retried while another process holds the catalog's lock; clear errors."""
    deadline = time.monotonic() + _BUSY_WAIT_S
    while True:
        try:
            return open_it()
        except (duckdb.ConnectionException, duckdb.ResourceInUseException) as exc:
            busy = exc, "another thread of this process is using it"  # e.g. a reader while we write
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():  # not a valid file, permissions, ...
                raise error(MlarchError, f"cannot open catalog {path}: {_first_line(exc)}: check the file, or point ",
                            Phrase("mlarch.open(DIR)", "--archive"), " elsewhere") from None
            busy = exc, "another process may hold it for writing"
        except duckdb.Error as exc:
            raise _unreadable(path, exc) from None
        if time.monotonic() > deadline:
            raise MlarchError(
                f"cannot open catalog {path}: {_first_line(busy[0])}; {busy[1]}: retry when it has finished"
            ) from None
        time.sleep(0.05)


def _unreadable(path: Path, exc: BaseException) -> MlarchError:
    return error(MlarchError, f"catalog {path} is not a readable DuckDB file ({_first_line(exc)}): "
                 "restore it from a copy or point ", Phrase("mlarch.open(DIR)", "--archive"), " elsewhere")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version of the catalog behind `con` (0: no migration applied yet)."""
    has_table = con.execute(  # in this connection's database only (readers see several)
        "SELECT count(*) FROM duckdb_tables() "
        "WHERE table_name = 'schema_migrations' AND database_name = current_database()"
    ).fetchall()[0][0]
    if not has_table:
        return 0
    return con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0][0]


_MIGRATIONS_COLUMNS = [("version", "INTEGER"), ("name", "VARCHAR"), ("applied_at", "TIMESTAMP")]


def checked_version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The schema version of the catalog `con` uses, after making sure that the file is an
    mlarch catalog (an empty DuckDB file counts as one at version 0) of a schema this mlarch
    understands: a foreign DuckDB file must never be migrated in place."""
    names = [row[0] for row in con.execute(
        "SELECT CASE WHEN schema_name = 'main' THEN table_name ELSE schema_name || '.' || table_name END "
        "FROM duckdb_tables() WHERE database_name = current_database() UNION ALL "
        "SELECT CASE WHEN schema_name = 'main' THEN view_name ELSE schema_name || '.' || view_name END "
        "FROM duckdb_views() WHERE database_name = current_database() AND NOT internal ORDER BY 1").fetchall()]
    if "schema_migrations" not in names:
        if names:
            raise _foreign(path, f"it holds {_few(names)} but no schema_migrations table")
        return 0
    columns = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = 'schema_migrations' ORDER BY column_index").fetchall()
    if [tuple(c) for c in columns] != _MIGRATIONS_COLUMNS:
        raise _foreign(path, "its schema_migrations table has columns "
                             f"{_few([f'{n} {t}' for n, t in columns])}, not mlarch's")
    ours = {version: name for version, name, _ in migrations()}
    applied = con.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    for version, name in applied:
        if version > latest_version():
            continue  # a newer mlarch's: refused below as newer
        if ours.get(version) != name:
            expected = f"mlarch's {ours[version]!r}" if version in ours else "no mlarch migration"
            raise _foreign(path, f"its schema_migrations lists version {version} as {str(name)[:40]!r}, "
                                 f"not {expected}")
    current = applied[-1][0] if applied else 0
    if current == 0 and len(names) > 1:  # ours creates its tables in the same transaction as the first row
        raise _foreign(path, f"it holds {_few([n for n in names if n != 'schema_migrations'])} "
                             "but no applied mlarch migration")
    _check_not_newer(path, current, latest_version())
    return current


def _foreign(path: Path, why: str) -> MlarchError:
    return error(MlarchError, f"{path} is not an mlarch catalog ({why}): point ",
                 Phrase("mlarch.open(DIR)", "--archive"), " at an mlarch archive folder")


def _few(names: list[str]) -> str:
    """A few names read from a foreign file, printable and short."""
    shown = ", ".join("".join(c if c.isprintable() else "?" for c in str(n)[:40]) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def missing_archive(root: Path) -> MlarchError:
    """The error for a path that holds no archive (reading one never creates it)."""
    hint = " (that is a file: pass the folder that holds catalog.duckdb)" if root.is_file() else ""
    return error(MlarchError, f"no mlarch archive at {root}{hint}: check ",
                 Phrase("the folder given to mlarch.open", "--archive"), " (or MLARCH_ARCHIVE); ",
                 Phrase("Archive.ingest or Archive.import_bundle", "`mlarch ingest` or `mlarch import-bundle`"),
                 " creates one")


def _seal_records(con) -> None:
    from mlarch.store import records  # only when migrating an old catalog

    records.seal(con)


def _place_analyses(con) -> None:
    from mlarch.store import analyses  # only when migrating an old catalog

    analyses.place_legacy(con)


# Python steps of migrations, run right after that version's SQL.
_AFTER_SQL = {2: _seal_records, 4: _place_analyses}


def ensure_schema(path: Path, confine: bool = False) -> int:
    """Create the catalog or apply pending migrations; refuse a newer schema or a DuckDB file
    that is not an mlarch catalog (left untouched). Returns the version. Its connections reach
    no other file either way; `confine`: a file fetched from elsewhere, opened without waiting
    for a lock (see confined())."""
    known = latest_version()
    connect = confined if confine else _connect
    if path.exists():
        con = connect(path, read_only=True)
        try:
            current = checked_version(con, path)
        finally:
            con.close()
        if current == known:
            return current
    con = connect(path, read_only=False)
    try:
        checked_version(con, path)  # again: the file may have changed since the read-only look
        con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
        )
        current = schema_version(con)
        _check_not_newer(path, current, known)
        for version, name, sql in migrations():
            if version <= current:
                continue
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(sql)
                if version in _AFTER_SQL:  # a step SQL cannot express, in the same transaction
                    _AFTER_SQL[version](con)
                con.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, now()::TIMESTAMP)", [version, name]
                )
                con.execute("COMMIT")
            except Exception as exc:
                con.execute("ROLLBACK")
                if isinstance(exc, duckdb.PermissionException):
                    raise _reaches_outside(path, exc) from None
                if isinstance(exc, duckdb.Error):  # e.g. schema_migrations edited to forget a migration
                    raise MlarchError(
                        f"cannot migrate catalog {path} to schema version {version} ({_first_line(exc)}): its "
                        "schema_migrations table does not match its tables; restore the catalog from a copy"
                    ) from None
                raise
        return known
    finally:
        con.close()


def _check_not_newer(path: Path, current: int, known: int) -> None:
    if current > known:
        raise MlarchError(
            f"archive catalog {path} has schema version {current}, newer than this mlarch "
            f"understands ({known}): upgrade mlarch (pip install -U mlarch)"
        )


_CHECKED: set[str] = set()  # catalogs whose schema this process has already checked


class _Readers:
    """Per process, one in-memory DuckDB per catalog file, sandboxed to that file (SANDBOX_PATHS:
    a view or macro in the file, which nobody vetted, can read no other file and load no
    extension); the catalog is attached to it read-only while at least one reader uses it,
    then detached, which releases the file lock so that writers in other processes are never
    blocked for long. The lock guards only bookkeeping: an ATTACH that waits for another
    process's writer blocks no other reader."""

    def __init__(self):
        self.lock = threading.Lock()
        self.hosts: dict[str | None, duckdb.DuckDBPyConnection] = {}  # resolved path (None: no file) -> instance
        self.users = 0  # cursors handed out and not closed yet
        self.attached: dict[str, _Attachment] = {}  # resolved path -> attachment

    def cursor(self, key: str | None = None) -> duckdb.DuckDBPyConnection:
        """A connection of its own (thread-safe) to the instance that may read the catalog at
        `key` (None: one that reads no file); release() it."""
        with self.lock:
            host = self.hosts.get(key)
            if host is None:
                host = self.hosts[key] = _sandboxed_instance([] if key is None else [key + s for s in _OWN_FILES])
            self.users += 1
            return host.cursor()

    def release(self, cursor: duckdb.DuckDBPyConnection) -> None:
        cursor.close()
        with self.lock:
            self.users = max(0, self.users - 1)  # a cursor from before a fork counts for nothing

    def attach(self, key: str, path: Path) -> str:
        """Alias of the catalog at `key` (resolved `path`), attached for one more reader."""
        while True:
            with self.lock:
                entry = self.attached.get(key)
                if entry is None:  # this thread attaches it; others wait for the outcome
                    alias = path.stem if path.stem not in _RESERVED else f"{path.stem}_2"
                    entry = self.attached[key] = _Attachment(alias)
                    break
                if entry.ready.is_set():
                    entry.readers += 1
                    return entry.alias
            entry.ready.wait()  # then look again: attached, or that attempt failed
        cursor = self.cursor(key)
        try:
            quoted = key.replace("'", "''")
            _opening(path, lambda: cursor.execute(f"ATTACH '{quoted}' AS {_name(entry.alias)} (READ_ONLY)"))
        except BaseException:
            with self.lock:
                del self.attached[key]
            entry.ready.set()
            raise
        finally:
            self.release(cursor)
        with self.lock:
            entry.readers += 1
            entry.ready.set()
        return entry.alias

    def detach(self, key: str) -> None:
        with self.lock:
            entry = self.attached.get(key)
            if entry is None:  # attached before a fork, by the parent
                return
            entry.readers -= 1
            if entry.readers == 0:
                del self.attached[key]
                self.hosts[key].execute(f"DETACH {_name(entry.alias)}")

    def before_fork(self) -> None:
        """Fork with no DuckDB instance where possible: a child cannot use or even close
        the parent's (its threads are gone), so only a new one serves the child."""
        self.lock.acquire()
        if self.users == 0 and not self.attached:
            for host in self.hosts.values():
                host.close()
            self.hosts.clear()

    def after_fork_in_parent(self) -> None:
        self.lock.release()

    def after_fork_in_child(self) -> None:
        if self.hosts:  # readers were busy in another thread: never touch them
            import ctypes  # here only: ~3 ms of every CLI call's start-up otherwise

            for host in self.hosts.values():
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(host))  # never freed, not even at exit
        self.lock = threading.Lock()
        self.hosts, self.users, self.attached = {}, 0, {}


class _Attachment:
    def __init__(self, alias: str):
        self.alias, self.readers, self.ready = alias, 0, threading.Event()


_RESERVED = {"memory", "system", "temp", "main"}


def _name(alias: str) -> str:
    return '"' + alias.replace('"', '""') + '"'


_READERS = _Readers()
_SCHEMA_LOCKS: dict[str, threading.Lock] = {}  # per catalog: one thread checks (and migrates) its schema
_SCHEMA_LOCKS_LOCK = threading.Lock()


def _schema_lock(key: str) -> threading.Lock:
    with _SCHEMA_LOCKS_LOCK:
        return _SCHEMA_LOCKS.setdefault(key, threading.Lock())


def _after_fork_in_child() -> None:
    global _SCHEMA_LOCKS_LOCK
    _READERS.after_fork_in_child()
    _SCHEMA_LOCKS_LOCK = threading.Lock()  # another thread may have held one at the fork
    _SCHEMA_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_READERS.before_fork, after_in_parent=_READERS.after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def statements(query: str):
    """The SQL statements in `query`, parsed by DuckDB (no catalog needed)."""
    cursor = _READERS.cursor()
    try:
        return cursor.extract_statements(query)
    finally:
        _READERS.release(cursor)


@contextmanager
def reading(path: Path):
    """A read-only connection to the catalog for one use, closed (and the file detached)
    afterwards. The first one per catalog and process also checks the schema version (and
    migrates an older catalog)."""
    path = _existing(path)
    key = str(path.resolve())
    with ExitStack() as stack:
        con = None
        if key not in _CHECKED:
            # waited for with nothing of ours attached: a migration needs the file to itself
            with _schema_lock(key):
                if key not in _CHECKED:
                    with _attached(key, path) as check:
                        current = checked_version(check, path)
                        if current == latest_version():  # keep the attachment: no second ATTACH
                            con = stack.enter_context(_attached(key, path))
                    if current < latest_version():
                        ensure_schema(path)  # migrate (read-write)
                    _CHECKED.add(key)
        if con is None:
            con = stack.enter_context(_attached(key, path))
        yield con


@contextmanager
def _attached(key: str, path: Path):
    alias = _READERS.attach(key, path)
    try:
        con = _READERS.cursor(key)
        try:
            con.execute(f"USE {_name(alias)}")
            yield con
        except duckdb.PermissionException as exc:
            raise _reaches_outside(path, exc) from None
        except (duckdb.CatalogException, duckdb.BinderException) as exc:
            drift = _drift_or_none(con)  # a table or column of ours gone: the file was edited, not mlarch wrong
            if not drift:
                raise
            raise error(MlarchError, f"catalog {path} differs from mlarch's schema ({'; '.join(drift[:2])}) and "
                        f"a read failed ({_first_line(exc)[:120]}): the catalog was altered; restore it from a copy "
                        "(a published archive: publish it again)") from None
        finally:
            _READERS.release(con)
    finally:
        _READERS.detach(key)


def _reaches_outside(path: Path, exc: duckdb.PermissionException) -> MlarchError:
    """The sandbox held: say so, without DuckDB's SQL excerpt."""
    return error(MlarchError, f"catalog {path} holds a view or macro that reaches outside the file "
                 f"({_first_line(exc)[:200]}): the catalog was altered; ",
                 Phrase("Archive.verify()", "`mlarch verify`"), " lists what differs; restore the catalog "
                 "from a copy (a published archive: publish it again)")


def _existing(path) -> Path:
    path = Path(path)
    if not path.exists():  # ATTACH would say less, and a connection would create the file
        raise missing_archive(path.parent)
    return path


# The sandbox of SQL a user typed (`mlarch sql` without --write): no file but the catalog
# (read_csv, COPY ... TO, ATTACH, EXPORT), no extension installed or loaded (no network),
# and no SET / PRAGMA that could undo this or write a profile. Statement checks in
# mlarch.query.api come first; this holds whatever they miss.
SANDBOX = {"enable_external_access": False, "autoinstall_known_extensions": False,
           "autoload_known_extensions": False, "lock_configuration": True}


# The files DuckDB keeps for a database: after a killed writer, a reader replays the WAL and
# may find its checkpoint and recovery files.
_OWN_FILES = ("", ".wal", ".wal.checkpoint", ".wal.recovery")

# What every connection to a catalog mlarch did not just create gets: no extension installed
# or loaded behind its back (a view reading an http:// URL would fetch httpfs), and no file but
# the catalog's own (a view calling read_text('/home/...') reads nothing). Set in this order:
# DuckDB takes allowed_paths only from a started database, and none once access is off.
_NO_EXTENSIONS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
# A connection to the file itself (writers, migrations, fetched snapshots): the same, with no
# file but its own. Writers too: a macro in the file named like a built-in they call (now())
# takes its place, and what it read would be written into the catalog.
_CONFINED = {**_NO_EXTENSIONS, "enable_external_access": False}


def _sandboxed_instance(allowed: list[str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can open only the files in `allowed` (exact paths)."""
    con = duckdb.connect(config=dict(_NO_EXTENSIONS))
    try:
        if allowed:
            con.execute("SET allowed_paths = [" + ", ".join("'" + p.replace("'", "''") + "'" for p in allowed) + "]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def confined(path: Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection of its own to the catalog file at `path` that reads no other file and
    loads no extension: for files fetched from elsewhere (a published snapshot, which only its
    fetcher opens: no waiting for a lock, and DuckDB's own errors for the caller to word)."""
    return duckdb.connect(str(path), read_only=read_only, config=dict(_CONFINED))


@contextmanager
def exporting(path: Path, folder: Path):
    """A read-only connection of its own to the catalog that may write files into `folder`
    (COPY ... TO) and reach nothing else; checks (and migrates) the schema like reading()."""
    path = _existing(path)
    with reading(path):
        pass
    con = _opening(path, lambda: duckdb.connect(str(path), read_only=True, config=dict(_NO_EXTENSIONS)))
    try:
        # as given and resolved: DuckDB compares the path strings it is handed
        allowed = {str(Path(folder).absolute()), str(Path(folder).resolve())}
        con.execute("SET allowed_directories = [" + ", ".join("'" + d.replace("'", "''") + "/'" for d in allowed) + "]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        yield con
    finally:
        con.close()


def _open_sandboxed(path: Path) -> duckdb.DuckDBPyConnection:
    return _opening(path, lambda: duckdb.connect(str(path), read_only=True, config=dict(SANDBOX)))


@contextmanager
def sandboxed(path: Path):
    """A read-only connection of its own to the catalog that can reach nothing else (SANDBOX),
    closed afterwards; checks (and migrates) the schema like reading(). Its DuckDB instance
    costs about what the shared reader's first use does, so a CLI call pays nothing extra;
    repeated calls in one process pay it each time (tens of ms, vs ~2 ms for an ATTACH)."""
    path = _existing(path)
    key = str(path.resolve())
    if key in _CHECKED:
        con = _open_sandboxed(path)
    else:
        with _schema_lock(key):  # opened under the lock: a migration elsewhere needs the file to itself
            con = _open_sandboxed(path)
            if key not in _CHECKED:
                try:
                    current = checked_version(con, path)
                    if current < latest_version():
                        con.close()
                        ensure_schema(path)
                        con = _open_sandboxed(path)
                except BaseException:
                    con.close()
                    raise
                _CHECKED.add(key)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def writing(path: Path, reach_files: bool = False):
    """A read-write connection inside one transaction: all of it commits, or none. It reaches
    no file but the catalog's own unless `reach_files` (SQL a user wrote for `sql --write`)."""
    path = _existing(path)  # never creates a catalog: ensure_schema() does
    from mlarch.store.layout import refuse_snapshot

    refuse_snapshot(path.parent)  # a fetched copy of a published archive is read-only
    if str(path.resolve()) not in _CHECKED:  # never writes to a foreign or newer catalog
        with reading(path):
            pass
    con = _connect(path, read_only=False, reach_files=reach_files)
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException as exc:
            con.execute("ROLLBACK")
            if isinstance(exc, duckdb.PermissionException) and not reach_files:
                raise _reaches_outside(path, exc) from None
            raise
        con.execute("COMMIT")
    finally:
        con.close()


_INTEGER = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
            "UBIGINT"}


def _dtype(duck: str):
    """polars dtype for a DuckDB column type (None: let polars infer)."""
    import polars as pl

    if duck.endswith("[]"):
        inner = _dtype(duck[:-2])
        return pl.List(inner) if inner is not None else None
    if duck in _INTEGER:
        return pl.Int64
    if duck in {"DOUBLE", "FLOAT"} or duck.startswith("DECIMAL"):
        return pl.Float64
    if duck in {"VARCHAR", "JSON", "UUID"}:
        return pl.Utf8
    if duck == "BOOLEAN":
        return pl.Boolean
    if duck == "TIMESTAMP":
        return pl.Datetime("us")
    if duck == "DATE":
        return pl.Date
    return None


def _plain(value):
    from decimal import Decimal

    if isinstance(value, Decimal):  # HUGEINT sums and DECIMALs
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def frame(con: duckdb.DuckDBPyConnection, query: str, params=None):
    """Run one statement and return its rows as a polars DataFrame (empty if none).

    Rows go through Python rather than Arrow: catalog results are small, and skipping the
    pyarrow round trip saves ~0.25 s of a CLI call's start-up."""
    import polars as pl

    result = con.execute(query, params)
    if result.description is None:
        return pl.DataFrame()
    columns = [(d[0], str(d[1])) for d in result.description]
    rows = [[_plain(v) for v in row] for row in result.fetchall()]
    schema = {}
    for name, duck in columns:
        schema[name] = _dtype(duck)
    if all(dtype is not None for dtype in schema.values()):
        return pl.DataFrame(rows, schema=schema, orient="row")
    frame = pl.DataFrame(rows, schema=[name for name, _ in columns], orient="row", infer_schema_length=None)
    return frame.with_columns(pl.col(name).cast(dtype) for name, dtype in schema.items() if dtype is not None)
