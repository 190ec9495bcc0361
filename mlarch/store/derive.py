"""Derived tables of one (model, seed): math-only set sizes and membership patterns.

Both are recomputed from the stored level codes whenever a run of that model and seed
is committed, so adding a language later extends every comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mlarch.ingest.selection import in_top, math_only
from mlarch.query.patterns import histogram
from mlarch.store import arrays


@dataclass(frozen=True)
class RunRef:
    run_id: str
    lang: str
    role: str
    arrays_group: str
    k_values: tuple[float, ...]


def levels_path(arrays_group: str, module: str) -> str:
    return f"{arrays_group}/levels/{module}"


def norms_path(arrays_group: str, module: str) -> str:
    return f"{arrays_group}/norms/{module}"


def derive(root: Path, model: str, seed: int, modules: list[str], runs: dict[tuple[str, str], RunRef]):
    """(selections, patterns) DataFrames for the languages that have both a math and a control run."""
    pairs = {
        lang: (runs[(lang, "math")], runs[(lang, "control")])
        for lang in sorted({lang for lang, _ in runs})
        if (lang, "math") in runs and (lang, "control") in runs
    }
    ks = sorted({k for m, c in pairs.values() for k in set(m.k_values) & set(c.k_values)})
    selection_rows, pattern_rows = [], []
    for module in modules:
        levels = {
            lang: (arrays.read(root, levels_path(m.arrays_group, module)),
                   arrays.read(root, levels_path(c.arrays_group, module)))
            for lang, (m, c) in pairs.items()
        }
        for k in ks:
            langs, masks = [], []
            for lang, (m, c) in pairs.items():
                if k not in m.k_values or k not in c.k_values:
                    continue
                math_levels, control_levels = levels[lang]
                jm, jc = m.k_values.index(k), c.k_values.index(k)
                if jm == jc:
                    mask = math_only(math_levels, control_levels, jm)
                else:
                    mask = in_top(math_levels, jm) & ~in_top(control_levels, jc)
                n_math, n_control = int(in_top(math_levels, jm).sum()), int(in_top(control_levels, jc).sum())
                selection_rows.append(
                    (model, k, seed, lang, module, n_math, n_control, int(mask.sum()), m.run_id, c.run_id)
                )
                langs.append(lang)
                masks.append(mask)
            for pattern, count in histogram(masks, langs):
                pattern_rows.append((model, k, seed, module, pattern, count))
    selections = pl.DataFrame(
        selection_rows,
        schema={
            "model": pl.Utf8, "k": pl.Float64, "seed": pl.Int64, "lang": pl.Utf8, "module": pl.Utf8,
            "n_math_top": pl.Int64, "n_control_top": pl.Int64, "n_selected": pl.Int64,
            "math_run_id": pl.Utf8, "control_run_id": pl.Utf8,
        },
        orient="row",
    )
    patterns = pl.DataFrame(
        pattern_rows,
        schema={
            "model": pl.Utf8, "k": pl.Float64, "seed": pl.Int64, "module": pl.Utf8,
            "langs": pl.List(pl.Utf8), "n_params": pl.Int64,
        },
        orient="row",
    )
    return selections, patterns


