"""`ingest`: score a model on math and control texts per language and archive the results.

Run lifecycle (MLflow style): a run row is inserted as RUNNING (a short write), the
forward passes and array writes happen with no catalog connection open, then one
transaction marks the run FINISHED together with every derived row. Readers never see
half a run; an interrupted run leaves a RUNNING/FAILED row and orphan arrays, nothing else.

Three steps: planning (mlarch/ingest/planning.py: settings, sources, digests, what is
archived already) gives a Plan; execution scores its units with a loaded model (here, in
`_run_local`, or on a Ray cluster: mlarch/ingest/ray_executor.py), each unit giving a
Pending run whose arrays are written (mlarch/ingest/units.py); the commit
(mlarch/ingest/commit.py, in this process only: DuckDB has one writer) folds each (seed,
language) group of runs into the catalog.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlarch import parallel
from mlarch.ingest import provenance  # noqa: F401 - bench/ingest_vs_forward.py times provenance.environment through it
from mlarch.ingest.config import (MAX_BATCH_SIZE, MAX_LENGTH, MAX_NAME, MAX_SAMPLES, MAX_SEED,  # noqa: F401 - re-exported
                                  METHOD, PAPER_KS, ROLES, IngestConfig, _bounded_int, check_langs, check_name,
                                  method_record)
from mlarch.ingest.context import ModelInfo, ScoringContext, WorkOrder, prepare  # noqa: F401 - re-exported
from mlarch.ingest.planning import IngestResult, Plan, Unit, check_writable, finished_digests, plan  # noqa: F401
from mlarch.ingest.commit import (begin_runs as _begin_runs, check_model_row, commit as _commit,  # noqa: F401
                                  mark_failed as _mark_failed, open_catalog)
from mlarch.ingest.units import (Pending as _Pending, Reporter, score_run as _score_run, work_order,  # noqa: F401
                                 write_array)

_check_writable = check_writable  # the evaluation pipeline's name for it


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
        if executor is not None:  # workers import torch while this process plans (on a running cluster)
            executor.prestart(root, cfg)
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


def overlaps(device) -> bool:
    """Whether selection and writes should overlap the next forward pass: yes on an
    accelerator, whose passes leave the CPU idle; not on a CPU, where torch already uses
    every core (overlapping made the passes of a 48-sample Gemma ingest 1.3x slower and the
    ingest 10-35% slower than running the same work in between, on 2 cores)."""
    return device.type != "cpu"
