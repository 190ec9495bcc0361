"""`ingest`: score a model on math and control texts per language and archive the results.

Run lifecycle (MLflow style): a run row is inserted as RUNNING (a short write), the
forward passes and array writes happen with no catalog connection open, then one
transaction marks the run FINISHED together with every derived row. Readers never see
half a run; an interrupted run leaves a RUNNING/FAILED row and orphan arrays, nothing else.

Three steps: planning (mlarch/ingest/planning.py: settings, sources, digests, what is
archived already) gives a Plan; execution scores its units with a loaded model (here, in
`_run_local`, or on a Ray cluster: mlarch/ingest/ray_executor.py), each unit giving a
_Pending run whose arrays are written; the commit (`_commit`, in this process only: DuckDB
has one writer) folds each (seed, language) group of runs into the catalog.
"""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from mlarch import methods, parallel
from mlarch.errors import MlarchError
from mlarch import selection
from mlarch.ingest import paper_sampling, provenance
from mlarch.ingest.config import (MAX_BATCH_SIZE, MAX_LENGTH, MAX_NAME, MAX_SAMPLES, MAX_SEED,  # noqa: F401 - re-exported
                                  METHOD, PAPER_KS, ROLES, IngestConfig, _bounded_int, check_langs, check_name,
                                  method_record)
from mlarch.ingest.context import ModelInfo, ScoringContext, WorkOrder, prepare
from mlarch.ingest.planning import IngestResult, Plan, Unit, check_writable, finished_digests, plan  # noqa: F401
from mlarch.store import analyses, array_store, arrays, catalog, layout, records
from mlarch.store import spans as span_layout
from mlarch.store.derive import (RunRef, current_runs, derive, levels_path, magnitudes_path, norms_path,
                                 replace_derived)

_check_writable = check_writable  # the evaluation pipeline's name for it


class Reporter:
    """Progress sink; the CLI shows a progress bar, the API stays quiet by default."""

    def message(self, text: str) -> None:
        """Show one line of status."""

    def start_pass(self, label: str, total: int) -> None:
        """A scoring pass of `total` samples begins."""

    def advance(self, samples: int, tokens: int) -> None:
        """`samples` more samples and `tokens` more tokens of the current pass are done."""

    def end_pass(self) -> None:
        """The current pass is done."""


@dataclass
class _Pending:
    """A scored run whose arrays are written, ready to commit. Without `levels` it is the
    small manifest a Ray worker returns (the driver's derive then reads them back)."""
    run_id: str
    lang: str
    role: str
    seed: int
    group: str
    indices: np.ndarray
    records: list  # (kind, ArrayRecord) of the arrays written
    n_tokens: int
    n_truncated: int
    provenance: dict
    levels: np.ndarray | None = None  # kept in memory for the commit's derive (local runs)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def ingest(root: Path, cfg: IngestConfig, reporter: Reporter | None = None) -> IngestResult:
    """Score the model of `cfg` on each language's math and control texts and archive the runs under `root`
    (configurations already archived are reused unless cfg.force). Returns an IngestResult."""
    reporter = reporter or Reporter()
    cfg.validate()
    executor = None
    if cfg.executor == "ray":  # its cluster is checked now, before the sources are read
        if not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
            # a local instance of our own: Ray reads this when imported and then keeps every
            # address on 127.0.0.1 (else it advertises the host's network address)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from mlarch.ingest.ray_executor import RayExecutor

        executor = RayExecutor(cfg)
    try:
        work = plan(root, cfg, reporter, resolve=executor.resolve if executor else None)
        if work.todo:
            if executor is None:
                _run_local(work, reporter)
            else:
                executor.run(work, reporter)
    finally:
        if executor is not None:
            executor.close()
    return work.result


def work_order(work: Plan) -> WorkOrder:
    """The part of the plan that scoring needs."""
    return WorkOrder(work.cfg, work.name, work.analysis, work.kind, work.device, work.dtype, work.array_store,
                     work.items, {role: (s.name, s.describe()) for role, s in work.sources.items()}, work.pools)


def _run_local(work: Plan, reporter: Reporter) -> None:
    """Score the plan's units in this process, committing each (seed, lang) group."""
    ctx = prepare(work_order(work), reporter)
    info = ctx.info
    open_catalog(work)
    archived = check_model_row(work, info)

    def write_magnitudes(path: str):
        ctx.magnitudes_ready.result()
        return write_array(work.array_store, path, ctx.magnitudes)

    # array work (|W|, selection, compression, digests) runs in order, in one background
    # thread while the next forward pass runs where the passes leave the CPU idle
    with parallel.background(overlap=overlaps(work.device)) as background:
        ctx.background = background
        reporter.message(f"|W| of {ctx.magnitudes.size:,} scored parameters" + (
            ": extracting (archived with the first commit)" if archived is None else ": extracting"))
        ctx.extract_magnitudes()  # before any run's selection
        for (seed, lang), units in work.commit_groups():
            run_ids = _begin_runs(work, units)
            try:
                futures = [_score_run(ctx, unit, run_id) for unit, run_id in zip(units, run_ids)]
                pending = [future.result() for future in futures]
                _commit(work, info, seed, pending, write_magnitudes)
            except BaseException:
                _mark_failed(work.catalog_path, run_ids)  # those not committed
                raise
            work.result.written.extend(p.run_id for p in pending)
            reporter.message(
                f"archived {lang} seed {seed}: " + ", ".join(f"{p.role} {p.run_id}" for p in pending))


def open_catalog(work: Plan) -> None:
    """The archive folder and catalog, created on the first ingest (after the model loaded)."""
    layout.ensure_folder(work.root)
    if not work.catalog_path.exists():  # an existing catalog's schema is checked by its first reading
        catalog.ensure_schema(work.catalog_path)
    array_store.record(work.root, work.array_store)  # the first ingest's --arrays s3://...


def check_model_row(work: Plan, info: ModelInfo) -> dict | None:
    """The archive's row of the model (None: not archived yet); refused when the archive
    gave its name to other weights (or another dtype)."""
    model_row = _model_row(work.catalog_path, work.name)
    if model_row is not None:
        if model_row["weights_sha256"] != info.weights_sha256 or model_row["dtype"] != work.dtype:
            raise MlarchError(
                f"the archive's model {work.name!r} has other weights or dtype "
                f"({model_row['weights_sha256'][:12]}, {model_row['dtype']}) than {work.cfg.model} "
                f"({info.weights_sha256[:12]}, {work.dtype}): pass --name to archive it separately"
            )
    return model_row


def write_array(store, path: str, data: np.ndarray, compress: bool = True):
    """Every array an ingest writes goes through here: |W| (once per model), and each run's
    norms and level codes (possibly on a Ray worker)."""
    return arrays.write(store, path, data, compress=compress)


def _score_run(ctx: ScoringContext, unit: Unit, run_id: str) -> Future:
    """Run the forward pass here; select and write in `ctx.background` (a thread beside the
    next pass, or inline: see `overlaps`). The returned future gives the run, ready to commit."""
    order, cfg, loaded, reporter = ctx.order, ctx.cfg, ctx.loaded, ctx.reporter
    lang, role, seed = unit.lang, unit.role, unit.seed
    loaded_items, pool = order.items[(lang, role)], order.pools.get((lang, role))
    group = layout.run_group(run_id)
    started = _now()
    texts_all = loaded_items.texts
    if pool is None:
        indices = paper_sampling.draw(cfg.sampling, len(texts_all), cfg.samples, seed, cfg.shuffle_seed)
    else:  # the same draw, over the pool of items an evaluation scored correct
        allowed = np.asarray(pool["items"], dtype=np.int64)
        indices = allowed[paper_sampling.draw(cfg.sampling, len(allowed), cfg.samples, seed, cfg.shuffle_seed)]
    texts = [texts_all[i] for i in indices]
    reporter.start_pass(unit.label, len(texts))
    clock = time.perf_counter()
    result = ctx.run_pass(
        loaded.model, loaded.tokenizer, ctx.modules, texts, batch_size=ctx.batch_size,
        max_length=cfg.max_length, device=loaded.device,
        on_batch=reporter.advance,
    )
    reporter.end_pass()
    spans = ctx.spans

    def finish() -> _Pending:
        ctx.magnitudes_ready.result()  # done (the queue runs in order); re-raises its error
        norms = np.empty(span_layout.total_norms(spans), dtype=np.float32)
        for span in spans:
            norms[span.norms] = result.norms[span.module]
        if not np.isfinite(norms).all():  # no top-k of inf or NaN scores means anything
            bad = next(s.module for s in spans if not np.isfinite(norms[s.norms]).all())
            raise MlarchError(f"the activations entering {bad} overflowed to inf or NaN on {lang} {role} texts "
                              f"(dtype {loaded.dtype}): ingest in --dtype float32, or with a smaller --max-length")
        if cfg.method == methods.BF16:  # the authors' bf16 scores and set sizes, not |W| x norms
            from mlarch.ingest import mathneuro

            levels = mathneuro.model_levels_bf16(spans, result.scores, cfg.top_k)
        else:
            levels = selection.model_levels(spans, ctx.magnitudes, norms, cfg.top_k)
        records = [("norms", write_array(order.store, norms_path(group), norms, compress=False)),
                   ("levels", write_array(order.store, levels_path(group), levels))]
        dataset, described = order.source_info[role]
        prov = {
            **ctx.env,
            "run_id": run_id,
            "started_at": started.isoformat(),
            "finished_at": _now().isoformat(),
            "duration_s": round(time.perf_counter() - clock, 3),
            "forward_s": round(result.seconds, 3),
            "n_tokens": result.n_tokens,
            "n_truncated": result.n_truncated,
            "config": ctx.config,
            "config_digest": unit.digest,
            "method": method_record(cfg),
            "model": {
                "name": order.name, "source": loaded.source, "source_kind": loaded.source_kind,
                "revision": loaded.revision, "commit_sha": loaded.commit_sha,
                "weights_sha256": loaded.weights_sha256, "weight_files": loaded.weight_files,
                "architecture": loaded.architecture, "dtype": loaded.dtype, **loaded.placement(),
            },
            "data": {
                "lang": lang, "role": role, "dataset": dataset, "source": described,
                "files": loaded_items.files, "templates": loaded_items.templates,
                "n_items": len(texts_all),
            },
            "texts_sha256": provenance.texts_digest(texts),
            "seed": seed,
            "sample_indices": indices.tolist(),
        }
        if cfg.sampling != "numpy":
            prov["sampling"] = paper_sampling.describe(cfg.sampling, cfg.shuffle_seed)
        if cfg.template != "default":
            prov["template"] = cfg.template
        if pool is not None:
            prov["only_correct"] = {**pool["record"], "n_items": len(pool["items"])}
        return _Pending(run_id, lang, role, seed, group, indices, records, result.n_tokens, result.n_truncated, prov,
                        levels)

    return ctx.background.submit(finish)


def _mark_failed(catalog_path: Path, run_ids: list[str]) -> None:
    """Mark the runs that are still RUNNING as FAILED (best effort: gc cleans up otherwise)."""
    try:
        with catalog.writing(catalog_path) as con:
            for run_id in run_ids:
                con.execute("UPDATE runs SET status = 'FAILED', finished_at = ? WHERE run_id = ? AND status = 'RUNNING'",
                            [_now(), run_id])
    except Exception:  # the original error matters more
        pass


def _commit(work: Plan, info: ModelInfo, seed: int, pending: list[_Pending],
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
        model_row = _model_row(catalog_path, name)
        new_model = None
        if model_row is None:
            shared = _shared_magnitudes(catalog_path, loaded, spans)
            if shared is not None:
                new_model = (shared, None)
            else:
                group = _free_model_group(catalog_path, name)
                new_model = (group, write_magnitudes(magnitudes_path(group)))
        elif model_row["weights_sha256"] != loaded.weights_sha256 or model_row["dtype"] != loaded.dtype:
            raise MlarchError(
                f"another ingest archived model {name!r} with other weights or dtype "
                f"({model_row['weights_sha256'][:12]}, {model_row['dtype']}) while this one ran: "
                "pass --name to archive this model separately")
        with catalog.reading(catalog_path) as con:
            analyses.check_config(con, name, analysis, analysis_config)  # another ingest may have named it
            current = current_runs(con, name, analysis, seed)
            newest = {(lang, role): at for lang, role, at in con.execute(
                "SELECT lang, role, max(finished_at) FROM runs WHERE model = ? AND analysis = ? AND seed = ? "
                "AND status = 'FINISHED' GROUP BY ALL", [name, analysis, seed]).fetchall()}
        # the run in use is the newest finished one (as import-bundle and verify have it): a run
        # that another ingest overtook while this one ran is archived, but not used
        in_use = {p.run_id: (p.lang, p.role) not in newest
                  or datetime.fromisoformat(p.provenance["finished_at"]) >= newest[(p.lang, p.role)] for p in pending}
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
                con.execute(
                    "UPDATE runs SET status = 'FINISHED', started_at = ?, finished_at = ?, n_tokens = ?, "
                    "n_truncated = ?, in_use = ?, provenance = ? WHERE run_id = ?",
                    [datetime.fromisoformat(p.provenance["started_at"]),
                     datetime.fromisoformat(p.provenance["finished_at"]), p.n_tokens, p.n_truncated,
                     in_use[p.run_id], json.dumps(p.provenance), p.run_id],
                )
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
        raise MlarchError(f"model name {name!r} was used for other weights whose |W| array models "
                          f"{', '.join(users) or '(none)'} still share: pass another --name")
    return group


def _insert_arrays(con, rows) -> None:
    con.executemany(
        "INSERT INTO arrays (path, owner, kind, dtype, shape, sha256, nbytes, meta_sha256, chunk_sha256) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [[r.path, owner, kind, r.dtype, list(r.shape), r.sha256, r.nbytes, r.meta_sha256,
          list(r.chunk_sha256) if r.chunk_sha256 is not None else None] for owner, kind, r in rows],
    )


def overlaps(device) -> bool:
    """Whether selection and writes should overlap the next forward pass: yes on an
    accelerator, whose passes leave the CPU idle; not on a CPU, where torch already uses
    every core (overlapping made the passes of a 48-sample Gemma ingest 1.3x slower and the
    ingest 10-35% slower than running the same work in between, on 2 cores)."""
    return device.type != "cpu"



def _model_row(catalog_path: Path, model: str) -> dict | None:
    with catalog.reading(catalog_path) as con:
        rows = con.execute("SELECT weights_sha256, dtype FROM models WHERE model = ?", [model]).fetchall()
        row = rows[0] if rows else None
    return None if row is None else {"weights_sha256": row[0], "dtype": row[1]}


def _begin_runs(work: Plan, units: list[Unit]) -> list[str]:
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
