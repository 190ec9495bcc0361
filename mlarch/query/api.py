"""Reading an archive: the Archive class whose methods query the catalog and the arrays.

`mlarch.open(path)` returns mlarch.archive.Archive, a subclass that adds what makes and
draws results (ingest, evaluate, demo, recompute, charts, reports); this module imports
none of that, so query only reads (tests/test_import_graph.py keeps it so).

Importing this module stays light (DuckDB, polars): numpy loads with the array methods.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.query import compare as _compare
from mlarch.query.params import SEE_RUNS, check_ks, check_path, check_sql, check_sql_params, check_text, check_texts
from mlarch.store import catalog, layout
from mlarch.wording import Arg, Phrase, brief, error

if TYPE_CHECKING:  # annotations only: numpy costs ~50 ms of every query command's start-up
    import numpy as np

# Statement types `sql` runs without --write: EXPLAIN only when the statement it wraps
# passes too, PRAGMA only one of READ_PRAGMAS (`PRAGMA x = y` parses as SET: refused).
# The connection is the read-only catalog.sandboxed() one as well, for whatever this misses.
READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA"}
READ_PRAGMAS = {"table_info", "show", "show_tables", "show_tables_expanded", "database_list", "database_size",
                "storage_info", "version", "platform", "functions", "collations"}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WRITE = Phrase("write=True", "--write")  # what lets `sql` change the archive
SHOW_LIST_LIMIT = 20  # `show` prints longer lists (the drawn indices) as a count and their first values


def _gap_end(text: str, pos: int) -> int:
    """Where the whitespace and comments from `pos` end (block comments nest, as in DuckDB)."""
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
        elif text.startswith("--", pos):
            newline = text.find("\n", pos)
            pos = len(text) if newline < 0 else newline + 1
        elif text.startswith("/*", pos):
            depth, pos = 1, pos + 2
            while depth and pos < len(text):
                if text.startswith("/*", pos):
                    depth, pos = depth + 1, pos + 2
                elif text.startswith("*/", pos):
                    depth, pos = depth - 1, pos + 2
                else:
                    pos += 1
        else:
            break
    return pos


def _word_at(text: str, pos: int) -> tuple[str, int]:
    """The keyword after whitespace and comments from `pos` (lower case, '' if none), and
    where it ends (where the gap ends, if none)."""
    pos = _gap_end(text, pos)
    word = _WORD.match(text, pos)
    return (word.group().lower(), word.end()) if word else ("", pos)


def _group_end(text: str, pos: int) -> int | None:
    """End of the parenthesised group at `pos` (quotes respected), None if unbalanced."""
    depth, quote = 0, None
    for i in range(pos, len(text)):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote  # a doubled quote closes and reopens: same result
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _refusal(statement, parse, depth: int = 0) -> str | None:
    """Why `sql` without --write refuses a parsed statement (None: it only reads)."""
    try:
        kind = statement.type.name
    except ValueError:  # a type this duckdb's Python API cannot even name (e.g. UPDATE EXTENSIONS)
        return "statements of a kind mlarch cannot check"
    text = statement.query
    first, end = _word_at(text, 0)
    if kind not in READ_STATEMENTS:  # named as the user wrote it too: INSTALL is a LOAD, TRUNCATE a DELETE
        also = f" ({first.upper()} ...)" if first and first != kind.lower() else ""
        return f"{kind} statements{also} change the archive or reach beyond it"
    if kind == "PRAGMA":  # IMPORT DATABASE parses as a PRAGMA too
        name = _word_at(text, end)[0] if first == "pragma" else ""
        if name not in READ_PRAGMAS:
            shown = f"PRAGMA {name}" if name else f"{first.upper() or 'this statement'} ..."
            return f"{shown} is not a read-only pragma ({', '.join(sorted(READ_PRAGMAS))})"
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs what it wraps: check that instead
        if first != "explain":  # something this scan misreads: no guessing
            return "EXPLAIN of a statement mlarch cannot check"
        pos = end
        starts = [pos]
        word, end = _word_at(text, pos)
        if word in ("analyze", "analyse"):
            starts.append(end)
        for start in list(starts):  # options: EXPLAIN [ANALYZE] (FORMAT json) ...
            opening = _gap_end(text, start)
            if text.startswith("(", opening) and (end := _group_end(text, opening)) is not None:
                starts.append(end)
        # every reading of the text that parses must pass, and one must parse: fail closed
        inner = []
        for start in starts:
            try:
                inner.extend(parse(text[start:]))
            except (duckdb.Error, ValueError):
                continue
        if not inner or depth > 2:
            return "EXPLAIN of a statement mlarch cannot check"
        for wrapped in inner:
            why = _refusal(wrapped, parse, depth + 1)
            if why:
                return f"EXPLAIN runs what it wraps, and {why}"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.split("\n")[0].split()) if text else type(exc).__name__


def _parsed(extract, query: str) -> list:
    """The statements of `query` (extract: a DuckDB connection's extract_statements)."""
    try:
        statements = extract(query)
    except (duckdb.Error, ValueError) as exc:
        raise MlarchError(f"SQL error: {_one_line(exc)}") from None
    if not statements:
        raise UsageError("no SQL statement given")
    return statements


def _run(con, statements, params) -> pl.DataFrame:
    from mlarch.query.frames import arrow_frame
    from mlarch.query.params import check_params

    check_params(statements, params)  # before anything runs: a missing $name is a usage error
    for statement in statements[:-1]:
        con.execute(statement.query).fetchall()
    return arrow_frame(con, statements[-1].query, params)  # Arrow, not Python rows: 1 M rows in < 1 s


_LANGS_FIX = ("e.g. ", Phrase("langs=['en', 'de'] or langs='en,de'", "--langs en,de"))
_SEE_EVALS = Phrase("see Archive.evaluations()", "see `mlarch evals`")
_SEE_MODELS = Phrase("see Archive.models()", "see `mlarch models`")
_SEE_MODULES = Phrase("see the modules view, Archive.sql('SELECT * FROM modules')", "see `mlarch sql 'SELECT * FROM "
                      "modules'`")


def _langs(langs, name: str = "langs") -> list[str] | None:
    """A comma string or a list of language codes, as a list (None stays None); anything
    else, or a list holding something other than a string, is a UsageError naming `name`."""
    if langs is None:
        return None
    if isinstance(langs, str):
        return [x.strip() for x in langs.split(",") if x.strip()]
    if isinstance(langs, (bytes, bytearray, Mapping)) or not isinstance(langs, Iterable):
        raise error(UsageError, Arg(name), f" takes language codes (a list, or a comma string), got {brief(langs)}: ",
                    *_LANGS_FIX)
    langs = list(langs)
    for i, lang in enumerate(langs):
        if not isinstance(lang, str):
            raise error(UsageError, Arg(name), f" holds {brief(lang)} at index {i}, not a language code (a string): ",
                        *_LANGS_FIX)
    return langs


def _model_text(model, name: str = "model") -> str:
    """A model argument (an archived name, or a part of one) as a str, else a UsageError."""
    return check_text(model, name, "a model name", _SEE_MODELS)


def _name_filter(frame: pl.DataFrame, model) -> pl.DataFrame:
    """`frame`'s rows whose model contains `model` (case-insensitive; None or '': all)."""
    if model is None:
        return frame
    model = check_text(model, "model", "a model name (or a part of one)", _SEE_MODELS)
    if not model:
        return frame
    return frame.filter(pl.col("model").str.to_lowercase().str.contains(model.lower(), literal=True))


def _flatten(rows: list, prefix: str, value) -> None:
    """Append (dotted key, text) rows for `value`: dicts by key, long lists shortened."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(rows, f"{prefix}.{key}" if prefix else str(key), inner)
    elif isinstance(value, list) and len(value) > SHOW_LIST_LIMIT:
        rows.append((prefix, f"[{len(value)} values] " + ",".join(map(str, value[:SHOW_LIST_LIMIT])) + ",..."))
    elif isinstance(value, list):
        rows.append((prefix, ",".join(map(str, value))))
    else:
        rows.append((prefix, "" if value is None else str(value)))


def _check_sealed(con, kind: str, name: str) -> None:
    """Refuse a run or model whose rows no longer give their record digest, before its arrays
    are read through them: k_values say which level is which k, and the modules rows where
    each matrix lies in the arrays; an edit there would read another set, silently."""
    from mlarch.store import records

    if not records.sealed_in(con, kind, name):
        raise MlarchError(f"the catalog rows of {kind} {name} changed since it was archived (its record digest "
                          "differs), so its arrays cannot be read through them: run `mlarch verify`, then restore "
                          "the catalog from a copy")


class Archive:
    """An archive folder, read: catalog.duckdb (summary rows, provenance, views) + arrays.zarr/.

    `mlarch.open` returns the subclass mlarch.archive.Archive, which also scores and draws."""

    def __init__(self, path=None):
        # Creates nothing: reads of a path without a catalog fail (a typo must not leave an
        # empty archive behind); ingest and import-bundle create the folder and catalog.
        # A catalog's schema version is checked by its first read. s3://BUCKET/PREFIX: a
        # published archive, its catalog fetched into the cache (read-only).
        from mlarch.store.remote_catalog import resolve

        if path is not None:
            check_path(path, "path", "an archive folder or s3://BUCKET/PREFIX", "mlarch-archive")
        self.root = resolve(path)
        # A finished run's arrays and a model's modules never change while the catalog does
        # not: cache their lookups (every read attaches the catalog, and array access loops
        # over modules), and drop them once the catalog file changed (_cached).
        self._module_cache: dict[str, dict] = {}
        self._run_cache: dict[str, dict] = {}
        self._record_cache: dict[tuple[str, str], object] = {}
        self._cached_for: tuple | None = None

    def __repr__(self) -> str:
        return f"Archive({str(self.root)!r})"

    @property
    def catalog_path(self) -> Path:
        """The archive's DuckDB catalog file (root/catalog.duckdb)."""
        return self.root / layout.CATALOG

    @property
    def arrays_path(self) -> Path:
        """The archive's zarr store of arrays (root/arrays.zarr)."""
        return self.root / layout.ARRAYS

    # --- SQL -------------------------------------------------------------------------
    def sql(self, query: str, params=None, *, write: bool = False) -> pl.DataFrame:
        """Run SQL against the catalog's tables and views.

        Read-only unless write=True, in two layers: only SELECT, EXPLAIN of such (EXPLAIN
        ANALYZE runs what it wraps) and read-only PRAGMAs (READ_PRAGMAS) pass; and they run
        on a connection of their own that reaches no file but the catalog, loads no
        extension and cannot be reconfigured (catalog.SANDBOX). So without write=True,
        read_csv / read_parquet / glob of other files are refused too: use write=True
        (`mlarch sql --write`), which runs anything in one read-write transaction (loading
        no extension unless it says LOAD), or DuckDB directly. Both modes fail on a path that
        holds no archive, creating nothing.

        params: a dict binds each $name (a list binds ? in order), never pasted into the
        text; a $name without a value, or a value no $name uses, is a UsageError before
        anything runs. Statements separated by ; run in order and the frame holds the
        last one's rows (params bind in the last; a parameter in an earlier one is a
        UsageError). The frame comes through DuckDB's Arrow stream (1 M rows in about a
        second; UUID, MAP, STRUCT, LIST as polars types; INTERVAL, UNION, BIT, UHUGEINT
        as DuckDB's text; DECIMAL as Float64, HUGEINT as Int64, or Int128 beyond it)."""
        query, params = check_sql(query), check_sql_params(params)
        if not write:
            return self._sql_read(query, params)
        statements = _parsed(catalog.statements, query)
        try:
            with catalog.writing(self.catalog_path, reach_files=True) as con:
                return _run(con, statements, params)
        except duckdb.Error as exc:
            raise MlarchError(f"SQL error: {_one_line(exc)}") from None

    def _sql_read(self, query: str, params) -> pl.DataFrame:
        # parsed on the sandbox itself: a second DuckDB instance just to parse costs ~as much
        with catalog.sandboxed(self.catalog_path) as con:
            statements = _parsed(con.extract_statements, query)
            for statement in statements:
                why = _refusal(statement, con.extract_statements)
                if why:
                    raise error(UsageError, f"{why}: refused without ", _WRITE, " (pass ", _WRITE,
                                " if you mean it)")
            try:
                return _run(con, statements, params)
            except duckdb.PermissionException as exc:
                raise error(MlarchError, f"SQL error: {_one_line(exc)}: without ", _WRITE, " ",
                            Phrase("sql()", "`mlarch sql`"), " reads the catalog and nothing else; pass ", _WRITE,
                            ", or use DuckDB directly, to read other files") from None
            except duckdb.Error as exc:
                raise MlarchError(f"SQL error: {_one_line(exc)}") from None

    def _read(self, query: str, params=None) -> pl.DataFrame:
        with catalog.reading(self.catalog_path) as con:
            return catalog.frame(con, query, params)

    # --- questions ---------------------------------------------------------------------
    def compare(self, model: str, langs, k: float | None = None, seed: int | None = None,
                by: str = "layer", analysis: str | None = None) -> pl.DataFrame:
        """Overlap of the languages' math-only sets for every model `model` names, in one
        analysis of each (`analysis`; default: each model's only one, else an error listing them).

        model: a pattern, or a comma list of them ("gemma,qwen", rows in that order; each part
        must match): a part that is an archived name means that model only, else every model
        whose name contains it (case-insensitive), so "tiny" compares tiny-llama with tiny-qwen.
        k: any fraction in (0, 1) (default 0.01 when archived, else the smallest archived): a k
        not archived is re-thresholded from the stored |W| x norms, as selection() does, which
        reads every module's arrays (a mathneuro-bf16 analysis allows only its archived k).
        Across models: n_params and the *_share columns (counts over the scored parameters of
        the row's layer, module or model); by='layer'/'module' add depth = layer / (blocks - 1)."""
        from mlarch.query.compare_rethreshold import patterns

        model, langs = _model_text(model), _langs(langs)
        if langs is None:
            raise error(UsageError, "compare needs at least two languages, e.g. ", Arg("langs", ["en", "de"]))
        with catalog.reading(self.catalog_path) as con:
            plan = _compare.plan(con, model, langs, k=k, seed=seed, by=by, analysis=analysis)
        rows = patterns(self, plan) if plan.rethreshold else None
        with catalog.reading(self.catalog_path) as con:
            return _compare.overlap_rows(con, plan, by, rows)

    def analyses(self, model: str | None = None) -> pl.DataFrame:
        """The analyses (named configurations) of each model: their sources (one per role, or
        `source (langs); ...` where languages differ), settings, and the languages, seeds and
        runs in use."""
        from mlarch.store.analyses import describe

        frame = self._read("""
            SELECT a.model, a.analysis, a.config,
                   coalesce(string_agg(DISTINCT r.lang, ',' ORDER BY r.lang), '') AS langs,
                   coalesce(string_agg(DISTINCT r.seed::VARCHAR, ',' ORDER BY r.seed::VARCHAR), '') AS seeds,
                   count(r.run_id) AS n_runs, a.config_digest, a.created_at
            FROM analyses a LEFT JOIN runs r ON r.model = a.model AND r.analysis = a.analysis
                 AND r.status = 'FINISHED' AND r.in_use
            GROUP BY ALL ORDER BY a.model, a.created_at, a.analysis""")
        frame = _name_filter(frame, model)
        shown = [describe(config) for config in frame["config"].to_list()]
        columns = {"math": pl.Utf8, "control": pl.Utf8, "samples": pl.Int64, "max_length": pl.Int64,
                   "top_k": pl.Utf8, "only_correct": pl.Boolean, "method": pl.Utf8}
        settings = pl.DataFrame([[row[c] for c in columns] for row in shown], schema=columns, orient="row")
        return pl.concat([frame.select("model", "analysis"), settings,
                          frame.select("langs", "seeds", "n_runs", "config_digest", "created_at")], how="horizontal")

    def analysis_overlap(self, model: str, langs=None, analyses=None, k=None, seed: int | None = None,
                         by: str = "layer") -> pl.DataFrame:
        """How the math-only sets change from one analysis to another (control A vs control B,
        or the exact method vs the authors' bf16 arithmetic): intersection, union and Jaccard
        per language, k and layer (by='module', 'global'), from the per-parameter masks.

        langs: 'en', 'en,de' or a list (default: every language both have); analyses: 'A,B'
        or [A, B] (default: the model's exact analysis X and the paper-compatible X-paper);
        k: a number, a list, or None / 'all' (every k both have sets at; a mathneuro-bf16
        analysis's archived k, which are the only ones it allows)."""
        from mlarch.query.analysis_overlap import analysis_overlap

        model, langs = _model_text(model), _langs(langs)
        if isinstance(analyses, str):  # 'a,b' as the CLI's --analyses takes it
            analyses = [a.strip() for a in analyses.split(",")]
        analyses = check_texts(analyses, "analyses", "an analysis name",
                               Phrase("see Archive.analyses()", "see `mlarch analyses`"))
        check_ks(k)
        return analysis_overlap(self, model, langs, analyses, k=k, seed=_compare.check_seed(seed), by=by)

    def runs(self, model: str | None = None) -> pl.DataFrame:
        """The runs, one row per scoring pass (run_id, model, analysis, lang, role, dataset, seed, sizes, status,
        times), as `mlarch runs`; `model` keeps models whose name contains it (case-insensitive)."""
        frame = self._read(
            "SELECT run_id, model, analysis, lang, role, dataset, seed, n_samples, n_tokens, status, "
            "started_at, finished_at FROM runs ORDER BY started_at, run_id"
        )
        return _name_filter(frame, model)

    def models(self) -> pl.DataFrame:
        """The archived models with their architecture, dtype, scored modules and parameters, and the languages, seeds
        and runs in use, as `mlarch models`."""
        return self._read("""
            SELECT m.model, m.architecture, m.dtype, m.n_modules, m.n_scored_params,
                   coalesce(string_agg(DISTINCT r.lang, ',' ORDER BY r.lang), '') AS langs,
                   coalesce(string_agg(DISTINCT r.seed::VARCHAR, ',' ORDER BY r.seed::VARCHAR), '') AS seeds,
                   count(r.run_id) AS n_runs, m.source
            FROM models m LEFT JOIN runs r ON r.model = m.model AND r.status = 'FINISHED' AND r.in_use
            GROUP BY ALL ORDER BY m.model""")

    def run(self, run_id: str) -> dict:
        """The run's catalog row with its full provenance."""
        check_text(run_id, "run_id", "a run id", SEE_RUNS)
        with catalog.reading(self.catalog_path) as con:
            rows = catalog.frame(con, "SELECT * FROM runs WHERE run_id = $id", {"id": run_id})
            if rows.is_empty():
                known = [r[0] for r in con.execute(
                    "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 5").fetchall()]
                hint = f"recent runs: {', '.join(known)}" if known else "the archive has no runs"
                raise MlarchError(f"no run {run_id!r} in {self.root}; {hint} (see `mlarch runs`)")
        row = rows.row(0, named=True)
        try:
            row["provenance"] = json.loads(row["provenance"]) if row["provenance"] else None
        except (ValueError, RecursionError):  # DuckDB's JSON type takes 100,000 levels; json does not
            raise MlarchError(f"run {run_id}'s provenance is not JSON mlarch can read (an edited catalog?): "
                              "run `mlarch verify` to list damage") from None
        return row

    # --- arrays ------------------------------------------------------------------------
    def _arrays(self):
        from mlarch.store import arrays

        return arrays

    def _array_store(self):
        """Where the arrays are: arrays.zarr, or the S3 prefix the catalog records (looked up,
        and a bucket probed, once per Archive that has a catalog)."""
        store = self.__dict__.get("_store")
        if store is None:
            from mlarch.store import array_store

            store = array_store.of(self.root)
            if self.catalog_path.exists():
                self._store = store
        return store

    def _cached(self) -> None:
        """Drop the cached lookups if the catalog file (or its write-ahead log) changed since
        they were made: a model removed and ingested again under its name (here or by another
        process) has other modules and another |W|, and reading the new runs at the old
        offsets would hand back another module's entries. Two stat calls, no catalog read."""
        state = []
        for suffix in ("", ".wal"):
            try:
                found = os.stat(f"{self.catalog_path}{suffix}")
                state.append((found.st_ino, found.st_size, found.st_mtime_ns))
            except OSError:
                state.append(None)
        if tuple(state) != self._cached_for:  # taken before the reads it guards: a later write clears them
            self._module_cache.clear()
            self._run_cache.clear()
            self._record_cache.clear()
            self._cached_for = tuple(state)

    def _spans(self, model: str) -> dict:
        """module -> Span (position in the concatenated arrays) for one model (cached)."""
        self._cached()
        if model not in self._module_cache:
            from mlarch.store.spans import read_spans

            with catalog.reading(self.catalog_path) as con:
                spans = {s.module: s for s in read_spans(con, model)}
                if spans:
                    _check_sealed(con, "model", model)
            if not spans:  # not an archived name (yet): nothing cached
                return spans
            self._module_cache[model] = spans
        return self._module_cache[model]

    def _model_name(self, model: str) -> str:
        """`model` resolved as resolve_model does, without a catalog read for an archived name."""
        _model_text(model)
        return model if self._spans(model) else self.resolve_model(model)

    def _span(self, model: str, module: str):
        check_text(module, "module", "a module name", _SEE_MODULES)
        model = self._model_name(model)
        spans = self._spans(model)
        if module not in spans:
            raise MlarchError(f"model {model!r} has no scored module {module!r} (see the modules view)")
        return spans[module]

    def _run_arrays(self, run_id: str) -> dict:
        """model, k_values and scoring method of a finished run of an archived model (cached)."""
        check_text(run_id, "run_id", "a run id", SEE_RUNS)
        self._cached()
        if run_id not in self._run_cache:
            with catalog.reading(self.catalog_path) as con:
                rows = catalog.frame(
                    con, "SELECT r.model, r.k_values, json_extract_string(r.provenance, '$.method.name') AS method "
                    "FROM runs r JOIN models m USING (model) WHERE r.run_id = $id AND r.status = 'FINISHED'",
                    {"id": run_id})
                if not rows.is_empty():
                    _check_sealed(con, "run", run_id)
            if rows.is_empty():
                self.run(run_id)  # raises "no run ..." with hints for unknown ids
                raise MlarchError(f"run {run_id} has not finished: it has no arrays to read")
            self._run_cache[run_id] = rows.row(0, named=True)
        return self._run_cache[run_id]

    def _record(self, owner: str, kind: str):
        """The catalog's record of one array (cached): every read is checked against it."""
        key = (owner, kind)
        self._cached()
        if key not in self._record_cache:
            from mlarch.store.arrays import RECORD_COLUMNS, catalog_record

            columns = f"owner, kind, {RECORD_COLUMNS}"
            if kind == "magnitudes":  # by the group the model's row names: |W| is shared per weights digest
                rows = self._read(f"SELECT {columns} FROM arrays WHERE kind = 'magnitudes' AND path = "
                                  "(SELECT magnitudes_group || '/magnitudes' FROM models WHERE model = ?)", [owner])
            else:
                rows = self._read(f"SELECT {columns} FROM arrays WHERE owner = ? AND kind = ?", [owner, kind])
            if rows.is_empty():
                raise MlarchError(f"the catalog records no {kind} array for {owner!r}: run `mlarch verify`, then "
                                  "remove the damaged run or model with `mlarch rm` and re-ingest it")
            self._record_cache[key] = catalog_record(rows.row(0, named=True))  # its path checked
        return self._record_cache[key]

    def norms(self, run_id: str) -> dict[str, np.ndarray]:
        """Activation-norm vector (float32, length n_cols) of every scored module of a run."""
        run = self._run_arrays(run_id)
        everything = self._arrays().read(self._array_store(), self._record(run_id, "norms"))
        return {m: everything[span.norms] for m, span in self._spans(run["model"]).items()}

    def magnitudes(self, model: str, module: str) -> np.ndarray:
        """|W| of one module as scored (float32, out x in); `model` as resolve_model takes it."""
        model = self._model_name(model)
        span = self._span(model, module)
        flat = self._arrays().read(self._array_store(), self._record(model, "magnitudes"),
                                   span.param_offset, span.param_offset + span.n_params)
        return flat.reshape(span.n_rows, span.n_cols)

    def levels(self, run_id: str, module: str) -> np.ndarray:
        """Stored level codes of one (run, module), uint8, out x in: j + 1 = first in the
        top-k_values[j] set of that run, 0 = in none."""
        run = self._run_arrays(run_id)
        span = self._span(run["model"], module)
        flat = self._arrays().read(self._array_store(), self._record(run_id, "levels"),
                                   span.param_offset, span.param_offset + span.n_params)
        return flat.reshape(span.n_rows, span.n_cols)

    def scores(self, run_id: str, module: str) -> np.ndarray:
        """The full score array |W| * norms of one (run, module), float32, out x in."""
        from mlarch import methods
        from mlarch.selection import scores

        run = self._run_arrays(run_id)
        if not methods.rethresholdable(run["method"] or methods.EXACT):
            raise error(UsageError, f"run {run_id} used ", Arg("method", run["method"]), ", whose bf16 scores are "
                        "not |W| x norms and are not archived: read its sets with levels() or selection() at an "
                        "archived k")
        span = self._span(run["model"], module)
        norms = self._arrays().read(self._array_store(), self._record(run_id, "norms"),
                                    span.norm_offset, span.norm_offset + span.n_cols)
        return scores(self.magnitudes(run["model"], module), norms)

    def top_k(self, run_id: str, module: str, k: float) -> np.ndarray:
        """Boolean top-k mask of one (run, module) at any k in (0, 1), from the stored factors
        (a mathneuro-bf16 run: only at a k it archived, from its level codes)."""
        from mlarch import methods
        from mlarch.selection import in_top, level_codes

        k = _compare.check_k(k)  # "0.01" too, as compare and sizes take it
        run = self._run_arrays(run_id)
        if not methods.rethresholdable(run["method"] or methods.EXACT):
            k_values = [float(v) for v in run["k_values"]]
            methods.check_rethreshold(run_id, run["method"], k, k_values)
            return in_top(self.levels(run_id, module), k_values.index(float(k)))
        return level_codes(self.scores(run_id, module), [k]) == 1

    def resolve_model(self, model: str) -> str:
        """The archived model `model` names, by the rule every method taking one model uses:
        the exact name wins, else the only model whose name contains it (case-insensitive);
        several are a UsageError listing them, none an MlarchError listing the archive's models."""
        from mlarch.query.model_names import resolve_model

        _model_text(model)
        with catalog.reading(self.catalog_path) as con:
            return resolve_model(con, model)

    def resolve_analysis(self, model: str, analysis: str | None = None) -> str:
        """The analysis of `model` (resolved as resolve_model does) to use: `analysis`
        (checked), else the only one; a UsageError listing them when there are several."""
        from mlarch.query.model_names import resolve_model
        from mlarch.store import analyses

        _model_text(model)
        with catalog.reading(self.catalog_path) as con:
            return analyses.resolve(con, resolve_model(con, model), analysis)

    def selection(self, model: str, lang: str, k: float, module: str, seed: int | None = None,
                  analysis: str | None = None) -> np.ndarray:
        """Boolean math-only mask (top-k math and not top-k control) of one module, in one
        analysis of the model (default: its only one, else an error listing them).

        Uses the stored level codes where k was archived, else re-thresholds the stored
        factors, so any k works without a GPU or the model (except for a mathneuro-bf16
        analysis, whose runs hold sets only at the k they archived: another k is an error)."""
        from mlarch.selection import in_top

        check_text(lang, "lang", "a language code", "e.g. ", Arg("lang", "en"))
        k, seed = _compare.check_k(k), _compare.check_seed(seed)
        check_text(module, "module", "a module name", _SEE_MODULES)
        model = self.resolve_model(model)
        analysis = self.resolve_analysis(model, analysis)
        # the pair of runs the derived tables used: one seed, both roles (never a math run of
        # one seed against a control run of another)
        with catalog.reading(self.catalog_path) as con:
            first = con.execute(
                "SELECT min(s.seed) FROM selections s WHERE s.model = ? AND s.analysis = ? AND s.lang = ?"
                + (" AND s.seed = ?" if seed is not None else ""),
                [model, analysis, lang] + ([seed] if seed is not None else [])).fetchone()[0]
            pair = _compare.pair_runs(con, model, analysis, lang, first) if first is not None else None
        if pair is None:
            where = f" at seed {seed}" if seed is not None else ""
            where += f" in analysis {analysis!r}"
            roles = self._read("SELECT DISTINCT role FROM runs WHERE model = ? AND analysis = ? AND lang = ? AND in_use "
                               "AND status = 'FINISHED'" + (" AND seed = ?" if seed is not None else ""),
                               [model, analysis, lang] + ([seed] if seed is not None else []))
            if roles.height == 2:  # both archived, but derive found no k in common
                raise error(MlarchError, f"the math and control runs of {model!r}, {lang!r}{where} share no k value, "
                            "so no math-only set was derived from them: ingest both roles with the same ",
                            Arg("top_k"))
            raise MlarchError(f"model {model!r} has no math and control runs for {lang!r}{where} (see `mlarch runs`)")
        masks = []
        for run_id in pair:
            k_values = list(self._run_arrays(run_id)["k_values"])
            if k not in k_values:  # a bf16 run cannot re-threshold: refused, naming the run and its k values
                from mlarch import methods

                methods.check_rethreshold(run_id, self._run_arrays(run_id)["method"] or methods.EXACT, k, k_values)
            masks.append(in_top(self.levels(run_id, module), k_values.index(k)) if k in k_values
                         else self.top_k(run_id, module, k))
        return masks[0] & ~masks[1]

    # --- evaluations -------------------------------------------------------------------
    def evaluations(self, model: str | None = None, *, eval_ids=None) -> pl.DataFrame:
        """Finished evaluations (the newest of each configuration), optionally only those of
        models whose name contains `model`, or only `eval_ids`."""
        frame = self._read(
            "SELECT eval_id, model, analysis, task, dataset, role, lang, intervention, target_lang, k, seed, factor, n_set, "
            "n_params_changed, n_items, n_tokens, value, stderr, finished_at FROM evaluations_current "
            "ORDER BY model, task, dataset, role, lang, intervention <> 'none', target_lang, k, "
            "list_position(['prune', 'scale', 'random', 'fraction'], intervention), factor, eval_id")
        frame = _name_filter(frame, model)
        if eval_ids is not None:
            eval_ids = check_texts(eval_ids, "eval_ids", "an eval id", _SEE_EVALS)
            frame = frame.filter(pl.col("eval_id").is_in(eval_ids))
        return frame

    def evaluation_items(self, eval_id: str) -> pl.DataFrame:
        """Per-item results of one evaluation (NLL per item, or completion and correctness)."""
        check_text(eval_id, "eval_id", "an eval id", _SEE_EVALS)
        return self._read("SELECT * FROM evaluation_items WHERE eval_id = ? ORDER BY position", [eval_id])

    # --- maintenance -------------------------------------------------------------------
    def rm(self, run_ids=None, model: str | None = None, *, dry_run: bool = False) -> list[str]:
        """Remove runs (a list of ids) or a whole model (exact name) and everything derived
        from them, as `mlarch rm`; dry_run=True removes nothing and returns what would go
        (runs, evaluations, analyses, array folders with sizes, then a total line)."""
        from mlarch.store.maintenance import rm

        run_ids = self._run_ids(run_ids)
        if model is not None:
            check_text(model, "model", "a model name", _SEE_MODELS)
        if bool(run_ids) == bool(model):
            raise UsageError("give run_ids or model (one of them)")
        self._require()
        self._check_odd_ids(run_ids)
        return rm(self.root, run_ids or None, model, dry_run=dry_run)

    @staticmethod
    def _run_ids(run_ids) -> list[str] | None:
        """run_ids of verify, rm and export_bundle (one id or a list; None stays None), checked:
        each a non-empty string."""
        return check_texts(run_ids, "run_ids", "a run id", SEE_RUNS)

    def _check_odd_ids(self, run_ids: list[str] | None) -> None:
        """An id with control characters or outer blanks that no run has: refused here, shown
        as its repr (the store's message prints ids as they are: a newline would break it)."""
        odd = [rid for rid in run_ids or [] if not rid.isprintable() or rid != rid.strip()]
        if odd:
            known = set(self._read("SELECT run_id FROM runs WHERE list_contains($ids, run_id)",
                                   {"ids": odd})["run_id"].to_list())
            missing = [rid for rid in odd if rid not in known]
            if missing:
                raise error(MlarchError, f"no run {', '.join(brief(rid) for rid in missing)} in {self.root}: ",
                            SEE_RUNS)

    def _require(self) -> None:
        """Raise unless the folder holds a catalog: no lock file or folder left in a stray path."""
        if not self.catalog_path.exists():
            raise catalog.missing_archive(self.root)

    def verify(self, run_ids=None) -> pl.DataFrame:
        """Check the archive as `mlarch verify` does: every array against its recorded sha256,
        record digests, set sizes and pattern counts against a recount from the stored masks,
        no orphans or leftovers (only the given runs' checks with run_ids). Returns one row per
        check (check, object, status 'ok' or 'FAIL', detail); raises nothing for a failed check:
        `frame.filter(pl.col("status") == "FAIL")` lists them."""
        from mlarch.store.maintenance import verify

        run_ids = self._run_ids(run_ids)
        if run_ids == []:  # not "every run": a list that came out empty is more likely a mistake
            raise error(UsageError, Arg("run_ids", []), " names no run: pass run ids, or leave ", Arg("run_ids"),
                        " out (None) to verify the whole archive")
        self._require()
        self._check_odd_ids(run_ids)
        checks = verify(self.root, run_ids)
        return pl.DataFrame([{"check": c.check, "object": c.object, "status": "ok" if c.ok else "FAIL",
                              "detail": c.detail} for c in checks],
                            schema={"check": pl.Utf8, "object": pl.Utf8, "status": pl.Utf8, "detail": pl.Utf8})

    def gc(self) -> list[str]:
        """Remove leftovers of interrupted ingests and imports (FAILED runs, RUNNING runs whose
        process is gone, arrays no run or model owns, staging folders of a killed import), as
        `mlarch gc`. Returns one line per thing removed (empty: nothing to remove)."""
        from mlarch.store.maintenance import gc

        self._require()
        return gc(self.root)

    def show(self, run_id: str) -> pl.DataFrame:
        """One run's catalog row and full provenance as (key, value) text rows, nested keys
        dotted (model.source, data.files...) and lists of more than 20 values shortened, as
        `mlarch show` prints them. Archive.run(run_id) gives the same as a dict."""
        run = self.run(run_id)
        rows: list[tuple[str, str]] = []
        provenance = run.pop("provenance") or {}
        _flatten(rows, "", dict(run))
        _flatten(rows, "", {k: v for k, v in provenance.items() if k not in run or isinstance(v, dict)})
        return pl.DataFrame(rows, schema={"key": pl.Utf8, "value": pl.Utf8}, orient="row")

    # --- export and bundles ------------------------------------------------------------
    def export(self, folder, *, format: str = "parquet") -> list[Path]:  # noqa: A002 - the CLI's --format
        """Write every catalog table and view as <name>.parquet in `folder` (created if
        missing), as `mlarch export`, for DuckDB, polars or Spark. Returns the files written."""
        from mlarch.store.bundle import export_parquet

        check_path(folder, "folder", "a folder", "export")
        if format != "parquet":
            raise UsageError(f"format={format!r} is not known: the only export format is 'parquet'")
        self._require()
        return export_parquet(self.root, Path(folder))

    def export_bundle(self, path, run_ids=None, *, model: str | None = None, anonymize: bool = False) -> dict:
        """Write finished runs (run_ids, or every one of `model`, an exact name) with their arrays,
        catalog rows and a manifest of digests to the .tar file `path`, as `mlarch export-bundle`.
        anonymize=True drops host names and absolute paths (which name the user) from the rows
        (provenance, model source, data paths) and records that in the manifest; the bundle still imports and
        verifies. Returns {"runs": n, "models": [...], "arrays": n, "bytes": n, "anonymized": bool}."""
        from mlarch.store.bundle import export_bundle

        check_path(path, "path", "a .tar file", "runs.tar")
        run_ids = self._run_ids(run_ids)
        if model is not None:
            check_text(model, "model", "a model name", _SEE_MODELS)
        if bool(run_ids) == bool(model):
            raise UsageError("give run_ids or model (one of them)")
        self._require()
        self._check_odd_ids(run_ids)
        return export_bundle(self.root, Path(path), run_ids or None, model, anonymize=anonymize)

    def publish(self, url: str) -> dict:
        """Upload a consistent snapshot of the catalog, and a manifest of its sha256, size and
        schema version, to `url` (s3://BUCKET/PREFIX, where this archive's arrays already are),
        as `mlarch publish`: `mlarch.open(url)` then reads it anywhere. Returns {"url",
        "sha256", "size", "schema_version", "runs"}."""
        from mlarch.store.remote_catalog import publish

        self._require()
        return publish(self.root, url)

    def import_bundle(self, path) -> dict:
        """Merge a bundle into this archive (created if missing), verifying every digest first,
        as `mlarch import-bundle`; runs already present are skipped. Returns {"imported": [run
        ids], "skipped": [run ids], "models": [new model names]}."""
        from mlarch.store.bundle import import_bundle

        check_path(path, "path", "a bundle (.tar file)", "runs.tar")
        return import_bundle(self.root, Path(path))

    # --- summaries ---------------------------------------------------------------------
    def sizes(self, model: str, k: float | None = None, seed: int | None = None,
              analysis: str | None = None) -> pl.DataFrame:
        """Math-only set size per language, all modules pooled (lang, n_selected, n_params,
        percent), largest first, for one model (as resolve_model takes it) in one analysis
        (default: its only one) at k and seed (defaults as in compare: k = 0.01 when archived,
        else the smallest; the smallest seed), as the demo prints it. A k not archived is
        re-thresholded from the stored |W| x norms, as compare() and selection() do."""
        model = self.resolve_model(model)  # names the archive's models for a typo
        analysis = self.resolve_analysis(model, analysis)
        with catalog.reading(self.catalog_path) as con:
            sets = _compare.derived_sets(con, [model], [analysis])
            k, seed = _compare.resolve_k_seed(sets, k, seed, any_k=True)
            langs = sorted(lang for (seed_, lang) in sets[model] if seed_ == seed)
            if all(k in sets[model][(seed, lang)] for lang in langs):
                return catalog.frame(con, (
                    "SELECT lang, sum(n_selected)::BIGINT AS n_selected, sum(n_params)::BIGINT AS n_params, "
                    "round(100 * sum(n_selected) / sum(n_params), 3) AS percent FROM set_sizes "
                    "WHERE model = $m AND analysis = $a AND k = $k AND seed = $s GROUP BY lang "
                    "ORDER BY n_selected DESC, lang"), {"m": model, "a": analysis, "k": k, "s": seed})
            plan = _compare.ComparePlan([model], [analysis], langs, float(k), int(seed), True)
            _compare.check_rethresholdable(con, plan)
            total = con.execute("SELECT sum(n_params)::BIGINT FROM modules WHERE model = ?", [model]).fetchone()[0]
        from mlarch.query.compare_rethreshold import patterns

        rows = patterns(self, plan)
        counts = {lang: 0 for lang in langs}
        for members, n in zip(rows["langs"], rows["n"]):
            for lang in members:
                counts[lang] += n
        frame = pl.DataFrame({"lang": langs, "n_selected": [counts[x] for x in langs], "n_params": [total] * len(langs)},
                             schema={"lang": pl.Utf8, "n_selected": pl.Int64, "n_params": pl.Int64})
        frame = frame.with_columns(percent=(100 * pl.col("n_selected") / pl.col("n_params")).round(3))
        return frame.sort(["n_selected", "lang"], descending=[True, False])

    def analysis_of_runs(self, run_ids) -> str | None:
        """The analysis the given runs belong to, or None when they span several (or none)."""
        run_ids = check_texts(run_ids, "run_ids", "a run id", SEE_RUNS)
        if run_ids is None:
            raise error(UsageError, Arg("run_ids"), " takes run ids, got None: ", SEE_RUNS)
        used = self._read("SELECT DISTINCT analysis FROM runs WHERE list_contains($ids, run_id)",
                          {"ids": run_ids})["analysis"].to_list()
        return used[0] if len(used) == 1 else None
