"""A shared read-only archive on S3: `mlarch publish s3://BUCKET/PREFIX` uploads a consistent
snapshot of an archive's catalog next to its arrays, and `mlarch --archive s3://BUCKET/PREFIX`
(or `mlarch.open("s3://...")`) fetches it into the cache and reads the arrays in place.

In the bucket, beside the arrays (runs/, models/):
    PREFIX/published/manifest.json               which snapshot is current: sha256, size, schema
    PREFIX/published/catalog-<sha256>.duckdb     a checkpointed copy of catalog.duckdb

The snapshot goes up first and the manifest last, so a reader always finds the pair it
names (the previous snapshot is kept for readers still downloading it). Everything read back
is hostile: the manifest is checked field by field (a catalog key other than the one its
digest names, a schema newer than this mlarch, a size beyond MAX_CATALOG are refused), and the
download must have exactly the size and sha256 the manifest gives before it replaces the
cached copy. The manifest is read on every open (one small GET); the catalog is fetched again
only when its digest changed, or when the cached copy was touched since.

The cache folder ($MLARCH_CACHE/published/<16 hex of the URL>/) holds catalog.duckdb and
MARKER, the record of what was fetched; an archive folder holding MARKER is a snapshot, and
every writer refuses it (layout.refuse_snapshot): what it would change is the publisher's archive."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, Phrase, error
from mlarch.store import array_store, layout

FORMAT = "mlarch-published-archive"
FORMAT_VERSION = 1
FOLDER = "published"  # inside the arrays prefix
MANIFEST = f"{FOLDER}/manifest.json"
MARKER = layout.SNAPSHOT  # in a fetched copy's folder: this archive is read-only (layout.refuse_snapshot)
MAX_MANIFEST = 64 << 10  # bytes: a manifest is ~400
MAX_CATALOG = 64 << 30  # bytes a manifest may announce (catalogs of big sweeps are ~100 MB)
_BLOCK = 8 << 20
_SHA = re.compile(r"[0-9a-f]{64}")
_FIELDS = {"format", "format_version", "catalog", "sha256", "size", "schema_version", "arrays", "published_at",
           "mlarch_version"}


def catalog_key(sha256: str) -> str:
    """The snapshot object of a catalog with this digest (relative to the prefix)."""
    return f"{FOLDER}/catalog-{sha256}.duckdb"


# --- reading a published archive -----------------------------------------------------------
def resolve(path) -> Path:
    """The archive folder of --archive / mlarch.open: an s3:// URL's published archive,
    fetched into the cache (fetch), else layout.resolve (a folder; other URLs refused)."""
    chosen = path or os.environ.get("MLARCH_ARCHIVE")
    if chosen is not None and os.fspath(chosen).startswith("s3://"):
        return fetch(os.fspath(chosen))
    return layout.resolve(path)


def is_snapshot(root) -> bool:
    """Whether the archive folder `root` is a fetched copy of a published archive."""
    return os.path.lexists(Path(root) / MARKER)


def _snapshot_url(root: Path) -> str:
    """The URL a snapshot folder was fetched from, for messages (its record is ours, but may be
    damaged: then a placeholder)."""
    try:
        return array_store.parse(json.loads((root / MARKER).read_text()).get("url")).url
    except Exception:
        return "s3://..."


# --- publishing -----------------------------------------------------------------------------
def publish(root, url: str) -> dict:
    """Upload a consistent snapshot of the catalog of the archive at `root`, and then the
    manifest naming it, to `url`, which must be where the archive's arrays already are.
    Returns what was published (url, sha256, size, schema_version, runs)."""
    root = Path(root)
    target = array_store.parse(url, Arg("url", flag="publish"))  # Archive.publish(url) / `mlarch publish URL`
    catalog_path = root / layout.CATALOG
    if not catalog_path.exists():
        from mlarch.store import catalog

        raise catalog.missing_archive(root)
    if is_snapshot(root):
        raise UsageError(f"{root} is a fetched copy of {_snapshot_url(root)}, not an archive of its own: publish "
                         "from the archive it was published from")
    recorded = array_store.recorded(catalog_path)  # also checks (and migrates) the schema
    if recorded is None:
        raise error(UsageError, f"archive {root} keeps its arrays in its folder ({layout.ARRAYS}), where readers of "
                    f"{target.url} cannot reach them: publish an archive whose first ingest had ",
                    Arg("arrays", shown=target.url),
                    " (or move the runs there: export-bundle, then import-bundle into one)")
    if recorded != target.url:
        raise error(UsageError, f"archive {root} keeps its arrays at {recorded}, not {target.url}: publish it where "
                    "its arrays are (", Phrase(f"url={recorded!r}", f"mlarch --archive {root} publish {recorded}"), ")")
    store = array_store.of(root)  # probed: a missing bucket or refused credentials is one line
    store.probe(write=True)
    with tempfile.TemporaryDirectory(prefix="mlarch-publish-") as tmp:
        snapshot = Path(tmp) / layout.CATALOG
        _checkpointed_copy(root, catalog_path, snapshot)
        sha, size = _file_digest(snapshot)
        version, runs = _describe(snapshot)
        try:  # the snapshot readers may still be fetching: kept
            previous = _manifest(store, missing_ok=True)
        except MlarchError:  # a damaged or foreign manifest is replaced, not obeyed
            previous = None
        fs = array_store._filesystem()
        store._call(fs.put_file, str(snapshot), store._key(catalog_key(sha)))
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "catalog": catalog_key(sha), "sha256": sha,
                    "size": size, "schema_version": version, "arrays": store.url,
                    "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "mlarch_version": _version()}
        store._call(fs.pipe_file, store._key(MANIFEST), json.dumps(manifest, indent=1).encode())
    _drop_old_snapshots(store, keep={catalog_key(sha), *([previous["catalog"]] if previous else [])})
    return {"url": store.url, "sha256": sha, "size": size, "schema_version": version, "runs": runs}


def _checkpointed_copy(root: Path, catalog_path: Path, snapshot: Path) -> None:
    """Copy the catalog as one consistent state: no mlarch commit in between (the commit lock),
    and DuckDB's write-ahead log folded into the file (CHECKPOINT) by a connection that holds
    DuckDB's own lock for the copy, so no other process writes it meanwhile (`sql --write`)."""
    from mlarch.store import catalog

    with layout.commit_lock(root):
        con = catalog._connect(catalog_path, read_only=False)
        try:
            con.execute("CHECKPOINT")
            shutil.copyfile(catalog_path, snapshot)
        finally:
            con.close()


def _file_digest(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _describe(path: Path) -> tuple[int, int]:
    """(schema version, finished runs) of a catalog file, opened on its own read-only."""
    from mlarch.store import catalog

    con = catalog.confined(path)
    try:
        version = catalog.checked_version(con, path)
        runs = con.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0] if version else 0
        return version, runs
    finally:
        con.close()


def _drop_old_snapshots(store, keep: set[str]) -> None:
    """Remove snapshot objects other than `keep` (the new one and the one readers may still be
    fetching); a failure leaves them for the next publish."""
    fs = array_store._filesystem()
    try:
        found = store._call(fs.find, store._key(FOLDER) + "/")
    except (FileNotFoundError, MlarchError):
        return
    base = store.base + "/"
    doomed = [key for key in found if re.fullmatch(rf"{FOLDER}/catalog-[0-9a-f]{{64}}\.duckdb", key[len(base):])
              and key[len(base):] not in keep]
    if doomed:
        try:
            store._call(fs.rm, doomed)
        except MlarchError:
            pass


def _version() -> str:
    from mlarch import __version__

    return __version__


# --- fetching -------------------------------------------------------------------------------
def cache_folder(url: str) -> Path:
    """Where the fetched catalog of `url` is kept: $MLARCH_CACHE/published/<16 hex of the URL>."""
    from mlarch.cache import cache_dir

    return cache_dir() / FOLDER / hashlib.sha256(url.encode()).hexdigest()[:16]


def fetch(url: str) -> Path:
    """The local folder of the published archive at `url`: its catalog fetched into the cache
    (again only if the manifest names another snapshot, or the cached copy changed), checked
    by size and sha256 against the manifest, read-only (layout.refuse_snapshot). Arrays stay on S3: the
    catalog records their location."""
    store = array_store.parse(url, Arg("path", flag="--archive"))  # mlarch.open(path) / --archive
    manifest = _manifest(store)
    folder = cache_folder(store.url)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MlarchError(f"cannot create the cache folder {folder} ({exc.strerror or exc}): set MLARCH_CACHE to a "
                          "writable folder") from None
    with _fetch_lock(folder):
        if not _cached(folder, store.url, manifest):
            _download(store, manifest, folder)
    return folder


def _manifest(store, missing_ok: bool = False) -> dict | None:
    """The published manifest at `store`, checked field by field (None if absent and missing_ok)."""
    fs = array_store._filesystem()
    where = f"{store.url}/{MANIFEST}"
    try:
        # one ranged GET (no HEAD first): every open reads it; a huge object costs no more
        raw = store._call(fs.cat_file, store._key(MANIFEST), start=0, end=MAX_MANIFEST + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(UsageError, f"nothing is published at {store.url} (no {MANIFEST}): publish an archive there with ",
                    Phrase(f"mlarch.open(DIR).publish({store.url!r})", f"`mlarch --archive DIR publish {store.url}`")
                    ) from None
    if len(raw) > MAX_MANIFEST:
        raise _bad_manifest(where, f"it is over {MAX_MANIFEST:,} bytes")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad_manifest(where, "it is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _bad_manifest(where, f"it is not an mlarch manifest (format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{where} has manifest format {str(manifest.get('format_version'))[:20]!r}, which this "
                         f"mlarch does not read ({FORMAT_VERSION}): upgrade mlarch (pip install -U mlarch)")
    sha, size, version = manifest.get("sha256"), manifest.get("size"), manifest.get("schema_version")
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise _bad_manifest(where, "its sha256 is not 64 hex digits")
    if manifest.get("catalog") != catalog_key(sha):  # the only key a manifest may name: no path of its choosing
        raise _bad_manifest(where, f"its catalog is not {catalog_key(sha)}")
    if type(size) is not int or not 0 < size <= MAX_CATALOG:
        raise _bad_manifest(where, f"its size is not a number of bytes up to {MAX_CATALOG:,}")
    if type(version) is not int or version < 1:
        raise _bad_manifest(where, "its schema_version is not a positive integer")
    from mlarch.store import catalog

    if version > catalog.latest_version():
        raise UsageError(f"the archive published at {store.url} has schema version {version}, newer than this "
                         f"mlarch understands ({catalog.latest_version()}): upgrade mlarch (pip install -U mlarch)")
    if manifest.get("arrays") != store.url:
        raise _bad_manifest(where, f"it names arrays at {str(manifest.get('arrays'))[:120]!r}, not {store.url}")
    return {name: manifest[name] for name in _FIELDS if name in manifest}


def _bad_manifest(where: str, why: str) -> MlarchError:
    return error(MlarchError, f"the published manifest {where} is damaged ({why}): publish the archive again (",
                 Phrase("mlarch.open(DIR).publish(URL)", "`mlarch --archive DIR publish URL`"), ")")


def _cached(folder: Path, url: str, manifest: dict) -> bool:
    """Whether the folder holds the snapshot the manifest names, untouched since it was fetched."""
    try:
        record = json.loads((folder / MARKER).read_text())
        stat = (folder / layout.CATALOG).stat()
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("url") == url and record.get("sha256") == manifest["sha256"]
            and record.get("file") == [stat.st_size, stat.st_mtime_ns, stat.st_ino])


def _download(store, manifest: dict, folder: Path) -> None:
    """Fetch the manifest's snapshot into a temporary file, check size, sha256, schema and
    array location, then put it in place (and the record after it)."""
    fs = array_store._filesystem()
    source = f"{store.url}/{manifest['catalog']}"
    # the size is the manifest's word (up to MAX_CATALOG): never fill the disk to find out it lied
    free = shutil.disk_usage(folder).free
    if manifest["size"] * 2 + (64 << 20) > free:  # the download, then its migration's copy at worst
        raise MlarchError(f"the published catalog {source} is {manifest['size']:,} bytes and {folder} has "
                          f"{free:,} bytes free: free some space or set MLARCH_CACHE to another folder")
    partial = folder / f".fetch-{uuid.uuid4().hex[:8]}.duckdb"
    try:
        digest, size = hashlib.sha256(), 0
        try:
            with store._call(fs.open, store._key(manifest["catalog"]), "rb", block_size=_BLOCK) as handle, \
                    open(partial, "wb") as out:
                while size <= manifest["size"]:
                    block = store._call(handle.read, min(_BLOCK, manifest["size"] + 1 - size))
                    if not block:
                        break
                    digest.update(block)
                    out.write(block)
                    size += len(block)
        except FileNotFoundError:
            raise MlarchError(f"the published catalog {source} is missing (its manifest names it): publish the "
                              "archive again") from None
        if size != manifest["size"]:
            raise MlarchError(f"the published catalog {source} is {'more than ' if size > manifest['size'] else ''}"
                              f"{size:,} bytes, its manifest says {manifest['size']:,} (truncated or replaced): "
                              "publish the archive again")
        if digest.hexdigest() != manifest["sha256"]:
            raise MlarchError(f"the published catalog {source} does not match its manifest's sha256 (damaged or "
                              "replaced): publish the archive again")
        _check_snapshot(partial, source, store.url, manifest["schema_version"])
        target = folder / layout.CATALOG
        # marked read-only before a catalog is there, and "not fetched" until the record below
        _write_record(folder, {"url": store.url, "sha256": None})
        os.replace(partial, target)
        stat = target.stat()
        _write_record(folder, {"url": store.url, "sha256": manifest["sha256"],
                               "schema_version": manifest["schema_version"],
                               "published_at": manifest.get("published_at"),
                               "file": [stat.st_size, stat.st_mtime_ns, stat.st_ino]})
    except OSError as exc:
        raise MlarchError(f"cannot write the fetched catalog into {folder} ({exc.strerror or exc}): free some space "
                          "or set MLARCH_CACHE to another folder") from None
    finally:
        partial.unlink(missing_ok=True)


def _write_record(folder: Path, record: dict) -> None:
    """The MARKER file (what was fetched), replaced whole."""
    written = folder / f".record-{uuid.uuid4().hex[:8]}"
    written.write_text(json.dumps(record))
    os.replace(written, folder / MARKER)


def _check_snapshot(path: Path, source: str, url: str, version: int) -> None:
    """The downloaded file is an mlarch catalog of the manifest's schema version whose arrays
    are at `url` (an older schema is migrated here, in the cache copy)."""
    import duckdb

    from mlarch.store import catalog

    try:  # a file from elsewhere: its views and macros can reach no other file (catalog.confined)
        con = catalog.confined(path)
    except duckdb.Error as exc:
        raise MlarchError(f"the published catalog {source} is not a DuckDB file ({catalog._first_line(exc)}): "
                          "publish the archive again") from None
    try:
        actual = catalog.checked_version(con, path)
        location = con.execute("SELECT url FROM array_location").fetchall() if actual >= 6 else []
    except duckdb.Error as exc:
        raise MlarchError(f"the published catalog {source} cannot be read ({catalog._first_line(exc)}): publish the "
                          "archive again") from None
    finally:
        con.close()
    if actual != version:
        raise MlarchError(f"the published catalog {source} has schema version {actual}, its manifest says {version}: "
                          "publish the archive again")
    if location != [(url,)]:
        raise MlarchError(f"the published catalog {source} does not record its arrays at {url}: publish the archive "
                          "again from the archive whose arrays are there")
    if actual < catalog.latest_version():
        try:
            catalog.ensure_schema(path, confine=True)
        except (duckdb.Error, MlarchError) as exc:  # its own message names the temporary file and a local fix
            raise MlarchError(f"the published catalog {source} (schema {actual}) cannot be upgraded to schema "
                              f"{catalog.latest_version()} ({catalog._first_line(exc)[:200]}): publish the archive "
                              "again") from None
    try:  # its views (and macros) are the publisher's: this copy reads through mlarch's own
        con = catalog.confined(path, read_only=False)
        try:
            catalog.rebuild_views(con)
        finally:
            con.close()
    except duckdb.Error as exc:
        raise MlarchError(f"the published catalog {source} does not hold mlarch's tables (its views cannot be made "
                          f"over them: {catalog._first_line(exc)[:160]}): publish the archive again") from None


def _fetch_lock(folder: Path):
    """One fetch at a time per cached URL (processes sharing a cache)."""
    return layout.file_lock(folder / ".fetch.lock", "the fetch lock", "fetch published archives where files "
                            "can be locked (flock or Windows)")


__all__ = ["MANIFEST", "MARKER", "cache_folder", "catalog_key", "fetch", "is_snapshot", "publish", "resolve"]
