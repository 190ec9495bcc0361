"""`compare`: overlap of math-only sets between languages, per layer, module or globally.

Counts come from the membership-pattern histogram, projected onto the compared
languages, so "unique" here means selected for that language and none of the other
compared languages (the `language_unique` view uses every archived language instead).
"""

from __future__ import annotations

from itertools import combinations

import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, error

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


def match_models(con, pattern: str) -> list[str]:
    """Archived model names containing `pattern` (case-insensitive); a comma list such as
    "gemma,qwen" matches each part (in the order given, each model once). Every part must
    match a model: a misspelt part never silently drops a model from a comparison."""
    names = [r[0] for r in con.execute("SELECT model FROM models ORDER BY model").fetchall()]
    parts = [part.strip() for part in str(pattern).split(",") if part.strip()] or [str(pattern)]
    matched: list[str] = []
    for part in parts:
        found = [n for n in names if part.lower() in n.lower()]
        if not found:
            if not names:
                raise MlarchError("the archive holds no models yet: run `mlarch ingest` first")
            raise MlarchError(f"no archived model matches {part!r}; archived models: {', '.join(names)}")
        matched += [n for n in found if n not in matched]
    return matched


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
                   seed: int | None) -> tuple[float, int]:
    """The k and seed to show (the given ones, checked, or the defaults), for the models
    and sets that `derived_sets` read."""
    models = list(sets)
    for model in models:
        if not sets[model]:
            raise MlarchError(
                f"model {model!r} has no math-only sets yet: ingest both math and control runs for it"
            )
    common_k = sorted(set.intersection(*(set().union(*s.values()) for s in sets.values())))
    common_seed = sorted(set.intersection(*({seed_ for seed_, _ in s} for s in sets.values())))
    if k is None:
        if not common_k:
            raise error(MlarchError, f"models {', '.join(models)} share no k value: pass a narrower ", Arg("model"))
        k = DEFAULT_K if DEFAULT_K in common_k else common_k[0]
    elif k not in common_k:
        raise MlarchError(
            f"k = {k} is not archived for {', '.join(models)}; archived k: {', '.join(map(str, common_k)) or 'none'}"
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


def compare(con, model: str, langs: list[str], k: float | None = None, seed: int | None = None,
            by: str = "layer", analysis: str | None = None) -> pl.DataFrame:
    """The overlap rows of Archive.compare / `mlarch compare`, read over `con` (an open
    catalog connection): one row per model, language pair and layer, module or the model."""
    if by not in BY:
        raise error(UsageError, Arg("by"), f" must be one of {', '.join(BY)}, got {by!r}")
    if len(langs) < 2:
        raise error(UsageError, "compare needs at least two languages, e.g. ", Arg("langs", ["en", "de"]))
    if len(set(langs)) != len(langs):
        raise UsageError(f"languages repeat in {','.join(langs)}: list each once")
    models = match_models(con, model)
    chosen = chosen_analyses(con, models, analysis)
    sets = derived_sets(con, models, chosen)
    k, seed = resolve_k_seed(sets, k, seed)
    for name in models:
        have = sorted(lang for (seed_, lang), ks in sets[name].items() if seed_ == seed and k in ks)
        missing = [lang for lang in langs if lang not in have]
        if missing:
            raise MlarchError(
                f"language {', '.join(missing)} is not archived for model {name!r} at k = {k}, seed {seed}; "
                f"archived: {', '.join(have)}"
            )
    pairs = list(combinations(langs, 2))
    params = {
        "models": models, "analyses": chosen, "langs": langs, "k": k, "seed": seed,
        "pair_a": [a for a, _ in pairs], "pair_b": [b for _, b in pairs],
    }
    from mlarch.store.catalog import frame

    return frame(con, _query(by), params)
