"""Portable bundles: runs with their arrays, catalog rows and a manifest of digests in one
tar file, and Parquet export of every table and view for other engines.

This is how results computed on a GPU cluster reach a laptop: `export_bundle` there,
`import_bundle` here (every digest verified; a tampered bundle is refused whole).

A bundle is hostile until proven otherwise. Import reads the manifest (size-capped), checks
every row against the archive's own schema and layout, then checks every member's name,
type and declared size against what the manifest's arrays can occupy, all before a byte is
written; only then are members copied (size-limited, exclusive create) into a staging folder
inside the archive, their digests verified, and the arrays moved into place. Nothing a
bundle says can make mlarch write, remove or run anything outside the archive folder."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import tarfile
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import mlarch
from mlarch.errors import MlarchError
from mlarch.store import arrays, catalog, layout, records
from mlarch.store.derive import current_runs, derive, replace_derived
from mlarch.store.spans import read_spans

FORMAT = "mlarch-bundle"
VERSION = 2  # 2: rows carry record digests (schema 2), which import requires
TABLES = ("models", "modules", "runs", "run_samples", "arrays")
VIEWS = ("set_sizes", "overlap_by_module", "overlap_by_layer", "overlap_global", "language_unique")

MANIFEST = "manifest.json"
MANIFEST_LIMIT = 64 << 20  # ~2,000 runs of 1,000 samples; export refuses a larger one too
META_LIMIT = 64 << 10  # an array's zarr.json: ~600 bytes as mlarch writes it
# Largest stored chunk over its raw bytes (zarr stores the edge chunk padded to full size):
# measured worst case 20 bytes (blosc header 16 + crc32c 4) for incompressible data of every
# dtype and length tried; the rest is margin.
CHUNK_OVERHEAD = 64
DISK_MARGIN = 64 << 20  # free space left over after an import
DTYPES = {"magnitudes": "<f4", "norms": "<f4", "levels": "|u1"}  # what ingest writes
CODECS = ("bytes", "blosc", "crc32c")
# the columns this module reads from a bundle's rows, by the type it needs (the other
# columns only pass through, as parameters, to INSERT)
_TEXT = {"models": ("model", "weights_sha256", "magnitudes_group"), "modules": ("model",),
         "runs": ("run_id", "model", "lang", "role", "status", "arrays_group"), "run_samples": ("run_id",),
         "arrays": ("path", "owner", "kind", "dtype", "sha256")}
_INT = {"runs": ("seed",), "run_samples": ("position", "item_index")}
REQUIRED = {t: {*_TEXT[t], *_INT.get(t, ()), *(("shape", "nbytes") if t == "arrays" else ())} for t in TABLES}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class _Bad(MlarchError):
    """Rows or members that are not what mlarch writes; callers say whose they are."""


def _plain(value):
    if isinstance(value, (datetime, date)):
        return {"$ts": value.isoformat()}
    if isinstance(value, Decimal):
        return int(value)
    return value


def _restore(value):
    if isinstance(value, dict) and set(value) == {"$ts"}:
        try:
            return datetime.fromisoformat(value["$ts"])
        except (TypeError, ValueError):
            raise _Bad(f"timestamp {str(value['$ts'])[:40]!r} is not ISO 8601") from None
    return value


def _rows(con, query: str, params) -> dict:
    result = con.execute(query, params)
    columns = [d[0] for d in result.description]
    return {"columns": columns, "rows": [[_plain(v) for v in row] for row in result.fetchall()]}


def _dicts(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], row)) for row in table["rows"]]


def _check_rows(tables: dict[str, list[dict]]) -> dict[str, dict]:
    """Check that every run, model and array row is laid out as mlarch lays them out (ids,
    groups, array paths, dtypes, shapes, digests); returns the array rows by path."""
    for table, rows in tables.items():
        for column in _TEXT.get(table, ()):
            if any(not isinstance(row[column], str) for row in rows):
                raise _Bad(f"a value of {table}.{column} is not text")
        for column in _INT.get(table, ()):
            if any(type(row[column]) is not int for row in rows):
                raise _Bad(f"a value of {table}.{column} is not an integer")
    runs = {}
    for run in tables["runs"]:
        run_id = run["run_id"]
        if run["arrays_group"] != layout.run_arrays_group(run_id):  # raises for a malformed id
            raise layout.UnsafePath(f"run {run_id}: arrays_group {str(run['arrays_group'])[:120]!r} is not "
                                    f"{layout.run_group(run_id)!r}")
        if run_id in runs:
            raise _Bad(f"run {run_id} appears twice")
        runs[run_id] = run
    models = {}
    for model in tables["models"]:
        name = model["model"]
        if not name or name in models:
            raise _Bad(f"model name {name[:80]!r} is empty or repeated")
        if model["magnitudes_group"] != layout.model_group(name):
            raise layout.UnsafePath(f"model {name!r}: magnitudes_group {str(model['magnitudes_group'])[:120]!r} "
                                    f"is not {layout.model_group(name)!r}")
        models[name] = model
    by_path, kinds = {}, {}
    for record in tables["arrays"]:
        owner, kind, path = record["owner"], record["kind"], record["path"]
        if owner in runs and kind in layout.RUN_ARRAYS:
            expected = layout.array_path(layout.run_group(owner), kind)
        elif owner in models and kind in layout.MODEL_ARRAYS:
            expected = layout.array_path(layout.model_group(owner), kind)
        else:
            raise _Bad(f"array {str(path)[:120]!r}: owner {str(owner)[:80]!r} with kind {str(kind)[:20]!r} "
                       "is no run or model of it")
        if path != expected:
            raise layout.UnsafePath(f"array of {owner} ({kind}) at {str(path)[:120]!r}, not {expected!r}")
        if path in by_path:
            raise _Bad(f"array {path} appears twice")
        shape = record["shape"]
        if (record["dtype"] != DTYPES[kind] or not isinstance(shape, list) or len(shape) != 1
                or type(shape[0]) is not int or not 0 <= shape[0] < 1 << 48
                or record["nbytes"] != shape[0] * int(DTYPES[kind][2:])):
            raise _Bad(f"array {path}: dtype {record['dtype']!r}, shape {str(shape)[:40]} and nbytes "
                       f"{str(record['nbytes'])[:20]} are not those of a 1-D {DTYPES[kind]} array")
        chunks, meta = record.get("chunk_sha256"), record.get("meta_sha256")  # absent before schema 2
        if chunks is not None and (not isinstance(chunks, list) or len(chunks) != arrays.n_chunks((shape[0],))):
            raise _Bad(f"array {path}: its chunk digests do not match its chunks")
        if not all(isinstance(d, str) and _SHA256.fullmatch(d)
                   for d in (record["sha256"], *([] if meta is None else [meta]), *(chunks or []))):
            raise _Bad(f"array {path}: a digest of it is not a sha256 hex digest")
        by_path[path] = record
        kinds.setdefault(owner, set()).add(kind)
    for run_id, run in runs.items():
        if run["status"] != "FINISHED" or run["model"] not in models:
            raise _Bad(f"run {run_id} is not a FINISHED run of a model in the bundle")
        if kinds.get(run_id) != set(layout.RUN_ARRAYS):
            raise _Bad(f"run {run_id} lacks its norms or levels array")
    for name in models:
        if kinds.get(name) != set(layout.MODEL_ARRAYS):
            raise _Bad(f"model {name!r} lacks its magnitudes array")
    if any(m["model"] not in models for m in tables["modules"]) or any(
            s["run_id"] not in runs for s in tables["run_samples"]):
        raise _Bad("modules or run_samples rows belong to no model or run of it")
    return by_path


def _member_names(record: dict) -> dict[str, int]:
    """Tar member name -> the most bytes it may hold, for one array (zarr v3, 1-D)."""
    n = record["shape"][0]
    chunk = arrays.chunks_for((n,))[0]
    base = f"arrays/{record['path']}"
    names = {f"{base}/zarr.json": META_LIMIT}
    for index in range(arrays.n_chunks((n,))):
        names[f"{base}/c/{index}"] = chunk * int(DTYPES[record["kind"]][2:]) + CHUNK_OVERHEAD
    return names


def export_bundle(root: Path, out: Path, run_ids: list[str] | None = None, model: str | None = None) -> dict:
    """Write the finished runs (given, or all of `model`) to the tar file `out`."""
    with catalog.reading(root / layout.CATALOG) as con:
        if model is not None:
            ids = [r[0] for r in con.execute(
                "SELECT run_id FROM runs WHERE model = ? AND status = 'FINISHED' ORDER BY started_at", [model]).fetchall()]
            if not ids:
                raise MlarchError(f"model {model!r} has no finished runs to export (see `mlarch models`)")
        else:
            ids = list(run_ids or [])
            found = {r[0] for r in con.execute(
                "SELECT run_id FROM runs WHERE status = 'FINISHED' AND list_contains(?, run_id)", [ids]).fetchall()}
            missing = [rid for rid in ids if rid not in found]
            if missing or not ids:
                raise MlarchError(f"no finished run {', '.join(missing) or '(none given)'} in {root} (see `mlarch runs`)")
        models = sorted({r[0] for r in con.execute(
            "SELECT DISTINCT model FROM runs WHERE list_contains(?, run_id)", [ids]).fetchall()})
        tables = {
            "models": _rows(con, "SELECT * FROM models WHERE list_contains(?, model)", [models]),
            "modules": _rows(con, "SELECT * FROM modules WHERE list_contains(?, model) ORDER BY model, position", [models]),
            "runs": _rows(con, "SELECT * FROM runs WHERE list_contains(?, run_id)", [ids]),
            "run_samples": _rows(con, "SELECT * FROM run_samples WHERE list_contains(?, run_id)", [ids]),
            "arrays": _rows(con, "SELECT * FROM arrays WHERE list_contains(?, owner) OR list_contains(?, owner)",
                            [ids, models]),
        }
    try:  # the catalog is read like a bundle: an edited row must not lead the export elsewhere
        records_by_path = _check_rows({name: [{c: _restore(v) for c, v in row.items()} for row in _dicts(t)]
                                       for name, t in tables.items()})
        files = [(name, layout.checked_group(root, record["path"], record["path"]).joinpath(
                  *name[len(f"arrays/{record['path']}/"):].split("/")))
                 for record in records_by_path.values() for name in _member_names(record)]
    except MlarchError as exc:
        raise MlarchError(f"catalog of {root}: {exc}: set the row back (`mlarch sql --write`) or restore the "
                          "catalog from a copy; nothing was exported") from None
    manifest = {"format": FORMAT, "version": VERSION, "mlarch": mlarch.__version__,
                "exported_at": datetime.now().isoformat(), "run_ids": ids, "models": models, "tables": tables}
    data = json.dumps(manifest, indent=1).encode()
    if len(data) > MANIFEST_LIMIT:
        raise MlarchError(f"the manifest of {len(ids)} runs is {len(data) >> 20} MiB, over the {MANIFEST_LIMIT >> 20} "
                          "MiB a bundle may hold: export fewer runs per bundle")
    out = Path(out)
    if out.suffix != ".tar":
        raise MlarchError(f"bundle file {out} must end in .tar")
    partial = out.with_name(out.name + ".partial")
    try:
        with tarfile.open(partial, "w") as tar:  # plain tar: chunks are compressed already
            _add(tar, MANIFEST, io.BytesIO(data), len(data))
            for name, source in files:  # regular files only, named exactly as import expects
                try:
                    handle = open(os.open(source, os.O_RDONLY | os.O_NOFOLLOW), "rb")
                except OSError as exc:
                    raise MlarchError(f"array file {source} cannot be read ({exc.strerror or exc}): run "
                                      "`mlarch verify` to list damage") from None
                with handle:
                    info = os.fstat(handle.fileno())
                    if not stat.S_ISREG(info.st_mode):
                        raise MlarchError(f"array file {source} is not a regular file: run `mlarch verify`")
                    _add(tar, name, handle, info.st_size, info.st_mtime)
        partial.replace(out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise MlarchError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"runs": len(ids), "models": models, "arrays": len(records_by_path), "bytes": out.stat().st_size}


def _add(tar: tarfile.TarFile, name: str, handle, size: int, mtime: float | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    info.mtime = int(mtime if mtime is not None else datetime.now().timestamp())
    tar.addfile(info, handle)  # no owner names: a bundle says nothing of who made it


def import_bundle(root: Path, bundle: Path) -> dict:
    """Merge a bundle into the archive at `root`: verify every digest, skip runs already present."""
    bundle = Path(bundle)
    if not bundle.is_file():
        raise MlarchError(f"bundle {bundle} does not exist")
    try:
        with open(bundle, "rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        raise MlarchError(f"cannot read bundle {bundle}: {exc.strerror or exc}") from None
    for prefix, kind in _COMPRESSED.items():
        # mlarch writes plain tar (its chunks are compressed already). A compressed stream
        # cannot be listed without decompressing all of it, so its sizes cannot be checked first.
        if magic.startswith(prefix):
            raise MlarchError(f"bundle {bundle} is {kind}-compressed: decompress it first (a bundle is a plain .tar)")
    layout.ensure_folder(root)
    catalog.ensure_schema(root / layout.CATALOG)
    schema = _schema_columns(root)
    try:
        tar = tarfile.open(bundle, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise MlarchError(f"{bundle} is not a readable mlarch bundle ({exc}): re-export it") from None
    with tar:
        try:
            tables, by_path, members, size = _scan(tar, bundle, schema)
        except (_Bad, layout.UnsafePath) as exc:
            raise MlarchError(f"bundle {bundle}: {exc}: refusing all of it (re-export it with mlarch)") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise MlarchError(f"{bundle} is not a readable mlarch bundle ({exc}): re-export it") from None
        free = shutil.disk_usage(root).free
        if size + DISK_MARGIN > free:
            raise MlarchError(f"bundle {bundle} needs {size >> 20} MiB in {root} and {free >> 20} MiB are free: "
                              "free disk space, or import into an archive on another disk")
        staging = root / layout.staging_name()  # gc removes it if this process dies
        staging.mkdir(mode=0o700)
        try:
            try:
                _extract(tar, members, staging)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise MlarchError(f"{bundle} is not a readable mlarch bundle ({exc}): re-export it") from None
            for record in by_path.values():
                try:
                    actual = arrays.check(staging / "arrays", arrays.ArrayRecord.from_row(record))
                except MlarchError as exc:  # its advice (restore the archive) is not for a bundle
                    detail = str(exc).split(": run `mlarch verify`")[0]
                    raise MlarchError(f"bundle {bundle}: {detail}: the bundle is damaged; refusing all of it") from None
                if actual != record["sha256"]:
                    raise MlarchError(f"bundle {bundle}: array {record['path']} has sha256 {actual}, the manifest says "
                                      f"{record['sha256']}: the bundle was altered; refusing all of it")
            return _merge(root, staging, tables, schema, bundle)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _schema_columns(root: Path) -> dict[str, list[str]]:
    """The columns of each bundled table, as this archive's catalog defines them: the only
    names that ever reach SQL text."""
    with catalog.reading(root / layout.CATALOG) as con:
        rows = con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND list_contains(?, table_name) ORDER BY table_name, column_index",
            [list(TABLES)]).fetchall()
    columns: dict[str, list[str]] = {name: [] for name in TABLES}
    for table, column in rows:
        columns[table].append(column)
    return columns


def _scan(tar: tarfile.TarFile, bundle: Path, schema: dict[str, list[str]]):
    """Read and check the manifest, then every member's header, writing nothing. Returns the
    tables, the array rows by path, the members to extract and their total size."""
    first = tar.next()
    if first is None or first.name != MANIFEST or not _regular(first):
        raise _Bad(f"its first member is not the file {MANIFEST}")
    if first.size > MANIFEST_LIMIT:
        raise _Bad(f"its manifest is {first.size >> 20} MiB, over the {MANIFEST_LIMIT >> 20} MiB limit")
    try:
        manifest = json.loads(tar.extractfile(first).read(MANIFEST_LIMIT))
    except (ValueError, RecursionError) as exc:  # JSON or UTF-8 errors
        raise _Bad(f"its manifest is not JSON ({' '.join(str(exc).split())[:80]})") from None
    tables = _tables(manifest, bundle, schema)
    by_path = _check_rows(tables)
    allowed, folders = {}, set()
    for record in by_path.values():
        allowed.update(_member_names(record))
        folders |= {f"arrays/{record['path']}", f"arrays/{record['path']}/c"}  # older exports listed them
    members, seen = [], {MANIFEST}
    while (member := tar.next()) is not None:
        name = member.name
        if name in seen:
            raise _Bad(f"member {name[:160]!r} appears twice")
        seen.add(name)
        if len(seen) > len(allowed) + len(folders) + 1:
            raise _Bad("it has more members than its manifest's arrays")
        if member.isdir() and name in folders:
            continue
        if name not in allowed:
            raise _Bad(f"member {name[:160]!r} is not a file of an array its manifest names")
        if not _regular(member):
            raise _Bad(f"member {name[:160]!r} is not a regular file (links, devices, sparse files are refused)")
        if member.size > allowed[name]:
            raise _Bad(f"member {name[:160]!r} declares {member.size:,} bytes, more than its array can occupy "
                       f"({allowed[name]:,})")
        members.append(member)
    missing = sorted(set(allowed) - seen)
    if missing:
        raise _Bad(f"it lacks {missing[0]} ({len(missing)} array file(s) missing)")
    named = {m.name: m for m in members}
    for record in by_path.values():  # zarr.json is read by zarr next: only the layout mlarch writes
        _check_meta(tar.extractfile(named[f"arrays/{record['path']}/zarr.json"]).read(META_LIMIT), record)
    return tables, by_path, members, sum(m.size for m in members)


def _regular(member: tarfile.TarInfo) -> bool:
    return member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.issparse()


def _tables(manifest, bundle: Path, schema: dict[str, list[str]]) -> dict[str, list[dict]]:
    """The manifest's rows as dicts, once every column is one of this archive's schema."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Bad("its manifest is not an mlarch bundle manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise MlarchError(f"bundle {bundle} has format version {str(manifest.get('version'))[:20]}, newer than this "
                          f"mlarch reads ({VERSION}): upgrade mlarch (pip install -U mlarch)")
    if manifest["version"] < 2:  # sealing its rows here would vouch for whatever they now say
        raise MlarchError(f"bundle {bundle} has format version {manifest['version']} (mlarch 0.1), whose rows carry no "
                          "record digests, so an edit cannot be told from the original: open the source archive with "
                          "this mlarch (it upgrades in place) and export the bundle again")
    given = manifest.get("tables")
    if not isinstance(given, dict):
        raise _Bad("its manifest has no tables")
    extra = sorted(set(given) - set(TABLES))
    if extra:
        raise MlarchError(f"bundle {bundle} has table {extra[0][:80]!r}, unknown to this mlarch: it was exported by a "
                          "newer one; upgrade mlarch (pip install -U mlarch) and retry")
    tables = {}
    for name in TABLES:
        table = given.get(name)
        if not isinstance(table, dict) or not isinstance(table.get("columns"), list) or not isinstance(
                table.get("rows"), list):
            raise _Bad(f"its manifest lacks the {name} table")
        columns = table["columns"]
        if not all(isinstance(c, str) for c in columns):
            raise _Bad(f"a column name of its {name} table is not text")
        unknown = [c for c in columns if c not in schema[name]]
        if unknown:
            raise MlarchError(f"bundle {bundle} has column {name}.{unknown[0][:80]}, which this archive's "
                              "catalog lacks: it was exported by a newer mlarch; upgrade mlarch "
                              "(pip install -U mlarch) and retry")
        if len(set(columns)) != len(columns) or not REQUIRED[name] <= set(columns):
            raise _Bad(f"its {name} table repeats a column or lacks one of {', '.join(sorted(REQUIRED[name]))}")
        rows = []
        for row in table["rows"]:
            if not isinstance(row, list) or len(row) != len(columns):
                raise _Bad(f"a row of its {name} table does not match the columns")
            rows.append({c: _restore(v) for c, v in zip(columns, row)})
        tables[name] = rows
    for name, key in (("runs", "run_id"), ("models", "model")):  # version 2 writes them: a row without one was edited
        bare = [row.get(key) for row in tables[name] if not isinstance(row.get("record_sha256"), str)]
        if bare:
            raise _Bad(f"its {name} row {str(bare[0])[:80]!r} has no record digest (the manifest was edited)")
    return tables


def _check_meta(raw: bytes, record: dict) -> None:
    """An array's zarr.json must describe the array of `record` as mlarch stores it: 1-D,
    its dtype, the chunking chunks_for gives, default chunk keys, bytes/blosc/crc32c codecs."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    n = record["shape"][0]
    codecs = meta.get("codecs") if isinstance(meta, dict) else None
    ok = (isinstance(meta, dict) and meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
          and meta.get("shape") == [n] and meta.get("data_type") == _zarr_dtype(record["kind"])
          and meta.get("chunk_grid") == {"name": "regular",
                                         "configuration": {"chunk_shape": list(arrays.chunks_for((n,)))}}
          and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
          and meta.get("storage_transformers", []) == []
          and isinstance(codecs, list) and codecs and all(isinstance(c, dict) and c.get("name") in CODECS
                                                          for c in codecs)
          and codecs[0]["name"] == "bytes")
    if not ok:
        raise _Bad(f"array {record['path']} has a zarr.json unlike the ones mlarch writes")


def _zarr_dtype(kind: str) -> str:
    return {"<f4": "float32", "|u1": "uint8"}[DTYPES[kind]]


def _extract(tar: tarfile.TarFile, members: list[tarfile.TarInfo], staging: Path) -> None:
    """Copy each checked member into a new file of its own under `staging`, at most the
    size its header declared (a member cannot grow, overwrite or follow a link)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for member in members:
        target = staging.joinpath(*member.name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        with open(os.open(target, flags, 0o644), "wb") as out:
            left = member.size
            while left:
                piece = source.read(min(left, 1 << 20))
                if not piece:
                    raise EOFError(f"member {member.name} is truncated")
                out.write(piece)
                left -= len(piece)


def _merge(root: Path, staging: Path, tables: dict, schema: dict[str, list[str]], bundle: Path) -> dict:
    path = root / layout.CATALOG
    with layout.commit_lock(root):
        with catalog.reading(path) as con:
            have_runs = {r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()}
            have_models = dict(con.execute("SELECT model, weights_sha256 FROM models").fetchall())
            have_paths = {r[0] for r in con.execute("SELECT path FROM arrays").fetchall()}
        for model in tables["models"]:
            known = have_models.get(model["model"])
            if known is not None and known != model["weights_sha256"]:
                raise MlarchError(f"model {model['model']!r} in the bundle has other weights "
                                  f"({str(model['weights_sha256'])[:12]}) than the archive's ({known[:12]}): "
                                  "import into another archive")
        new_runs = [r for r in tables["runs"] if r["run_id"] not in have_runs]
        new_models = [m for m in tables["models"] if m["model"] not in have_models]
        new_owners = {r["run_id"] for r in new_runs} | {m["model"] for m in new_models}
        placing = [a["path"] for a in tables["arrays"] if a["owner"] in new_owners]
        clash = sorted(set(placing) & have_paths)
        if clash:
            raise MlarchError(f"the archive records array {clash[0]} with no run or model owning it: run "
                              "`mlarch verify`, then `mlarch rm`/`mlarch gc`, and import again")
        _check_record_digests(tables, schema, new_runs, new_models, bundle)
        try:
            targets = {p: layout.checked_group(root, p, p) for p in placing}
        except layout.UnsafePath as exc:
            raise MlarchError(f"archive {root}: {exc}: mlarch never makes links there; remove it by hand") from None
        placed: list[Path] = []
        try:
            for p in placing:  # validated paths: runs/<id>/<kind> or models/<group>/magnitudes
                target = targets[p]
                group = target.parent
                if not group.exists():
                    group.mkdir(parents=True)
                    placed.append(group)
                layout.checked_group(root, p, p)  # still no link, now that the folders exist
                if target.exists():  # no catalog row owns it: a leftover of an interrupted ingest
                    shutil.rmtree(target)
                shutil.move(staging / "arrays" / p, target)  # a rename: staging is in the archive
                placed.append(target)
            with catalog.writing(path) as con:
                _insert(con, tables, schema, new_runs, new_models)
                for run in new_runs:  # the newest finished run of each (model, lang, role, seed) is the one in use
                    con.execute("""
                        UPDATE runs SET in_use = (run_id = (
                            SELECT run_id FROM runs WHERE model = $m AND lang = $l AND role = $r AND seed = $s
                            AND status = 'FINISHED' ORDER BY finished_at DESC, run_id LIMIT 1))
                        WHERE model = $m AND lang = $l AND role = $r AND seed = $s""",
                                {"m": run["model"], "l": run["lang"], "r": run["role"], "s": run["seed"]})
                for model, seed in sorted({(r["model"], r["seed"]) for r in new_runs}):
                    selections, patterns = derive(root / layout.ARRAYS, model, seed, read_spans(con, model),
                                                  current_runs(con, model, seed))
                    replace_derived(con, model, seed, selections, patterns)
        except BaseException as exc:
            for done in reversed(placed):  # the catalog never named them: leave no orphans
                shutil.rmtree(done, ignore_errors=True)
            if isinstance(exc, layout.UnsafePath):  # a link made while we placed arrays
                raise MlarchError(f"archive {root}: {exc}: remove the link by hand") from None
            if isinstance(exc, Exception) and not isinstance(exc, MlarchError):  # rows that disagree
                raise MlarchError(f"bundle {bundle} does not fit this archive's catalog ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:160]}): refusing all of it") from exc
            raise
    return {"imported": [r["run_id"] for r in new_runs],
            "skipped": [r["run_id"] for r in tables["runs"] if r["run_id"] in have_runs],
            "models": [m["model"] for m in new_models]}


def _insert(con, tables: dict, schema: dict[str, list[str]], new_runs: list[dict], new_models: list[dict]) -> None:
    """INSERT the new rows; column names come from the archive's schema, values are parameters."""
    run_ids = {r["run_id"] for r in new_runs}
    model_names = {m["model"] for m in new_models}
    owners = run_ids | model_names
    for name, rows in (("models", new_models),
                       ("modules", [m for m in tables["modules"] if m["model"] in model_names]),
                       ("runs", new_runs),
                       ("run_samples", [s for s in tables["run_samples"] if s["run_id"] in run_ids]),
                       ("arrays", [a for a in tables["arrays"] if a["owner"] in owners])):
        if not rows:
            continue
        columns = [c for c in schema[name] if c in rows[0]]  # every bundle column is one of these
        values = [[json.dumps(row[c]) if c == "provenance" and row[c] is not None and not isinstance(row[c], str)
                   else row[c] for c in columns] for row in rows]
        con.executemany(f"INSERT INTO {name} ({', '.join(_quoted(c) for c in columns)}) "
                        f"VALUES ({', '.join('?' * len(columns))})", values)


def _check_record_digests(tables: dict, schema: dict[str, list[str]], new_runs: list[dict],
                          new_models: list[dict], bundle: Path) -> None:
    """Every record digest in the bundle must match its rows (checked before any array is
    placed); _tables has refused rows without one."""
    by_owner: dict[str, list[dict]] = {}
    for record in tables["arrays"]:
        by_owner.setdefault(record["owner"], []).append(record)
    for run in new_runs:
        samples = sorted((s for s in tables["run_samples"] if s["run_id"] == run["run_id"]),
                         key=lambda s: s["position"])  # integers (checked)
        try:
            actual = records.run_digest(run, [s["item_index"] for s in samples], by_owner.get(run["run_id"], []))
        except (TypeError, ValueError):
            actual = None
        if actual != run["record_sha256"]:
            raise MlarchError(f"bundle {bundle}: run {run['run_id']}'s rows differ from its record digest: the bundle "
                              "was altered; refusing all of it")
    for model in new_models:
        modules = [m for m in tables["modules"] if m["model"] == model["model"]]
        try:
            actual = records.model_digest(model, modules, by_owner.get(model["model"], []))
        except (TypeError, ValueError):
            actual = None
        if actual != model["record_sha256"]:
            raise MlarchError(f"bundle {bundle}: model {model['model']!r}'s rows differ from its record digest: the "
                              "bundle was altered; refusing all of it")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def export_parquet(root: Path, folder: Path) -> list[Path]:
    """Every table and view of the catalog as <name>.parquet in `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise MlarchError(f"cannot create {folder}: {getattr(exc, 'strerror', None) or exc}") from None
    written = []
    with catalog.reading(root / layout.CATALOG) as con:
        for name in (*TABLES, "selections", "patterns", *VIEWS):  # names from these constants only
            target = folder / f"{name}.parquet"
            # the file name goes in as a parameter: no quoting of a path inside SQL text
            con.execute(f"COPY (SELECT * FROM {_quoted(name)}) TO ? (FORMAT parquet)", [str(target)])
            written.append(target)
    return written
