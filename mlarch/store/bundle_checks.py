"""What a bundle may hold, and the checks that hold a hostile one to it: the manifest's
format and rows against the archive's schema and layout, each tar member's name, type and
declared size against what the manifest's arrays can occupy, each zarr.json against what
mlarch writes, and each run's and model's record digest against its rows. All of it runs
before a byte of the bundle is written anywhere."""

from __future__ import annotations

import json
import os
import re
import tarfile
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

from mlarch.errors import MlarchError
from mlarch.store import analyses, arrays, layout, records

FORMAT = "mlarch-bundle"
VERSION = 3  # 2: rows carry record digests (schema 2), which import requires; 3: analyses (schema 4)
TABLES = ("models", "modules", "runs", "run_samples", "arrays", "analyses")
SINCE = {"analyses": 3}  # tables a bundle of an earlier format version lacks (its runs are placed on import)
MANIFEST = "manifest.json"
MANIFEST_LIMIT = 64 << 20  # ~2,000 runs of 1,000 samples; export refuses a larger one too
META_LIMIT = arrays.META_LIMIT  # the bounds every read of a stored object keeps too
CHUNK_OVERHEAD = arrays.CHUNK_OVERHEAD
DTYPES = {"magnitudes": "<f4", "norms": "<f4", "levels": "|u1"}  # what ingest writes
CODECS = (["bytes", "blosc", "crc32c"], ["bytes", "crc32c"])  # arrays._codecs: compressed, or checksum only
# the columns this module reads from a bundle's rows, by the type it needs (the other
# columns only pass through, as parameters, to INSERT)
# the columns this module reads from a bundle's rows, by the type it needs (the other
# columns only pass through, as parameters, to INSERT)
_TEXT = {"models": ("model", "weights_sha256", "magnitudes_group"), "modules": ("model", "module"),
         "runs": ("run_id", "model", "lang", "role", "status", "arrays_group"), "run_samples": ("run_id",),
         "arrays": ("path", "owner", "kind", "dtype", "sha256"),
         "analyses": ("model", "analysis", "config", "config_digest")}
_INT = {"runs": ("seed",), "run_samples": ("position", "item_index"),
        "modules": ("position", "n_rows", "n_cols", "n_params", "param_offset", "norm_offset")}
REQUIRED = {t: {*_TEXT[t], *_INT.get(t, ()), *(("shape", "nbytes") if t == "arrays" else ())} for t in TABLES}
_SHA256 = re.compile(r"[0-9a-f]{64}")
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class Bad(MlarchError):
    """Rows or members that are not what mlarch writes; callers say whose they are."""


def plain(value):
    """A catalog value as a bundle manifest holds it: timestamps as {'$ts': ISO text}, DuckDB's HUGEINT sums (Decimal)
    as int."""
    if isinstance(value, (datetime, date)):
        return {"$ts": value.isoformat()}
    if isinstance(value, Decimal):
        return int(value)
    return value


def restore(value):
    """A manifest value as the catalog holds it (the inverse of plain); a bad timestamp is a Bad bundle."""
    if isinstance(value, dict) and set(value) == {"$ts"}:
        try:
            return datetime.fromisoformat(value["$ts"])
        except (TypeError, ValueError):
            raise Bad(f"timestamp {str(value['$ts'])[:40]!r} is not ISO 8601") from None
    return value


def check_rows(tables: dict[str, list[dict]]) -> dict[str, dict]:
    """Check that every run, model and array row is laid out as mlarch lays them out (ids,
    groups, array paths, dtypes, shapes, digests); returns the array rows by path."""
    for table, rows in tables.items():
        for column in _TEXT.get(table, ()):
            if any(not isinstance(row[column], str) for row in rows):
                raise Bad(f"a value of {table}.{column} is not text")
        for column in _INT.get(table, ()):
            if any(type(row[column]) is not int for row in rows):
                raise Bad(f"a value of {table}.{column} is not an integer")
    runs = {}
    for run in tables["runs"]:
        run_id = run["run_id"]
        if run["arrays_group"] != layout.run_arrays_group(run_id):  # raises for a malformed id
            raise layout.UnsafePath(f"run {run_id}: arrays_group {str(run['arrays_group'])[:120]!r} is not "
                                    f"{layout.run_group(run_id)!r}")
        if run_id in runs:
            raise Bad(f"run {run_id} appears twice")
        runs[run_id] = run
    # a model's |W| lies in the group made for its name, or (weights stored once) in the group
    # made for the name of the model that archived them first: the owner of that array row
    shared_groups = {layout.model_group(r["owner"]) for r in tables["arrays"] if r["kind"] in layout.MODEL_ARRAYS}
    models = {}
    for model in tables["models"]:
        name = model["model"]
        if not name or name in models:
            raise Bad(f"model name {name[:80]!r} is empty or repeated")
        if model["magnitudes_group"] != layout.model_group(name) and model["magnitudes_group"] not in shared_groups:
            raise layout.UnsafePath(f"model {name!r}: magnitudes_group {str(model['magnitudes_group'])[:120]!r} "
                                    f"is not {layout.model_group(name)!r}")
        models[name] = model
    model_groups = {m["magnitudes_group"] for m in models.values()}
    by_path, kinds = {}, {}
    for record in tables["arrays"]:
        owner, kind, path = record["owner"], record["kind"], record["path"]
        if owner in runs and kind in layout.RUN_ARRAYS:
            expected = layout.array_path(layout.run_group(owner), kind)
        elif kind in layout.MODEL_ARRAYS and layout.model_group(owner) in model_groups:
            expected = layout.array_path(layout.model_group(owner), kind)
        else:
            raise Bad(f"array {str(path)[:120]!r}: owner {str(owner)[:80]!r} with kind {str(kind)[:20]!r} "
                       "is no run or model of it")
        if path != expected:
            raise layout.UnsafePath(f"array of {owner} ({kind}) at {str(path)[:120]!r}, not {expected!r}")
        if path in by_path:
            raise Bad(f"array {path} appears twice")
        shape = record["shape"]
        if (record["dtype"] != DTYPES[kind] or not isinstance(shape, list) or len(shape) != 1
                or type(shape[0]) is not int or not 0 <= shape[0] < 1 << 48
                or record["nbytes"] != shape[0] * int(DTYPES[kind][2:])):
            raise Bad(f"array {path}: dtype {record['dtype']!r}, shape {str(shape)[:40]} and nbytes "
                       f"{str(record['nbytes'])[:20]} are not those of a 1-D {DTYPES[kind]} array")
        chunks, meta = record.get("chunk_sha256"), record.get("meta_sha256")  # absent before schema 2
        if chunks is not None and (not isinstance(chunks, list) or len(chunks) != arrays.n_chunks((shape[0],))):
            raise Bad(f"array {path}: its chunk digests do not match its chunks")
        if not all(isinstance(d, str) and _SHA256.fullmatch(d)
                   for d in (record["sha256"], *([] if meta is None else [meta]), *(chunks or []))):
            raise Bad(f"array {path}: a digest of it is not a sha256 hex digest")
        if record.get("sha256_scheme") not in (None, arrays.CHUNKED):  # absent before schema 7
            raise Bad(f"array {path}: digest scheme {str(record['sha256_scheme'])[:20]!r} is not one mlarch writes")
        by_path[path] = record
        kinds.setdefault(owner if owner in runs else layout.model_group(owner), set()).add(kind)
    for run_id, run in runs.items():
        if run["status"] != "FINISHED" or run["model"] not in models:
            raise Bad(f"run {run_id} is not a FINISHED run of a model in the bundle")
        if kinds.get(run_id) != set(layout.RUN_ARRAYS):
            raise Bad(f"run {run_id} lacks its norms or levels array")
    for name, model in models.items():
        if kinds.get(model["magnitudes_group"]) != set(layout.MODEL_ARRAYS):
            raise Bad(f"model {name!r} lacks its magnitudes array")
    seen = set()
    for row in tables["analyses"]:
        key = (row["model"], row["analysis"])
        if key in seen or row["model"] not in models:
            raise Bad(f"analysis {str(row['analysis'])[:80]!r} is repeated or of no model of it")
        try:
            analyses.check_name(row["analysis"])
        except MlarchError as exc:
            raise Bad(str(exc).rsplit(": pass ", 1)[0]) from None  # the reason, without the fix
        try:
            config = json.loads(row["config"])
        except (TypeError, ValueError, RecursionError):
            config = None
        if not isinstance(config, dict) or analyses.config_digest(config) != row["config_digest"]:
            raise Bad(f"analysis {row['analysis'][:80]!r}: its configuration does not match its digest")
        seen.add(key)
    for run_id, run in runs.items():
        if run.get("analysis") is not None and (run["model"], run["analysis"]) not in seen:
            raise Bad(f"run {run_id} names an analysis the bundle does not carry")
    if any(m["model"] not in models for m in tables["modules"]) or any(
            s["run_id"] not in runs for s in tables["run_samples"]):
        raise Bad("modules or run_samples rows belong to no model or run of it")
    check_spans(tables, models, runs, by_path)
    return by_path


def check_spans(tables: dict, models: dict, runs: dict, by_path: dict) -> None:
    """A model's modules rows must tile its arrays as spans.layout lays them out (in position
    order, each at the end of the one before, n_rows x n_cols parameters and n_cols norms), and
    their totals must be the lengths of its |W| and of each of its runs' levels and norms:
    derive and every read trust the spans, so a forged row (2**40 rows, an offset of 2**50)
    would have them read or allocate far past the arrays, under the commit lock."""
    by_model: dict[str, list[dict]] = {}
    for row in tables["modules"]:
        by_model.setdefault(row["model"], []).append(row)
    totals = {}
    for name, model in models.items():
        rows = sorted(by_model.get(name, []), key=lambda m: m["position"])
        params = norms = 0
        for at, row in enumerate(rows):
            if (row["n_rows"] < 1 or row["n_cols"] < 1 or row["n_params"] != row["n_rows"] * row["n_cols"]
                    or row["param_offset"] != params or row["norm_offset"] != norms
                    or at and row["position"] == rows[at - 1]["position"]):
                raise Bad(f"model {name[:80]!r}: module {row['module'][:80]!r} is not laid out as mlarch lays "
                          "modules out (sizes of at least 1, each right after the one before)")
            params, norms = params + row["n_params"], norms + row["n_cols"]
        magnitudes = by_path[layout.array_path(model["magnitudes_group"], "magnitudes")]["shape"][0]
        if magnitudes != params:
            raise Bad(f"model {name[:80]!r}: its modules hold {params:,} parameters, its |W| array {magnitudes:,}")
        totals[name] = {"levels": params, "norms": norms}
    for run_id, run in runs.items():
        for kind, expected in totals[run["model"]].items():
            length = by_path[layout.array_path(layout.run_group(run_id), kind)]["shape"][0]
            if length != expected:
                raise Bad(f"run {run_id}: its {kind} array has {length:,} entries, its model's modules {expected:,}")


def declared_files(records) -> int:
    """How many files (zarr.json and chunks) the array rows `records` name: member_names would
    build a table of that many, so callers bound it by what is actually there first."""
    return sum(arrays.n_chunks((record["shape"][0],)) + 1 for record in records)


def member_names(record: dict) -> dict[str, int]:
    """Tar member name -> the most bytes it may hold, for one array (zarr v3, 1-D)."""
    n = record["shape"][0]
    chunk = arrays.chunks_for((n,))[0]
    base = f"arrays/{record['path']}"
    names = {f"{base}/zarr.json": META_LIMIT}
    for index in range(arrays.n_chunks((n,))):
        names[f"{base}/c/{index}"] = chunk * int(DTYPES[record["kind"]][2:]) + CHUNK_OVERHEAD
    return names


def scan(tar: tarfile.TarFile, bundle: Path, schema: dict[str, list[str]]):
    """Read and check the manifest, then every member's header, writing nothing. Returns the
    tables, the array rows by path, the members to extract and their total size."""
    first = tar.next()
    if first is None or first.name != MANIFEST or not regular(first):
        raise Bad(f"its first member is not the file {MANIFEST}")
    if first.size > MANIFEST_LIMIT:
        raise Bad(f"its manifest is {first.size >> 20} MiB, over the {MANIFEST_LIMIT >> 20} MiB limit")
    try:
        manifest = json.loads(tar.extractfile(first).read(MANIFEST_LIMIT))
    except (ValueError, RecursionError) as exc:  # JSON or UTF-8 errors
        raise Bad(f"its manifest is not JSON ({' '.join(str(exc).split())[:80]})") from None
    tables = tables_of(manifest, bundle, schema)
    by_path = check_rows(tables)
    # an array row without chunk digests may declare 2**26 chunks: every one is a tar member
    # (a 512-byte header at least), so no more can be named than the file has room for
    room = os.fstat(tar.fileobj.fileno()).st_size // tarfile.BLOCKSIZE
    if declared_files(by_path.values()) > room:
        raise Bad(f"its arrays name {declared_files(by_path.values()):,} files, more than its "
                  f"{room * tarfile.BLOCKSIZE:,} bytes can hold")
    allowed, folders = {}, set()
    for record in by_path.values():
        allowed.update(member_names(record))
        folders |= {f"arrays/{record['path']}", f"arrays/{record['path']}/c"}  # older exports listed them
    members, seen = [], {MANIFEST}
    while (member := tar.next()) is not None:
        name = member.name
        if name in seen:
            raise Bad(f"member {name[:160]!r} appears twice")
        seen.add(name)
        if len(seen) > len(allowed) + len(folders) + 1:
            raise Bad("it has more members than its manifest's arrays")
        if member.isdir() and name in folders:
            continue
        if name not in allowed:
            raise Bad(f"member {name[:160]!r} is not a file of an array its manifest names")
        if not regular(member):
            raise Bad(f"member {name[:160]!r} is not a regular file (links, devices, sparse files are refused)")
        if member.size > allowed[name]:
            raise Bad(f"member {name[:160]!r} declares {member.size:,} bytes, more than its array can occupy "
                       f"({allowed[name]:,})")
        members.append(member)
    missing = sorted(set(allowed) - seen)
    if missing:
        raise Bad(f"it lacks {missing[0]} ({len(missing)} array file(s) missing)")
    named = {m.name: m for m in members}
    for record in by_path.values():  # zarr.json is read by zarr next: only the layout mlarch writes
        check_meta(tar.extractfile(named[f"arrays/{record['path']}/zarr.json"]).read(META_LIMIT), record)
    return tables, by_path, members, sum(m.size for m in members)


def regular(member: tarfile.TarInfo) -> bool:
    """Whether a tar member is a regular file (no link, device, folder or sparse file)."""
    return member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not member.issparse()


def tables_of(manifest, bundle: Path, schema: dict[str, list[str]]) -> dict[str, list[dict]]:
    """The manifest's rows as dicts, once every column is one of this archive's schema."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Bad("its manifest is not an mlarch bundle manifest")
    if type(manifest.get("version")) is not int:  # NaN, text, a fraction, true: not a version mlarch writes
        raise Bad(f"its manifest's format version {str(manifest.get('version'))[:20]!r} is not an integer")
    if manifest["version"] > VERSION:
        raise MlarchError(f"bundle {bundle} has format version {str(manifest.get('version'))[:20]}, newer than this "
                          f"mlarch reads ({VERSION}): upgrade mlarch (pip install -U mlarch)")
    if manifest["version"] < 2:  # sealing its rows here would vouch for whatever they now say
        raise MlarchError(f"bundle {bundle} has format version {manifest['version']} (mlarch 0.1), whose rows carry no "
                          "record digests, so an edit cannot be told from the original: open the source archive with "
                          "this mlarch (it upgrades in place) and export the bundle again")
    given = manifest.get("tables")
    if not isinstance(given, dict):
        raise Bad("its manifest has no tables")
    extra = sorted(set(given) - set(TABLES))
    if extra:
        raise MlarchError(f"bundle {bundle} has table {extra[0][:80]!r}, unknown to this mlarch: it was exported by a "
                          "newer one; upgrade mlarch (pip install -U mlarch) and retry")
    tables = {}
    for name in TABLES:
        if name not in given and manifest["version"] < SINCE.get(name, 0):
            tables[name] = []  # e.g. a bundle made before analyses: its runs are placed on import
            continue
        table = given.get(name)
        if not isinstance(table, dict) or not isinstance(table.get("columns"), list) or not isinstance(
                table.get("rows"), list):
            raise Bad(f"its manifest lacks the {name} table")
        columns = table["columns"]
        if not all(isinstance(c, str) for c in columns):
            raise Bad(f"a column name of its {name} table is not text")
        unknown = [c for c in columns if c not in schema[name]]
        if unknown:
            raise MlarchError(f"bundle {bundle} has column {name}.{unknown[0][:80]}, which this archive's "
                              "catalog lacks: it was exported by a newer mlarch; upgrade mlarch "
                              "(pip install -U mlarch) and retry")
        if len(set(columns)) != len(columns) or not REQUIRED[name] <= set(columns):
            raise Bad(f"its {name} table repeats a column or lacks one of {', '.join(sorted(REQUIRED[name]))}")
        rows = []
        for row in table["rows"]:
            if not isinstance(row, list) or len(row) != len(columns):
                raise Bad(f"a row of its {name} table does not match the columns")
            rows.append({c: restore(v) for c, v in zip(columns, row)})
        tables[name] = rows
    if manifest["version"] >= SINCE["analyses"] and any(not isinstance(r.get("analysis"), str) for r in tables["runs"]):
        raise Bad("a run of it names no analysis (the manifest was edited)")
    for name, key in (("runs", "run_id"), ("models", "model")):  # version 2 writes them: a row without one was edited
        bare = [row.get(key) for row in tables[name] if not isinstance(row.get("record_sha256"), str)]
        if bare:
            raise Bad(f"its {name} row {str(bare[0])[:80]!r} has no record digest (the manifest was edited)")
    return tables


def check_meta(raw: bytes, record: dict) -> None:
    """An array's zarr.json must describe the array of `record` as mlarch stores it: 1-D,
    its dtype, the chunking chunks_for gives, default chunk keys, bytes/blosc/crc32c codecs."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    n = record["shape"][0]
    codecs = meta.get("codecs") if isinstance(meta, dict) else None
    ok = (isinstance(meta, dict) and meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
          and meta.get("shape") == [n] and meta.get("data_type") == zarr_dtype(record["kind"])
          and meta.get("chunk_grid") == {"name": "regular",
                                         "configuration": {"chunk_shape": list(arrays.chunks_for((n,)))}}
          and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}}
          and meta.get("storage_transformers", []) == []
          and isinstance(codecs, list) and all(isinstance(c, dict) for c in codecs)
          and [c.get("name") for c in codecs] in CODECS)
    if not ok:
        raise Bad(f"array {record['path']} has a zarr.json unlike the ones mlarch writes")


def zarr_dtype(kind: str) -> str:
    """The zarr v3 data type name of an array kind (float32 or uint8)."""
    return {"<f4": "float32", "|u1": "uint8"}[DTYPES[kind]]


def check_record_digests(tables: dict, schema: dict[str, list[str]], new_runs: list[dict],
                          new_models: list[dict], bundle: Path) -> None:
    """Every record digest in the bundle must match its rows (checked before any array is
    placed); tables_of has refused rows without one."""
    # rows grouped once: a scan of every sample per run is quadratic (2,000 runs of 1,000
    # samples: minutes, under the commit lock)
    by_owner: dict[str, list[dict]] = {}
    for record in tables["arrays"]:
        by_owner.setdefault(record["owner"], []).append(record)
    samples_of: dict[str, list[dict]] = {}
    for sample in tables["run_samples"]:
        samples_of.setdefault(sample["run_id"], []).append(sample)
    modules_of: dict[str, list[dict]] = {}
    for module in tables["modules"]:
        modules_of.setdefault(module["model"], []).append(module)
    for run in new_runs:
        samples = sorted(samples_of.get(run["run_id"], []), key=lambda s: s["position"])  # integers (checked)
        try:
            actual = records.run_digest(run, [s["item_index"] for s in samples], by_owner.get(run["run_id"], []))
        except (TypeError, ValueError, RecursionError):  # RecursionError: deeply nested provenance JSON
            actual = None
        if actual != run["record_sha256"]:
            raise MlarchError(f"bundle {bundle}: run {run['run_id']}'s rows differ from its record digest: the bundle "
                              "was altered; refusing all of it")
    by_path = {record["path"]: record for record in tables["arrays"]}
    for model in new_models:
        modules = modules_of.get(model["model"], [])
        magnitudes = by_path.get(layout.array_path(str(model["magnitudes_group"]), "magnitudes"))
        try:
            actual = records.model_digest(model, modules, [magnitudes] if magnitudes else [])
        except (TypeError, ValueError, RecursionError):
            actual = None
        if actual != model["record_sha256"]:
            raise MlarchError(f"bundle {bundle}: model {model['model']!r}'s rows differ from its record digest: the "
                              "bundle was altered; refusing all of it")


