"""One builder per chart kind: SQL aggregates (charts.data) -> an Altair chart.

Each builder gets the archive and a resolved Scope and returns an unconfigured chart;
`charts.build` adds the shared look (fonts, sizes, white background)."""

from __future__ import annotations

import math
from itertools import combinations

import polars as pl

from . import colors, data

WIDTH, HEIGHT = 440, 260  # one panel, in px (before the PNG scale factor)
TALL = 340  # log-log sizes: more room per decade
FACET_COLUMNS = 3
BAR_HEIGHT = 200  # UpSet bars


def _alt():
    from mlarch.charts.extras import require

    return require("altair")


def fmt_k(k: float) -> str:
    """A k value as charts and tables print it: 0.01, 1e-05, or every digit it needs
    (data.exact), so two k never share a label and a printed k can be typed back."""
    return data.exact(k)


def _where(scope: data.Scope, *, k: bool = True) -> str:
    parts = [scope.models[0] if len(scope.models) == 1 else f"{len(scope.models)} models"]
    if k:
        parts.append(f"k = {fmt_k(scope.k)}")
    parts.append(f"seed {scope.seed}")
    return " · ".join(parts)


def _title(text: str, *subtitle: str):
    alt = _alt()
    return alt.TitleParams(text, subtitle=[s for s in subtitle if s], anchor="start", offset=10)


def _outside_note(archive, scope: data.Scope) -> str:
    outside = data.outside_modules(archive, scope)
    if not outside:
        return ""
    return f"Not shown: modules outside transformer blocks ({', '.join(outside)}); heatmap --by layer includes them."


def _lang_encodings(langs):
    alt = _alt()
    legend = alt.Legend(title="language", symbolStrokeWidth=2)
    return (alt.Color("lang:N", scale=alt.Scale(domain=langs, range=[colors.color(x) for x in langs]), legend=legend),
            alt.Shape("lang:N", scale=alt.Scale(domain=langs, range=[colors.shape(x) for x in langs]), legend=legend))


def _pair_encodings(pairs):
    alt = _alt()
    labels = [data.pair_label(a, b) for a, b in pairs]
    legend = alt.Legend(title="language pair", symbolStrokeWidth=2)
    return (alt.Color("pair:N", scale=alt.Scale(domain=labels, range=[colors.pair_color(i) for i in range(len(labels))]),
                      legend=legend),
            alt.Shape("pair:N", scale=alt.Scale(domain=labels, range=[colors.pair_shape(i) for i in range(len(labels))]),
                      legend=legend))


def _layer_axis(layers):
    alt = _alt()
    top = max(layers) if layers else 0
    step = 1 if top < 24 else 2 if top < 48 else 4
    return alt.X("layer:Q", title="transformer block (layer index)",
                 scale=alt.Scale(domain=[0, top], nice=False, padding=8),
                 axis=alt.Axis(values=list(range(0, top + 1, step)), format="d", grid=False))


X_AXES = ("layer", "depth")  # layer-wise charts: block index, or relative depth across models


def _x_axis(frame, x: str):
    """Block index, or relative depth layer / (n_layers - 1) in [0, 1]: blocks of models of
    different depth line up (first block 0, last block 1)."""
    if x == "layer":
        return _layer_axis(frame["layer"].to_list())
    alt = _alt()
    return alt.X("depth:Q", title="relative depth (layer / (blocks − 1))",
                 scale=alt.Scale(domain=[0, 1], nice=False, padding=8),
                 axis=alt.Axis(values=[0, 0.25, 0.5, 0.75, 1], format=".2~f", grid=False))


def _facet(chart, scope: data.Scope, *, columns: int = FACET_COLUMNS):
    """Several models: one panel each, shared scales (Vega-Lite's default for facets)."""
    if len(scope.models) == 1:
        return chart
    alt = _alt()
    return chart.facet(facet=alt.Facet("model:N", title=None, sort=scope.models,
                                       header=alt.Header(labelFontSize=12, labelFontWeight="bold")),
                       columns=min(columns, len(scope.models)))


def _lines(frame, x, y, tooltip, color, shape):
    alt = _alt()
    base = alt.Chart(frame).encode(x=x, y=y, color=color)
    line = base.mark_line(strokeWidth=2)
    points = base.mark_point(filled=True, size=55, opacity=1).encode(shape=shape, tooltip=tooltip)
    return alt.layer(line, points).properties(width=WIDTH, height=HEIGHT)


SI_LABEL = "datum.value == 0 ? '0' : format(datum.value, '~s')"  # 0 rather than "0k"


def _log_ticks(values) -> list[float]:
    """1, 2, 5 x 10^n covering the values (a readable log axis)."""
    low, high = min(values), max(values)
    ticks, base = [], 10 ** math.floor(math.log10(low))
    while base <= high * 10:
        ticks += [base * m for m in (1, 2, 5)]
        base *= 10
    return [t for t in ticks if low / 2.5 <= t <= high * 2.5]


def _count_y(values, title):
    """Counts over orders of magnitude: log scale (symlog if a count is 0)."""
    alt = _alt()
    if values and all(v > 0 for v in values):  # a tight domain keeps close lines apart
        ticks = _log_ticks([min(values) / 1.1, max(values) * 1.1])
        low = max(t for t in ticks if t <= min(values) / 1.1)  # end on a labelled tick
        high = min(t for t in ticks if t >= max(values) * 1.1)
        ticks = [t for t in ticks if low <= t <= high]
        return alt.Y("n_selected:Q", title=f"{title} (log scale)",
                     scale=alt.Scale(type="log", domain=[low, high], nice=False),
                     axis=alt.Axis(values=ticks, labelExpr=SI_LABEL))
    return alt.Y("n_selected:Q", title=f"{title} (symlog scale)", scale=alt.Scale(type="symlog"),
                 axis=alt.Axis(labelExpr=SI_LABEL))


def sizes(archive, scope: data.Scope):
    """The sizes chart: math-specific parameters vs top-k on log-log axes, one line per language (a panel per model)."""
    alt = _alt()
    frame = data.sizes(archive, scope)
    color, shape = _lang_encodings(scope.langs)
    x = alt.X("k:Q", title="top-k fraction k (log scale)", scale=alt.Scale(type="log", nice=False, padding=12),
              axis=alt.Axis(values=scope.ks, format="~g", labelAngle=-45, labelOverlap=False, grid=False))
    y = _count_y(frame["n_selected"].to_list(), "math-specific parameters")
    tooltip = [alt.Tooltip("model:N"), alt.Tooltip("lang:N", title="language"), alt.Tooltip("k:Q", format="~g"),
               alt.Tooltip("n_selected:Q", title="math-specific", format=","),
               alt.Tooltip("percent:Q", title="% of scored", format=".3f")]
    chart = _facet(_lines(frame, x, y, tooltip, color, shape).properties(height=TALL), scope)
    return chart.properties(title=_title(
        "Math-specific parameters vs top-k",
        f"{_where(scope, k=False)} · top-k on math text and not top-k on control text, summed over all scored matrices"))


def layers(archive, scope: data.Scope, x: str = "layer"):
    """The layers chart: math-specific parameters per block, one line per language; x the block index or relative
    depth."""
    alt = _alt()
    frame = data.layers(archive, scope)
    color, shape = _lang_encodings(scope.langs)
    y = alt.Y("n_selected:Q", title="math-specific parameters in block", scale=alt.Scale(zero=True),
              axis=alt.Axis(labelExpr=SI_LABEL))
    tooltip = [alt.Tooltip("model:N"), alt.Tooltip("lang:N", title="language"), alt.Tooltip("layer:Q"),
               alt.Tooltip("depth:Q", format=".3f"), alt.Tooltip("n_selected:Q", title="math-specific", format=","),
               alt.Tooltip("percent:Q", title="% of layer", format=".3f")]
    chart = _facet(_lines(frame, _x_axis(frame, x), y, tooltip, color, shape), scope)
    return chart.properties(title=_title(
        "Math-specific parameters per layer", f"{_where(scope)} · summed over each block's scored matrices",
        _outside_note(archive, scope)))


def overlap(archive, scope: data.Scope, x: str = "layer"):
    """The overlap chart: Jaccard of the math-specific sets per block, one line per language pair, chance dashed; x
    the block index or relative depth."""
    alt = _alt()
    frame = data.overlap_layers(archive, scope).filter(pl.col("layer").is_not_null())
    color, shape = _pair_encodings(scope.pairs)
    y = alt.Y("jaccard:Q", title="Jaccard index of math-specific sets", scale=alt.Scale(zero=True))
    tooltip = [alt.Tooltip("model:N"), alt.Tooltip("pair:N", title="pair"), alt.Tooltip("layer:Q"),
               alt.Tooltip("jaccard:Q", format=".3f"), alt.Tooltip("n_intersection:Q", title="intersection", format=","),
               alt.Tooltip("n_union:Q", title="union", format=","),
               alt.Tooltip("chance_jaccard:Q", title="chance", format=".4f"), alt.Tooltip("depth:Q", format=".3f")]
    field = x
    x = _x_axis(frame, field)
    base = alt.Chart(frame)
    line = base.mark_line(strokeWidth=2).encode(x=x, y=y, color=color)
    points = base.mark_point(filled=True, size=55, opacity=1).encode(x=x, y=y, color=color, shape=shape,
                                                                       tooltip=tooltip)
    rule = base.mark_rule(color=colors.CHANCE_COLOR, strokeDash=[6, 4], strokeWidth=1.5).encode(
        y=alt.Y("max(chance_jaccard):Q"))
    text = base.mark_text(align="right", baseline="bottom", dx=-2, dy=-3, color=colors.CHANCE_COLOR,
                          fontSize=11).encode(x=alt.X(f"max({field}):Q"), y=alt.Y("max(chance_jaccard):Q"),
                                              text=alt.value(f"chance = {data.chance(scope.k):.4f}"))
    chart = alt.layer(rule, line, points, text).properties(width=WIDTH, height=HEIGHT)
    return _facet(chart, scope).properties(title=_title(
        "Overlap of math-specific parameters per layer", _where(scope),
        "Dashed: chance Jaccard of two random top-k sets, p/(2−p) with p = k(1−k).",
        _outside_note(archive, scope)))


def unique(archive, scope: data.Scope):
    """Language-unique share per model and language: bars grouped by model, one per language."""
    alt = _alt()
    frame = data.unique_shares(archive, scope)
    color, _ = _lang_encodings(scope.langs)
    tooltip = [alt.Tooltip("model:N"), alt.Tooltip("lang:N", title="language"),
               alt.Tooltip("n_unique:Q", title="language-unique", format=","),
               alt.Tooltip("n_selected:Q", title="math-specific", format=","),
               alt.Tooltip("percent:Q", title="% unique", format=".2f")]
    chart = alt.Chart(frame).mark_bar().encode(
        x=alt.X("model:N", title=None, sort=scope.models, axis=alt.Axis(labelAngle=0)),
        xOffset=alt.XOffset("lang:N", sort=scope.langs),
        y=alt.Y("share:Q", title="language-unique share of the math-specific set",
                scale=alt.Scale(domain=[0, 1], nice=False), axis=alt.Axis(format="%")),
        color=color, tooltip=tooltip,
    ).properties(width=max(WIDTH // 2, 60 * len(scope.models) * max(1, len(scope.langs)) // 2), height=HEIGHT)
    return chart.properties(title=_title(
        "Language-unique share of math-specific parameters", _where(scope),
        "Selected for this language and no other archived language (same analysis, k, seed) ÷ the language's "
        "math-specific set, whole model."))


def _depth_heatmap(archive, scope: data.Scope):
    """Jaccard per (pair, block) on the relative-depth axis: each block a cell from
    depth − ½ step to depth + ½ step (step = 1 / (blocks − 1) of its model), so models of
    different depth line up; modules outside blocks have no depth and are left out."""
    alt = _alt()
    frame = data.overlap_layers(archive, scope).filter(pl.col("layer").is_not_null())
    blocks = frame.group_by("model").agg(n=pl.col("layer").n_unique())
    frame = frame.join(blocks, on="model").with_columns(
        half=pl.when(pl.col("n") > 1).then(0.5 / (pl.col("n") - 1)).otherwise(0.5))
    cells = frame.select("model", "layer", "depth", "half", pl.col("pair").alias("row"), "jaccard",
                         "n_intersection", "n_union")
    chance = cells.select("model", "layer", "depth", "half").unique(maintain_order=True).with_columns(
        row=pl.lit("chance"), jaccard=pl.lit(data.chance(scope.k)),
        n_intersection=pl.lit(None, pl.Int64), n_union=pl.lit(None, pl.Int64))
    cells = pl.concat([cells, chance.select(cells.columns)], how="vertical_relaxed").with_columns(
        x0=pl.col("depth") - pl.col("half"), x1=pl.col("depth") + pl.col("half"))
    rows = [data.pair_label(a, b) for a, b in scope.pairs] + ["chance"]
    top = max([v for v in cells["jaccard"].to_list() if v is not None] + [1e-9])
    chart = alt.Chart(cells).mark_rect(stroke="white", strokeWidth=0.5).encode(
        x=alt.X("x0:Q", title="relative depth (layer / (blocks − 1))", scale=alt.Scale(domain=[-0.05, 1.05], nice=False),
                axis=alt.Axis(values=[0, 0.25, 0.5, 0.75, 1], format=".2~f", grid=False)),
        x2="x1:Q",
        y=alt.Y("row:O", title="language pair", sort=rows, axis=alt.Axis(ticks=False, domain=False)),
        color=alt.Color("jaccard:Q", title="Jaccard", scale=alt.Scale(scheme="blues", domain=[0, top]),
                        legend=alt.Legend(format=".2f", gradientLength=max(80, 24 * len(rows)))),
        tooltip=[alt.Tooltip("model:N"), alt.Tooltip("row:N", title="pair"), alt.Tooltip("layer:Q", title="block"),
                 alt.Tooltip("depth:Q", format=".3f"), alt.Tooltip("jaccard:Q", format=".3f"),
                 alt.Tooltip("n_intersection:Q", format=","), alt.Tooltip("n_union:Q", format=",")],
    ).properties(width=WIDTH, height=alt.Step(24))
    if len(scope.models) > 1:
        chart = chart.facet(row=alt.Row("model:N", title=None, sort=scope.models,
                                        header=alt.Header(labelFontSize=12, labelFontWeight="bold",
                                                          labelAngle=0, labelAlign="left")))
    return chart.properties(title=_title(
        "Jaccard overlap of math-specific parameters per layer, by relative depth", _where(scope),
        "Last row: chance Jaccard, p/(2−p) with p = k(1−k). Modules outside blocks (e.g. an untied head) "
        "have no depth: not shown."))


def heatmap(archive, scope: data.Scope, by: str = "global", x: str = "layer"):
    """The heatmap chart: Jaccard per language pair and k (by='global') or per pair and layer (by='layer')."""
    alt = _alt()
    if by == "layer" and x == "depth":
        return _depth_heatmap(archive, scope)
    if by == "layer":
        frame = data.overlap_layers(archive, scope)
        outside = data.outside_modules(archive, scope)
        other = outside[0] if len(outside) == 1 else "outside blocks"
        frame = frame.with_columns(column=pl.col("layer").cast(pl.String).fill_null(other))
        columns = [str(x) for x in sorted({x for x in frame["layer"].to_list() if x is not None})]
        columns += [other] if frame["layer"].null_count() else []
        x_title = "transformer block (layer index)"
    else:
        frame = data.overlap_global(archive, scope)
        frame = frame.with_columns(column=pl.col("k").map_elements(fmt_k, return_dtype=pl.String))
        columns = [fmt_k(k) for k in scope.ks]
        x_title = "top-k fraction k"
    cells = frame.select("model", "column", pl.col("pair").alias("row"), "jaccard", "n_intersection",
                         "n_union")
    chance_rows = cells.select("model", "column").unique(maintain_order=True)
    chance_of = {fmt_k(k): data.chance(k) for k in scope.ks}  # by column: k, or the one k per layer
    chance_rows = chance_rows.with_columns(
        row=pl.lit("chance"),
        jaccard=pl.col("column").map_elements(
            lambda c: chance_of[c] if by == "global" else data.chance(scope.k), return_dtype=pl.Float64),
        n_intersection=pl.lit(None, pl.Int64), n_union=pl.lit(None, pl.Int64))
    cells = pl.concat([cells, chance_rows.select(cells.columns)], how="vertical_relaxed")
    rows = [data.pair_label(a, b) for a, b in scope.pairs] + ["chance"]
    top = max([v for v in cells["jaccard"].to_list() if v is not None] + [1e-9])
    step = 52 if by == "global" else 40
    base = alt.Chart(cells).encode(
        x=alt.X("column:O", title=x_title, sort=columns, axis=alt.Axis(labelAngle=0, ticks=False, domain=False)),
        y=alt.Y("row:O", title="language pair", sort=rows, axis=alt.Axis(ticks=False, domain=False)))
    rect = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("jaccard:Q", title="Jaccard", scale=alt.Scale(scheme="blues", domain=[0, top]),
                        legend=alt.Legend(format=".2f", gradientLength=max(80, 24 * len(rows)))),
        tooltip=[alt.Tooltip("model:N"), alt.Tooltip("row:N", title="pair"), alt.Tooltip("column:N", title=x_title),
                 alt.Tooltip("jaccard:Q", format=".3f"), alt.Tooltip("n_intersection:Q", format=","),
                 alt.Tooltip("n_union:Q", format=",")])
    text = base.mark_text(fontSize=10 if by == "global" else 9).encode(
        text=alt.Text("jaccard:Q", format=".3f"),
        # white text where it contrasts better with the "blues" cell than black does
        color=alt.condition(f"datum.jaccard > {0.72 * top}", alt.value("white"), alt.value("black")))
    chart = alt.layer(rect, text).properties(width=alt.Step(step), height=alt.Step(24))
    if len(scope.models) > 1:
        chart = chart.facet(row=alt.Row("model:N", title=None, sort=scope.models,
                                        header=alt.Header(labelFontSize=12, labelFontWeight="bold",
                                                          labelAngle=0, labelAlign="left")))
    if by == "layer":
        what, where = "per layer", _where(scope)
    else:
        what, where = "by top-k, all layers pooled", _where(scope, k=False)
    return chart.properties(title=_title(
        f"Jaccard overlap of math-specific parameters {what}", where,
        "Last row: chance Jaccard of two random top-k sets, p/(2−p) with p = k(1−k)."))


def _patterns(frame, langs):
    """(members in display order, count) per pattern: non-empty ones, plus 'all' and
    each language alone even when empty; sorted by size, then fewer members first."""
    counts = {tuple(sorted(row["langs"], key=langs.index)): row["n_params"] for row in frame.iter_rows(named=True)}
    for members in [tuple(langs)] + [(x,) for x in langs]:
        counts.setdefault(members, 0)
    order = {m: i for i, m in enumerate(c for r in range(1, len(langs) + 1) for c in combinations(langs, r))}
    return sorted(counts.items(), key=lambda item: (-item[1], len(item[0]), order[item[0]]))


def upset(archive, scope: data.Scope):
    """The UpSet chart: the size of every intersection pattern of the languages' math-specific sets, per model."""
    alt = _alt()
    frame = data.patterns(archive, scope)
    per_model = {m: _patterns(frame.filter(pl.col("model") == m), scope.langs) for m in scope.models}
    top = max([n for items in per_model.values() for _, n in items] + [1])
    blocks = [_upset_block(alt, model, items, scope, top) for model, items in per_model.items()]
    chart = blocks[0] if len(blocks) == 1 else alt.hconcat(*blocks, spacing=30)
    return chart.properties(title=_title(
        "Math-specific parameters shared across languages (UpSet)", _where(scope),
        f"Bars: parameters selected by exactly the marked languages among {', '.join(scope.langs)};"
        " row labels give each language's whole set."))


def _upset_block(alt, model, items, scope, top):
    langs = scope.langs
    totals = {x: sum(n for members, n in items if x in members) for x in langs}
    labels = {x: f"{x} ({totals[x]:,})" for x in langs}
    ids = [f"p{i:03d}" for i in range(len(items))]
    bars, dots = [], []
    for pid, (members, n) in zip(ids, items):
        name = " ∩ ".join(members) if len(members) > 1 else f"{members[0]} only"
        bars.append({"model": model, "pattern": pid, "name": name, "langs": list(members), "n_params": n,
                     "size": len(members), "fill": colors.color(members[0]) if len(members) == 1 else colors.NEUTRAL})
        for x in langs:
            dots.append({"model": model, "pattern": pid, "name": name, "lang": x, "label": labels[x],
                         "member": x in members,
                         "fill": colors.color(x) if x in members else colors.ABSENT})
    step = max(18, min(34, 640 // max(1, len(items))))
    x = alt.X("pattern:O", sort=ids, axis=None, scale=alt.Scale(paddingInner=0.25))
    bar_base = alt.Chart(alt.Data(values=bars)).encode(x=x)
    widest = max(len(f"{n:,}") for _, n in items) * 6.2  # px of a 9-pt count label
    rotate = step < 22
    headroom = BAR_HEIGHT / max(BAR_HEIGHT / 2, BAR_HEIGHT - widest - 8) if rotate else 1.12  # room for counts
    bar = bar_base.mark_bar().encode(
        y=alt.Y("n_params:Q", title="parameters in pattern", scale=alt.Scale(domain=[0, top * headroom], nice=False),
                axis=alt.Axis(labelExpr=SI_LABEL, tickCount=5)),
        color=alt.Color("fill:N", scale=None),
        tooltip=[alt.Tooltip("name:N", title="pattern"), alt.Tooltip("n_params:Q", title="parameters", format=",")])
    count = bar_base.mark_text(baseline="middle" if rotate else "bottom", fontSize=9, angle=270 if rotate else 0,
                               align="left" if rotate else "center", dx=0, dy=-3).encode(
        y=alt.Y("n_params:Q"), text=alt.Text("n_params:Q", format="," if rotate or widest < step else ".3~s"))
    top_chart = alt.layer(bar, count).properties(width=alt.Step(step), height=BAR_HEIGHT)
    y = alt.Y("label:N", title=None, sort=[labels[x] for x in langs], axis=alt.Axis(ticks=False, domain=False))
    dot_base = alt.Chart(alt.Data(values=dots)).encode(x=x, y=y)
    link = dot_base.transform_filter("datum.member").mark_line(color=colors.NEUTRAL, strokeWidth=2).encode(
        detail="pattern:N")
    dot = dot_base.mark_circle(size=110, opacity=1).encode(
        color=alt.Color("fill:N", scale=None),
        tooltip=[alt.Tooltip("name:N", title="pattern"), alt.Tooltip("lang:N", title="language"),
                 alt.Tooltip("member:N", title="in pattern")])
    matrix = alt.layer(link, dot).properties(width=alt.Step(step), height=alt.Step(22))
    block = alt.vconcat(top_chart, matrix, spacing=4).resolve_scale(x="shared")
    if len(scope.models) > 1:
        block = block.properties(title=alt.TitleParams(model, fontSize=12, anchor="middle"))
    return block


# --- interventions (`mlarch eval`) ----------------------------------------------------------
LINES_WIDTH, LINES_HEIGHT = 360, 260
TASK_LABELS = {"nll": "NLL (nats per token)", "accuracy": "accuracy"}
TASK_NAMES = {"nll": "NLL", "accuracy": "accuracy"}
BASELINE_SERIES = "baseline (no intervention)"
NULL_SERIES = "random set of the same size"
DASHES = {"own": [1, 0], "null": [6, 4], "baseline": [2, 3]}
VERBS = {"prune": "Pruning", "scale": "Scaling", "fraction": "Partly pruning", "random": "Pruning random"}


def null_row(lang: str) -> str:
    """Heatmap row label of the random null of `lang`'s set."""
    return f"{data.NULL}:{lang}"


def _what(scope: data.EvalScope) -> str:
    """The intervention in words, e.g. 'pruned' or 'scaled ×0.5'."""
    if scope.intervention == "scale":
        return f"scaled ×{data.exact(scope.factor)}" if scope.factor is not None else "scaled"
    if scope.intervention == "fraction":
        return f"{data.exact(scope.factor)} of it pruned" if scope.factor is not None else "partly pruned"
    if scope.intervention == data.NULL:
        return "a random set of its size pruned"
    return "pruned"


def _intervention_label(scope: data.EvalScope) -> str:
    return scope.intervention if scope.factor is None else f"{scope.intervention} {data.exact(scope.factor)}"


def _eval_where(scope: data.EvalScope, *, k: bool = True) -> str:
    parts = [scope.models[0] if len(scope.models) == 1 else f"{len(scope.models)} models",
             f"{TASK_NAMES[scope.task]} on {data.shown_path(scope.dataset)} ({scope.role} texts)",
             f"{_intervention_label(scope)}" + (f" at k = {fmt_k(scope.k)}" if k else ""),
             f"seed {scope.seed}"]
    return " · ".join(parts)


def own_series(scope: data.EvalScope) -> str:
    """The legend label of the line with each language's own math-only set changed."""
    return f"own math-only set {_what(scope)}"


def interventions(archive, scope: data.EvalScope):
    """Left: relative change vs baseline per (changed set, evaluated language) at one k, with
    the random null rows; right: each language's value vs k with its own set changed."""
    alt = _alt()
    heat = _intervention_heatmap(alt, archive, scope)
    lines = _intervention_lines(alt, archive, scope)
    chart = alt.hconcat(heat, lines, spacing=40).resolve_scale(color="independent", shape="independent",
                                                              strokeDash="independent")
    task = TASK_NAMES[scope.task]
    notes = [f"Left: relative change of {task} vs the same model without intervention, "
             f"(value − baseline) / |baseline|; row: whose math-only set was {_what(scope)}, "
             "column: evaluated language."]
    if scope.null:
        notes.append(f"Rows {null_row('<lang>')}: a random set of the size of <lang>'s set pruned instead (the null).")
    notes.append(f"Right: {task} vs k with each language's own set {_what(scope)}"
                 + ("; dashed: the random null" if scope.null else "") + "; dotted: the baseline.")
    return chart.properties(title=_title(f"{VERBS[scope.intervention]} math-only parameters: effect on {task} "
                                         "across languages", _eval_where(scope), *notes))


def _intervention_heatmap(alt, archive, scope: data.EvalScope):
    frame = data.intervention_cells(archive, scope)
    is_null = (pl.col("intervention") == data.NULL) & pl.lit(scope.intervention != data.NULL)
    cells = frame.with_columns(row=pl.when(is_null).then(pl.lit(data.NULL + ":") + pl.col("target_lang"))
                               .otherwise(pl.col("target_lang")))
    rows = list(scope.targets)
    if scope.null:
        present = set(cells.filter(pl.col("intervention") == data.NULL)["target_lang"].to_list())
        rows += [null_row(x) for x in data._canonical(present)]
    changes = [abs(v) for v in cells["relative_change"].to_list() if v is not None and math.isfinite(v)]
    top = max(changes + [1e-6])
    base = alt.Chart(cells).encode(
        x=alt.X("lang:O", title="evaluated language", sort=scope.langs,
                axis=alt.Axis(labelAngle=0, ticks=False, domain=False, orient="top")),
        y=alt.Y("row:O", title="changed set (target language)", sort=rows, axis=alt.Axis(ticks=False, domain=False)))
    # red = worse in both tasks: NLL rises, accuracy falls
    scale = alt.Scale(scheme="redblue", domain=[-top, top], domainMid=0, reverse=scope.task == "nll")
    rect = base.mark_rect(stroke="white", strokeWidth=1).encode(
        color=alt.Color("relative_change:Q", title="relative change", scale=scale,
                        legend=alt.Legend(format="+.0%", gradientLength=max(80, 24 * len(rows)))),
        tooltip=[alt.Tooltip("model:N"), alt.Tooltip("row:N", title="changed set"),
                 alt.Tooltip("lang:N", title="evaluated language"),
                 alt.Tooltip("baseline:Q", format=".4f"), alt.Tooltip("value:Q", format=".4f"),
                 alt.Tooltip("delta:Q", format="+.4f"), alt.Tooltip("relative_change:Q", title="relative change",
                                                                    format="+.2%"),
                 alt.Tooltip("n_params_changed:Q", title="parameters changed", format=","),
                 alt.Tooltip("n_items:Q", title="items", format=",")])
    text = base.transform_filter("isValid(datum.relative_change)").mark_text(fontSize=10).encode(
        text=alt.Text("relative_change:Q", format="+.1%"),
        color=alt.condition(f"abs(datum.relative_change) > {0.6 * top}", alt.value("white"), alt.value("black")))
    chart = alt.layer(rect, text).properties(width=alt.Step(56), height=alt.Step(24))
    if len(scope.models) > 1:
        chart = chart.facet(row=alt.Row("model:N", title=None, sort=scope.models,
                                        header=alt.Header(labelFontSize=12, labelFontWeight="bold",
                                                          labelAngle=0, labelAlign="left")))
    return chart.properties(title=alt.TitleParams(
        f"Relative change of {TASK_NAMES[scope.task]} at k = {fmt_k(scope.k)}", fontSize=12, anchor="start"))


def _intervention_lines(alt, archive, scope: data.EvalScope):
    frame = data.intervention_lines(archive, scope)
    own = own_series(scope)
    series = pl.when(pl.col("intervention") == data.NULL).then(pl.lit(NULL_SERIES)).otherwise(pl.lit(own))
    if scope.intervention == data.NULL:  # random chosen as the kind: its rows are the own series
        series = pl.lit(own)
    points = frame.with_columns(series=series)
    baselines = (frame.sort("finished_at").group_by("model", "lang", maintain_order=True)
                 .agg(pl.col("baseline").last().alias("value"))  # of the newest point, if they differ
                 .with_columns(series=pl.lit(BASELINE_SERIES), intervention=pl.lit("none"))
                 .select("model", "lang", "series", "intervention", "value"))
    domain = [own] + ([NULL_SERIES] if scope.null else []) + [BASELINE_SERIES]
    dashes = {own: DASHES["own"], NULL_SERIES: DASHES["null"], BASELINE_SERIES: DASHES["baseline"]}
    dash = alt.StrokeDash("series:N", title="line", scale=alt.Scale(domain=domain, range=[dashes[d] for d in domain]),
                          legend=alt.Legend(symbolStrokeWidth=2, symbolType="stroke", symbolSize=500,
                                            labelLimit=260))
    color, shape = _lang_encodings(scope.langs)
    ks = scope.ks
    x = alt.X("k:Q", title="top-k fraction k (log scale)", scale=alt.Scale(type="log", nice=False, padding=12),
              axis=alt.Axis(values=ks, format="~g", labelAngle=-45, labelOverlap=False, grid=False))
    accuracy = scope.task == "accuracy"
    y = alt.Y("value:Q", title=TASK_LABELS[scope.task], scale=alt.Scale(zero=False, padding=12),
              axis=alt.Axis(format=".0%" if accuracy else "~g"))
    tooltip = [alt.Tooltip("model:N"), alt.Tooltip("lang:N", title="language"), alt.Tooltip("series:N", title="line"),
               alt.Tooltip("k:Q", format="~g"), alt.Tooltip("value:Q", format=".4f"),
               alt.Tooltip("baseline:Q", format=".4f"),
               alt.Tooltip("relative_change:Q", title="relative change", format="+.2%"),
               alt.Tooltip("n_params_changed:Q", title="parameters changed", format=",")]
    # one data set for all layers (facets need it): the points, then one baseline row per language
    frame = pl.concat([points.select("model", "lang", "series", "intervention", "k", "value", "baseline",
                                     "relative_change", "n_params_changed"), baselines], how="diagonal_relaxed")
    base = alt.Chart(frame).encode(x=x, y=y, color=color)
    curves = base.transform_filter(alt.FieldOneOfPredicate(field="series", oneOf=[own, NULL_SERIES]))
    line = curves.mark_line(strokeWidth=2).encode(strokeDash=dash, detail="series:N")
    dots = curves.mark_point(filled=True, size=50, opacity=1).encode(shape=shape, tooltip=tooltip)
    rule = alt.Chart(frame).transform_filter(alt.FieldEqualPredicate(field="series", equal=BASELINE_SERIES)) \
        .mark_rule(strokeWidth=1.5, opacity=0.9).encode(
            y=alt.Y("value:Q"), color=color, strokeDash=dash,
            tooltip=[alt.Tooltip("model:N"), alt.Tooltip("lang:N", title="language"),
                     alt.Tooltip("value:Q", title="baseline", format=".4f")])
    chart = alt.layer(rule, line, dots).properties(width=LINES_WIDTH, height=LINES_HEIGHT)
    if len(scope.models) > 1:
        chart = chart.facet(row=alt.Row("model:N", title=None, sort=scope.models,
                                        header=alt.Header(labelFontSize=12, labelFontWeight="bold",
                                                          labelAngle=0, labelAlign="left")))
    return chart.properties(title=alt.TitleParams(
        f"{TASK_LABELS[scope.task][0].upper()}{TASK_LABELS[scope.task][1:]} vs k, each language's own set "
        f"{_what(scope)}", fontSize=12, anchor="start"))


# --- two analyses of one model (`mlarch compare --analyses`; exact vs --paper-compat) --------------
# k lines: viridis from green (small k) to dark purple (large k); its yellow end vanishes on white
K_RAMP = ["#6CCE59", "#35B779", "#1F9E89", "#26828E", "#31688E", "#3E4A89", "#482878", "#440154"]


def _k_encodings(ks):
    """One colour (a sequential ramp: small k light, large k dark) and marker per k value."""
    alt = _alt()
    labels = [fmt_k(k) for k in ks]
    legend = alt.Legend(title="top-k fraction k", symbolStrokeWidth=2)
    ramp = [K_RAMP[round(i * (len(K_RAMP) - 1) / max(1, len(ks) - 1))] for i in range(len(ks))]
    return (alt.Color("k_label:N", sort=labels, scale=alt.Scale(domain=labels, range=ramp), legend=legend),
            alt.Shape("k_label:N", sort=labels, scale=alt.Scale(domain=labels, range=[colors.SHAPES[i % len(colors.SHAPES)]
                                                                                     for i in range(len(ks))]),
                      legend=legend))


def _jaccard_y():
    alt = _alt()
    return alt.Y("jaccard:Q", title="Jaccard index, analysis A vs B", scale=alt.Scale(zero=False, padding=10),
                 axis=alt.Axis(format=".2f"))


def analyses(archive, plan, by: str = "global", x: str = "layer"):
    """Jaccard of one model's math-only sets in two analyses (plan: query.analysis_overlap.Plan):
    by='global', Jaccard vs k (log axis), one line per language; by='layer', Jaccard per layer
    (x: 'layer' or 'depth'), one line per k, one panel per language."""
    alt = _alt()
    a, b = plan.analyses
    where = f"{plan.model} · A = {a}, B = {b} · seed {plan.seed}"
    what = "Math-only set: top-k on math text and not top-k on control text, same matrix and k; 1 = identical sets."
    tooltip = [alt.Tooltip("lang:N", title="language"), alt.Tooltip("k:Q", format="~g"),
               alt.Tooltip("jaccard:Q", format=".4f"), alt.Tooltip("n_a:Q", title="in A", format=","),
               alt.Tooltip("n_b:Q", title="in B", format=","),
               alt.Tooltip("n_intersection:Q", title="in both", format=","),
               alt.Tooltip("n_union:Q", title="in either", format=",")]
    if by == "global":
        frame = data.analysis_pair_overlap(archive, plan, "global")
        color, shape = _lang_encodings(plan.langs)
        x_axis = alt.X("k:Q", title="top-k fraction k (log scale)", scale=alt.Scale(type="log", nice=False, padding=12),
                       axis=alt.Axis(values=plan.ks, format="~g", labelAngle=-45, labelOverlap=False, grid=False))
        chart = _lines(frame, x_axis, _jaccard_y(), tooltip, color, shape)
        return chart.properties(title=_title("Math-only sets in two analyses: Jaccard vs top-k", where,
                                             "All scored matrices pooled, one line per language. " + what))
    frame = data.analysis_pair_overlap(archive, plan, "layer")
    outside = frame.filter(pl.col("layer").is_null()).height > 0
    frame = frame.filter(pl.col("layer").is_not_null()).with_columns(
        k_label=pl.col("k").map_elements(fmt_k, return_dtype=pl.String))
    color, shape = _k_encodings(plan.ks)
    tooltip = [alt.Tooltip("layer:Q"), alt.Tooltip("depth:Q", format=".3f")] + tooltip
    base = alt.Chart(frame).encode(x=_x_axis(frame, x), y=_jaccard_y(), color=color)
    line = base.mark_line(strokeWidth=2).encode(detail="k_label:N")
    points = base.mark_point(filled=True, size=45, opacity=1).encode(shape=shape, tooltip=tooltip)
    chart = alt.layer(line, points).properties(width=WIDTH, height=HEIGHT)
    if len(plan.langs) > 1:
        chart = chart.facet(facet=alt.Facet("lang:N", title=None, sort=plan.langs,
                                            header=alt.Header(labelFontSize=12, labelFontWeight="bold")),
                            columns=min(FACET_COLUMNS, len(plan.langs)))
    langs = f"language {plan.langs[0]}" if len(plan.langs) == 1 else "one panel per language"
    return chart.properties(title=_title(
        "Math-only sets in two analyses: Jaccard per layer", where,
        f"One line per k, {langs}. " + what,
        "Not shown: modules outside transformer blocks (e.g. an untied head); the Jaccard vs k (by global) "
        "includes them." if outside else ""))
