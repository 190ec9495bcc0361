"""How one language's math-only set changes between two analyses of a model (e.g. the same
math data against control A and control B): intersection, union and Jaccard of the two sets.

Not a view: `patterns` counts membership across the languages of one analysis, so the
overlap of two analyses' sets needs the per-parameter masks. They come from
Archive.selection (stored level codes, checked reads), module by module."""

from __future__ import annotations

import polars as pl

from mlarch.errors import MlarchError, UsageError
from mlarch.query.compare import BY, DEFAULT_K, derived_sets, match_models
from mlarch.store import catalog

_SCHEMA = {"model": pl.Utf8, "lang": pl.Utf8, "k": pl.Float64, "seed": pl.Int64, "analysis_a": pl.Utf8,
           "analysis_b": pl.Utf8, "module": pl.Utf8, "layer": pl.Int64, "n_a": pl.Int64, "n_b": pl.Int64,
           "n_intersection": pl.Int64, "n_union": pl.Int64}


def _pick(lang: str, model: str, names: list[str], sets: list[dict], k, seed) -> tuple[float, int]:
    """k and seed at which `lang` has a set in both analyses (the given ones, checked)."""
    seeds = sorted(set.intersection(*({s for (s, lang_), _ in found.items() if lang_ == lang} for found in sets)))
    for name, found in zip(names, sets):
        if not any(lang_ == lang for _, lang_ in found):
            raise MlarchError(f"analysis {name!r} of model {model!r} has no math-only set for {lang!r}; it has "
                              f"{', '.join(sorted({x for _, x in found})) or 'none'} (see `mlarch analyses`)")
    if seed is None:
        if not seeds:
            raise MlarchError(f"analyses {', '.join(names)} of {model!r} share no seed for {lang!r}")
        seed = seeds[0]
    elif seed not in seeds:
        raise MlarchError(f"seed {seed} has no set for {lang!r} in both analyses; shared seeds: "
                          f"{', '.join(map(str, seeds)) or 'none'}")
    common = sorted(set.intersection(*(found[(seed, lang)] for found in sets)))
    if k is None:
        if not common:
            raise MlarchError(f"analyses {', '.join(names)} of {model!r} share no k for {lang!r}: pass --k")
        k = DEFAULT_K if DEFAULT_K in common else common[0]
    elif not 0 < k < 1:
        raise UsageError(f"k = {k} is outside (0, 1)")
    return float(k), int(seed)


def analysis_overlap(archive, model: str, lang: str, analyses: list[str], k: float | None = None,
                     seed: int | None = None, by: str = "layer") -> pl.DataFrame:
    """One row per layer (or module, or one global row): the sizes of `lang`'s math-only set
    in analyses A and B, their intersection, union and Jaccard. Any k works (a k that was not
    archived is re-thresholded from the stored factors, as Archive.selection does)."""
    if by not in BY:
        raise UsageError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    if len(analyses) != 2 or analyses[0] == analyses[1]:
        raise UsageError(f"--analyses takes two different analyses of the model, got {','.join(analyses) or 'none'}: "
                         "e.g. --analyses gsm8k-vs-flores,gsm8k-vs-mmlu (see `mlarch analyses`)")
    with catalog.reading(archive.catalog_path) as con:
        matched = match_models(con, model)
        if len(matched) != 1 and model not in matched:
            raise UsageError(f"{model!r} matches {len(matched)} models ({', '.join(matched)}): --analyses compares "
                             "the analyses of one model; pass its full name")
        model = model if model in matched else matched[0]
    names = [archive.resolve_analysis(model, name) for name in analyses]  # each exists (else: the list)
    with catalog.reading(archive.catalog_path) as con:
        sets = [derived_sets(con, [model], [name])[model] for name in names]
    k, seed = _pick(lang, model, names, sets, k, seed)
    rows = []
    for module, span in sorted(archive._spans(model).items(), key=lambda item: item[1].param_offset):
        a = archive.selection(model, lang, k, module, seed=seed, analysis=names[0])
        b = archive.selection(model, lang, k, module, seed=seed, analysis=names[1])
        rows.append((model, lang, k, seed, names[0], names[1], module, span.layer, int(a.sum()), int(b.sum()),
                     int((a & b).sum()), int((a | b).sum())))
    frame = pl.DataFrame(rows, schema=_SCHEMA, orient="row")
    keys = ["model", "lang", "k", "seed", "analysis_a", "analysis_b"]
    if by == "layer":
        frame = frame.group_by(keys + ["layer"], maintain_order=True).agg(
            pl.col(c).sum() for c in ("n_a", "n_b", "n_intersection", "n_union")).sort("layer", nulls_last=True)
    elif by == "global":
        frame = frame.group_by(keys, maintain_order=True).agg(
            pl.col(c).sum() for c in ("n_a", "n_b", "n_intersection", "n_union"))
    return frame.with_columns(
        jaccard=pl.when(pl.col("n_union") > 0).then(pl.col("n_intersection") / pl.col("n_union")))
