"""The Archive that `mlarch.open` returns: everything mlarch.query.api.Archive reads, plus
what makes and draws results (ingest, evaluations, the demo, recompute, charts, reports).

It sits above the layers it drives (ingest, evaluation, charts), so that mlarch.query only
reads the store and knows nothing of how results are made. The CLI is a thin shell over
this class: each command's logic is a method here or below.

Importing this module stays as light as query.api (DuckDB, polars): torch and transformers
load only when a method that scores or evaluates runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.query import api as _query
from mlarch.wording import Phrase, error

# `verify --recompute` passes when every recomputed top-k set has at least this Jaccard with the
# archived one (1.0 on the same machine and device; float32 rounding elsewhere swaps a few ties)
RECOMPUTE_MIN_JACCARD = 0.99


class OptionError(UsageError, TypeError):
    """A keyword option that ingest or evaluate does not take (a TypeError too, as for any
    bad keyword), naming the accepted ones."""


def _check_options(method: str, config_class, options: dict, named: tuple[str, ...]) -> None:
    """Refuse an option `config_class` has no field for (or one the method names itself)
    before anything loads: the dataclass's own error is a bare TypeError about __init__."""
    import dataclasses
    import difflib

    accepted = [f.name for f in dataclasses.fields(config_class) if f.name not in named]
    for name in options:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "no such option"
            raise OptionError(f"{method}() takes no option {name!r} ({hint}): it takes {', '.join(accepted)}")


def effects_matrix(effects: pl.DataFrame, langs, role: str) -> pl.DataFrame:
    """One role's intervention_effects rows as `mlarch demo --interventions` prints them: a
    'baseline' row (held-out NLL, nats per token), then per language of `langs` whose set was
    changed a 'prune LANG' and a 'random LANG' row of relative changes (0.05: +5 %); one Float64
    column per evaluated language, in `langs` order (null: not evaluated). No rows: none of `role`."""
    part = effects.filter(pl.col("role") == role)
    langs = _query._langs(langs) or []
    shown = [lang for lang in langs if lang in set(part["lang"])]
    baseline = dict(part.group_by("lang").agg(pl.col("baseline").first()).iter_rows())
    change = {(r["intervention"], r["target_lang"], r["lang"]): r["relative_change"] for r in part.iter_rows(named=True)}
    rows = [["baseline", *(baseline[lang] for lang in shown)]] if shown else []
    for target in langs:
        for kind in ("prune", "random"):
            if any((kind, target, lang) in change for lang in shown):
                rows.append([f"{kind} {target}", *(change.get((kind, target, lang)) for lang in shown)])
    return pl.DataFrame(rows, schema={"row": pl.Utf8, **{lang: pl.Float64 for lang in shown}}, orient="row")


class Archive(_query.Archive):
    """An archive folder: catalog.duckdb (summary rows, provenance, views) + arrays.zarr/.

    Reading (sql, compare, runs, arrays, verify, ...) is mlarch.query.api.Archive's; this
    class adds scoring, evaluating, recomputing and drawing."""

    # --- named data sources ------------------------------------------------------------
    @staticmethod
    def sources() -> pl.DataFrame:
        """The named data sources (name, kind, languages, items, licence, upstream), as
        `mlarch sources` lists them. Needs no archive: `mlarch.Archive.sources()` works too."""
        from mlarch.ingest.corpora import catalogue

        return pl.DataFrame(catalogue())

    # --- ingest ------------------------------------------------------------------------
    def ingest(self, model: str, langs, math: str, control: str, *, reporter=None, progress: bool | None = None,
               **options):
        """Score `model` on each language's math and control texts and archive the runs.

        Options mirror `mlarch ingest`: name, analysis, samples, seeds, top_k, batch_size, max_length
        (None: no truncation), device, device_map ('auto': over several GPUs), dtype, revision, gguf_file,
        trust_remote_code, force, data_dir,
        only_correct, and the paper-compat settings method ('mathneuro' or 'mathneuro-bf16'),
        sampling ('numpy' or 'pandas'), shuffle_seed, template ('default' or 'paper') and
        paper_compat=True (all of them as the authors' code does: mlarch.methods.PAPER_COMPAT) (`model`: a folder,
        a .gguf file, a hub id or a named model such as 'qwen2.5-coder-0.5b'). arrays='s3://BUCKET/PREFIX'
        on an archive's first ingest keeps its arrays there (the catalog records it). executor='ray'
        scores the units on a Ray cluster (ray_address='HOST:PORT', else RAY_ADDRESS, else a local
        instance; a ray session already open in this process is used as is; gpus_per_unit=1).
        progress: show a progress bar (default: when interactive, a terminal or a notebook); reporter:
        your own instead. Returns an IngestResult (model, analysis, written and skipped run ids).
        """
        from mlarch.ingest.pipeline import IngestConfig, ingest
        from mlarch.progress import reporter_for

        _check_options("ingest", IngestConfig, options, ("model", "langs", "math", "control"))
        cfg = IngestConfig(model=model, langs=_query._langs(langs), math=math, control=control, **options)
        return ingest(self.root, cfg, reporter_for(progress, reporter))

    # --- evaluations -------------------------------------------------------------------
    def evaluate(self, model: str, langs, task: str, data: str, *, interventions=(), reporter=None,
                 progress: bool | None = None, **options):
        """Evaluate `model` per language (task 'nll' or 'accuracy') on `data`, with each of
        `interventions` (specs such as 'prune:en@0.01') and a baseline, and archive the
        results. Options mirror `mlarch eval`: name, analysis, role, seed, limit, all_items, shots,
        chat, batch_size, max_length, max_new_tokens, device, device_map ('auto'), dtype, revision, gguf_file,
        trust_remote_code, force, data_dir.
        Returns an EvalResult (written and reused eval_ids). progress: show a progress bar
        (default: when interactive, a terminal or a notebook); reporter: your own instead."""
        from mlarch.evaluation.pipeline import EvalConfig, evaluate
        from mlarch.progress import reporter_for

        _check_options("evaluate", EvalConfig, options, ("model", "langs", "task", "data", "interventions"))
        if isinstance(interventions, str):
            interventions = [interventions]
        elif isinstance(interventions, Iterable) and not isinstance(interventions, (bytes, bytearray, Mapping)):
            interventions = list(interventions)  # anything else stays as given: EvalConfig.validate refuses it
        cfg = EvalConfig(model=model, langs=_query._langs(langs), task=task, data=data,
                         interventions=interventions, **options)
        return evaluate(self.root, cfg, reporter_for(progress, reporter))

    # --- recompute ---------------------------------------------------------------------
    def recompute(self, run_id: str, device: str = "auto", *, min_jaccard: float | None = None) -> pl.DataFrame:
        """Score a run again from its provenance (same weights digest, texts, drawn indices and
        settings; needs the model and data files) and compare, as `mlarch verify --recompute`.
        Returns rows (metric, value, status): the device, the largest relative norm difference,
        and per archived k the Jaccard of the recomputed and archived top-k sets, whose status is
        'FAIL' below `min_jaccard` (default RECOMPUTE_MIN_JACCARD, 0.99; the CLI then exits 1),
        else 'ok'."""
        from mlarch.ingest.devices import check as check_device
        from mlarch.ingest.recompute import recompute

        self._require()
        run = self.run(run_id)
        if (run.get("provenance") or {}).get("anonymized"):
            raise error(MlarchError, f"run {run_id} came from an anonymized bundle (",
                        Phrase("Archive.export_bundle(anonymize=True)", "export-bundle --anonymize"),
                        "): its model and data paths were dropped, so it cannot be scored again here; recompute it "
                        "in the archive it was exported from")
        bar = RECOMPUTE_MIN_JACCARD if min_jaccard is None else float(min_jaccard)
        rows = recompute(self, run_id, check_device(device))
        for row in rows:
            row["status"] = (("ok" if float(row["value"]) >= bar else "FAIL")
                             if row["metric"].startswith("Jaccard") else "")
        return pl.DataFrame(rows, schema={"metric": pl.Utf8, "value": pl.Utf8, "status": pl.Utf8})

    # --- the demo ----------------------------------------------------------------------
    def demo(self, langs=None, samples: int = 24, data_dir=None, *, reporter=None,
             progress: bool | None = None) -> dict:
        """Run `mlarch demo`'s analysis into this archive: Gemma-3-270M (the `demo` extra)
        scored on the starter set (or the corpora in data_dir); runs already archived are reused.
        Returns {"model", "analysis", "written", "skipped" (run ids), "overlap" (Archive.compare
        globally at k = 0.01, seed 1), "sizes" (Archive.sizes at k = 0.01, seed 1)}."""
        from mlarch.ingest import demo as demo_lib
        from mlarch.ingest.pipeline import IngestConfig
        from mlarch.progress import reporter_for

        langs = _query._langs(langs) or list(demo_lib.DEMO_LANGS)
        IngestConfig(model="-", langs=langs, math="-", control="-", samples=samples).validate()
        result = demo_lib.run(self.root, langs=langs, samples=samples, data_dir=data_dir,
                              reporter=reporter_for(progress, reporter))
        # the analysis of the runs just scored or reused (an archive may hold others of the model)
        analysis = self.analysis_of_runs(result["written"] + result["skipped"])
        return {"model": result["model"], "analysis": self.resolve_analysis(result["model"], analysis),
                "written": result["written"], "skipped": result["skipped"],
                "overlap": self.compare(result["model"], langs, k=demo_lib.DEMO_K, seed=1, by="global",
                                        analysis=analysis),
                "sizes": self.sizes(result["model"], k=demo_lib.DEMO_K, seed=1, analysis=analysis)}

    def demo_interventions(self, langs=None, data_dir=None, *, reporter=None, progress: bool | None = None) -> dict:
        """`mlarch demo --interventions` after Archive.demo: each language's math-only set at
        k = 0.01 pruned in turn (and as many random parameters per matrix), held-out NLL of every
        language. Returns {"model", "written", "reused" (eval ids), "effects" (their
        intervention_effects rows: role, intervention, target_lang, lang, baseline, relative_change),
        "matrices" ({role: effects_matrix(effects, langs, role)} for the roles evaluated)}."""
        from mlarch.ingest import demo as demo_lib
        from mlarch.progress import reporter_for

        langs = _query._langs(langs) or list(demo_lib.DEMO_LANGS)
        done = demo_lib.interventions(self.root, langs=langs, data_dir=data_dir,
                                      reporter=reporter_for(progress, reporter))
        effects = self._read(
            "SELECT role, intervention, target_lang, lang, baseline, relative_change FROM intervention_effects "
            "WHERE model = $m AND task = 'nll' AND k = $k AND seed = 1 AND list_contains($ids, eval_id)",
            {"m": done["model"], "k": demo_lib.DEMO_K, "ids": done["written"] + done["reused"]})
        matrices = {role: effects_matrix(effects, langs, role) for role in ("math", "control")}
        return {**done, "effects": effects, "matrices": {role: m for role, m in matrices.items() if m.height}}

    # --- charts and reports ------------------------------------------------------------
    def chart(self, kind: str, **options):
        """An altair.Chart of `kind` (sizes, overlap, heatmap, layers, upset, interventions)
        built from SQL aggregates; options are those of the kind's function in mlarch.charts
        (mlarch.charts.overlap(archive, model, langs=None, k=None, seed=None), ...; listed by
        mlarch.charts.options_of(kind)): a misspelt one is an error naming the accepted ones."""
        from mlarch.charts import chart

        if options.get("langs") is not None:  # a list of codes or a comma string, checked as every method does
            options["langs"] = _query._langs(options["langs"])
        _query.check_ks(options.get("k"))
        return chart(self, kind, **options)

    def report(self, folder, model: str, *, langs=None, k: float | None = None, seed: int | None = None,
               analysis: str | None = None, anonymize: bool = False) -> Path:
        """Write every chart (SVG and PNG) and a self-contained index.html with the key tables
        and provenance into `folder`, as `mlarch report`; `anonymize` shows every absolute
        path (data files, the archive) as <anonymized>/NAME. Returns the path of index.html."""
        from mlarch.charts.report import write_report

        _query.check_path(folder, "folder", "a folder", "report")
        self._require()
        return write_report(self, folder, model=model, langs=_query._langs(langs), k=k, seed=seed, analysis=analysis,
                            anonymize=anonymize)
