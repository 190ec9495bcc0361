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

import dataclasses
import functools
import io
import json
import os
import shutil
import tarfile
from datetime import datetime
from pathlib import Path

import mlarch
from mlarch.errors import MlarchError
from mlarch.wording import Phrase, error, for_cli
from mlarch.store import analyses, array_store, arrays, catalog, layout, records
from mlarch.store import bundle_checks as checks
from mlarch.store.derive import current_runs, derive, replace_derived
from mlarch.store.spans import read_spans


DISK_MARGIN = 64 << 20  # free space left over after an import


def _rows(con, query: str, params) -> dict:
    result = con.execute(query, params)
    columns = [d[0] for d in result.description]
    return {"columns": columns, "rows": [[checks.plain(v) for v in row] for row in result.fetchall()]}


def _dicts(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], row)) for row in table["rows"]]


def export_bundle(root: Path, out: Path, run_ids: list[str] | None = None, model: str | None = None, *,
                  anonymize: bool = False) -> dict:
    """Write the finished runs (given, or all of `model`) to the tar file `out`; with
    `anonymize`, without host names and absolute paths (mlarch.store.anonymize), which the
    manifest records. Returns {"runs", "models", "arrays", "bytes", "anonymized"}."""
    with catalog.reading(root / layout.CATALOG) as con:
        if model is not None:
            ids = [r[0] for r in con.execute(
                "SELECT run_id FROM runs WHERE model = ? AND status = 'FINISHED' ORDER BY started_at", [model]).fetchall()]
            if not ids:
                raise MlarchError(f"model {model!r} has no finished runs to export (see `mlarch models`)")
        else:
            ids = list(dict.fromkeys(run_ids or []))  # a run named twice is packed (and counted) once
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
            # a model's |W| by the group its row names (shared by models of the same weights)
            "arrays": _rows(con, "SELECT * FROM arrays WHERE list_contains(?, owner) OR (kind = 'magnitudes' AND path IN "
                                 "(SELECT magnitudes_group || '/magnitudes' FROM models WHERE list_contains(?, model)))",
                            [ids, models]),
            "analyses": _rows(con, "SELECT * FROM analyses a WHERE EXISTS (SELECT 1 FROM runs r WHERE r.model = "
                                   "a.model AND r.analysis = a.analysis AND list_contains(?, r.run_id)) "
                                   "ORDER BY model, analysis", [ids]),
        }
        # a row edited since it was sealed would make a bundle whose import blames the bundle
        # (anonymize checks them itself: it seals the rows again)
        unsealed = [] if anonymize else [f"{kind} {name}" for kind, names in (("run", ids), ("model", models))
                                         for name in names if not records.sealed_in(con, kind, name)]
    rows = {name: [{c: checks.restore(v) for c, v in row.items()} for row in _dicts(t)] for name, t in tables.items()}
    anonymized = None
    if anonymize:
        from mlarch.store.anonymize import anonymize as scrub

        try:
            anonymized = scrub(rows)
        except MlarchError as exc:
            raise error(MlarchError, f"catalog of {root}: ", Phrase(str(exc), for_cli(exc)),  # keeps --anonymize
                        "; nothing was exported") from None
        tables = {name: {"columns": t["columns"], "rows": [[checks.plain(row[c]) for c in t["columns"]]
                                                           for row in rows[name]]} for name, t in tables.items()}
    store = array_store.of(root)  # arrays on S3: (array path, object name) instead of a file
    try:  # the catalog is read like a bundle: an edited row must not lead the export elsewhere
        if unsealed:
            raise MlarchError(f"the rows of {unsealed[0]} changed since it was archived (its record digest differs)")
        records_by_path = checks.check_rows(rows)
        for record in records_by_path.values():  # rows with chunk digests list their chunks already
            if record.get("chunk_sha256") is None:  # a shape (2**47) could name far more files than exist
                named, held = checks.declared_files([record]), len(store.signature(record["path"])[1])
                if named > held:
                    raise checks.Bad(f"array {record['path']} of shape {record['shape']} names {named:,} files, "
                                     f"and {held:,} are stored")
    except MlarchError as exc:
        raise error(MlarchError, f"catalog of {root}: ", Phrase(str(exc), for_cli(exc)), ": set the row back (",
                    Phrase("Archive.sql(..., write=True)", "`mlarch sql --write`"), ") or restore the "
                    "catalog from a copy; nothing was exported") from None
    try:  # the rows are mlarch's: a link (or a link loop) below arrays.zarr is the folder's doing
        for record in records_by_path.values():
            store.owned(record["path"], record["path"])
        files = [(name, (record["path"], name[len(f"arrays/{record['path']}/"):]), limit)
                 for record in records_by_path.values() for name, limit in checks.member_names(record).items()]
    except layout.UnsafePath as exc:
        raise MlarchError(f"archive {root}: {exc}: mlarch follows no link inside arrays.zarr; run `mlarch verify` "
                          "to list damage; nothing was exported") from None
    manifest = {"format": checks.FORMAT, "version": checks.VERSION, "mlarch": mlarch.__version__,
                "exported_at": datetime.now().isoformat(), "run_ids": ids, "models": models, "tables": tables}
    if anonymized is not None:  # informational: import trusts the digests, never this
        manifest["anonymized"] = anonymized
    data = json.dumps(manifest, indent=1).encode()
    if len(data) > checks.MANIFEST_LIMIT:
        raise MlarchError(f"the manifest of {len(ids)} runs is {len(data) >> 20} MiB, over the {checks.MANIFEST_LIMIT >> 20} "
                          "MiB a bundle may hold: export fewer runs per bundle")
    out = Path(out)
    if out.suffix != ".tar":
        raise MlarchError(f"bundle file {out} must end in .tar")
    if not store.remote:  # each file there, plain and within its size, before anything is read whole
        for name, source, limit in files:
            _open_member(store, source, name, limit)[0].close()
    _check_arrays(store, records_by_path)  # a damaged array is refused here, not at the import elsewhere
    partial = out.with_name(out.name + ".partial")
    try:
        with tarfile.open(partial, "w") as tar:  # plain tar: chunks are compressed already
            _add(tar, checks.MANIFEST, io.BytesIO(data), len(data))
            for name, source, limit in files:  # regular files only, named exactly as import expects
                if store.remote:  # streamed from the bucket, object by object
                    with store.member(*source) as (handle, size):
                        _check_member_size(name, size, limit)
                        _add(tar, name, handle, size)
                    continue
                handle, info = _open_member(store, source, name, limit)
                with handle:
                    _add(tar, name, handle, info.st_size, info.st_mtime)
        partial.replace(out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise MlarchError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {"runs": len(ids), "models": models, "arrays": len(records_by_path), "bytes": out.stat().st_size,
            "anonymized": anonymized is not None}


def _open_member(store: array_store.LocalArrays, source: tuple[str, str], name: str, limit: int):
    """(handle, stat) of a local array file to pack, opened as every read opens it
    (LocalArrays.open_file: no link, pipe or device) and no larger than any object of its
    array can be."""
    path, member = source
    try:
        opened = store.open_file(path, member)
    except array_store.UnsafeFile as exc:
        raise MlarchError(f"array {path}: {exc}: run `mlarch verify` to list damage; nothing was exported") from None
    except OSError as exc:
        raise MlarchError(f"array file {store.folder / path / member} cannot be read ({exc.strerror or exc}): run "
                          "`mlarch verify` to list damage; nothing was exported") from None
    if opened is None:
        raise MlarchError(f"array {path}: {member} is missing: run `mlarch verify` to list damage; nothing was "
                          "exported")
    handle, info = opened
    try:
        _check_member_size(name, info.st_size, limit)
    except BaseException:
        handle.close()
        raise
    return handle, info


def _check_arrays(store, records_by_path: dict[str, dict]) -> None:
    """Every array to export as the catalog records it (zarr.json and each chunk against their
    recorded digests, the content against its sha256): arrays.check, as import and verify use it."""
    for record in records_by_path.values():
        try:
            actual = arrays.check(store, arrays.ArrayRecord.from_row(record))
        except arrays.ArrayDamaged as exc:
            detail = str(exc).split(": run `mlarch verify`")[0]
            raise MlarchError(f"{detail}: run `mlarch verify` to list damage; nothing was exported") from None
        if actual != record["sha256"]:
            raise MlarchError(f"array {record['path']} has sha256 {actual[:16]}..., the catalog records "
                              f"{record['sha256'][:16]}...: run `mlarch verify` to list damage; nothing was exported")


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
    for prefix, kind in checks.COMPRESSED.items():
        # mlarch writes plain tar (its chunks are compressed already). A compressed stream
        # cannot be listed without decompressing all of it, so its sizes cannot be checked first.
        if magic.startswith(prefix):
            raise MlarchError(f"bundle {bundle} is {kind}-compressed: decompress it first (a bundle is a plain .tar)")
    # an archive is created only for a bundle that passed its checks: a malformed bundle (or a
    # mistyped --archive) leaves no empty archive behind
    new = not (root / layout.CATALOG).exists()
    if new:
        _check_creatable(root)
        schema = _reference_columns()  # what ensure_schema will make
    else:
        layout.ensure_folder(root)
        catalog.ensure_schema(root / layout.CATALOG)
        schema = _schema_columns(root)
    try:
        tar = tarfile.open(bundle, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise MlarchError(f"{bundle} is not a readable mlarch bundle ({exc}): re-export it") from None
    with tar:
        try:
            tables, by_path, members, size = checks.scan(tar, bundle, schema)
        except (checks.Bad, layout.UnsafePath) as exc:
            raise MlarchError(f"bundle {bundle}: {exc}: refusing all of it (re-export it with mlarch)") from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise MlarchError(f"{bundle} is not a readable mlarch bundle ({exc}): re-export it") from None
        if not new:
            return _place(root, bundle, tar, tables, by_path, members, size, schema)
        made = [p for p in (root / layout.LOCK, root / layout.ARRAYS, root, *root.parents) if not os.path.lexists(p)]
        try:
            layout.ensure_folder(root)
            catalog.ensure_schema(root / layout.CATALOG)
            return _place(root, bundle, tar, tables, by_path, members, size, schema)
        except BaseException:
            _remove_new_archive(root, made)
            raise


def _place(root: Path, bundle: Path, tar: tarfile.TarFile, tables: dict, by_path: dict, members: list,
           size: int, schema: dict[str, list[str]]) -> dict:
    """Extract a scanned bundle into a staging folder in the archive, verify every digest, merge."""
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


def _check_creatable(root: Path) -> None:
    """Before a new archive is made at `root`: refuse a published snapshot, and a folder (or the
    nearest existing folder above it) that cannot be written, writing nothing that stays."""
    layout.refuse_snapshot(root)
    ancestor = root
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.is_dir():  # else (a file on the way) creating the folder says so
        layout.probe_writable(ancestor, root)


def _remove_new_archive(root: Path, made: list[Path]) -> None:
    """After a failed import into a new archive: remove what the import created (the catalog,
    and of `made`, the paths that were not there before: its lock, arrays.zarr if it holds no
    file, the folders made for it), once the catalog holds nothing."""
    path = root / layout.CATALOG
    if path.exists():
        try:
            with catalog.reading(path) as con:
                held = sum(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                           for table in ("models", "runs", "evaluations"))
        except Exception:  # unreadable now: leave it as it is
            return
        if held:  # another process archived something meanwhile
            return
    for file in (path, root / f"{layout.CATALOG}.wal", *[p for p in made if p.name == layout.LOCK]):
        try:
            file.unlink(missing_ok=True)
        except OSError:
            pass
    if root / layout.ARRAYS in made:
        for folder, _, _ in sorted(os.walk(root / layout.ARRAYS), key=lambda entry: -len(entry[0])):
            try:
                os.rmdir(folder)  # empty folders only: a file in arrays.zarr stays
            except OSError:
                pass
    for folder in made:  # deepest first, each only if empty
        try:
            folder.rmdir()
        except OSError:
            pass


def _schema_columns(root: Path) -> dict[str, list[str]]:
    """The columns of each bundled table, as this archive's catalog defines them: the only
    names that ever reach SQL text."""
    with catalog.reading(root / layout.CATALOG) as con:
        return _columns(con)


@functools.lru_cache(maxsize=1)
def _reference_columns() -> dict[str, list[str]]:
    """_schema_columns of a catalog the migrations make now (that of a new archive)."""
    return catalog.replayed(_columns)


def _columns(con) -> dict[str, list[str]]:
    rows = con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND list_contains(?, table_name) ORDER BY table_name, column_index",
        [list(checks.TABLES)]).fetchall()
    columns: dict[str, list[str]] = {name: [] for name in checks.TABLES}
    for table, column in rows:
        columns[table].append(column)
    return columns


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
    store = array_store.for_changes(root)  # the archive's arrays.zarr, or its S3 prefix (probed, claimed)
    with layout.commit_lock(root):
        with catalog.reading(path) as con:
            have_runs = {r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()}
            have_models = dict(con.execute("SELECT model, weights_sha256 FROM models").fetchall())
            have_paths = {p: (scheme, sha) for p, sha, scheme in con.execute(
                "SELECT path, sha256, sha256_scheme FROM arrays").fetchall()}
            have_analyses = {(r[0], r[1]): r[2] for r in con.execute(
                "SELECT model, analysis, config FROM analyses").fetchall()}
            # |W| arrays by (weights, dtype, digest scheme, array digest): a new model of the same weights shares one
            have_weights = {}
            for name, group, weights, dtype, scheme, sha in con.execute(
                    "SELECT m.model, m.magnitudes_group, m.weights_sha256, m.dtype, a.sha256_scheme, a.sha256 FROM models m "
                    "JOIN arrays a ON a.path = m.magnitudes_group || '/magnitudes' AND a.kind = 'magnitudes' "
                    "ORDER BY m.created_at, m.model").fetchall():
                have_weights.setdefault((weights, dtype, scheme, sha), (group, read_spans(con, name)))
        digest_as = _digests_of(staging)
        for model in tables["models"]:
            known = have_models.get(model["model"])
            if known is not None and known != model["weights_sha256"]:
                raise MlarchError(f"model {model['model']!r} in the bundle has other weights "
                                  f"({str(model['weights_sha256'])[:12]}) than the archive's ({known[:12]}): "
                                  "import into another archive")
        new_runs = [r for r in tables["runs"] if r["run_id"] not in have_runs]
        new_models = [m for m in tables["models"] if m["model"] not in have_models]
        checks.check_record_digests(tables, schema, new_runs, new_models, bundle)  # before any row changes
        new_models, regrouped = _share_magnitudes(tables, new_models, have_weights, digest_as)
        new_groups = {f"{m['magnitudes_group']}/magnitudes" for m in new_models}
        # a shared |W| the archive holds already (same content) is not placed again
        present = {a["path"] for a in tables["arrays"] if a["path"] in new_groups and a["path"] in have_paths
                   and digest_as(a, have_paths[a["path"]][0]) == have_paths[a["path"]][1]}
        placing = [a["path"] for a in tables["arrays"]
                   if (a["owner"] in {r["run_id"] for r in new_runs} or a["path"] in new_groups)
                   and a["path"] not in present]
        clash = sorted(set(placing) & set(have_paths))
        if clash:
            raise MlarchError(f"the archive records array {clash[0]} with no run or model owning it: run "
                              "`mlarch verify`, then `mlarch rm`/`mlarch gc`, and import again")
        used = {(r["model"], r["analysis"]) for r in new_runs if r.get("analysis") is not None}
        new_analyses, extended = [], []
        for row in tables["analyses"]:
            key = (row["model"], row["analysis"])
            if key not in used:
                continue
            if key not in have_analyses:
                new_analyses.append(row)
                continue
            # the archive's analysis of that name may gain languages, never change a setting or source
            if analyses.merged(json.loads(have_analyses[key]), json.loads(row["config"])) is None:
                raise MlarchError(f"analysis {row['analysis']!r} of model {row['model']!r} in the bundle has another "
                                  "configuration than the archive's analysis of that name: import into another "
                                  "archive")
            extended.append((key, json.loads(row["config"])))
        try:
            targets = {p: store.owned(p, p) for p in placing}
        except layout.UnsafePath as exc:
            raise MlarchError(f"archive {root}: {exc}: mlarch never makes links there; remove it by hand") from None
        placed: list[Path] = []
        try:
            for p in placing:  # validated paths: runs/<id>/<kind> or models/<group>/magnitudes
                if store.remote:  # uploaded from the checked staging copy; a leftover there goes first
                    if store.exists(p):
                        store.remove(p)
                    placed.append(p)
                    store.upload(staging / "arrays" / p, p)
                    continue
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
                _insert(con, tables, schema, new_runs, new_models, set(placing), new_analyses)
                for (model, name), config in extended:
                    analyses.ensure(con, model, name, config)
                for name in regrouped:  # its row now names the archive's |W| group: sealed again, as verified
                    con.execute("UPDATE models SET record_sha256 = ? WHERE model = ?",
                                [records.model_digest_in(con, name), name])
                # runs of a bundle made before analyses: one analysis per model, as the migration does
                for model in sorted({r["model"] for r in new_runs if r.get("analysis") is None}):
                    analyses.place(con, model, [r["run_id"] for r in new_runs
                                                if r["model"] == model and r.get("analysis") is None])
                keys = set()
                for run in new_runs:  # the newest finished run of each (model, analysis, lang, role, seed) is in use
                    analysis = con.execute("SELECT analysis FROM runs WHERE run_id = ?", [run["run_id"]]).fetchone()[0]
                    params = {"m": run["model"], "a": analysis, "l": run["lang"], "r": run["role"], "s": run["seed"]}
                    con.execute("""
                        UPDATE runs SET in_use = (run_id = (
                            SELECT run_id FROM runs WHERE model = $m AND analysis = $a AND lang = $l AND role = $r
                            AND seed = $s AND status = 'FINISHED' ORDER BY finished_at DESC, run_id LIMIT 1))
                        WHERE model = $m AND analysis = $a AND lang = $l AND role = $r AND seed = $s""", params)
                    keys.add((run["model"], analysis, run["seed"]))
                for model, analysis, seed in sorted(keys):
                    selections, patterns = derive(store, model, analysis, seed, read_spans(con, model),
                                                  current_runs(con, model, analysis, seed),
                                                  count_tops=True)  # sizes as stored (bf16 runs: int(numel * k))
                    replace_derived(con, model, analysis, seed, selections, patterns)
        except BaseException as exc:
            for done in reversed(placed):  # the catalog never named them: leave no orphans
                if store.remote:
                    try:
                        store.remove(done)
                    except Exception:  # the bucket is gone too: `mlarch gc` collects them later
                        pass
                    continue
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


def _digests_of(staging: Path):
    """digest_as(row, scheme): the content digest of a checked bundle array (an `arrays` row) in
    `scheme`, the archive's for an array it holds: its own row's when the schemes agree, else
    recounted from the staged copy (arrays written before and after schema 7 differ only there)."""
    known: dict[tuple, str] = {}

    def digest_as(row: dict, scheme) -> str:
        if row.get("sha256_scheme") == scheme:
            return row["sha256"]
        key = (row["path"], scheme)
        if key not in known:
            record = dataclasses.replace(arrays.ArrayRecord.from_row(row), sha256_scheme=scheme)
            known[key] = arrays.check(staging / "arrays", record)
        return known[key]
    return digest_as


def _share_magnitudes(tables: dict, new_models: list[dict], have_weights: dict,
                      digest_as) -> tuple[list[dict], list[str]]:
    """New models whose |W| the archive holds already (same weights, dtype, array content and
    module layout) point at the archive's array instead of placing a second copy. Returns the
    models (changed ones copied) and the names of those whose |W| record is now the archive's
    (another group, or the same array recorded with the other digest scheme): their record
    digests are sealed again once the bundle's own were verified."""
    by_path = {a["path"]: a for a in tables["arrays"]}
    changed, names = [], []
    for model in new_models:
        record = by_path.get(f"{model['magnitudes_group']}/magnitudes")
        key, found = next(((key, group) for key, group in have_weights.items()
                           if record is not None and key[:2] == (model["weights_sha256"], model.get("dtype"))
                           and digest_as(record, key[2]) == key[3]), (None, None))
        if found is not None and found[0] == model["magnitudes_group"]:
            if key[2:] != (record.get("sha256_scheme"), record["sha256"]):
                names.append(model["model"])
        elif found is not None:
            modules = sorted((m for m in tables["modules"] if m["model"] == model["model"]), key=lambda m: m["position"])
            layout_ = [(m["module"], m["layer"], m["n_rows"], m["n_cols"], m["param_offset"], m["norm_offset"])
                       for m in modules]
            if layout_ == [(s.module, s.layer, s.n_rows, s.n_cols, s.param_offset, s.norm_offset) for s in found[1]]:
                model = {**model, "magnitudes_group": found[0]}
                names.append(model["model"])
        changed.append(model)
    return changed, names


def _insert(con, tables: dict, schema: dict[str, list[str]], new_runs: list[dict], new_models: list[dict],
            placed: set[str], new_analyses: list[dict]) -> None:
    """INSERT the new rows; column names come from the archive's schema, values are parameters."""
    run_ids = {r["run_id"] for r in new_runs}
    model_names = {m["model"] for m in new_models}
    for name, rows in (("models", new_models),
                       ("modules", [m for m in tables["modules"] if m["model"] in model_names]),
                       ("analyses", new_analyses),
                       ("runs", new_runs),
                       ("run_samples", [s for s in tables["run_samples"] if s["run_id"] in run_ids]),
                       ("arrays", [a for a in tables["arrays"] if a["path"] in placed])):
        if not rows:
            continue
        columns = [c for c in schema[name] if c in rows[0]]  # every bundle column is one of these
        values = [[json.dumps(row[c]) if c == "provenance" and row[c] is not None and not isinstance(row[c], str)
                   else row[c] for c in columns] for row in rows]
        con.executemany(f"INSERT INTO {name} ({', '.join(_quoted(c) for c in columns)}) "
                        f"VALUES ({', '.join('?' * len(columns))})", values)


def _check_member_size(name: str, size: int, limit: int) -> None:
    """An object larger than any of its array's could be (planted, or damaged) is never copied:
    a bundle import would refuse it anyway, after the export had filled the disk."""
    if size > limit:
        raise MlarchError(f"array object {name} is {size:,} bytes, more than the {limit:,} any object of its array "
                          "can be: run `mlarch verify` to list damage; nothing was exported")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def export_parquet(root: Path, folder: Path) -> list[Path]:
    """Every table and view of the catalog (as the migrations define them) as <name>.parquet in `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise MlarchError(f"cannot create {folder}: {getattr(exc, 'strerror', None) or exc}") from None
    written = []
    with catalog.exporting(root / layout.CATALOG, folder) as con:
        for name in catalog.reference_names():  # mlarch's names, not the file's (its schema was checked)
            target = folder / f"{name}.parquet"
            # the file name goes in as a parameter: no quoting of a path inside SQL text
            con.execute(f"COPY (SELECT * FROM {_quoted(name)}) TO ? (FORMAT parquet)", [str(target.absolute())])
            written.append(target)
    return written
