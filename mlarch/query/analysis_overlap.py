"""How the math-only sets change between two analyses of a model (e.g. the same math data
against control A and control B, or the exact method against the authors' bf16 arithmetic):
intersection, union and Jaccard of the two sets, per language, per k and per layer (or
module, or whole model).

Not a view: `patterns` counts membership across the languages of one analysis, so the
overlap of two analyses' sets needs the per-parameter masks. They come from the stored level
codes (checked reads, as Archive.selection): each run's codes are read once, a window of
whole modules at a time, and every k follows from them (a k a run did not archive is
re-thresholded from its stored factors; a mathneuro-bf16 run has no factors, so only its
archived k are allowed, refused up front)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl

from mlarch import methods
from mlarch.errors import UsageError
from mlarch.query.compare import BY, derived_sets, pair_runs
from mlarch.query.model_names import resolve_model
from mlarch.store import analyses as analyses_store
from mlarch.store import catalog
from mlarch.store.spans import groups as span_groups
from mlarch.wording import Arg, error

COUNTS = ("n_a", "n_b", "n_intersection", "n_union")
_SCHEMA = {"model": pl.Utf8, "lang": pl.Utf8, "k": pl.Float64, "seed": pl.Int64, "analysis_a": pl.Utf8,
           "analysis_b": pl.Utf8, "module": pl.Utf8, "layer": pl.Int64, "depth": pl.Float64, "n_a": pl.Int64,
           "n_b": pl.Int64, "n_intersection": pl.Int64, "n_union": pl.Int64}
# Level codes read at once per run: whole modules up to about this many elements. A module
# read alone decodes every 4 M-element chunk it touches; small modules share chunks, so a
# window decodes each chunk about once, and memory stays bounded for any model size.
WINDOW = 1 << 25
PAPER_SUFFIX = "-paper"  # analyses.default_name's suffix for a paper-compatible analysis
PAIR_ARG = "analyses"  # the argument naming the two analyses (the charts' is `analysis`)


@dataclass(frozen=True)
class Plan:
    """What one comparison reads: checked before any array is read."""

    model: str
    analyses: tuple[str, str]
    langs: list[str]
    ks: list[float]  # ascending
    seed: int
    runs: dict  # (analysis, lang) -> (math_run_id, control_run_id), the pair Archive.selection uses
    k_default: bool  # ks were not given: every k both analyses have sets at


# --- which analyses: the exact one and the paper-compatible one beside it -------------------
def is_paper_compatible(config: dict) -> bool:
    """An analysis ingested with any of the authors' settings (issue 15): mathneuro-bf16, their
    draw or texts (recorded only when not at the defaults), or no truncation."""
    return (any(config.get(f) is not None for f in analyses_store.COMPAT_SETTINGS)
            or ("max_length" in config and config["max_length"] is None))


def paper_pairs(con, model: str) -> list[tuple[str, str]]:
    """(exact, paper-compatible) analysis pairs of `model`: `X` and `X-paper` (the default names
    of an ingest without and with --paper-compat), else its only exact and only compatible one."""
    configs = {}
    for name, text in con.execute("SELECT analysis, config FROM analyses WHERE model = ? ORDER BY analysis",
                                  [model]).fetchall():
        try:
            config = json.loads(text)
        except (TypeError, ValueError):
            config = {}
        configs[name] = config if isinstance(config, dict) else {}
    paper = [n for n, c in configs.items() if is_paper_compatible(c)]
    exact = [n for n in configs if n not in paper]
    pairs = [(n[:-len(PAPER_SUFFIX)], n) for n in paper if n.endswith(PAPER_SUFFIX) and n[:-len(PAPER_SUFFIX)] in exact]
    if not pairs and len(exact) == 1 and len(paper) == 1:
        pairs = [(exact[0], paper[0])]
    return pairs


def default_pair(con, model: str, shown: str | None = None, arg: str = PAIR_ARG) -> tuple[str, str]:
    """The exact and paper-compatible analyses of `model` to compare (the pair holding `shown`,
    if given); a UsageError naming the choices when there is not exactly one."""
    pairs = [p for p in paper_pairs(con, model) if shown is None or shown in p]
    if len(pairs) == 1:
        return pairs[0]
    names = analyses_store.names(con, model)
    if not pairs:
        raise error(UsageError, f"model {model!r} has no paper-compatible analysis beside an exact one (it has "
                    f"{', '.join(names) or 'none'}): pass two analyses to compare, ", Arg(arg, "A,B"),
                    " (see `mlarch analyses`)")
    raise error(UsageError, f"model {model!r} has {len(pairs)} exact/paper-compatible pairs of analyses "
                f"({'; '.join(f'{a},{b}' for a, b in pairs)}): choose one, ", Arg(arg, "A,B"))


# --- arguments -------------------------------------------------------------------------------
def parse_langs(value) -> list[str] | None:
    """None or 'all' (every language both analyses have), 'en', 'en,de' or a list."""
    parts = value.split(",") if isinstance(value, str) else None if value is None else list(value)
    if parts is None or [str(x).strip().lower() for x in parts] == ["all"]:
        return None
    langs = [str(x).strip() for x in parts if str(x).strip()]
    if not langs:
        raise UsageError("no language given: pass codes such as en,de, or none for every language both analyses have")
    if len(set(langs)) != len(langs):
        raise UsageError(f"languages repeat in {','.join(langs)}: list each once")
    return langs


def parse_ks(value) -> list[float] | None:
    """None or 'all' (every k both analyses have sets at), a number, '0.01,0.05' or a list."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    parts = value.split(",") if isinstance(value, str) else [value] if isinstance(value, (int, float)) else list(value)
    try:
        ks = [float(x) for x in parts]
    except (TypeError, ValueError):
        raise UsageError(f"k must be numbers in (0, 1) or all, got {value!r}") from None
    bad = [k for k in ks if not 0 < k < 1]
    if not ks or bad:
        raise error(UsageError, f"k must be in (0, 1), got {', '.join(f'{k:g}' for k in bad) or 'nothing'}: e.g. ",
                    Arg("k", [0.01, 0.05]))
    return sorted(set(ks))


def _pair_of_names(analyses, arg: str = PAIR_ARG) -> list[str] | None:
    if analyses is None:
        return None
    names = [x.strip() for x in analyses.split(",") if x.strip()] if isinstance(analyses, str) else list(analyses)
    if len(names) != 2 or names[0] == names[1]:
        raise error(UsageError, Arg(arg), f" takes two different analyses of the model, got "
                    f"{','.join(map(str, names)) or 'none'}: e.g. ", Arg(arg, "gsm8k-vs-flores,gsm8k-vs-flores-paper"),
                    " (see `mlarch analyses`)")
    return names


# --- the plan: names, languages, seed, k, runs; every check before any array is read ---------
def plan(archive, model: str, langs=None, analyses=None, k=None, seed: int | None = None,
         arg: str = PAIR_ARG) -> Plan:
    """Resolve and check a comparison (see analysis_overlap); `arg`: the name of the argument
    that holds the two analyses, for messages."""
    langs, ks, names = parse_langs(langs), parse_ks(k), _pair_of_names(analyses, arg)
    with catalog.reading(archive.catalog_path) as con:
        model = resolve_model(con, model)  # one model: exact name, else a unique part of one
        if names is None:
            names = list(default_pair(con, model, arg=arg))
    names = [archive.resolve_analysis(model, name) for name in names]  # each exists (else: the list)
    with catalog.reading(archive.catalog_path) as con:
        sets = [derived_sets(con, [model], [name])[model] for name in names]
    langs, seed = _langs_and_seed(model, names, sets, langs, seed)
    with catalog.reading(archive.catalog_path) as con:
        runs = {(name, lang): pair_runs(con, model, name, lang, seed) for name in names for lang in langs}
    ks, k_default = _ks_for(archive, model, names, sets, langs, seed, runs, ks)
    return Plan(model, (names[0], names[1]), langs, ks, seed, runs, k_default)


def _langs_and_seed(model, names, sets, langs, seed) -> tuple[list[str], int]:
    """The languages (given, else every one both analyses have at the seed) and one seed at
    which both analyses have sets for all of them (given, else the smallest)."""
    def seeds(found, lang=None):
        return {s for (s, x) in found if lang is None or x == lang}

    for lang in langs or []:
        for name, found in zip(names, sets):
            if not seeds(found, lang):
                have = sorted({x for _, x in found})
                raise UsageError(f"analysis {name!r} of model {model!r} has no math-only set for {lang!r}; it has "
                                 f"{', '.join(have) or 'none'} (see `mlarch analyses`)")
    if langs:
        shared = set.intersection(*(seeds(found, lang) for found in sets for lang in langs))
        where = f"for {', '.join(langs)}"
    else:
        shared = {s for s in seeds(sets[0]) if {x for t, x in sets[0] if t == s} & {x for t, x in sets[1] if t == s}}
        where = "for any language"
    if seed is None:
        if not shared:
            raise error(UsageError, f"analyses {', '.join(names)} of {model!r} share no seed {where}: "
                        "ingest both with a common ", Arg("seeds"), " value")
        seed = min(shared)
    elif seed not in shared:
        raise UsageError(f"seed {seed} has no sets {where} in both analyses {', '.join(names)}; shared seeds: "
                         f"{', '.join(map(str, sorted(shared))) or 'none'}")
    if not langs:
        both = {x for s, x in sets[0] if s == seed} & {x for s, x in sets[1] if s == seed}
        langs = sorted(both)
    return langs, int(seed)


def _ks_for(archive, model, names, sets, langs, seed, runs, ks) -> tuple[list[float], bool]:
    """The k values to compare: the given ones (a mathneuro-bf16 run refuses a k it did not
    archive: the message of Archive.selection, math run first), else every k both analyses
    have sets at: where one is mathneuro-bf16, its archived k (the exact one re-thresholds),
    else the k both archived."""
    fixed, archived = [], []
    for name, found in zip(names, sets):
        for lang in langs:
            have = {float(x) for x in found[(seed, lang)]}
            archived.append(have)
            if any(not methods.rethresholdable(archive._run_arrays(r)["method"] or methods.EXACT)
                   for r in runs[(name, lang)]):
                fixed.append(have)
    if ks is not None:
        for name in names:
            for lang in langs:
                for run_id in runs[(name, lang)]:
                    run = archive._run_arrays(run_id)
                    for k in ks:
                        methods.check_rethreshold(run_id, run["method"] or methods.EXACT, k,
                                                  [float(v) for v in run["k_values"]])
        return ks, False
    common = sorted(set.intersection(*(fixed or archived)))
    if not common:
        raise error(UsageError, f"analyses {', '.join(names)} of {model!r} have no k in common for "
                    f"{', '.join(langs)} at seed {seed}: pass ", Arg("k"))
    return common, True


# --- the counts ----------------------------------------------------------------------------
def _top_masks(archive, run_id: str, run: dict, span, codes, ks: list[float]) -> list:
    """Boolean top-k masks of one (run, module) at each of `ks`: from the stored level codes
    where the run archived k, else re-thresholded from its scores (one pass for all such k)."""
    from mlarch.selection import in_top, level_codes

    k_values = [float(v) for v in run["k_values"]]
    missing = [k for k in ks if k not in k_values]
    rethresholded = {}
    if missing:  # exact runs only (plan refused the others)
        levels = level_codes(archive.scores(run_id, span.module), missing)
        rethresholded = {k: in_top(levels, j) for j, k in enumerate(missing)}
    return [rethresholded[k] if k in rethresholded else in_top(codes, k_values.index(k)) for k in ks]


def _bounds_lut(run_k_values: list[float], ks: list[float]):
    """uint8 lookup: a run's level code -> index in `ks` of the first k whose top-k set holds
    the entry (len(ks): none of them). Needs every k of `ks` archived by the run."""
    import numpy as np

    lut = np.full(256, len(ks), dtype=np.uint8)
    for code, k in enumerate(run_k_values, start=1):  # code c: first in the top-run_k_values[c-1] set
        later = [i for i, x in enumerate(ks) if x >= k]
        lut[code] = later[0] if later else len(ks)
    return lut


HISTOGRAM_CODES = 15  # runs with up to this many k: one joint histogram of level codes per module
_SLICE = 1 << 22  # elements per histogram pass (bounds the temporaries)


def _histogram_counts(codes: list, luts: list, n_ks: int, base: int) -> list[tuple[int, int, int, int]]:
    """(n_a, n_b, n_intersection, n_union) at each k from one pass over the four runs' level
    codes (math A, control A, math B, control B), each below `base` (1 + the most k a run has).

    The stored codes of every entry are counted in one joint histogram (16^4 bins at most);
    then, per bin: an entry is in a math-only set at ks[j] iff lo <= j < hi, lo = the first k
    of its math top-k set, hi = that of its control top-k set (len(ks): never), both read off
    the bin's codes by `luts` (the sets are nested in k)."""
    import numpy as np

    hist = np.zeros(base ** 4, dtype=np.int64)
    flat = [c.reshape(-1) for c in codes]
    for first in range(0, flat[0].size, _SLICE):
        index = flat[0][first:first + _SLICE].astype(np.uint16)
        for part in flat[1:]:
            index *= base
            index += part[first:first + _SLICE]
        hist += np.bincount(index, minlength=base ** 4)
    grid = np.indices((base,) * 4).reshape(4, -1)  # the four codes of each bin
    lo_a, hi_a, lo_b, hi_b = (lut[g] for lut, g in zip(luts, grid))
    out = []
    for j in range(n_ks):
        in_a, in_b = (lo_a <= j) & (j < hi_a), (lo_b <= j) & (j < hi_b)
        n_a, n_b, n_both = int(hist[in_a].sum()), int(hist[in_b].sum()), int(hist[in_a & in_b].sum())
        out.append((n_a, n_b, n_both, n_a + n_b - n_both))
    return out


def _mask_counts(archive, plan: Plan, lang: str, span, codes: dict) -> list[tuple[int, int, int, int]]:
    """The same counts from boolean masks per k (a k some run re-thresholds, or many k)."""
    import numpy as np

    selected = []
    for name in plan.analyses:
        masks = [_top_masks(archive, run_id, archive._run_arrays(run_id), span, codes[run_id], plan.ks)
                 for run_id in plan.runs[(name, lang)]]
        selected.append([m & ~c for m, c in zip(*masks)])  # math-only: top-k math, not top-k control
    out = []
    for a, b in zip(*selected):
        n_a, n_b = int(np.count_nonzero(a)), int(np.count_nonzero(b))
        n_both = int(np.count_nonzero(a & b))
        out.append((n_a, n_b, n_both, n_a + n_b - n_both))
    return out


def _module_counts(archive, plan: Plan, lang: str, spans: list) -> list[tuple]:
    """(module, k index, n_a, n_b, n_intersection, n_union) for the modules of one window."""
    reads = {}  # run_id -> level codes of the window
    start = spans[0].param_offset
    stop = spans[-1].param_offset + spans[-1].n_params
    run_ids = [run_id for name in plan.analyses for run_id in plan.runs[(name, lang)]]  # math A, control A, B...
    for run_id in run_ids:
        if run_id not in reads:
            reads[run_id] = archive._arrays().read(archive._array_store(), archive._record(run_id, "levels"),
                                                   start, stop)
    k_values = {r: [float(v) for v in archive._run_arrays(r)["k_values"]] for r in run_ids}
    archived = all(k in k_values[r] for r in run_ids for k in plan.ks)
    luts = [_bounds_lut(k_values[r], plan.ks) for r in run_ids] if archived else None
    base = 1 + max(len(k_values[r]) for r in run_ids)  # level codes are 0 .. len(k_values)
    out = []
    for span in spans:
        codes = {r: reads[r][span.param_offset - start:span.param_offset - start + span.n_params]
                 .reshape(span.n_rows, span.n_cols) for r in run_ids}
        if archived and base <= HISTOGRAM_CODES + 1:
            counts = _histogram_counts([codes[r] for r in run_ids], luts, len(plan.ks), base)
        else:
            counts = _mask_counts(archive, plan, lang, span, codes)
        out += [(span.module, j, *c) for j, c in enumerate(counts)]
    return out


def overlap(archive, plan: Plan, by: str = "layer") -> pl.DataFrame:
    """The counts of `plan`, one row per (language, k) and layer, module or nothing (global)."""
    if by not in BY:
        raise error(UsageError, Arg("by"), f" must be one of {', '.join(BY)}, got {by!r}")
    spans = sorted(archive._spans(plan.model).values(), key=lambda s: s.param_offset)
    blocks = sorted({s.layer for s in spans if s.layer is not None})
    depth_of = {layer: layer / (len(blocks) - 1) if len(blocks) > 1 else 0.0 for layer in blocks}  # = layer_depth
    span_of = {s.module: s for s in spans}
    a, b = plan.analyses
    rows = []
    for lang in plan.langs:
        for window in span_groups(spans, WINDOW):  # runs of whole modules of about WINDOW elements
            for module, j, *counts in _module_counts(archive, plan, lang, window):
                layer = span_of[module].layer
                rows.append((plan.model, lang, plan.ks[j], plan.seed, a, b, module, layer, depth_of.get(layer),
                             *counts))
    frame = pl.DataFrame(rows, schema=_SCHEMA, orient="row")
    keys = ["model", "lang", "k", "seed", "analysis_a", "analysis_b"]
    order = {lang: i for i, lang in enumerate(plan.langs)}
    frame = frame.with_columns(_lang_no=pl.col("lang").replace_strict(order, return_dtype=pl.Int64))
    if by == "layer":
        frame = frame.group_by(keys + ["_lang_no", "layer"], maintain_order=True).agg(
            *(pl.col(c).sum() for c in COUNTS), pl.col("depth").first()).sort(
            ["_lang_no", "k", "layer"], nulls_last=True)
        frame = frame.select(keys + ["layer", *COUNTS, "depth"])
    elif by == "global":
        frame = frame.group_by(keys + ["_lang_no"], maintain_order=True).agg(pl.col(c).sum() for c in COUNTS).sort(
            ["_lang_no", "k"]).select(keys + list(COUNTS))
    else:
        frame = frame.sort(["_lang_no", "k"], maintain_order=True).select(
            keys + ["module", "layer", *COUNTS, "depth"])
    jaccard = pl.when(pl.col("n_union") > 0).then(pl.col("n_intersection") / pl.col("n_union"))
    if by == "global":
        return frame.with_columns(jaccard=jaccard)
    return frame.with_columns(jaccard=jaccard).select(pl.exclude("depth"), "depth")


def analysis_overlap(archive, model: str, langs=None, analyses=None, k=None, seed: int | None = None,
                     by: str = "layer") -> pl.DataFrame:
    """One row per language, k and layer (or module, or one per language and k with
    by='global'): the sizes of the math-only set in analyses A and B, their intersection,
    union and Jaccard; by='layer'/'module' add depth = layer / (blocks - 1).

    langs: 'en', 'en,de' or a list (default: every language both analyses have sets for);
    analyses: 'A,B' or [A, B] (default: the model's exact analysis and the paper-compatible
    one beside it, `X` and `X-paper`); k: a number, a list, 'all' or None (every k both
    analyses have sets at; where one is mathneuro-bf16, its archived k). Any k works for
    exact runs (re-thresholded from the stored factors); a mathneuro-bf16 run has sets only
    at the k it archived, and another k is refused before anything is read."""
    if by not in BY:
        raise error(UsageError, Arg("by"), f" must be one of {', '.join(BY)}, got {by!r}")
    return overlap(archive, plan(archive, model, langs, analyses, k, seed), by)
