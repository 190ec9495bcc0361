"""Paper-ready charts from an archive's SQL aggregates (Altair + vl-convert, offline).

    chart = mlarch.charts.overlap(archive, model="gemma", langs=["en", "de", "hi"])
    mlarch.charts.save(chart, "overlap.pdf")   # .svg .png .pdf .html (self-contained) .json
    effects = mlarch.charts.interventions(archive, "gemma", task="nll", intervention="prune")
    same = archive.chart("overlap", model="gemma", langs="en,de,hi")   # options checked by name

Importing this module is light: altair and vl_convert load when a chart is built or saved.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from mlarch.errors import MlarchError, UsageError
from mlarch.charts.extras import require  # noqa: F401 - mlarch.charts.require, as before

KINDS = ("sizes", "overlap", "heatmap", "layers", "upset", "unique", "interventions", "analyses")
X_AXES = ("layer", "depth")  # layers and overlap: block index or relative depth
EVAL_OPTIONS = ("task", "intervention", "dataset")  # interventions only
BY = ("global", "layer")
FORMATS = ("svg", "png", "pdf", "html", "json")
PNG_SCALE = 2  # PNG pixels per chart px (≈ 200 dpi at the chart's nominal size)
FONT = "Liberation Sans, Arial, Helvetica, sans-serif"  # bundled with vl-convert: same look everywhere


def check_kind(kind: str) -> str:
    """`kind` if it is one of KINDS, else a UsageError listing them."""
    if kind not in KINDS:
        raise UsageError(f"unknown chart kind {kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def check_format(path) -> str:
    """The output format from the file's suffix; UsageError for anything else."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        got = f"suffix .{suffix}" if suffix else "no suffix"
        raise UsageError(f"cannot tell the chart format of {str(path)!r} ({got}): "
                         f"end the file name in .{', .'.join(FORMATS)}")
    return suffix


def build(archive, kind: str, model: str | None = None, langs=None, k=None, seed: int | None = None,
          by: str = "global", *, task: str | None = None, intervention: str | None = None,
          dataset: str | None = None, x: str | None = None, **scope_options):
    """An Altair chart of `kind` for the models matching `model` (the per-kind functions
    sizes(), overlap(), heatmap(), layers(), upset(), unique(), interventions(), analyses() document
    each; analyses compares two analyses of one model and takes analysis='A,B').

    x (layers, overlap, and heatmap with by='layer'): 'layer' (block index) or 'depth'
    (layer / (blocks - 1), so models of different depth align); default depth when several
    models match, else layer.

    langs: codes (list or "en,de"), default all archived; k: one value (a list for the
    k-axis charts `sizes` and `heatmap --by global`), default as in `mlarch compare`
    (0.01 if archived; every archived k on a k axis); seed: default the smallest archived.

    `interventions` (evaluations of `mlarch eval`) also takes task ('nll' | 'accuracy',
    default nll if evaluated), intervention ('prune' by default; 'scale', 'fraction',
    'random'; a factor as in 'scale=0.5') and dataset (the evaluated data set, 'name' or
    'name:role'; default the only one); langs are the evaluated languages, k the heatmap's
    (default 0.01 if evaluated, else the smallest), seed the smallest evaluated.

    scope_options: further keyword options of charts.data.resolve (or resolve_evaluations
    for interventions), passed through; any other name is an error (see options_of).
    """
    from mlarch.charts import data, kinds

    check_kind(kind)
    _check_scope_options(kind, scope_options)
    if by not in BY:
        raise UsageError(f"by (--by) must be one of {', '.join(BY)}, got {by!r}")
    if x is not None and kind not in ("layers", "overlap") and not (kind in ("heatmap", "analyses") and by == "layer"):
        raise UsageError(f"x (--x) applies to the layers and overlap charts and to heatmap and analyses with by='layer' "
                         f"(--by layer) only, not to {kind}{' by k' if kind in ('heatmap', 'analyses') else ''}: "
                         "leave it out")
    if x is not None and x not in X_AXES:
        raise UsageError(f"x (--x) must be one of {', '.join(X_AXES)}, got {x!r}")
    given = [name for name, value in zip(EVAL_OPTIONS, (task, intervention, dataset)) if value is not None]
    if kind == "interventions":
        if by != "global":
            raise UsageError("by='layer' (--by layer) does not apply to interventions: leave it out")
        archive = _open(archive)
        scope = data.resolve_evaluations(archive, model, langs, k, seed, task=task, intervention=intervention,
                                         dataset=dataset, **scope_options)
        return style(kinds.interventions(archive, scope))
    if given:
        options = ", ".join(f"{name} (--{name})" for name in given)
        raise UsageError(f"{options} appl{'ies' if len(given) == 1 else 'y'} only to the interventions chart, "
                         f"not to {kind}: leave {'it' if len(given) == 1 else 'them'} out")
    if by == "layer" and kind in ("sizes", "upset", "unique"):
        raise UsageError(f"by='layer' (--by layer) does not apply to {kind}: use it with heatmap "
                         "(overlap and layers are per layer already)")
    archive = _open(archive)
    if kind == "analyses":  # two analyses of one model: its own resolver (query.analysis_overlap)
        pair = data.resolve_analysis_pair(archive, model, langs, k, seed, **scope_options)
        return style(kinds.analyses(archive, pair, by=by, x=x or "layer"))
    multi_k = kind == "sizes" or (kind == "heatmap" and by == "global")
    min_langs = {"overlap": 2, "heatmap": 2, "upset": 3}.get(kind, 1)
    scope = data.resolve(archive, model, langs, k, seed, multi_k=multi_k, min_langs=min_langs, kind=kind,
                         **scope_options)
    if kind == "heatmap":
        chart = kinds.heatmap(archive, scope, by=by,
                              x=x or ("depth" if by == "layer" and len(scope.models) > 1 else "layer"))
    elif kind in ("layers", "overlap"):
        chart = getattr(kinds, kind)(archive, scope, x=x or ("depth" if len(scope.models) > 1 else "layer"))
    else:
        chart = getattr(kinds, kind)(archive, scope)
    return style(chart)


# --- one function per kind: real signatures and docstrings for Python callers ----------
# Each also takes the keyword options of charts.data.resolve beyond these (for example an
# analysis name, where the archive has several): `options_of(kind)` lists them all.

def sizes(archive, model: str, langs=None, k=None, seed: int | None = None, **scope_options):
    """Math-specific parameter count vs top-k (log-log), one line per language.

    archive: an Archive or its path; model: substring of archived model names (several
    matches: one panel each); langs: list or "en,de" (default all archived); k: the k values
    on the axis (default every archived k); seed: default the smallest archived."""
    return build(archive, "sizes", model, langs, k, seed, **scope_options)


def overlap(archive, model: str, langs=None, k: float | None = None, seed: int | None = None,
            x: str | None = None, **scope_options):
    """Jaccard of the math-only sets per layer, one line per language pair, chance dashed.

    langs: 2 or more (default all archived); k: one value (default 0.01 when archived);
    model: a substring or a comma list ("gemma,qwen"), one panel per model; x: 'layer' or
    'depth' (layer / (blocks - 1); the default when several models match)."""
    return build(archive, "overlap", model, langs, k, seed, x=x, **scope_options)


def heatmap(archive, model: str, langs=None, k=None, seed: int | None = None, by: str = "global",
            x: str | None = None, **scope_options):
    """Jaccard per language pair and k (by='global'; k: a list, default every archived k)
    or per pair and layer (by='layer'; k: one value, default 0.01 when archived; x: 'layer'
    columns, or 'depth', cells placed at layer / (blocks - 1), the default when several
    models match)."""
    return build(archive, "heatmap", model, langs, k, seed, by, x=x, **scope_options)


def layers(archive, model: str, langs=None, k: float | None = None, seed: int | None = None,
           x: str | None = None, **scope_options):
    """Math-specific parameter count per layer, one line per language (k: one value);
    model: a substring or a comma list, one panel per model; x: 'layer' or 'depth'
    (layer / (blocks - 1); the default when several models match)."""
    return build(archive, "layers", model, langs, k, seed, x=x, **scope_options)


def unique(archive, model: str, langs=None, k: float | None = None, seed: int | None = None, **scope_options):
    """Language-unique share per model and language (view language_unique_share): parameters
    selected for the language and no other archived one, over its math-only set, whole model.
    model: a substring or a comma list ("gemma,qwen"): bars grouped by model; k: one value."""
    return build(archive, "unique", model, langs, k, seed, **scope_options)


def upset(archive, model: str, langs=None, k: float | None = None, seed: int | None = None, **scope_options):
    """Sizes of every intersection pattern of 3 or more languages (UpSet plot)."""
    return build(archive, "upset", model, langs, k, seed, **scope_options)


def interventions(archive, model: str, langs=None, k: float | None = None, seed: int | None = None, *,
                  task: str | None = None, intervention: str | None = None, dataset: str | None = None,
                  **scope_options):
    """Evaluations of `mlarch eval`: relative change of NLL or accuracy per changed set and
    evaluated language (heatmap at k), and the value vs k with each language's own set changed.

    task: 'nll' or 'accuracy' (default nll when evaluated); intervention: 'prune' (default),
    'scale', 'fraction', 'random', with a factor as in 'scale=0.5'; dataset: 'name' or
    'name:role' (default the only one); langs: the evaluated languages."""
    return build(archive, "interventions", model, langs, k, seed, task=task, intervention=intervention,
                 dataset=dataset, **scope_options)


def analyses(archive, model: str, langs=None, k=None, seed: int | None = None, by: str = "global",
             x: str | None = None, **scope_options):
    """Jaccard of one model's math-only sets in two of its analyses (e.g. exact vs
    --paper-compat): by='global', Jaccard vs k, one line per language; by='layer', Jaccard per
    layer (x: 'layer' or 'depth'), one line per k, one panel per language.

    analysis: the two, 'A,B' or [A, B] (default: the model's exact analysis X and the
    paper-compatible X-paper beside it); langs: default every language both have; k: a
    list, default every k both have sets at (a mathneuro-bf16 analysis: its archived k)."""
    return build(archive, "analyses", model, langs, k, seed, by, x=x, **scope_options)


_BUILDERS = {"sizes": sizes, "overlap": overlap, "heatmap": heatmap, "layers": layers, "upset": upset,
             "unique": unique, "interventions": interventions, "analyses": analyses}
_NOT_OPTIONS = {"archive", "model", "langs", "k", "seed", "multi_k", "min_langs", "kind"}  # resolve's own


class ChartOptionError(UsageError, TypeError):
    """An option the chart kind does not take (a TypeError too, as for any bad keyword)."""


def _scope_option_names(kind: str) -> list[str]:
    """Keyword options of charts.data's resolver for `kind` beyond those every chart names."""
    import inspect

    from mlarch.charts import data

    resolver = {"interventions": data.resolve_evaluations,
                "analyses": data.resolve_analysis_pair}.get(kind, data.resolve)
    named = {"task", "intervention", "dataset"}  # interventions() names these itself
    return [p.name for p in inspect.signature(resolver).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _NOT_OPTIONS | named]


def options_of(kind: str) -> list[str]:
    """The option names chart `kind` takes (after the archive), from the signatures of its
    function here and of charts.data's resolver."""
    import inspect

    check_kind(kind)
    own = [p.name for p in inspect.signature(_BUILDERS[kind]).parameters.values()
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "archive"]
    return own + [name for name in _scope_option_names(kind) if name not in own]


def _unknown_option(kind: str, name: str, accepted: list[str]) -> ChartOptionError:
    import difflib

    elsewhere = [other for other in KINDS if other != kind and name in options_of(other)]
    if elsewhere:
        kinds_text = " and ".join(elsewhere) if len(elsewhere) < 3 else ", ".join(elsewhere[:-1]) + " and " + elsewhere[-1]
        hint = f"{name!r} applies to the {kinds_text} chart{'s' if len(elsewhere) > 1 else ''} only"
    else:
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "no such option"
    return ChartOptionError(f"chart {kind!r} takes no option {name!r} ({hint}): it takes {', '.join(accepted)}")


def _check_scope_options(kind: str, options) -> None:
    accepted = _scope_option_names(kind)
    for name in options:
        if name not in accepted:
            raise _unknown_option(kind, name, options_of(kind))


def chart(archive, kind: str, **options):
    """The chart of `kind` (one of KINDS) with `options` checked against options_of(kind):
    a misspelt name is a ChartOptionError (a UsageError and a TypeError) that lists the
    accepted ones. `Archive.chart` calls this."""
    check_kind(kind)
    accepted = options_of(kind)
    for name in options:
        if name not in accepted:
            raise _unknown_option(kind, name, accepted)
    if "model" not in options:
        raise ChartOptionError(f"chart {kind!r} needs model=: a substring of archived model names, e.g. "
                               f"model='gemma' (it takes {', '.join(accepted)})")
    return _BUILDERS[kind](archive, **options)


def _open(archive):
    from mlarch.query.api import Archive
    from mlarch.store import layout

    if isinstance(archive, Archive):
        return archive
    from mlarch.store.remote_catalog import resolve

    root = resolve(archive)  # a folder, or a published s3:// archive fetched into the cache
    if not (root / layout.CATALOG).exists():
        from mlarch.store.catalog import missing_archive

        raise missing_archive(root)
    return Archive(root)


def style(chart):
    """The shared look: readable fonts, white background, no view border on heatmaps."""
    return (chart.configure(font=FONT, background="white", padding=12)
            .configure_title(fontSize=15, subtitleFontSize=11, subtitleColor="#444444", subtitlePadding=4)
            .configure_axis(labelFontSize=11, titleFontSize=12, titleFontWeight="normal", labelColor="#222222",
                            gridColor="#E6E6E6")
            .configure_legend(labelFontSize=11, titleFontSize=12, titleFontWeight="normal")
            .configure_header(labelFontSize=12, titleFontSize=12)
            .configure_view(stroke="#BBBBBB"))


def render(chart, fmt: str) -> bytes:
    """The chart in one format (svg, png, pdf, html, json) as bytes, rendered offline."""
    if fmt == "json":
        return (chart.to_json(indent=2) + "\n").encode()
    vlc = require("vl_convert")
    if fmt == "html":
        # vega, vega-lite and vega-embed embedded; the spec as script-safe JSON (names come from catalogs)
        return chart.to_html(inline=True, json_kwds={"cls": _ScriptSafeJSON}).encode()
    from altair.utils._importers import vl_version_for_vl_convert

    spec, version = chart.to_dict(), vl_version_for_vl_convert()
    if fmt == "svg":
        return vlc.vegalite_to_svg(spec, vl_version=version).encode()
    if fmt == "png":
        return vlc.vegalite_to_png(spec, vl_version=version, scale=PNG_SCALE)
    if fmt == "pdf":
        return vlc.vegalite_to_pdf(spec, vl_version=version)
    raise UsageError(f"unknown chart format {fmt!r}: choose one of {', '.join(FORMATS)}")


# JSON text holds these only inside strings, where a \u escape means the same character:
# the spec parses as before, but no name can end the page's <script> ("</script>") or a line
# of JavaScript (U+2028/9 in older engines)
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                              "\u2028": "\\u2028", "\u2029": "\\u2029"})


class _ScriptSafeJSON(json.JSONEncoder):
    """json.dumps(..., cls=_ScriptSafeJSON): JSON safe to put inside an HTML <script> element."""

    def encode(self, o) -> str:
        return super().encode(o).translate(_SCRIPT_SAFE)


def write_atomic(path, payload: bytes) -> Path:
    """Write via a temporary file in the same folder, then rename: never a partial file."""
    path = Path(path)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise MlarchError(f"cannot write {path}: {blocker} is a file, not a folder; choose another -o path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory")
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp
    except OSError as exc:
        raise MlarchError(f"cannot write {path} ({exc.strerror or exc}): choose a writable -o path") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MlarchError(f"cannot write {path} ({exc.strerror or exc}): choose a writable -o path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(chart, path) -> Path:
    """Render `chart` in the format of `path`'s suffix and write it atomically."""
    return write_atomic(path, render(chart, check_format(path)))


__all__ = ["BY", "FORMATS", "KINDS", "ChartOptionError", "analyses", "build", "chart", "heatmap", "interventions", "layers",
           "options_of", "overlap", "render", "save", "sizes", "style", "unique", "upset"]
