"""SQL aggregates behind the charts: a few rows per (model, language, k, layer), never
per-parameter data. Model matching and default k/seed follow `mlarch compare`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations

import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.query.compare import derived_sets, match_models, resolve_k_seed
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

    @property
    def k(self) -> float:
        return self.ks[0]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(combinations(self.langs, 2))

    def params(self, **extra) -> dict:
        return {"models": self.models, "langs": self.langs, "ks": self.ks, "k": self.k, "seed": self.seed,
                **extra}


def _langs(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    langs = [str(x).strip() for x in value if str(x).strip()]
    if not langs:
        raise UsageError("--langs is empty: list language codes, e.g. --langs en,de,bn")
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
            min_langs: int = 1, kind: str = "chart") -> Scope:
    """Match models, check languages, and pick k/seed (defaults as in `mlarch compare`)."""
    if not model or not str(model).strip():
        raise UsageError("--model is required: a substring of archived model names, e.g. --model gemma")
    langs, ks = _langs(langs), _ks(k)
    if ks and not multi_k and len(ks) > 1:
        raise UsageError(f"{kind} shows one k, got {len(ks)} ({','.join(map(str, ks))}): pass a single --k")
    if ks and any(not 0 < x < 1 for x in ks):
        raise UsageError(f"k must be in (0, 1), got {','.join(map(str, ks))}")
    with catalog.reading(archive.catalog_path) as con:
        models = match_models(con, str(model))
        sets = derived_sets(con, models)  # one read of `runs` answers every check below
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
            raise MlarchError(f"models {', '.join(models)} share no language: pass a narrower --model")
        langs = _canonical(common)
    for name in models:
        missing = [lang for lang in langs if lang not in have[name]]
        if missing:
            raise MlarchError(
                f"language {', '.join(missing)} is not archived for model {name!r} at seed {seed_used}; "
                f"archived: {', '.join(have[name]) or 'none'}")
    if len(langs) < min_langs:
        raise UsageError(f"{kind} needs at least {min_langs} languages, got {len(langs)} "
                         f"({','.join(langs)}): pass e.g. --langs en,de,bn")
    return Scope(models, langs, ks, seed_used, k_default=k is None, seed_default=seed is None)


def _frame(archive, query: str, params: dict) -> pl.DataFrame:
    used = {name: value for name, value in params.items() if re.search(rf"\${name}\b", query)}  # DuckDB refuses extras
    with catalog.reading(archive.catalog_path) as con:
        return catalog.frame(con, query, used)


_SCOPE = "list_contains($models, model) AND seed = $seed AND list_contains($langs, lang)"


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
               100 * sum(n_selected) / sum(n_params) AS percent
        FROM set_sizes WHERE {_SCOPE} AND k = $k AND layer IS NOT NULL
        GROUP BY model, lang, layer ORDER BY model, lang, layer""", scope.params())


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
    return f"{a}–{b}"


def overlap_layers(archive, scope: Scope) -> pl.DataFrame:
    """Jaccard per (model, pair, layer) at one k, from overlap_by_layer (layer NULL included)."""
    frame = _frame(archive, """
        SELECT model, lang_a, lang_b, layer, n_intersection, n_union, jaccard::DOUBLE AS jaccard,
               chance_jaccard::DOUBLE AS chance_jaccard
        FROM overlap_by_layer WHERE list_contains($models, model) AND k = $k AND seed = $seed
          AND list_contains($langs, lang_a) AND list_contains($langs, lang_b)
        ORDER BY model, layer NULLS LAST, lang_a, lang_b""", scope.params())
    return _pair_columns(frame, scope).sort(["model", "pair_no", "layer"], nulls_last=True)


def overlap_global(archive, scope: Scope) -> pl.DataFrame:
    """Jaccard per (model, pair, k), all modules pooled, from overlap_global."""
    frame = _frame(archive, """
        SELECT model, lang_a, lang_b, k, n_intersection, n_union, jaccard::DOUBLE AS jaccard,
               chance_jaccard::DOUBLE AS chance_jaccard
        FROM overlap_global WHERE list_contains($models, model) AND list_contains($ks, k) AND seed = $seed
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
    return _frame(archive, """
        SELECT model, ls AS langs, sum(n_params)::BIGINT AS n_params FROM (
            SELECT model, list_filter(langs, lambda x: list_contains($langs, x)) AS ls, n_params
            FROM patterns WHERE list_contains($models, model) AND k = $k AND seed = $seed)
        WHERE len(ls) > 0 GROUP BY model, ls ORDER BY model, n_params DESC""", scope.params())


def runs_used(archive, scope: Scope) -> pl.DataFrame:
    """The math and control runs behind the derived rows of the scope, with provenance."""
    return _frame(archive, """
        WITH used AS (
            SELECT DISTINCT unnest([math_run_id, control_run_id]) AS run_id FROM selections
            WHERE list_contains($models, model) AND seed = $seed AND list_contains($langs, lang)
              AND list_contains($ks, k))
        SELECT r.run_id, r.model, r.lang, r.role, r.dataset, r.seed, r.n_samples, r.n_tokens, r.finished_at,
               r.provenance
        FROM runs r JOIN used USING (run_id) ORDER BY r.model, list_position($langs, r.lang), r.role DESC""", scope.params())
