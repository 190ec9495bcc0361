"""`mlarch report`: every chart (SVG + PNG) and one self-contained index.html with the
key tables and the provenance of the runs used, for a paper's supplement."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import shlex
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, error

from . import build, data, render, write_atomic
from .kinds import fmt_k


def _figures(scope: data.Scope, model: str):
    """(file stem, kind, options, caption) of every chart the languages allow."""
    common = {"model": model, "langs": scope.langs, "seed": scope.seed, "analysis": _analysis(scope)}
    one_k = {**common, "k": scope.k}
    n = len(scope.langs)
    figures = [("sizes", "sizes", common, "Math-specific parameters vs top-k, one line per language.")]
    if n >= 2:
        figures += [
            ("heatmap", "heatmap", common, "Global Jaccard overlap per language pair and k, with the chance row."),
            ("overlap", "overlap", one_k, "Jaccard overlap per layer, one line per language pair; dashed: chance."),
            ("heatmap-layer", "heatmap", {**one_k, "by": "layer"}, "Jaccard overlap per language pair and layer."),
        ]
    figures.append(("layers", "layers", one_k, "Math-specific parameters per layer, one line per language."))
    if n >= 2:
        figures.append(("unique", "unique", one_k,
                        "Language-unique share of each language's math-specific set (no other archived language)."))
    if n >= 3:
        figures.append(("upset", "upset", one_k, "Sizes of every intersection pattern of the languages (UpSet)."))
    return figures


def _slug(text: str) -> str:
    """`text` as part of a file name. Folding case and punctuation maps names to one slug
    (Tiny.A, tiny-a): a slug that is not the text itself ends in a digest of the text."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "data"
    return slug if slug == text else f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _unique_stems(figures: list) -> list:
    """`figures` with distinct file stems: a stem already taken (model 'x' by layer and
    model 'layer-x' are both analyses-layer-x) gets -2, -3, ... in figure order, so no
    chart's files replace another's. Compared case-folded, as on macOS and Windows disks."""
    taken, out = set(), []
    for stem, *rest in figures:
        unique, n = stem, 1
        while unique.casefold() in taken:
            n += 1
            unique = f"{stem}-{n}"
        taken.add(unique.casefold())
        out.append((unique, *rest))
    return out


def _archive_shown(archive) -> str:
    """The archive as a supplement names it: the s3:// URL of a fetched published one, else
    the path as given (never resolved: a relative path stays relative; home as ~)."""
    from mlarch.store import remote_catalog

    if remote_catalog.is_snapshot(archive.root):
        return remote_catalog._snapshot_url(archive.root)
    return data.shown_path(str(archive.root))


def reproduce_command(archive, model: str, scope: data.Scope, scope_k: data.Scope) -> str:
    """The `mlarch report` command that draws this report again, shell-quoted (names come
    from catalogs), with every number exactly as archived (data.exact)."""
    words = ["mlarch", "--archive", _archive_shown(archive), "report", "--model", model]
    if _analysis(scope):
        words += ["--analysis", _analysis(scope)]
    words += ["--langs", ",".join(scope.langs), "--k", data.exact(scope_k.k), "--seed", str(scope.seed)]
    # ~ is expanded by mlarch itself, so the quoted path still works
    return " ".join(shlex.quote(w) for w in words) + " -o DIR"


def _analysis(scope: data.Scope) -> str | None:
    """The analysis to pass on to each chart: the one every model shows, when they share a
    name (else each model's only one is found again)."""
    return scope.analyses[0] if scope.analyses and len(set(scope.analyses)) == 1 else None


def intervention_figures(archive, models: list[str], model: str, scope: data.Scope):
    """(file stem, kind, options, caption) of the interventions charts: one per evaluated
    task and data set (prune if evaluated, else the first kind; its smallest factor), for the
    report's languages, k and seed where evaluated. None when the models have no evaluations
    with interventions, or when some matched models have none (a narrower --model shows them)."""
    chosen = list(scope.analyses)
    evaluated = data.evaluated_models(archive, models, chosen)
    if not evaluated or len(evaluated) != len(models):
        return []
    groups = data.evaluation_groups(archive, models, chosen).filter(pl.col("n_models") == len(models))
    kinds_found = set(groups["intervention"].to_list())
    kind = next((x for x in data.INTERVENTIONS if x in kinds_found), None)
    if kind is None:
        return []
    chosen = {}
    for row in groups.filter(pl.col("intervention") == kind).iter_rows(named=True):
        chosen.setdefault((row["task"], row["dataset"], row["role"]), row)  # smallest factor first
    tasks = {task for task, _, _ in chosen}
    datasets = {(dataset, role) for _, dataset, role in chosen}
    figures = []
    for (task, dataset, role), row in chosen.items():
        langs = [x for x in scope.langs if x in row["langs"]]
        if not langs:
            continue
        stem = "-".join(["interventions"] + ([task] if len(tasks) > 1 else [])
                        + ([_slug(f"{dataset}-{role}")] if len(datasets) > 1 else []))
        options = {"model": model, "analysis": _analysis(scope), "langs": langs, "task": task,
                   "dataset": f"{dataset}:{role}",
                   "intervention": kind if row["factor"] is None else f"{kind}={data.exact(row['factor'])}",
                   "k": scope.k if scope.k in row["ks"] else None,
                   "seed": scope.seed if scope.seed in row["seeds"] else None}
        name = "NLL" if task == "nll" else task
        null = ", with the random null" if kind == "prune" else ""
        caption = (f"Relative change of {name} on {data.shown_path(dataset)} ({role}) vs the baseline, per changed "
                   f"math-only set (rows) and evaluated language (columns){null};"
                   f" {name} vs k for each language's own set ({kind}; dashed: random null, dotted: baseline).")
        figures.append((stem, "interventions", options, caption))
    return figures


def analysis_pairs(archive, scope: data.Scope) -> list:
    """For each model whose shown analysis has a paper-compatible twin (X and X-paper, or its
    only exact and compatible analyses): the comparison to draw (query.analysis_overlap.Plan),
    on the report's languages that both have (none: left out)."""
    from mlarch.query.analysis_overlap import paper_pairs
    from mlarch.store import catalog

    with catalog.reading(archive.catalog_path) as con:
        found = {m: [p for p in paper_pairs(con, m) if shown in p] for m, shown in zip(scope.models, scope.analyses)}
    plans = []
    for name, pairs in found.items():
        if len(pairs) != 1:
            continue
        try:
            plan = data.resolve_analysis_pair(archive, name, analysis=list(pairs[0]))
        except MlarchError:  # e.g. no language, seed or k in common: nothing to compare
            continue
        langs = [x for x in scope.langs if x in plan.langs]
        if langs:
            plans.append(data.resolve_analysis_pair(archive, name, langs, None, plan.seed, analysis=list(pairs[0])))
    return plans


def analysis_figures(plans: list) -> list:
    """(file stem, kind, options, caption) of the analyses charts of `plans`."""
    figures = []
    for plan in plans:
        a, b = plan.analyses
        suffix = "" if len(plans) == 1 else "-" + _slug(plan.model)
        options = {"model": plan.model, "analysis": f"{a},{b}", "langs": plan.langs, "seed": plan.seed}
        figures += [
            (f"analyses-layer{suffix}", "analyses", {**options, "by": "layer"},
             f"Jaccard of the math-only sets in analysis {a} vs {b} per layer, one line per k."),
            (f"analyses{suffix}", "analyses", {**options, "by": "global"},
             f"Jaccard of the math-only sets in analysis {a} vs {b} vs k, all layers pooled, one line per language."),
        ]
    return figures


def analyses_table(archive, plans: list) -> pl.DataFrame:
    """model, language, then the Jaccard of the two analyses' sets at each k (all layers pooled)."""
    rows = []
    for plan in plans:
        frame = data.analysis_pair_overlap(archive, plan, "global")
        for lang in plan.langs:
            part = frame.filter(pl.col("lang") == lang)
            rows.append({"model": plan.model, "A": plan.analyses[0], "B": plan.analyses[1], "language": lang,
                         **{f"k = {fmt_k(k)}": j for k, j in zip(part["k"].to_list(), part["jaccard"].to_list())}})
    return pl.DataFrame(rows)


def effects_table(archive, models: list[str], analyses: list[str]) -> pl.DataFrame:
    """intervention_effects of the models: the columns that vary (model, task, data set,
    seed, factor) first, then target_lang, lang, intervention, k, baseline, value, the
    relative change in percent and the parameters changed."""
    frame = data.effects(archive, models, analyses)
    if frame.height == 0:
        return frame
    frame = frame.with_columns(dataset=pl.col("dataset").map_elements(data.shown_path, return_dtype=pl.String)
                               + ":" + pl.col("role"),
                               relative_change=pl.col("relative_change") * 100,
                               k=pl.col("k").map_elements(fmt_k, return_dtype=pl.String))
    varying = [c for c in ("model", "task", "dataset", "seed", "factor") if frame[c].n_unique() > 1]
    columns = varying + ["target_lang", "lang", "intervention", "k", "baseline", "value", "relative_change",
                         "n_params_changed"]
    return frame.select(columns).rename({"relative_change": "relative_change (%)"})


def _effects_caption(archive, models: list[str], analyses: list[str], frame: pl.DataFrame) -> str:
    shown = set(frame.columns)
    full = data.effects(archive, models, analyses)
    fixed = []
    for column, label in (("model", "model"), ("task", "task"), ("dataset", "data"), ("seed", "seed"),
                          ("factor", "factor")):
        if column not in shown:
            value = full[column][0]
            if column == "dataset":
                value = f"{data.shown_path(value)}:{full['role'][0]}"
            if value is not None:
                fixed.append(f"{label} {data.exact(value)}" if isinstance(value, float) else f"{label} {value}")
    return ("Effects of interventions on math-only parameters: each evaluation next to its baseline without "
            "intervention; relative change = (value − baseline) / |baseline|, in percent"
            + (f" ({', '.join(fixed)})" if fixed else "") + ".")


def _table(frame: pl.DataFrame, caption: str, numeric_from: int = 0) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for row in frame.iter_rows():
        cells = []
        for i, value in enumerate(row):
            cls = ' class="num"' if i >= numeric_from and isinstance(value, (int, float)) else ""
            cells.append(f"<td{cls}>{html.escape(_cell(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):  # Jaccard: 3 decimals; tiny chance levels keep 4 significant digits
        return f"{value:.4g}" if 0 < abs(value) < 0.001 else f"{value:.3f}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    return str(value)


def sizes_table(archive, scope: data.Scope) -> pl.DataFrame:
    """model, language, scored parameters, then the math-specific count at each k."""
    frame = data.sizes(archive, scope)
    rows = []
    for model in scope.models:
        for lang in scope.langs:
            part = frame.filter((pl.col("model") == model) & (pl.col("lang") == lang))
            row = {"model": model, "language": lang,
                   "scored parameters": int(part["n_params"].max()) if part.height else None}
            counts = dict(zip(part["k"].to_list(), part["n_selected"].to_list()))
            row.update({f"k = {fmt_k(k)}": counts.get(k) for k in scope.ks})
            rows.append(row)
    return pl.DataFrame(rows)


def jaccard_table(archive, scope: data.Scope) -> pl.DataFrame:
    """model, pair, then the global Jaccard at each k; a last 'chance' row per model."""
    frame = data.overlap_global(archive, scope)
    rows = []
    for model in scope.models:
        for a, b in scope.pairs:
            part = frame.filter((pl.col("model") == model) & (pl.col("lang_a") == a) & (pl.col("lang_b") == b))
            values = dict(zip(part["k"].to_list(), part["jaccard"].to_list()))
            rows.append({"model": model, "pair": data.pair_label(a, b),
                         **{f"k = {fmt_k(k)}": values.get(k) for k in scope.ks}})
        rows.append({"model": model, "pair": "chance", **{f"k = {fmt_k(k)}": data.chance(k) for k in scope.ks}})
    return pl.DataFrame(rows)


def provenance_table(archive, scope: data.Scope) -> pl.DataFrame:
    """One row per run behind the derived rows, with versions from runs.provenance."""
    rows = []
    for run in data.runs_used(archive, scope).iter_rows(named=True):
        prov = json.loads(run.pop("provenance") or "{}")
        git = prov.get("git") or {}
        commit = (git.get("commit") or "")[:12] + (" (dirty)" if git.get("dirty") else "")
        rows.append({**{k: run[k] for k in ("run_id", "model", "lang", "role", "dataset", "seed", "n_samples",
                                            "n_tokens")},
                     "dataset": data.shown_path(run["dataset"]),  # a template under /home/alice names her
                     "finished_at": run["finished_at"], "mlarch": prov.get("mlarch"), "git commit": commit or None,
                     "torch": prov.get("torch"), "transformers": prov.get("transformers"),
                     "device": prov.get("device"),
                     "weights sha256": ((prov.get("model") or {}).get("weights_sha256") or "")[:16] or None})
    return pl.DataFrame(rows)


CSS = """
body { font-family: "Liberation Sans", Arial, Helvetica, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } code { background: #f4f4f4; padding: 0 0.25em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.95em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { text-align: left; font-weight: bold; padding-bottom: 0.4em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _page(title: str, meta: list[str], figures: list[tuple[str, str, bytes]], tables: list[str]) -> str:
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="meta">{line}</p>' for line in meta]
    parts.append("<h2>Charts</h2>")
    for stem, caption, svg in figures:
        uri = "data:image/svg+xml;base64," + base64.b64encode(svg).decode()
        parts.append(f'<figure id="{stem}"><img src="{uri}" alt="{html.escape(caption)}">'
                     f'<figcaption>{html.escape(caption)} Files: <a href="{stem}.svg">{stem}.svg</a>, '
                     f'<a href="{stem}.png">{stem}.png</a>.</figcaption></figure>')
    parts.append("<h2>Tables</h2>")
    parts += tables
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(archive, out_dir, model: str, langs=None, k: float | None = None, seed: int | None = None,
                 analysis: str | None = None, anonymize: bool = False) -> Path:
    """Render everything in memory, then write DIR/<chart>.svg|.png and DIR/index.html;
    with `anonymize`, every absolute path shown (data files, the archive) is <anonymized>/NAME."""
    with data.anonymized_paths() if anonymize else nullcontext():
        return _write_report(archive, out_dir, model, langs, k, seed, analysis, anonymize)


def _write_report(archive, out_dir, model: str, langs, k, seed, analysis, anonymize: bool) -> Path:
    from mlarch import __version__
    from mlarch.charts import _open

    archive = _open(archive)
    if not str(out_dir).strip():  # Path("") is ".": the report would land among the caller's files
        raise error(UsageError, "the report folder is empty: pass one, e.g. ", Arg("folder", "supplement/", flag="-o"))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MlarchError(f"cannot write the report into {out}: it is a file, not a folder; choose another -o")
    scope_k = data.resolve(archive, model, langs, k, seed, kind="report", analysis=analysis)
    scope = data.resolve(archive, model, scope_k.langs, None, scope_k.seed, multi_k=True, kind="report",
                         analysis=analysis)
    files: dict[str, bytes] = {}
    shown = []
    figures_eval = intervention_figures(archive, scope.models, model, scope_k)
    pairs = analysis_pairs(archive, scope_k)  # exact vs paper-compatible (issue 15), where the model has both
    for stem, kind, options, caption in _unique_stems(_figures(scope_k, model) + figures_eval
                                                      + analysis_figures(pairs)):
        chart = build(archive, kind, **options)
        files[f"{stem}.svg"] = render(chart, "svg")
        files[f"{stem}.png"] = render(chart, "png")
        shown.append((stem, caption, files[f"{stem}.svg"]))
    tables = [_table(sizes_table(archive, scope), f"Math-specific parameters per language and k (seed {scope.seed}).")]
    if len(scope.langs) >= 2:
        tables.append(_table(jaccard_table(archive, scope),
                             f"Jaccard overlap per language pair and k, all layers pooled (seed {scope.seed}); "
                             "chance = p/(2−p), p = k(1−k)."))
    shown_analysis = dict(zip(scope.models, scope.analyses))
    evaluated = data.evaluated_models(archive, scope.models, list(scope.analyses))
    if evaluated:  # archives without evaluations get exactly the report they always got
        chosen = [shown_analysis[m] for m in evaluated]
        effects = effects_table(archive, evaluated, chosen)
        tables.append(_table(effects, _effects_caption(archive, evaluated, chosen, effects)))
    if pairs:
        tables.append(_table(analyses_table(archive, pairs),
                             "Jaccard of the math-only sets in analysis A vs B (the exact method vs the paper-compatible "
                             "one) per language and k, all layers pooled."))
    tables.append(_table(provenance_table(archive, scope), "Runs used (math and control per language)."))
    title = f"mlarch report: {', '.join(scope.models)}"
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = [f"Analysis {html.escape(', '.join(sorted(set(scope.analyses))))} · "
            f"Languages {html.escape(', '.join(scope.langs))} · k = {fmt_k(scope_k.k)} for the per-layer charts, "
            f"every archived k ({html.escape(', '.join(fmt_k(x) for x in scope.ks))}) on k axes · "
            f"seed {scope.seed}.",
            f"Archive <code>{html.escape(_archive_shown(archive))}</code> · mlarch {html.escape(__version__)} · "
            f"generated {when}. " + ("Absolute paths are anonymized. " if anonymize else "") +
            f"Reproduce: <code>{html.escape(reproduce_command(archive, model, scope, scope_k))}</code>"]
    files["index.html"] = _page(title, meta, shown, tables).encode()
    for name, payload in files.items():
        write_atomic(out / name, payload)
    return out / "index.html"
