"""The Python API: `mlarch.open(path)` returns an Archive. The CLI is a thin shell over it.

Importing this module stays light (DuckDB, polars): numpy loads with the array methods,
torch and transformers only when `ingest` runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.query import compare as _compare
from mlarch.store import catalog, layout

if TYPE_CHECKING:  # annotations only: numpy costs ~50 ms of every query command's start-up
    import numpy as np

# Statement types `sql` runs without --write (the connection is read-only as well).
READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA"}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.split("\n")[0].split()) if text else type(exc).__name__


class Archive:
    """An archive folder: catalog.duckdb (summary rows, provenance, views) + arrays.zarr/."""

    def __init__(self, path=None):
        self.root = layout.resolve(path)
        if not (self.root / layout.CATALOG).exists():
            layout.ensure_folder(self.root)  # first use creates it
            catalog.ensure_schema(self.catalog_path)
        # an existing catalog's schema version is checked by its first read
        # A finished run's arrays and a model's modules never change: cache their lookups
        # (every read attaches the catalog, and array access loops over modules).
        self._module_cache: dict[str, dict] = {}
        self._run_cache: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"Archive({str(self.root)!r})"

    @property
    def catalog_path(self) -> Path:
        return self.root / layout.CATALOG

    @property
    def arrays_path(self) -> Path:
        return self.root / layout.ARRAYS

    # --- SQL -------------------------------------------------------------------------
    def sql(self, query: str, params=None, *, write: bool = False) -> pl.DataFrame:
        """Run SQL against the catalog's tables and views. Read-only unless write=True."""
        try:
            statements = catalog.statements(query)
        except duckdb.Error as exc:
            raise MlarchError(f"SQL error: {_one_line(exc)}") from None
        if not statements:
            raise UsageError("no SQL statement given")
        if not write:
            for statement in statements:
                kind = statement.type.name
                if kind not in READ_STATEMENTS:
                    raise UsageError(
                        f"{kind} statements change the archive and are refused: pass --write "
                        "(sql(..., write=True)) if you mean it"
                    )
        context = catalog.writing(self.catalog_path) if write else catalog.reading(self.catalog_path)
        try:
            with context as con:
                for statement in statements[:-1]:
                    con.execute(statement.query).fetchall()
                return catalog.frame(con, statements[-1].query, params)
        except duckdb.Error as exc:
            raise MlarchError(f"SQL error: {_one_line(exc)}") from None

    def _read(self, query: str, params=None) -> pl.DataFrame:
        with catalog.reading(self.catalog_path) as con:
            return catalog.frame(con, query, params)

    # --- questions ---------------------------------------------------------------------
    def compare(self, model: str, langs, k: float | None = None, seed: int | None = None,
                by: str = "layer") -> pl.DataFrame:
        """Overlap of the languages' math-only sets for every model matching `model`."""
        if isinstance(langs, str):
            langs = [x.strip() for x in langs.split(",") if x.strip()]
        with catalog.reading(self.catalog_path) as con:
            return _compare.compare(con, model, list(langs), k=k, seed=seed, by=by)

    def runs(self, model: str | None = None) -> pl.DataFrame:
        frame = self._read(
            "SELECT run_id, model, lang, role, dataset, seed, n_samples, n_tokens, status, "
            "started_at, finished_at FROM runs ORDER BY started_at, run_id"
        )
        if model:
            frame = frame.filter(pl.col("model").str.to_lowercase().str.contains(model.lower(), literal=True))
        return frame

    def models(self) -> pl.DataFrame:
        return self._read("""
            SELECT m.model, m.architecture, m.dtype, m.n_modules, m.n_scored_params,
                   coalesce(string_agg(DISTINCT r.lang, ',' ORDER BY r.lang), '') AS langs,
                   coalesce(string_agg(DISTINCT r.seed::VARCHAR, ',' ORDER BY r.seed::VARCHAR), '') AS seeds,
                   count(r.run_id) AS n_runs, m.source
            FROM models m LEFT JOIN runs r ON r.model = m.model AND r.status = 'FINISHED' AND r.in_use
            GROUP BY ALL ORDER BY m.model""")

    def run(self, run_id: str) -> dict:
        """The run's catalog row with its full provenance."""
        with catalog.reading(self.catalog_path) as con:
            rows = catalog.frame(con, "SELECT * FROM runs WHERE run_id = $id", {"id": run_id})
            if rows.is_empty():
                known = [r[0] for r in con.execute(
                    "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 5").fetchall()]
                hint = f"recent runs: {', '.join(known)}" if known else "the archive has no runs"
                raise MlarchError(f"no run {run_id!r} in {self.root}; {hint} (see `mlarch runs`)")
        row = rows.row(0, named=True)
        row["provenance"] = json.loads(row["provenance"]) if row["provenance"] else None
        return row

    # --- arrays ------------------------------------------------------------------------
    def _arrays(self):
        from mlarch.store import arrays

        return arrays

    def _spans(self, model: str) -> dict:
        """module -> Span (position in the concatenated arrays) for one model (cached)."""
        if model not in self._module_cache:
            from mlarch.store.spans import read_spans

            with catalog.reading(self.catalog_path) as con:
                self._module_cache[model] = {s.module: s for s in read_spans(con, model)}
        return self._module_cache[model]

    def _span(self, model: str, module: str):
        spans = self._spans(model)
        if not spans:
            raise MlarchError(f"no model {model!r} in the archive (see `mlarch models`)")
        if module not in spans:
            raise MlarchError(f"model {model!r} has no scored module {module!r} (see the modules view)")
        return spans[module]

    def _run_arrays(self, run_id: str) -> dict:
        """model, arrays_group, k_values and magnitudes_group of a finished run (cached)."""
        if run_id not in self._run_cache:
            rows = self._read(
                "SELECT r.model, r.arrays_group, r.k_values, m.magnitudes_group FROM runs r "
                "JOIN models m USING (model) WHERE r.run_id = ? AND r.status = 'FINISHED'", [run_id])
            if rows.is_empty():
                self.run(run_id)  # raises "no run ..." with hints for unknown ids
                raise MlarchError(f"run {run_id} has not finished: it has no arrays to read")
            self._run_cache[run_id] = rows.row(0, named=True)
        return self._run_cache[run_id]

    def norms(self, run_id: str) -> dict[str, np.ndarray]:
        """Activation-norm vector (float32, length n_cols) of every scored module of a run."""
        from mlarch.store.derive import norms_path

        run = self._run_arrays(run_id)
        everything = self._arrays().read(self.arrays_path, norms_path(run["arrays_group"]))
        return {m: everything[span.norms] for m, span in self._spans(run["model"]).items()}

    def magnitudes(self, model: str, module: str) -> np.ndarray:
        """|W| of one module as scored (float32, out x in)."""
        from mlarch.store.derive import magnitudes_path
        from mlarch.store.layout import model_group

        span = self._span(model, module)
        flat = self._arrays().read(self.arrays_path, magnitudes_path(model_group(model)),
                                   span.param_offset, span.param_offset + span.n_params)
        return flat.reshape(span.n_rows, span.n_cols)

    def levels(self, run_id: str, module: str) -> np.ndarray:
        """Stored level codes of one (run, module), uint8, out x in: j + 1 = first in the
        top-k_values[j] set of that run, 0 = in none."""
        from mlarch.store.derive import levels_path

        run = self._run_arrays(run_id)
        span = self._span(run["model"], module)
        flat = self._arrays().read(self.arrays_path, levels_path(run["arrays_group"]),
                                   span.param_offset, span.param_offset + span.n_params)
        return flat.reshape(span.n_rows, span.n_cols)

    def scores(self, run_id: str, module: str) -> np.ndarray:
        """The full score array |W| * norms of one (run, module), float32, out x in."""
        from mlarch.ingest.selection import scores
        from mlarch.store.derive import norms_path

        run = self._run_arrays(run_id)
        span = self._span(run["model"], module)
        norms = self._arrays().read(self.arrays_path, norms_path(run["arrays_group"]),
                                    span.norm_offset, span.norm_offset + span.n_cols)
        return scores(self.magnitudes(run["model"], module), norms)

    def top_k(self, run_id: str, module: str, k: float) -> np.ndarray:
        """Boolean top-k mask of one (run, module) at any k in (0, 1), from the stored factors."""
        from mlarch.ingest.selection import level_codes

        if not 0 < k < 1:
            raise UsageError(f"k = {k} is outside (0, 1)")
        return level_codes(self.scores(run_id, module), [k]) == 1

    def selection(self, model: str, lang: str, k: float, module: str, seed: int | None = None) -> np.ndarray:
        """Boolean math-only mask (top-k math and not top-k control) of one module.

        Uses the stored level codes where k was archived, else re-thresholds the stored
        factors, so any k works without a GPU or the model."""
        from mlarch.ingest.selection import in_top

        query = ("SELECT role, run_id, k_values FROM runs WHERE model = ? AND lang = ? "
                 "AND status = 'FINISHED' AND in_use" + (" AND seed = ?" if seed is not None else "") +
                 " ORDER BY seed")
        rows = self._read(query, [model, lang] + ([seed] if seed is not None else []))
        runs = {}
        for row in rows.iter_rows(named=True):
            runs.setdefault(row["role"], row)
        if set(runs) != {"math", "control"}:
            raise MlarchError(f"model {model!r} has no math and control runs for {lang!r} (see `mlarch runs`)")
        masks = []
        for role in ("math", "control"):
            run = runs[role]
            if k in run["k_values"]:
                masks.append(in_top(self.levels(run["run_id"], module), run["k_values"].index(k)))
            else:
                masks.append(self.top_k(run["run_id"], module, k))
        return masks[0] & ~masks[1]

    # --- charts ------------------------------------------------------------------------
    def chart(self, kind: str, **options):
        """An altair.Chart of `kind` (sizes, overlap, heatmap, layers, upset) built from SQL
        aggregates; options mirror `mlarch chart` (model, langs, k, seed, by)."""
        from mlarch.charts import build

        return build(self, kind, **options)

    # --- ingest ------------------------------------------------------------------------
    def ingest(self, model: str, langs, math: str, control: str, *, reporter=None, **options):
        """Score `model` on each language's math and control texts and archive the runs.

        Options mirror `mlarch ingest`: name, samples, seeds, top_k, batch_size, max_length,
        device, dtype, revision, force, data_dir.
        """
        from mlarch.ingest.pipeline import IngestConfig, ingest

        if isinstance(langs, str):
            langs = [x.strip() for x in langs.split(",") if x.strip()]
        cfg = IngestConfig(model=model, langs=list(langs), math=math, control=control, **options)
        return ingest(self.root, cfg, reporter)
