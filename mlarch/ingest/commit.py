"""The driver's side of an ingest: run rows and the commit, in the one process that writes
the catalog (DuckDB has one writer), whichever executor scored the units.

A run row is inserted as RUNNING (`begin_runs`, a short write); the scored runs of a (seed,
language) group are folded into the catalog in one transaction (`commit`); the runs not
committed when anything fails are marked FAILED (`mark_failed`), for `mlarch gc`. A Ray
worker's manifest is untrusted input here: `check_manifest` holds it to the unit and run id
the driver sent, and to the arrays actually stored, before it is committed.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from mlarch import methods
from mlarch.errors import MlarchError
from mlarch.wording import Arg, error
from mlarch.ingest.context import ModelInfo
from mlarch.ingest.planning import Plan, Unit, check_archived_model
from mlarch.ingest.units import Pending
from mlarch.store import analyses, array_store, arrays, catalog, layout, records
from mlarch.store import spans as span_layout
from mlarch.store.derive import RunRef, current_runs, derive, magnitudes_path, replace_derived


def open_catalog(work: Plan) -> None:
    """The archive folder and catalog, created on the first ingest (after the model loaded)."""
    layout.ensure_folder(work.root)
    if not work.catalog_path.exists():  # an existing catalog's schema is checked by its first reading
        catalog.ensure_schema(work.catalog_path)
    array_store.record(work.root, work.array_store)  # the first ingest's --arrays s3://...


def _now() -> datetime:
    """This process's clock, as the catalog stores times (UTC): the committing side's, never
    that of the process that scored (units._now, a Ray node's clock)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def check_model_row(work: Plan, info: ModelInfo) -> dict | None:
    """The archive's row of the loaded model (None: not archived yet); refused when the archive
    gave its name to other weights or another dtype."""
    return check_archived_model(work.catalog_path, work.cfg, work.name, info.weights_sha256, work.dtype)


def mark_failed(catalog_path: Path, run_ids: list[str]) -> None:
    """Mark the runs that are still RUNNING as FAILED (best effort: gc cleans up otherwise)."""
    try:
        with catalog.writing(catalog_path) as con:
            for run_id in run_ids:
                con.execute("UPDATE runs SET status = 'FAILED', finished_at = ? WHERE run_id = ? AND status = 'RUNNING'",
                            [_now(), run_id])
    except Exception:  # the original error matters more
        pass


def commit(work: Plan, info: ModelInfo, seed: int, pending: list[Pending],
            write_magnitudes: Callable[[str], arrays.ArrayRecord]) -> None:
    """Fold finished runs into the catalog: one transaction, under the archive's commit lock.

    The model's rows and |W| array go in with the first commit that finds the model missing,
    decided under the lock: two ingests of a new model at once both complete, the second
    reusing what the first archived (same weights) or refusing (other weights). A new model
    name whose weights (and dtype) another model has archived already points at that |W|
    array: it is stored once per weights digest. `write_magnitudes(path)` writes |W| there
    (from this process or from a Ray worker that holds the model) and gives its record."""
    root, name, analysis, analysis_config = work.root, work.name, work.analysis, work.analysis_config
    loaded, modules, spans = info, info.modules, info.spans()
    # set sizes as stored (mathneuro-bf16's are the authors' int(numel * k), not top_count's)
    count_tops = work.cfg.method == methods.BF16
    catalog_path = work.catalog_path
    with layout.commit_lock(root):
        model_row = check_archived_model(catalog_path, work.cfg, name, loaded.weights_sha256, loaded.dtype,
                                         during=True)
        new_model = None
        if model_row is None:
            shared = _shared_magnitudes(catalog_path, loaded, spans)
            if shared is not None:
                new_model = (shared, None)
            else:
                group = _free_model_group(catalog_path, name)
                new_model = (group, write_magnitudes(magnitudes_path(group)))
        with catalog.reading(catalog_path) as con:
            analyses.check_config(con, name, analysis, analysis_config)  # another ingest may have named it
            current = current_runs(con, name, analysis, seed)
            newest = {(lang, role): at for lang, role, at in con.execute(
                "SELECT lang, role, max(finished_at) FROM runs WHERE model = ? AND analysis = ? AND seed = ? "
                "AND status = 'FINISHED' GROUP BY ALL", [name, analysis, seed]).fetchall()}
        # the run in use is the newest finished one (as import-bundle and verify have it): a run
        # that another ingest overtook while this one ran is archived, but not used. Times a
        # scoring process (a Ray node) reports are never later than now here: a node whose
        # clock runs fast must not outrank the runs committed after it
        now = _now()
        times = {p.run_id: tuple(min(datetime.fromisoformat(p.provenance[key]), now)
                                 for key in ("started_at", "finished_at")) for p in pending}
        in_use = {p.run_id: (p.lang, p.role) not in newest or times[p.run_id][1] >= newest[(p.lang, p.role)]
                  for p in pending}
        for p in pending:
            if in_use[p.run_id]:
                levels = dict(p.records)["levels"]
                current[(p.lang, p.role)] = RunRef(p.run_id, p.lang, p.role, p.group,
                                                   tuple(p.provenance["config"]["top_k"]), levels)
        selections, patterns = derive(work.array_store, name, analysis, seed, spans, current,
                                      preloaded={p.group: p.levels for p in pending if p.levels is not None},
                                      count_tops=count_tops)
        with catalog.writing(catalog_path) as con:
            if new_model is not None:
                group, record = new_model
                con.execute(
                    "INSERT INTO models (model, source, source_kind, revision, commit_sha, weights_sha256, dtype, "
                    "architecture, n_modules, n_scored_params, magnitudes_group, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [name, loaded.source, loaded.source_kind, loaded.revision, loaded.commit_sha,
                     loaded.weights_sha256, loaded.dtype, loaded.architecture, len(modules),
                     sum(m.n_params for m in modules), group, _now()],
                )
                rows = pl.DataFrame(  # one insert from a frame: executemany costs ~0.7 ms a row
                    [(name, m.name, m.layer, m.kind, m.n_rows, m.n_cols, m.n_params, i, span.param_offset,
                      span.norm_offset) for i, (m, span) in enumerate(zip(modules, spans))],
                    schema={"model": pl.Utf8, "module": pl.Utf8, "layer": pl.Int64, "kind": pl.Utf8,
                            "n_rows": pl.Int64, "n_cols": pl.Int64, "n_params": pl.Int64, "position": pl.Int64,
                            "param_offset": pl.Int64, "norm_offset": pl.Int64},
                    orient="row",
                )
                con.register("new_modules", rows.to_arrow())
                con.execute("INSERT INTO modules SELECT * FROM new_modules")
                con.unregister("new_modules")
                if record is not None:  # else the array of the model that archived these weights first
                    _insert_arrays(con, [(name, "magnitudes", record)])
                con.execute("UPDATE models SET record_sha256 = ? WHERE model = ?",
                            [records.model_digest_in(con, name), name])
            for p in pending:
                if in_use[p.run_id]:
                    con.execute(
                        "UPDATE runs SET in_use = false WHERE model = ? AND analysis = ? AND lang = ? AND role = ? "
                        "AND seed = ? AND in_use", [name, analysis, p.lang, p.role, p.seed],
                    )
                finished = con.execute(
                    "UPDATE runs SET status = 'FINISHED', started_at = ?, finished_at = ?, n_tokens = ?, "
                    "n_truncated = ?, in_use = ?, provenance = ? WHERE run_id = ? AND status = 'RUNNING'",
                    [*times[p.run_id], p.n_tokens, p.n_truncated, in_use[p.run_id], json.dumps(p.provenance),
                     p.run_id],
                ).fetchone()[0]
                if finished != 1:  # the row must still be ours: else nothing of this commit is archived
                    raise MlarchError(f"run {p.run_id} was removed or changed while it was scored (`mlarch rm`, "
                                      "`gc` or an edit): this commit archived nothing; ingest again")
                samples = pl.DataFrame({
                    "run_id": [p.run_id] * len(p.indices),
                    "position": np.arange(len(p.indices), dtype=np.int32),
                    "item_index": p.indices.astype(np.int64),
                })
                con.register("new_samples", samples.to_arrow())
                con.execute("INSERT INTO run_samples SELECT * FROM new_samples")
                con.unregister("new_samples")
                _insert_arrays(con, [(p.run_id, kind, r) for kind, r in p.records])
                con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?",
                            [records.run_digest_in(con, p.run_id), p.run_id])
            analyses.ensure(con, name, analysis, analysis_config)
            replace_derived(con, name, analysis, seed, selections, patterns)


def _shared_magnitudes(catalog_path: Path, loaded, spans) -> str | None:
    """The magnitudes group of an archived model with these weights and dtype and the same
    scored layout, whose |W| array a new model name reuses (None: there is none)."""
    with catalog.reading(catalog_path) as con:
        for other, group in con.execute(
                "SELECT m.model, m.magnitudes_group FROM models m JOIN arrays a ON a.path = m.magnitudes_group || "
                "'/magnitudes' AND a.kind = 'magnitudes' WHERE m.weights_sha256 = ? AND m.dtype = ? "
                "ORDER BY m.created_at, m.model", [loaded.weights_sha256, loaded.dtype]).fetchall():
            if span_layout.read_spans(con, other) == list(spans):
                return group
    return None


def _free_model_group(catalog_path: Path, name: str) -> str:
    """The group of a new model's |W|: refused while a model of a removed name's weights
    still uses the group that name gives."""
    group = layout.model_group(name)
    with catalog.reading(catalog_path) as con:
        users = [r[0] for r in con.execute("SELECT model FROM models WHERE magnitudes_group = ?", [group]).fetchall()]
        owned = con.execute("SELECT count(*) FROM arrays WHERE path = ?", [magnitudes_path(group)]).fetchone()[0]
    if users or owned:
        raise error(MlarchError, f"model name {name!r} was used for other weights whose |W| array models "
                    f"{', '.join(users) or '(none)'} still share: pass another ", Arg("name"))
    return group


def _insert_arrays(con, rows) -> None:
    con.executemany(
        "INSERT INTO arrays (path, owner, kind, dtype, shape, sha256, nbytes, meta_sha256, chunk_sha256, "
        "sha256_scheme) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [[r.path, owner, kind, r.dtype, list(r.shape), r.sha256, r.nbytes, r.meta_sha256,
          list(r.chunk_sha256) if r.chunk_sha256 is not None else None, r.sha256_scheme] for owner, kind, r in rows],
    )


def begin_runs(work: Plan, units: list[Unit]) -> list[str]:
    """Insert RUNNING rows for `units` in one short write; their run ids."""
    run_ids = [layout.new_run_id() for _ in units]
    with catalog.writing(work.catalog_path) as con:
        for run_id, unit in zip(run_ids, units):
            con.execute(
                "INSERT INTO runs (run_id, model, analysis, lang, role, dataset, seed, n_samples, status, started_at, "
                "k_values, config_digest, in_use, arrays_group, host, pid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'RUNNING', ?, ?, ?, false, ?, ?, ?)",
                [run_id, work.name, work.analysis, unit.lang, unit.role, work.sources[unit.role].name, unit.seed,
                 work.cfg.samples, _now(), work.cfg.top_k, unit.digest,
                 layout.run_group(run_id), socket.gethostname(), os.getpid()],
            )
    return run_ids
