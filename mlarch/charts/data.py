"""SQL aggregates behind the charts: a few rows per (model, language, k, layer), never
per-parameter data. Model matching and default k/seed follow `mlarch compare`."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, error
from mlarch.query.compare import chosen_analyses, derived_sets, match_models, resolve_k_seed
from mlarch.store import catalog

from .colors import LANGUAGE_COLORS


@dataclass(frozen=True)
class Scope:
    """What one chart shows: matched models, languages (in display order), k values, seed."""

    models: list[str]
    langs: list[str]
    ks: list[float]  # every k shown (one for single-k charts)
    seed: int
    k_default: bool  # k was not given: the default was used
    seed_default: bool
    analyses: tuple[str, ...] = ()  # the analysis shown of each model (aligned with models)

    @property
    def k(self) -> float:
        """The k of a one-k chart: the first (or only) k of the scope."""
        return self.ks[0]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every pair of the scope's languages, in their order."""
        return list(combinations(self.langs, 2))

    def params(self, **extra) -> dict:
        """The scope as SQL parameters ($models, $analyses, $langs, $ks, $k, $seed), plus `extra`."""
        return {"models": self.models, "analyses": list(self.analyses), "langs": self.langs, "ks": self.ks,
                "k": self.k, "seed": self.seed, **extra}


def _langs(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    langs = [str(x).strip() for x in value if str(x).strip()]
    if not langs:
        raise error(UsageError, Arg("langs"), " is empty: list language codes, e.g. ", Arg("langs", ["en", "de", "bn"]))
    if len(set(langs)) != len(langs):
        raise UsageError(f"languages repeat in {','.join(langs)}: list each once")
    return langs


def _ks(value) -> list[float] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values:
        return None
    try:
        return [float(x) for x in values]
    except (TypeError, ValueError):
        raise UsageError(f"k must be numbers in (0, 1), got {value!r}") from None


def _canonical(langs) -> list[str]:
    known = list(LANGUAGE_COLORS)
    return sorted(langs, key=lambda x: (known.index(x) if x in known else len(known), x))


def resolve(archive, model: str, langs=None, k=None, seed: int | None = None, *, multi_k: bool = False,
            min_langs: int = 1, kind: str = "chart", analysis: str | None = None) -> Scope:
    """Match models, pick each one's analysis (the one given, else its only one), check
    languages, and pick k/seed (defaults as in `mlarch compare`)."""
    if not model or not str(model).strip():
        raise error(UsageError, Arg("model"), " is required: a substring of archived model names, e.g. ",
                    Arg("model", "gemma"))
    langs, ks = _langs(langs), _ks(k)
    if ks and not multi_k and len(ks) > 1:
        raise error(UsageError, f"{kind} shows one k, got {len(ks)} ({','.join(map(str, ks))}): pass a single ",
                    Arg("k"))
    if ks and any(not 0 < x < 1 for x in ks):
        raise UsageError(f"k must be in (0, 1), got {','.join(map(str, ks))}")
    with catalog.reading(archive.catalog_path) as con:
        models = match_models(con, str(model))
        chosen = chosen_analyses(con, models, analysis)
        sets = derived_sets(con, models, chosen)  # one read of `runs` answers every check below
        first_k, seed_used = resolve_k_seed(sets, ks[0] if ks else None, seed)
        if multi_k:
            for extra in (ks or [])[1:]:
                resolve_k_seed(sets, extra, seed_used)  # raises for unarchived k
            if not ks:
                ks = sorted(set.intersection(*(
                    set().union(*(k_values for (s, _), k_values in sets[name].items() if s == seed_used))
                    for name in models)))
            ks = sorted(set(ks))
        else:
            ks = [first_k]
        have = {name: sorted(lang for (s, lang), k_values in sets[name].items()
                             if s == seed_used and k_values & set(ks))
                for name in models}
    if langs is None:
        common = set.intersection(*(set(v) for v in have.values()))
        if not common:
            raise error(MlarchError, f"models {', '.join(models)} share no language: pass a narrower ", Arg("model"))
        langs = _canonical(common)
    for name in models:
        missing = [lang for lang in langs if lang not in have[name]]
        if missing:
            raise MlarchError(
                f"language {', '.join(missing)} is not archived for model {name!r} at seed {seed_used}; "
                f"archived: {', '.join(have[name]) or 'none'}")
    if len(langs) < min_langs:
        raise error(UsageError, f"{kind} needs at least {min_langs} languages, got {len(langs)} ({','.join(langs)}): "
                    "pass e.g. ", Arg("langs", ["en", "de", "bn"]))
    return Scope(models, langs, ks, seed_used, k_default=k is None, seed_default=seed is None,
                 analyses=tuple(chosen))


def _frame(archive, query: str, params: dict) -> pl.DataFrame:
    used = {name: value for name, value in params.items() if re.search(rf"\${name}\b", query)}  # DuckDB refuses extras
    with catalog.reading(archive.catalog_path) as con:
        return catalog.frame(con, query, used)


_IN_ANALYSIS = "list_contains($models, model) AND analysis = $analyses[list_position($models, model)]"
_SCOPE = f"{_IN_ANALYSIS} AND seed = $seed AND list_contains($langs, lang)"


def sizes(archive, scope: Scope) -> pl.DataFrame:
    """Math-specific parameters per (model, lang, k), summed over modules."""
    return _frame(archive, f"""
        SELECT model, lang, k, sum(n_selected)::BIGINT AS n_selected, sum(n_params)::BIGINT AS n_params,
               100 * sum(n_selected) / sum(n_params) AS percent
        FROM set_sizes WHERE {_SCOPE} AND list_contains($ks, k)
        GROUP BY model, lang, k ORDER BY model, lang, k""", scope.params())


def layers(archive, scope: Scope) -> pl.DataFrame:
    """Math-specific parameters per (model, lang, layer) at one k; blocks only."""
    return _frame(archive, f"""
        SELECT model, lang, layer, sum(n_selected)::BIGINT AS n_selected, sum(n_params)::BIGINT AS n_params,
               100 * sum(n_selected) / sum(n_params) AS percent, any_value(depth)::DOUBLE AS depth
        FROM set_sizes WHERE {_SCOPE} AND k = $k AND layer IS NOT NULL
        GROUP BY model, lang, layer ORDER BY model, lang, layer""", scope.params())


def unique_shares(archive, scope: Scope) -> pl.DataFrame:
    """Per (model, lang) at one k, over the whole model: parameters selected for the language
    and no other archived one, as a share of its math-only set (language_unique_share)."""
    return _frame(archive, f"""
        SELECT model, lang, n_unique, n_selected, share::DOUBLE AS share, 100 * share::DOUBLE AS percent
        FROM language_unique_share WHERE {_SCOPE} AND k = $k
        ORDER BY list_position($models, model), list_position($langs, lang)""", scope.params())


def outside_modules(archive, scope: Scope) -> list[str]:
    """Scored modules outside transformer blocks (layer NULL), e.g. an untied lm_head."""
    frame = _frame(archive, "SELECT DISTINCT module FROM modules WHERE list_contains($models, model) "
                            "AND layer IS NULL ORDER BY module", {"models": scope.models})
    return frame["module"].to_list()


def _pair_columns(frame: pl.DataFrame, scope: Scope) -> pl.DataFrame:
    """Orient the views' (lang_a < lang_b) rows as the user's pairs; add `pair` and `pair_no`."""
    order = {frozenset(p): i for i, p in enumerate(scope.pairs)}
    rows = []
    for row in frame.iter_rows(named=True):
        i = order[frozenset((row["lang_a"], row["lang_b"]))]
        a, b = scope.pairs[i]
        rows.append({**row, "lang_a": a, "lang_b": b, "pair": pair_label(a, b), "pair_no": i})
    return pl.DataFrame(rows, schema={**frame.schema, "pair": pl.String, "pair_no": pl.Int64}, orient="row")


def pair_label(a: str, b: str) -> str:
    """The label of a language pair in charts and tables: `a–b`."""
    return f"{a}–{b}"


def overlap_layers(archive, scope: Scope) -> pl.DataFrame:
    """Jaccard per (model, pair, layer) at one k, from overlap_by_layer (layer NULL included)."""
    frame = _frame(archive, f"""
        SELECT model, lang_a, lang_b, layer, n_intersection, n_union, jaccard::DOUBLE AS jaccard,
               chance_jaccard::DOUBLE AS chance_jaccard, depth::DOUBLE AS depth
        FROM overlap_by_layer WHERE {_IN_ANALYSIS} AND k = $k AND seed = $seed
          AND list_contains($langs, lang_a) AND list_contains($langs, lang_b)
        ORDER BY model, layer NULLS LAST, lang_a, lang_b""", scope.params())
    return _pair_columns(frame, scope).sort(["model", "pair_no", "layer"], nulls_last=True)


def overlap_global(archive, scope: Scope) -> pl.DataFrame:
    """Jaccard per (model, pair, k), all modules pooled, from overlap_global."""
    frame = _frame(archive, f"""
        SELECT model, lang_a, lang_b, k, n_intersection, n_union, jaccard::DOUBLE AS jaccard,
               chance_jaccard::DOUBLE AS chance_jaccard
        FROM overlap_global WHERE {_IN_ANALYSIS} AND list_contains($ks, k) AND seed = $seed
          AND list_contains($langs, lang_a) AND list_contains($langs, lang_b)
        ORDER BY model, k, lang_a, lang_b""", scope.params())
    return _pair_columns(frame, scope).sort(["model", "pair_no", "k"])


def chance(k: float) -> float:
    """Jaccard of two independent random top-k sets: p / (2 - p), p = k(1 - k)."""
    p = k * (1 - k)
    return p / (2 - p)


def patterns(archive, scope: Scope) -> pl.DataFrame:
    """Parameters selected by exactly each subset of the chosen languages (the `patterns`
    histogram projected onto them), per model, at one k. Empty subsets are dropped."""
    return _frame(archive, f"""
        SELECT model, ls AS langs, sum(n_params)::BIGINT AS n_params FROM (
            SELECT model, list_filter(langs, lambda x: list_contains($langs, x)) AS ls, n_params
            FROM patterns WHERE {_IN_ANALYSIS} AND k = $k AND seed = $seed)
        WHERE len(ls) > 0 GROUP BY model, ls ORDER BY model, n_params DESC""", scope.params())


def runs_used(archive, scope: Scope) -> pl.DataFrame:
    """The math and control runs behind the derived rows of the scope, with provenance."""
    return _frame(archive, f"""
        WITH used AS (
            SELECT DISTINCT unnest([math_run_id, control_run_id]) AS run_id FROM selections
            WHERE {_SCOPE} AND list_contains($ks, k))
        SELECT r.run_id, r.model, r.analysis, r.lang, r.role, r.dataset, r.seed, r.n_samples, r.n_tokens, r.finished_at,
               r.provenance
        FROM runs r JOIN used USING (run_id) ORDER BY r.model, list_position($langs, r.lang), r.role DESC""", scope.params())


# --- evaluations with interventions (`mlarch eval`) -------------------------------------------
TASKS = ("nll", "accuracy")
INTERVENTIONS = ("prune", "scale", "fraction", "random")  # 'none' is the baseline of each
DEFAULT_INTERVENTION = "prune"
NULL = "random"  # the null of 'prune': a random set of the same size as the language's set
DEFAULT_EVAL_K = 0.01


@dataclass(frozen=True)
class EvalScope:
    """What the interventions chart shows: one task, data set, intervention (and factor),
    seed and k; evaluated languages (columns, lines) and changed sets (heatmap rows)."""

    models: list[str]
    langs: list[str]  # evaluated languages, in display order
    targets: list[str]  # languages whose math-only set was changed (heatmap rows)
    task: str
    intervention: str
    factor: float | None  # scale factor or pruned fraction; None for prune and random
    dataset: str
    role: str
    seed: int
    k: float  # the heatmap's k
    ks: list[float]  # every k of the lines panel
    null: bool  # show the random null (prune only)
    analyses: tuple[str, ...] = ()  # whose sets were changed, per model (aligned with models)

    def params(self, **extra) -> dict:
        """The scope as SQL parameters (models, analyses, langs, task, intervention, factor, dataset, role, seed, k,
        null), plus `extra`."""
        return {"models": self.models, "analyses": list(self.analyses), "langs": self.langs, "task": self.task, "intervention": self.intervention,
                "factor": self.factor, "dataset": self.dataset, "role": self.role, "seed": self.seed, "k": self.k,
                "null": NULL if self.null else None, **extra}


def _intervention(value) -> tuple[str | None, float | None]:
    """'prune', or 'scale=0.5' (a kind with its factor) -> (kind, factor)."""
    if value is None:
        return None, None
    text = str(value).strip()
    kind, _, factor = text.partition("=")
    kind = kind.strip().lower()
    if kind not in INTERVENTIONS:
        hint = " ('none' is the baseline every cell is compared with)" if kind == "none" else ""
        raise UsageError(f"unknown intervention {text!r}{hint}: choose one of {', '.join(INTERVENTIONS)} "
                         "(a factor as in scale=0.5)")
    if not factor.strip():
        if "=" in text:
            raise error(UsageError, f"intervention {text!r} has no factor after '=': e.g. ",
                        Arg("intervention", f"{kind}=0.5"))
        return kind, None
    if kind in ("prune", NULL):
        raise error(UsageError, f"{kind} takes no factor, got {text!r}: pass ", Arg("intervention", kind))
    try:
        return kind, float(factor)
    except ValueError:
        raise error(UsageError, f"the factor of {text!r} is not a number: e.g. ",
                    Arg("intervention", f"{kind}=0.5")) from None


def _task(value) -> str | None:
    if value is None:
        return None
    task = str(value).strip().lower()
    if task not in TASKS:
        raise UsageError(f"unknown task {value!r}: choose one of {', '.join(TASKS)}")
    return task


def _dataset(value) -> tuple[str | None, str | None]:
    """'gsm8k' or 'gsm8k:math' (with the role) -> (dataset, role)."""
    if value is None:
        return None, None
    text = str(value).strip()
    if not text:
        raise error(UsageError, Arg("dataset"), " is empty: name the evaluated data set, e.g. ", Arg("dataset", "mgsm"))
    name, sep, role = text.rpartition(":")
    if sep and role in ("math", "control") and name:
        return name, role
    return text, None


def exact(value: float) -> str:
    """A k or factor as printed anywhere it may be typed back or tell two apart (commands,
    listed choices, column labels): short (0.01, 1e-05) when that is the value exactly, else
    the shortest text that is (0.0123456789: 6 digits would name another k)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


_ANONYMIZED = ContextVar("mlarch_anonymized_paths", default=False)


@contextmanager
def anonymized_paths():
    """Within it, shown_path hides every absolute path and URL user name as
    `export-bundle --anonymize` does (`report --anonymize`): an archive imported from
    another machine records that machine's paths (/home/bob/...), which ~ does not cover."""
    token = _ANONYMIZED.set(True)
    try:
        yield
    finally:
        _ANONYMIZED.reset(token)


def shown_path(text: str) -> str:
    """A path as reports and chart titles show it: under the user's home folder as ~/...
    (/home/alice names the user), else as recorded (a relative one stays relative); within
    anonymized_paths(), <anonymized>/ and its file name for any absolute path."""
    if _ANONYMIZED.get():
        from mlarch.store.anonymize import Scrubber

        return Scrubber(()).text(text)
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no home folder known: nothing to hide
        return text
    if home == home.parent:  # HOME=/ would turn every absolute path into ~/...
        return text
    if text == str(home):
        return "~"
    prefix = str(home) + os.sep
    return "~" + os.sep + text[len(prefix):] if text.startswith(prefix) else text


def _fmt(values) -> str:
    return ", ".join(exact(v) if isinstance(v, float) else str(v) for v in values) or "none"


def _data_label(dataset: str, role: str) -> str:
    return f"{dataset}:{role}"


def resolve_evaluations(archive, model: str, langs=None, k=None, seed: int | None = None, task=None,
                        intervention=None, dataset=None, *, kind: str = "interventions",
                        analysis: str | None = None) -> EvalScope:
    """Match models that have evaluations with interventions, then pick task, intervention,
    data set, seed and k (the given ones, checked, or the defaults) and the languages."""
    if not model or not str(model).strip():
        raise error(UsageError, Arg("model"), " is required: a substring of archived model names, e.g. ",
                    Arg("model", "gemma"))
    langs, ks = _langs(langs), _ks(k)
    if ks and len(ks) > 1:
        raise error(UsageError, f"{kind} shows one k, got {len(ks)} ({','.join(map(str, ks))}): pass a single ",
                    Arg("k"))
    if ks and any(not 0 < x < 1 for x in ks):
        raise UsageError(f"k must be in (0, 1), got {','.join(map(str, ks))}")
    task, (chosen, factor), (data_name, data_role) = _task(task), _intervention(intervention), _dataset(dataset)
    with catalog.reading(archive.catalog_path) as con:
        models = match_models(con, str(model))
        chosen_sets = chosen_analyses(con, models, analysis)
        rows = catalog.dicts(con, f"""
            SELECT model, task, dataset, role, intervention, factor, seed, k, target_lang, lang
            FROM intervention_effects WHERE {_IN_ANALYSIS}
            GROUP BY ALL""", {"models": models, "analyses": chosen_sets})
    eval_hint = "run `mlarch eval --intervene prune:en@0.01 ...` first"
    lacking = [m for m in models if not any(r["model"] == m for r in rows)]
    if lacking:
        others = [m for m in models if m not in lacking]
        if not others:
            raise MlarchError(f"no evaluations with interventions in the archive for model "
                              f"{', '.join(lacking)}: {eval_hint}")
        raise error(MlarchError, f"no evaluations with interventions in the archive for model {', '.join(lacking)} "
                    f"({', '.join(others)} has some): pass a narrower ", Arg("model"), f", or {eval_hint}")
    who = models[0] if len(models) == 1 else ", ".join(models)

    def common(values_of) -> list:
        """Values present for every model, sorted."""
        return sorted(set.intersection(*({values_of(r) for r in rows if r["model"] == m} for m in models)),
                      key=lambda v: (v is None, v))

    # task: nll if evaluated, else accuracy
    tasks = common(lambda r: r["task"])
    if task is None:
        if not tasks:
            raise error(MlarchError, f"models {who} share no evaluated task: pass a narrower ", Arg("model"))
        task = "nll" if "nll" in tasks else tasks[0]
    elif task not in tasks:
        raise error(MlarchError, f"no {task} evaluations with interventions for model {who}; evaluated tasks: "
                    f"{_fmt(tasks)}: pass ", Arg("task", tasks[0] if tasks else "nll"), f", or {eval_hint}")
    rows = [r for r in rows if r["task"] == task]
    # intervention: prune if evaluated, else the first kind found
    kinds = [x for x in INTERVENTIONS if x in common(lambda r: r["intervention"])]
    if chosen is None:
        if not kinds:
            raise error(MlarchError, f"models {who} share no intervention in their {task} evaluations: "
                        "pass a narrower ", Arg("model"))
        chosen = DEFAULT_INTERVENTION if DEFAULT_INTERVENTION in kinds else kinds[0]
    elif chosen not in kinds:
        raise error(MlarchError, f"no {chosen} evaluations ({task}) for model {who}; evaluated interventions: "
                    f"{_fmt(kinds)}: pass e.g. ", Arg("intervention", kinds[0] if kinds else "prune"))
    null_rows = [r for r in rows if r["intervention"] == NULL] if chosen == "prune" else []
    rows = [r for r in rows if r["intervention"] == chosen]
    # factor of scale / fraction
    factors = common(lambda r: r["factor"])
    if chosen in ("scale", "fraction"):
        if factor is None:
            if len(factors) > 1:
                raise error(UsageError, f"{chosen} evaluations of {who} ({task}) use several factors "
                            f"({_fmt(factors)}): pick one, e.g. ",
                            Arg("intervention", f"{chosen}={exact(factors[0])}"))
            factor = factors[0] if factors else None
        elif factor not in factors:
            raise MlarchError(f"no {chosen} evaluations with factor {exact(factor)} ({task}) for model {who}; "
                              f"factors: {_fmt(factors)}")
        rows = [r for r in rows if r["factor"] == factor]
    # data set and role
    pairs = common(lambda r: (r["dataset"], r["role"]))
    if data_name is not None:
        picked = [p for p in pairs if p[0] == data_name and data_role in (None, p[1])]
        if not picked:
            raise MlarchError(f"no {chosen} evaluations ({task}) of model {who} on data set {dataset!r}; "
                              f"evaluated: {_fmt(_data_label(*p) for p in pairs)}")
        pairs = picked
    if len(pairs) != 1:
        if not pairs:
            raise error(MlarchError, f"models {who} share no evaluated data set ({task}, {chosen}): pass a narrower ",
                        Arg("model"))
        raise error(UsageError, f"{chosen} evaluations of {who} ({task}) use several data sets "
                    f"({_fmt(_data_label(*p) for p in pairs)}): pick one, e.g. ", Arg("dataset", _data_label(*pairs[0])))
    data_name, data_role = pairs[0]
    rows = [r for r in rows if (r["dataset"], r["role"]) == (data_name, data_role)]
    null_rows = [r for r in null_rows if (r["dataset"], r["role"]) == (data_name, data_role)]
    where = f"{task}, {_data_label(data_name, data_role)}"
    # seed: the smallest evaluated
    seeds = common(lambda r: r["seed"])
    if seed is None:
        if not seeds:
            raise error(MlarchError, f"models {who} share no seed in their {chosen} evaluations ({where}): pass ",
                        Arg("seed"), " or a narrower ", Arg("model"))
        seed = seeds[0]
    elif seed not in seeds:
        raise MlarchError(f"no {chosen} evaluations at seed {seed} ({where}) for model {who}; "
                          f"evaluated seeds: {_fmt(seeds)}")
    rows = [r for r in rows if r["seed"] == seed]
    null_rows = [r for r in null_rows if r["seed"] == seed]
    where += f", seed {seed}"
    # k: 0.01 if evaluated, else the smallest
    k_values = common(lambda r: r["k"])
    if not ks:
        if not k_values:
            raise error(MlarchError, f"models {who} share no k in their {chosen} evaluations ({where}): "
                        "pass a narrower ", Arg("model"))
        k = DEFAULT_EVAL_K if DEFAULT_EVAL_K in k_values else k_values[0]
    else:
        k = ks[0]
        if k not in k_values:
            raise MlarchError(f"no {chosen} evaluations at k = {exact(k)} ({where}) for model {who}; "
                              f"evaluated k: {_fmt(k_values)}")
    at_k = [r for r in rows if r["k"] == k]
    # evaluated languages (columns and lines) and changed sets (rows)
    have = {m: {r["lang"] for r in at_k if r["model"] == m} for m in models}
    if langs is None:
        shared = set.intersection(*have.values())
        if not shared:
            raise error(MlarchError, f"models {who} share no evaluated language at k = {exact(k)} ({where}): "
                        "pass a narrower ", Arg("model"))
        langs = _canonical(shared)
    for name in models:
        missing = [x for x in langs if x not in have[name]]
        if missing:
            raise MlarchError(f"language {', '.join(missing)} was not evaluated with {chosen} at k = {exact(k)} "
                              f"({where}) for model {name!r}; evaluated: {_fmt(_canonical(have[name]))}")
    targets = _canonical({r["target_lang"] for r in at_k if r["lang"] in langs and r["target_lang"] is not None})
    ks_shown = sorted({r["k"] for r in rows + null_rows if r["lang"] in langs and r["target_lang"] == r["lang"]
                       and r["k"] is not None})
    null = any(r["k"] == k and r["lang"] in langs for r in null_rows)
    return EvalScope(models, list(langs), targets, task, chosen, factor, data_name, data_role, seed, k,
                     ks_shown or [k], null, analyses=tuple(chosen_sets))


_EVAL_SCOPE = ("list_contains($models, e.model) AND e.analysis = $analyses[list_position($models, e.model)] "
               "AND e.task = $task AND e.dataset = $dataset AND e.role = $role "
               "AND e.seed = $seed AND list_contains($langs, e.lang)")
_NEWEST = "QUALIFY row_number() OVER (PARTITION BY {keys} ORDER BY c.finished_at DESC, e.eval_id DESC) = 1"


def intervention_cells(archive, scope: EvalScope) -> pl.DataFrame:
    """The cross-lingual matrix at one k: each (changed set, evaluated language) against its
    baseline, plus the random null of each language's set when the chart shows it. Of
    several configurations of one cell (e.g. other item counts) the newest counts."""
    keys = "e.model, e.intervention, e.target_lang, e.lang"
    return _frame(archive, f"""
        SELECT e.model, e.intervention, e.target_lang, e.lang, e.k, e.factor, e.n_set, e.n_params_changed,
               e.n_items, e.baseline, e.value, e.delta, e.relative_change, e.baseline_stderr, e.stderr,
               e.eval_id, e.baseline_eval_id
        FROM intervention_effects e JOIN evaluations_current c USING (eval_id)
        WHERE {_EVAL_SCOPE} AND e.k = $k
          AND ((e.intervention = $intervention AND e.factor IS NOT DISTINCT FROM $factor)
               OR (e.intervention = $null))
        {_NEWEST.format(keys=keys)}
        ORDER BY e.model, e.intervention, e.target_lang, e.lang""", scope.params())


def intervention_lines(archive, scope: EvalScope) -> pl.DataFrame:
    """Each evaluated language with its own math-only set changed, at every k (and the
    random null), next to its baseline; the newest configuration per point."""
    keys = "e.model, e.intervention, e.lang, e.k"
    return _frame(archive, f"""
        SELECT e.model, e.lang, e.intervention, e.k, e.value, e.stderr, e.baseline, e.baseline_stderr,
               e.relative_change, e.n_params_changed, c.finished_at
        FROM intervention_effects e JOIN evaluations_current c USING (eval_id)
        WHERE {_EVAL_SCOPE} AND e.target_lang = e.lang
          AND ((e.intervention = $intervention AND e.factor IS NOT DISTINCT FROM $factor)
               OR (e.intervention = $null))
        {_NEWEST.format(keys=keys)}
        ORDER BY e.model, e.lang, e.intervention, e.k""", scope.params())


def evaluated_models(archive, models: list[str], analyses: list[str]) -> list[str]:
    """Those of `models` with at least one finished evaluation with an intervention on the
    sets of their analysis (aligned with models)."""
    frame = _frame(archive, f"SELECT DISTINCT model FROM intervention_effects WHERE {_IN_ANALYSIS} "
                            "ORDER BY model", {"models": models, "analyses": analyses})
    return frame["model"].to_list() if frame.height else []


def evaluation_groups(archive, models: list[str], analyses: list[str]) -> pl.DataFrame:
    """(task, dataset, role, intervention, factor) combinations with interventions: how many
    of the models have each, and their seeds, k values and evaluated languages."""
    return _frame(archive, f"""
        SELECT task, dataset, role, intervention, factor, count(DISTINCT model) AS n_models,
               list_sort(list(DISTINCT seed)) AS seeds, list_sort(list(DISTINCT k)) AS ks,
               list_sort(list(DISTINCT lang)) AS langs
        FROM intervention_effects WHERE {_IN_ANALYSIS}
        GROUP BY task, dataset, role, intervention, factor
        ORDER BY task DESC, dataset, role, intervention, factor NULLS FIRST""", {"models": models, "analyses": analyses})


def effects(archive, models: list[str], analyses: list[str]) -> pl.DataFrame:
    """Every intervened evaluation of the models' sets (in their analysis) next to its baseline."""
    return _frame(archive, f"""
        SELECT model, analysis, task, dataset, role, seed, intervention, factor, target_lang, lang, k, baseline, value,
               relative_change, n_params_changed
        FROM intervention_effects WHERE {_IN_ANALYSIS}
        ORDER BY model, list_position(['nll', 'accuracy'], task), dataset, role, seed, list_position(['prune', 'random', 'scale', 'fraction'],
                 intervention), factor NULLS FIRST, k, target_lang, lang""", {"models": models, "analyses": analyses})


# --- two analyses of one model (e.g. exact vs --paper-compat, issue 15) -----------------------
def resolve_analysis_pair(archive, model: str, langs=None, k=None, seed: int | None = None, *,
                          analysis=None):
    """The comparison an `analyses` chart draws (a query.analysis_overlap.Plan): one model; two
    of its analyses, analysis='A,B' or [A, B] (default: its exact analysis and the
    paper-compatible one beside it, X and X-paper); languages (default: every one both have);
    k values (default: every k both have sets at); seed (default: the smallest shared)."""
    from mlarch.query import analysis_overlap

    if not model or not str(model).strip():
        raise error(UsageError, Arg("model"), " is required: a substring of archived model names, e.g. ",
                    Arg("model", "gemma"))
    return analysis_overlap.plan(archive, str(model), langs, analysis, k, seed, arg="analysis")


def analysis_pair_overlap(archive, plan, by: str = "layer") -> pl.DataFrame:
    """Jaccard of the two analyses' math-only sets per (language, k) and layer (layer NULL:
    modules outside blocks) or, by='global', per (language, k)."""
    from mlarch.query.analysis_overlap import overlap

    return overlap(archive, plan, by)
