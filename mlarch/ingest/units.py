"""One unit of an ingest, scored: the forward pass, selection, the run's arrays written, and
the manifest the commit needs (a Pending run).

Both executors score units through `score_run`: this process (`--executor local`,
mlarch/ingest/pipeline.py) and each Ray worker (mlarch/ingest/ray_executor.py). The catalog
side (run rows, the commit) is mlarch/ingest/commit.py, run by the driver alone.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from mlarch import methods
from mlarch.errors import MlarchError
from mlarch.wording import Arg, error
from mlarch.ingest import paper_sampling, provenance
from mlarch.ingest.config import method_record
from mlarch.ingest.context import ScoringContext, WorkOrder
from mlarch.ingest.planning import Plan, Unit
from mlarch.store import arrays, layout
from mlarch.store import spans as span_layout
from mlarch.store.derive import levels_path, norms_path


class Reporter:
    """Progress sink; the CLI shows a progress bar, the API stays quiet by default."""

    def message(self, text: str) -> None:
        """Show one line of status."""

    def start_pass(self, label: str, total: int, unit: str = "samples") -> None:
        """A scoring pass of `total` samples (or other `unit`s: a Ray ingest's bar counts units) begins."""

    def advance(self, samples: int, tokens: int) -> None:
        """`samples` more samples and `tokens` more tokens of the current pass are done."""

    def end_pass(self) -> None:
        """The current pass is done."""


@dataclass
class Pending:
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


def work_order(work: Plan) -> WorkOrder:
    """The part of the plan that scoring needs."""
    return WorkOrder(work.cfg, work.name, work.analysis, work.kind, work.device, work.dtype, work.array_store,
                     work.items, {role: (s.name, s.describe()) for role, s in work.sources.items()}, work.pools)


def write_array(store, path: str, data: np.ndarray, compress: bool = True):
    """Every array an ingest writes goes through here: |W| (once per model), and each run's
    norms and level codes (possibly on a Ray worker)."""
    return arrays.write(store, path, data, compress=compress)


def draw_indices(order: WorkOrder, unit: Unit) -> np.ndarray:
    """The item indices a unit scores, in draw order (the driver recounts a Ray worker's)."""
    cfg, pool = order.cfg, order.pools.get((unit.lang, unit.role))
    n_items = len(order.items[(unit.lang, unit.role)].texts)
    if pool is None:
        return paper_sampling.draw(cfg.sampling, n_items, cfg.samples, unit.seed, cfg.shuffle_seed)
    # the same draw, over the pool of items an evaluation scored correct
    allowed = np.asarray(pool["items"], dtype=np.int64)
    return allowed[paper_sampling.draw(cfg.sampling, len(allowed), cfg.samples, unit.seed, cfg.shuffle_seed)]


def score_run(ctx: ScoringContext, unit: Unit, run_id: str) -> Future:
    """Run the forward pass here; select and write in `ctx.background` (a thread beside the
    next pass, or inline: see pipeline.overlaps). The returned future gives the run, ready to commit."""
    order, cfg, loaded, reporter = ctx.order, ctx.cfg, ctx.loaded, ctx.reporter
    lang, role, seed = unit.lang, unit.role, unit.seed
    loaded_items, pool = order.items[(lang, role)], order.pools.get((lang, role))
    group = layout.run_group(run_id)
    started = _now()
    texts_all = loaded_items.texts
    indices = draw_indices(order, unit)
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

    def finish() -> Pending:
        ctx.magnitudes_ready.result()  # done (the queue runs in order); re-raises its error
        norms = np.empty(span_layout.total_norms(spans), dtype=np.float32)
        for span in spans:
            norms[span.norms] = result.norms[span.module]
        if not np.isfinite(norms).all():  # no top-k of inf or NaN scores means anything
            bad = next(s.module for s in spans if not np.isfinite(norms[s.norms]).all())
            raise error(MlarchError, f"the activations entering {bad} overflowed to inf or NaN on {lang} {role} "
                        f"texts (dtype {loaded.dtype}): ingest in ", Arg("dtype", "float32"), ", or with a smaller ",
                        Arg("max_length"))
        if cfg.method == methods.BF16:  # the authors' bf16 scores and set sizes, not |W| x norms
            from mlarch.ingest import mathneuro

            levels = mathneuro.model_levels_bf16(spans, result.scores, cfg.top_k)
        else:
            levels = ctx.model_levels(norms)  # on the host, or where the weights are (CUDA)
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
                "model_files": loaded.model_files,
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
        return Pending(run_id, lang, role, seed, group, indices, records, result.n_tokens, result.n_truncated, prov,
                        levels)

    return ctx.background.submit(finish)
