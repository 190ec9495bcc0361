"""`compare`: overlap of math-only sets between languages, per layer, module or globally.

Counts come from the membership-pattern histogram, projected onto the compared
languages, so "unique" here means selected for that language and none of the other
compared languages (the `language_unique` view uses every archived language instead).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from itertools import combinations

import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.query.model_names import match_models  # noqa: F401 - compare's, charts' and overlap's model rule
from mlarch.wording import Arg, brief, error

DEFAULT_K = 0.01  # the paper's headline k
BY = ("layer", "module", "global")

_COUNTS = """
    coalesce(sum(n) FILTER (WHERE list_contains(ls, lang_a)), 0)::BIGINT AS n_a,
    coalesce(sum(n) FILTER (WHERE list_contains(ls, lang_b)), 0)::BIGINT AS n_b,
    coalesce(sum(n) FILTER (WHERE list_contains(ls, lang_a) AND list_contains(ls, lang_b)), 0)::BIGINT AS n_intersection,
    coalesce(sum(n) FILTER (WHERE list_contains(ls, lang_a) OR list_contains(ls, lang_b)), 0)::BIGINT AS n_union,
    coalesce(sum(n) FILTER (WHERE ls = [lang_a]), 0)::BIGINT AS unique_a,
    coalesce(sum(n) FILTER (WHERE ls = [lang_b]), 0)::BIGINT AS unique_b,
    sum(mp)::BIGINT AS n_params
"""

_BASE = """
WITH q AS (
    SELECT m.model, m.module, m.layer, d.depth,
           list_filter(p.langs, lambda x: list_contains($langs, x)) AS ls, p.n_params AS n,
           -- the module's size on one of its rows only: sum(mp) = scored parameters in scope
           CASE WHEN row_number() OVER (PARTITION BY m.model, m.module) = 1 THEN m.n_params ELSE 0 END AS mp
    FROM modules m
    LEFT JOIN layer_depth d ON d.model = m.model AND d.layer = m.layer
    LEFT JOIN patterns p ON p.model = m.model AND p.module = m.module AND p.k = $k AND p.seed = $seed
                        AND p.analysis = $analyses[list_position($models, m.model)]
    WHERE list_contains($models, m.model)
), pairs AS (
    SELECT unnest($pair_a) AS lang_a, unnest($pair_b) AS lang_b, generate_subscripts($pair_a, 1) AS pair_no
)
"""


def _query(by: str) -> str:
    if by == "layer":
        scope = """
          SELECT model, coalesce(layer::VARCHAR, 'none') AS layer, coalesce(layer, 1e9) AS o1, 0 AS o0,
                 lang_a, lang_b, pair_no, depth, {counts} FROM q CROSS JOIN pairs GROUP BY ALL
          UNION ALL
          SELECT model, 'all', 2e9, 1, lang_a, lang_b, pair_no, NULL, {counts} FROM q CROSS JOIN pairs GROUP BY ALL"""
        cols = "model, layer"
        order = "list_position($models, model), o0, o1, pair_no"
    elif by == "module":
        scope = """
          SELECT model, module, layer::VARCHAR AS layer, 0 AS o0, lang_a, lang_b, pair_no, depth, {counts}
          FROM q CROSS JOIN pairs GROUP BY ALL
          UNION ALL
          SELECT model, 'all', NULL, 1, lang_a, lang_b, pair_no, NULL, {counts} FROM q CROSS JOIN pairs GROUP BY ALL"""
        cols = "model, module, layer"
        order = "list_position($models, model), o0, coalesce(try_cast(layer AS INTEGER), 1e9), module, pair_no"
    else:
        scope = """
          SELECT model, lang_a, lang_b, pair_no, {counts} FROM q CROSS JOIN pairs GROUP BY ALL"""
        cols = "model"
        order = "list_position($models, model), pair_no"
    depth = "" if by == "global" else ", depth::DOUBLE AS depth"
    return f"""{_BASE}
SELECT model, $analyses[list_position($models, model)] AS analysis{cols[len("model"):]}, $k AS k, $seed AS seed, lang_a, lang_b, n_a, n_b, n_intersection, n_union,
       CASE WHEN n_union > 0 THEN n_intersection / n_union END AS jaccard,
       ($k * (1 - $k)) / (2 - $k * (1 - $k)) AS chance_jaccard,
       unique_a, unique_b,
       -- shares of the scored parameters in the row's scope: models of different size compare
       n_params, n_a / n_params AS n_a_share, n_b / n_params AS n_b_share,
       unique_a / n_params AS unique_a_share, unique_b / n_params AS unique_b_share{depth}
FROM ({scope.format(counts=_COUNTS)})
ORDER BY {order}"""


def chosen_analyses(con, models: list[str], analysis: str | None) -> list[str]:
    """The analysis shown for each model (aligned with `models`): the one given, else each
    model's only one; a UsageError listing them where a model has several."""
    from mlarch.store import analyses

    return [analyses.resolve(con, model, analysis) for model in models]


def derived_sets(con, models: list[str], analyses: list[str]) -> dict[str, dict[tuple[int, str], set[float]]]:
    """For each model (in its analysis), the (seed, lang) that have math-only sets and their k values.

    Read from `runs` (a few rows), not from `selections` (one row per module): derive pairs
    the in-use finished math and control runs of each language and seed, at their shared k."""
    rows = con.execute(
        "SELECT model, seed, lang, role, k_values FROM runs WHERE status = 'FINISHED' AND in_use "
        "AND list_contains($m, model) AND analysis = $a[list_position($m, model)]",
        {"m": models, "a": analyses}).fetchall()
    roles: dict[tuple[str, int, str], dict[str, set[float]]] = {}
    for model, seed, lang, role, ks in rows:
        roles.setdefault((model, seed, lang), {})[role] = set(ks)
    sets: dict[str, dict[tuple[int, str], set[float]]] = {m: {} for m in models}
    for (model, seed, lang), by_role in roles.items():
        shared = by_role.get("math", set()) & by_role.get("control", set())
        if shared:
            sets[model][(seed, lang)] = shared
    return sets


def resolve_k_seed(sets: dict[str, dict[tuple[int, str], set[float]]], k: float | None,
                   seed: int | None, *, any_k: bool = False) -> tuple[float, int]:
    """The k and seed to show (the given ones, checked, or the defaults), for the models
    and sets that `derived_sets` read. any_k: a given k need not be archived (the caller
    re-thresholds the stored scores); it must still be in (0, 1)."""
    models = list(sets)
    k = None if k is None else check_k(k)  # "0.01" is 0.01 here too, not a k that no run archived
    seed = check_seed(seed)
    for model in models:
        if not sets[model]:
            raise MlarchError(
                f"model {model!r} has no math-only sets yet: ingest both math and control runs for it"
            )
    common_k = sorted(set.intersection(*(set().union(*s.values()) for s in sets.values())))
    common_seed = sorted(set.intersection(*({seed_ for seed_, _ in s} for s in sets.values())))
    if k is None:
        if not common_k:
            raise error(MlarchError, f"models {', '.join(models)} share no k value: pass a narrower ", Arg("model"),
                        *([" or a ", Arg("k"), " to re-threshold"] if any_k else []))
        k = DEFAULT_K if DEFAULT_K in common_k else common_k[0]
    elif not any_k and k not in common_k:
        raise MlarchError(
            f"k = {k} is not archived for {', '.join(models)}; archived k: {', '.join(map(str, common_k)) or 'none'}"
            " (compare and selection re-threshold any k from the stored scores)"
        )
    if seed is None:
        if not common_seed:
            raise error(MlarchError, f"models {', '.join(models)} share no seed: pass ", Arg("seed"), " or a narrower ",
                        Arg("model"))
        seed = common_seed[0]
    elif seed not in common_seed:
        raise MlarchError(
            f"seed {seed} is not archived for {', '.join(models)}; archived seeds: "
            f"{', '.join(map(str, common_seed)) or 'none'}"
        )
    return k, seed


def check_k(k) -> float:
    """`k` as a float in (0, 1), else a UsageError naming the argument."""
    try:
        value = float(k)
    except (TypeError, ValueError):
        value = None
    if value is None or isinstance(k, bool) or not 0 < value < 1:
        raise error(UsageError, f"k must be a fraction in (0, 1), got {k!r}: e.g. ", Arg("k", 0.01))
    return value


MAX_SEED = 2**63 - 1  # seeds are stored as BIGINT


def check_seed(seed) -> int | None:
    """`seed` as an int from 0 to 2**63-1 (None stays None), else a UsageError naming the
    argument: a bool, a string or a float is not a seed (numpy integers are)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise error(UsageError, f"seed {brief(seed)} is not valid: ", Arg("seed"), " takes an integer from 0 to 2**63-1, "
                    "e.g. ", Arg("seed", 1))
    return int(seed)


@dataclass(frozen=True)
class ComparePlan:
    """What one comparison shows, checked before anything is counted."""

    models: list[str]
    analyses: list[str]  # aligned with models
    langs: list[str]
    k: float
    seed: int
    rethreshold: bool  # some compared (model, language) did not archive k: counts come from the scores


def plan(con, model: str, langs: list[str], k: float | None = None, seed: int | None = None,
         by: str = "layer", analysis: str | None = None, *, any_k: bool = True) -> ComparePlan:
    """Resolve and check a comparison: models (match_models: exact names first), each one's
    analysis, k and seed (defaults: k = 0.01 when archived, else the smallest shared; the
    smallest seed), and the languages. A k some (model, language) did not archive is
    re-thresholded (rethreshold=True) unless any_k=False."""
    if by not in BY:
        raise error(UsageError, Arg("by"), f" must be one of {', '.join(BY)}, got {by!r}")
    if len(langs) < 2:
        raise error(UsageError, "compare needs at least two languages, e.g. ", Arg("langs", ["en", "de"]))
    if len(set(langs)) != len(langs):
        raise UsageError(f"languages repeat in {','.join(langs)}: list each once")
    models = match_models(con, model)
    chosen = chosen_analyses(con, models, analysis)
    sets = derived_sets(con, models, chosen)
    k, seed = resolve_k_seed(sets, k, seed, any_k=any_k)
    rethreshold = False
    for name in models:
        have = sorted(lang for (seed_, lang), ks in sets[name].items() if seed_ == seed and k in ks)
        anyk = sorted(lang for (seed_, lang) in sets[name] if seed_ == seed)
        missing = [lang for lang in langs if lang not in (anyk if any_k else have)]
        if missing:
            raise MlarchError(
                f"language {', '.join(missing)} is not archived for model {name!r} at k = {k}, seed {seed}; "
                f"archived: {', '.join(anyk if any_k else have)}"
            )
        rethreshold = rethreshold or any(lang not in have for lang in langs)
    made = ComparePlan(models, chosen, list(langs), float(k), int(seed), rethreshold)
    if rethreshold:
        check_rethresholdable(con, made)
    return made


# The pair of runs a language's derived rows name, and whether they are that language's math
# and control runs in use: an edited row naming another language's runs would hand back
# that language's set, every array digest intact.
_PAIR = """
    SELECT DISTINCT s.math_run_id, s.control_run_id,
        coalesce(m.role = 'math' AND c.role = 'control' AND m.in_use AND c.in_use
                 AND m.status = 'FINISHED' AND c.status = 'FINISHED'
                 AND (m.model, m.analysis, m.lang, m.seed) = (s.model, s.analysis, s.lang, s.seed)
                 AND (c.model, c.analysis, c.lang, c.seed) = (s.model, s.analysis, s.lang, s.seed), false)
    FROM selections s LEFT JOIN runs m ON m.run_id = s.math_run_id LEFT JOIN runs c ON c.run_id = s.control_run_id
    WHERE s.model = ? AND s.analysis = ? AND s.lang = ? AND s.seed = ?"""


def pair_runs(con, model: str, analysis: str, lang: str, seed: int) -> tuple[str, str]:
    """(math_run_id, control_run_id) whose sets the derived tables hold for one language (the
    pair Archive.selection uses), once they are its math and control runs in use."""
    rows = con.execute(_PAIR, [model, analysis, lang, seed]).fetchall()
    if len(rows) != 1:
        raise MlarchError(f"the derived tables of {model!r}, {lang!r} in analysis {analysis!r} name {len(rows)} "
                          f"pairs of runs at seed {seed}: run `mlarch verify`")
    math_run, control_run, theirs = rows[0]
    if not theirs:
        raise MlarchError(f"the derived tables of {model!r}, {lang!r} in analysis {analysis!r} at seed {seed} name "
                          f"runs {str(math_run)[:40]!r} and {str(control_run)[:40]!r}, which are not its math and "
                          "control runs in use: the catalog was edited; run `mlarch verify`, then restore it from a "
                          "copy")
    return math_run, control_run


def check_rethresholdable(con, plan: ComparePlan) -> None:
    """Refuse, before any array is read, a k that a mathneuro-bf16 run of `plan` did not archive."""
    from mlarch import methods

    k = plan.k
    for model, analysis in zip(plan.models, plan.analyses):
        for lang in plan.langs:
            for run_id in pair_runs(con, model, analysis, lang, plan.seed):
                method, k_values = con.execute(
                    "SELECT json_extract_string(provenance, '$.method.name'), k_values FROM runs WHERE run_id = ?",
                    [run_id]).fetchone()
                methods.check_rethreshold(run_id, method or methods.EXACT, k, [float(v) for v in k_values])


# the patterns table's rows at a re-thresholded k, bound as lists (one per column)
_RETHRESHOLDED = """patterns AS (
    SELECT unnest($r_model::VARCHAR[]) AS model, unnest($r_analysis::VARCHAR[]) AS analysis, $k::DOUBLE AS k,
           $seed::BIGINT AS seed, unnest($r_module::VARCHAR[]) AS module, unnest($r_langs::VARCHAR[][]) AS langs,
           unnest($r_n::BIGINT[]) AS n_params
), """


def overlap_rows(con, plan: ComparePlan, by: str = "layer", patterns: dict | None = None) -> pl.DataFrame:
    """The rows of a planned comparison: from the archived patterns table, or from `patterns`
    (compare_rethreshold.patterns: the same rows at a k not archived) when given."""
    pairs = list(combinations(plan.langs, 2))
    params = {
        "models": plan.models, "analyses": plan.analyses, "langs": plan.langs, "k": plan.k, "seed": plan.seed,
        "pair_a": [a for a, _ in pairs], "pair_b": [b for _, b in pairs],
    }
    query = _query(by)
    if patterns is not None:
        query = query.replace("WITH q AS (", "WITH " + _RETHRESHOLDED + "q AS (", 1)
        params.update({f"r_{name}": values for name, values in patterns.items()})
    from mlarch.store.catalog import frame

    return frame(con, query, params)


def compare(con, model: str, langs: list[str], k: float | None = None, seed: int | None = None,
            by: str = "layer", analysis: str | None = None) -> pl.DataFrame:
    """The overlap rows of a comparison at an archived k, read over `con` (an open catalog
    connection): one row per model, language pair and layer, module or the model.
    Archive.compare also re-thresholds a k that was not archived."""
    return overlap_rows(con, plan(con, model, langs, k, seed, by, analysis, any_k=False), by)
