"""Derived tables of one (model, analysis, seed): math-only set sizes and membership patterns.

Both are recomputed from the stored level codes whenever a run of that model, analysis and
seed is committed, so adding a language later extends every comparison; the rows of other
analyses are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mlarch import parallel
from mlarch.errors import MlarchError
from mlarch.selection import top_count
from mlarch.query.patterns import histogram
from mlarch.store import arrays, layout
from mlarch.store.arrays import ArrayRecord
from mlarch.store.catalog import dicts
from mlarch.store.spans import Span, groups


GROUP_BUDGET = 1 << 24  # parameters per read: whole chunks, bounded memory


@dataclass(frozen=True)
class RunRef:
    run_id: str
    lang: str
    role: str
    arrays_group: str
    k_values: tuple[float, ...]
    levels: ArrayRecord | None = None  # the catalog's record of its level codes (None: not yet committed)


def levels_path(arrays_group: str) -> str:
    return layout.array_path(arrays_group, "levels")


def norms_path(arrays_group: str) -> str:
    return layout.array_path(arrays_group, "norms")


def magnitudes_path(model_group: str) -> str:
    return layout.array_path(model_group, "magnitudes")


def _selected_bits(math_levels: np.ndarray, control_levels: np.ndarray, jm: list[int], jc: list[int]) -> np.ndarray:
    """uint8 per parameter with bit t set when it is math-only at the t-th shared k.

    In-place uint8 arithmetic, no index arrays: level - 1 wraps 0 ("never") to 255, so
    `level - 1 <= j` means "in the top-ks[j] set"."""
    if jm == jc and jm == list(range(jm[0], jm[0] + len(jm))):
        return _selected_range(math_levels, control_levels, jm[0], len(jm))
    math1 = math_levels - np.uint8(1)
    control1 = control_levels - np.uint8(1)
    out = np.zeros_like(math_levels)
    for t, (a, b) in enumerate(zip(jm, jc)):
        bit = np.less_equal(math1, np.uint8(a))
        bit &= np.greater(control1, np.uint8(b))
        bits = bit.view(np.uint8)
        if t:
            bits <<= np.uint8(t)
        out |= bits
    return out


def _selected_range(math_levels: np.ndarray, control_levels: np.ndarray, first: int, width: int) -> np.ndarray:
    """_selected_bits when both runs share the k indices first .. first + width - 1 (the usual
    case): the sets nest, so a parameter is math-only exactly from its math level to just
    before its control level, a run of bits (1 << c) - (1 << m) built in 9 passes, not 4 per k."""
    start = math_levels - np.uint8(1)  # t from which it is in the math set (255: never)
    np.maximum(start, np.uint8(first), out=start)
    start -= np.uint8(first)
    stop = control_levels - np.uint8(1)  # t from which it is in the control set
    np.maximum(stop, np.uint8(first), out=stop)
    stop -= np.uint8(first)
    np.minimum(stop, np.uint8(8), out=stop)
    bits = np.left_shift(np.uint8(1), stop)  # shifts by >= 8 give 0, and 0 - 1 = 255: all bits
    bits -= np.uint8(1)
    below = np.left_shift(np.uint8(1), start)
    below -= np.uint8(1)
    np.invert(below, out=below)
    bits &= below
    bits &= np.uint8((1 << width) - 1)
    return bits


def _in_top_counts(levels: np.ndarray, js: list[int]) -> list[int]:
    """How many entries the stored codes put in the top-k_values[j] set, for each j."""
    shifted = levels - np.uint8(1)  # 0 ("in no set") wraps to 255
    return [int(np.count_nonzero(shifted <= np.uint8(j))) for j in js]


def _module_rows(model, analysis, seed, module, chunk_ks, pairs, levels, selection_rows, pattern_rows,
                 count_tops: bool = False) -> None:
    bits, langs_of = {}, {}
    for lang, (m, c) in pairs.items():
        shared = [k for k in chunk_ks if k in m.k_values and k in c.k_values]
        if not shared:
            continue
        math_levels, control_levels = levels[lang]
        jm = [m.k_values.index(k) for k in shared]
        jc = [c.k_values.index(k) for k in shared]
        lang_bits = _selected_bits(math_levels, control_levels, jm, jc)
        if count_tops:  # as stored (verify); otherwise as level_codes guarantees
            math_tops, control_tops = _in_top_counts(math_levels, jm), _in_top_counts(control_levels, jc)
        else:
            math_tops = control_tops = [top_count(math_levels.size, k) for k in shared]
        for t, k in enumerate(shared):
            langs_of.setdefault(k, []).append(lang)
            n_selected = int(np.count_nonzero(lang_bits & np.uint8(1 << t)))
            selection_rows.append((model, analysis, k, seed, lang, module, math_tops[t], control_tops[t], n_selected,
                                   m.run_id, c.run_id))
            if len(pairs) == 1 and n_selected:  # one language: its only pattern is itself
                pattern_rows.append((model, analysis, k, seed, module, [lang], n_selected))
        bits[lang] = (lang_bits, {k: t for t, k in enumerate(shared)})
    if len(pairs) == 1 or not bits:
        return
    support = np.zeros_like(next(iter(bits.values()))[0])
    for lang_bits, _ in bits.values():
        support |= lang_bits
    where = np.flatnonzero(support)  # only these parameters belong to any pattern
    compact = {lang: (lang_bits[where], index) for lang, (lang_bits, index) in bits.items()}
    for k, langs in langs_of.items():
        masks = [((compact[lang][0] >> compact[lang][1][k]) & 1).astype(bool) for lang in langs]
        for pattern, count in histogram(masks, langs):
            pattern_rows.append((model, analysis, k, seed, module, pattern, count))


def derive(root: Path, model: str, analysis: str, seed: int, spans: list[Span], runs: dict[tuple[str, str], RunRef],
           preloaded: dict[str, np.ndarray] | None = None, count_tops: bool = False):
    """(selections, patterns) DataFrames for the languages that have both a math and a control run.

    Per module: one uint8 of math-only bits per language (bit t: selected at the t-th k),
    then pattern histograms over the parameters that any language selected at any k.
    `preloaded` maps an arrays_group to its level codes already in memory (a run being
    committed), which are then not read back from zarr. Every other read is checked against
    the run's array record (arrays.read: an array recorded before chunk digests existed is
    checked whole first). count_tops counts n_math_top / n_control_top in the
    stored codes (what `verify` compares) instead of taking the count level_codes guarantees."""
    preloaded = preloaded or {}

    def read_levels(ref: RunRef, start: int, stop: int) -> np.ndarray:
        if ref.arrays_group in preloaded:
            return preloaded[ref.arrays_group][start:stop]
        return arrays.read(root, ref.levels, start, stop)

    pairs = {
        lang: (runs[(lang, "math")], runs[(lang, "control")])
        for lang in sorted({lang for lang, _ in runs})
        if (lang, "math") in runs and (lang, "control") in runs
    }
    ks = sorted({k for m, c in pairs.values() for k in set(m.k_values) & set(c.k_values)})
    for m, c in pairs.values():
        for ref in (m, c):
            if ref.arrays_group in preloaded:
                continue
            if ref.levels is None:
                raise MlarchError(f"run {ref.run_id} has no levels array recorded in the catalog: "
                                  "run `mlarch verify`, then remove the run with `mlarch rm` and re-ingest it")

    def rows_of(chunk_ks: list[float], group: list[Span]) -> tuple[list, list]:
        start, stop = group[0].param_offset, group[-1].param_offset + group[-1].n_params
        block = {lang: (read_levels(m, start, stop), read_levels(c, start, stop))
                 for lang, (m, c) in pairs.items()}
        selection_rows, pattern_rows = [], []
        for span in group:
            part = slice(span.param_offset - start, span.param_offset - start + span.n_params)
            levels = {lang: (math[part], control[part]) for lang, (math, control) in block.items()}
            _module_rows(model, analysis, seed, span.module, chunk_ks, pairs, levels, selection_rows, pattern_rows, count_tops)
        return selection_rows, pattern_rows

    # 8 k values per uint8 of bits; one read per run covers many small modules
    work = [(ks[first:first + 8], group) for first in range(0, len(ks), 8) for group in groups(spans, GROUP_BUDGET)]
    selection_rows, pattern_rows = [], []
    with parallel.pool() as pool:
        for selections, patterns in pool.map(lambda item: rows_of(*item), work):  # in order
            selection_rows.extend(selections)
            pattern_rows.extend(patterns)
    selections = pl.DataFrame(
        selection_rows,
        schema={
            "model": pl.Utf8, "analysis": pl.Utf8, "k": pl.Float64, "seed": pl.Int64, "lang": pl.Utf8,
            "module": pl.Utf8,
            "n_math_top": pl.Int64, "n_control_top": pl.Int64, "n_selected": pl.Int64,
            "math_run_id": pl.Utf8, "control_run_id": pl.Utf8,
        },
        orient="row",
    )
    patterns = pl.DataFrame(
        pattern_rows,
        schema={
            "model": pl.Utf8, "analysis": pl.Utf8, "k": pl.Float64, "seed": pl.Int64, "module": pl.Utf8,
            "langs": pl.List(pl.Utf8), "n_params": pl.Int64,
        },
        orient="row",
    )
    return selections, patterns


def current_runs(con, model: str, analysis: str, seed: int) -> dict[tuple[str, str], RunRef]:
    """The in-use finished run of each (lang, role) of one model, analysis and seed."""
    rows = con.execute(
        "SELECT run_id FROM runs WHERE model = ? AND analysis = ? AND seed = ? AND in_use AND status = 'FINISHED'",
        [model, analysis, seed]).fetchall()
    refs = (run_ref(con, r[0]) for r in rows)
    return {(ref.lang, ref.role): ref for ref in refs}


def run_ref(con, run_id: str) -> RunRef:
    """A finished run with the record of its levels array (None if the catalog lacks it)."""
    r = con.execute("SELECT run_id, lang, role, arrays_group, k_values FROM runs WHERE run_id = ?",
                    [run_id]).fetchall()[0]
    found = dicts(con, f"SELECT {arrays.RECORD_COLUMNS} FROM arrays WHERE owner = ? AND kind = 'levels'", [run_id])
    levels = ArrayRecord.from_row(found[0]) if found else None
    return RunRef(r[0], r[1], r[2], r[3], tuple(r[4]), levels)


SELECTION_COLUMNS = ("model", "analysis", "k", "seed", "lang", "module", "n_math_top", "n_control_top", "n_selected",
                     "math_run_id", "control_run_id")
PATTERN_COLUMNS = ("model", "analysis", "k", "seed", "module", "langs", "n_params")


def replace_derived(con, model: str, analysis: str, seed: int, selections: pl.DataFrame,
                    patterns: pl.DataFrame) -> None:
    """Swap one (model, analysis, seed)'s derived rows inside the caller's transaction."""
    for table in ("selections", "patterns"):
        con.execute(f"DELETE FROM {table} WHERE model = ? AND analysis = ? AND seed = ?", [model, analysis, seed])
    con.register("new_selections", selections.select(SELECTION_COLUMNS).to_arrow())
    con.execute(f"INSERT INTO selections ({', '.join(SELECTION_COLUMNS)}) SELECT * FROM new_selections")
    con.unregister("new_selections")
    con.register("new_patterns", patterns.select(PATTERN_COLUMNS).to_arrow())
    con.execute(f"INSERT INTO patterns ({', '.join(PATTERN_COLUMNS)}) SELECT * FROM new_patterns")
    con.unregister("new_patterns")
