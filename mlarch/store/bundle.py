"""Portable bundles: runs with their arrays, catalog rows and a manifest of digests in one
tar file, and Parquet export of every table and view for other engines.

This is how results computed on a GPU cluster reach a laptop: `export_bundle` there,
`import_bundle` here (every digest verified; a tampered bundle is refused whole)."""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import mlarch
from mlarch.errors import MlarchError
from mlarch.store import arrays, catalog, layout
from mlarch.store.derive import current_runs, derive, replace_derived
from mlarch.store.spans import read_spans

FORMAT = "mlarch-bundle"
VERSION = 1
TABLES = ("models", "modules", "runs", "run_samples", "arrays")
VIEWS = ("set_sizes", "overlap_by_module", "overlap_by_layer", "overlap_global", "language_unique")


def _plain(value):
    if isinstance(value, (datetime, date)):
        return {"$ts": value.isoformat()}
    if isinstance(value, Decimal):
        return int(value)
    return value


def _restore(value):
    if isinstance(value, dict) and set(value) == {"$ts"}:
        return datetime.fromisoformat(value["$ts"])
    return value


def _rows(con, query: str, params) -> dict:
    result = con.execute(query, params)
    columns = [d[0] for d in result.description]
    return {"columns": columns, "rows": [[_plain(v) for v in row] for row in result.fetchall()]}


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
    manifest = {"format": FORMAT, "version": VERSION, "mlarch": mlarch.__version__,
                "exported_at": datetime.now().isoformat(), "run_ids": ids, "models": models, "tables": tables}
    paths = [row[0] for row in tables["arrays"]["rows"]]
    out = Path(out)
    if out.suffix != ".tar":
        raise MlarchError(f"bundle file {out} must end in .tar")
    partial = out.with_name(out.name + ".partial")
    try:
        with tarfile.open(partial, "w") as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            tar.addfile(info, fileobj=__import__("io").BytesIO(data))
            for path in paths:
                tar.add(root / layout.ARRAYS / path, arcname=f"arrays/{path}")
        partial.replace(out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise MlarchError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    return {"runs": len(ids), "models": models, "arrays": len(paths), "bytes": out.stat().st_size}


def _safe_members(tar: tarfile.TarFile):
    for member in tar.getmembers():
        name = Path(member.name)
        if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
            raise MlarchError(f"bundle member {member.name!r} is not allowed: refusing the bundle")
        yield member


def import_bundle(root: Path, bundle: Path) -> dict:
    """Merge a bundle into the archive at `root`: verify every digest, skip runs already present."""
    bundle = Path(bundle)
    if not bundle.is_file():
        raise MlarchError(f"bundle {bundle} does not exist")
    layout.ensure_folder(root)
    catalog.ensure_schema(root / layout.CATALOG)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        try:
            with tarfile.open(bundle, "r") as tar:
                tar.extractall(staging, members=list(_safe_members(tar)))
            manifest = json.loads((staging / "manifest.json").read_text())
        except (tarfile.TarError, OSError, json.JSONDecodeError) as exc:
            raise MlarchError(f"{bundle} is not a readable mlarch bundle ({exc}); re-export it") from None
        if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
            raise MlarchError(f"{bundle} is not an mlarch bundle this version can read (format "
                              f"{manifest.get('format')!r} v{manifest.get('version')}); upgrade mlarch")
        tables = {name: [dict(zip(t["columns"], map(_restore, row))) for row in t["rows"]]
                  for name, t in manifest["tables"].items()}
        for record in tables["arrays"]:
            try:
                actual = arrays.digest(arrays.read(staging / "arrays", record["path"]))
            except Exception as exc:
                raise MlarchError(f"bundle {bundle}: array {record['path']} is unreadable ({exc}); "
                                  "the bundle is damaged: refusing all of it") from None
            if actual != record["sha256"]:
                raise MlarchError(f"bundle {bundle}: array {record['path']} has sha256 {actual}, the manifest says "
                                  f"{record['sha256']}: the bundle was altered; refusing all of it")
        return _merge(root, staging, tables)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _merge(root: Path, staging: Path, tables: dict) -> dict:
    path = root / layout.CATALOG
    with layout.commit_lock(root):
        with catalog.reading(path) as con:
            have_runs = {r[0] for r in con.execute("SELECT run_id FROM runs").fetchall()}
            have_models = dict(con.execute("SELECT model, weights_sha256 FROM models").fetchall())
        for model in tables["models"]:
            known = have_models.get(model["model"])
            if known is not None and known != model["weights_sha256"]:
                raise MlarchError(f"model {model['model']!r} in the bundle has other weights ({model['weights_sha256'][:12]}) "
                                  f"than the archive's ({known[:12]}): import into another archive")
        new_runs = [r for r in tables["runs"] if r["run_id"] not in have_runs]
        new_models = [m for m in tables["models"] if m["model"] not in have_models]
        new_owners = {r["run_id"] for r in new_runs} | {m["model"] for m in new_models}
        for record in tables["arrays"]:
            if record["owner"] in new_owners:
                target = root / layout.ARRAYS / record["path"]
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(staging / "arrays" / record["path"], target)
        with catalog.writing(path) as con:
            for name, rows in (("models", new_models),
                               ("modules", [m for m in tables["modules"] if m["model"] in {x["model"] for x in new_models}]),
                               ("runs", new_runs),
                               ("run_samples", [s for s in tables["run_samples"] if s["run_id"] in {r["run_id"] for r in new_runs}]),
                               ("arrays", [a for a in tables["arrays"] if a["owner"] in new_owners])):
                if not rows:
                    continue
                columns = list(rows[0])
                values = [[json.dumps(row[c]) if c == "provenance" and row[c] is not None and not isinstance(row[c], str)
                           else row[c] for c in columns] for row in rows]
                con.executemany(f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                                values)
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
    return {"imported": [r["run_id"] for r in new_runs],
            "skipped": [r["run_id"] for r in tables["runs"] if r["run_id"] in have_runs],
            "models": [m["model"] for m in new_models]}


def export_parquet(root: Path, folder: Path) -> list[Path]:
    """Every table and view of the catalog as <name>.parquet in `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MlarchError(f"cannot create {folder}: {exc.strerror or exc}") from None
    written = []
    with catalog.reading(root / layout.CATALOG) as con:
        for name in (*TABLES, "selections", "patterns", *VIEWS):
            target = folder / f"{name}.parquet"
            con.execute(f"COPY (SELECT * FROM {name}) TO '{str(target).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
            written.append(target)
    return written
