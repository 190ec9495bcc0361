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
from mlarch.pattern_counts import code_dtype, count_codes, merge_counts, named
from mlarch.selection import top_count
from mlarch.store import arrays, layout
from mlarch.store.arrays import ArrayRecord
from mlarch.store.catalog import dicts
from mlarch.store.spans import Span


GROUP_BUDGET = 1 << 24  # parameters per work item, rounded up to whole chunks: memory per thread bounded
READ_ALIGN: int | None = None  # ranges start at multiples of this (None: the level arrays' chunk length)
THREADS = 8  # most threads derive runs: each holds ~(2 x languages + 4) bytes per parameter of its range


@dataclass(frozen=True)
class RunRef:
    """A finished run as derive reads it: id, language, role, arrays group, archived k values and the record of its
    level codes."""
    run_id: str
    lang: str
    role: str
    arrays_group: str
    k_values: tuple[float, ...]
    levels: ArrayRecord | None = None  # the catalog's record of its level codes (None: not yet committed)


def levels_path(arrays_group: str) -> str:
    """Path of a run's level-code array inside arrays.zarr."""
    return layout.array_path(arrays_group, "levels")


def norms_path(arrays_group: str) -> str:
    """Path of a run's activation-norm array inside arrays.zarr."""
    return layout.array_path(arrays_group, "norms")


def magnitudes_path(model_group: str) -> str:
    """Path of a model's |W| array inside arrays.zarr."""
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


# --- derive: chunked pattern counting ------------------------------------------------
#
# Work is split into ranges of parameters (whole chunks of the level arrays, GROUP_BUDGET
# parameters each), not into modules, so memory per thread is bounded by the range, whatever
# the size of a module; a module split across ranges sums its pieces' counts. Per range:
#   1. support: the parameters that some language has math-only at some k, found with one
#      uint8 compare per language (a superset: math level - 1 < control level - 1);
#   2. each supported parameter's levels of every language packed into one word (a nibble
#      per level), and the distinct words counted (np.unique: one sort of the support);
#   3. the few distinct words decoded into a pattern code per k (bit l: language l is
#      math-only there) and counted with their multiplicities.
# All k values are derived from the level codes at once (level j + 1 = first in top-k_values[j],
# so in top-k_values[j] iff 1 <= level <= j + 1); every step is linear in parameters x languages.

_ONE = np.uint8(1)
_NIBBLE = np.uint8(15)
_PACKED_LEVELS = 14  # runs with at most this many k values store levels 0..14: a level fits a nibble
_PACKED_LANGS = 8  # a byte per language in one uint64 word


@dataclass(frozen=True)
class _Plan:
    """Which k each language's pair of runs shares, and where it sits in each run's k_values."""
    langs: tuple[str, ...]  # languages with a math and a control run, sorted: bit l of a pattern code
    ks: tuple[float, ...]  # every k that some language shares, ascending: t indexes these
    members: tuple[dict[int, tuple[int, int]], ...]  # per language: t -> (index in the math run's k_values, in the control run's)
    packed: bool  # the word path (<= 8 languages, <= 14 k values per run); else codes per parameter

    @property
    def width(self) -> int:
        return len(self.langs)


def _plan(pairs: dict[str, tuple[RunRef, RunRef]]) -> _Plan:
    ks = tuple(sorted({k for m, c in pairs.values() for k in set(m.k_values) & set(c.k_values)}))
    members = tuple({t: (m.k_values.index(k), c.k_values.index(k)) for t, k in enumerate(ks)
                     if k in m.k_values and k in c.k_values} for m, c in pairs.values())
    packed = len(pairs) <= _PACKED_LANGS and all(len(r.k_values) <= _PACKED_LEVELS for p in pairs.values() for r in p)
    return _Plan(tuple(pairs), ks, members, packed)


def _member(math: np.ndarray, control: np.ndarray, jm: int, jc: int) -> np.ndarray:
    """Math-only at one k: in the math run's top-k_values[jm] set and not in the control run's
    top-k_values[jc] set. level - 1 wraps 0 ("in no set") to 255, above every index."""
    hit = np.less_equal(math - _ONE, np.uint8(jm))
    hit &= np.greater(control - _ONE, np.uint8(jc))
    return hit


def _support(levels: list[tuple[np.ndarray, np.ndarray]], plan: _Plan) -> np.ndarray:
    """Boolean per parameter of the range: True where some language may be math-only at some k."""
    n = levels[0][0].size
    support = np.zeros(n, bool)
    math1, control1, hit = np.empty(n, np.uint8), np.empty(n, np.uint8), np.empty(n, bool)
    for (math, control), members in zip(levels, plan.members):
        if not members:
            continue
        if all(jm <= jc for jm, jc in members.values()):
            # math-only at k means math level - 1 <= jm <= jc < control level - 1: one compare finds
            # a superset (parameters it admits wrongly get code 0 below, which is never a row)
            np.subtract(math, _ONE, out=math1)
            np.subtract(control, _ONE, out=control1)
            np.less(math1, control1, out=hit)
        else:  # runs whose k lists interleave: the exact test per k
            hit[:] = False
            for jm, jc in members.values():
                hit |= _member(math, control, jm, jc)
        support |= hit
    return support


def _packed_words(levels: list[tuple[np.ndarray, np.ndarray]], where: np.ndarray) -> np.ndarray:
    """One unsigned word per parameter at `where`: byte l = language l's math level (low nibble)
    | control level (high nibble). A level above 14 (none in runs of <= 14 k values) becomes 15,
    which like 0 is in no set of such a run."""
    size = 2 if len(levels) <= 2 else 4 if len(levels) <= 4 else 8
    table = np.zeros((where.size, size), np.uint8)
    for l, (math, control) in enumerate(levels):
        low = np.take(math, where)
        np.minimum(low, _NIBBLE, out=low)
        high = np.take(control, where)
        np.minimum(high, _NIBBLE, out=high)
        high <<= np.uint8(4)
        high |= low
        table[:, l] = high
    return table.view(np.dtype(f"u{size}")).reshape(-1)


def _unpack(words: np.ndarray, width: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    table = words.view(np.uint8).reshape(words.size, words.dtype.itemsize)
    return ([table[:, l] & _NIBBLE for l in range(width)], [table[:, l] >> np.uint8(4) for l in range(width)])


def _pattern_counts(maths: list[np.ndarray], controls: list[np.ndarray], weights: np.ndarray | None,
                    plan: _Plan) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per k (t): (pattern codes, counts) of parameters with these levels, each counted
    weights[i] times (None: once)."""
    dtype = code_dtype(plan.width)
    codes = np.empty(maths[0].size if maths else 0, dtype)
    out = []
    for t in range(len(plan.ks)):
        codes[:] = 0
        for l, members in enumerate(plan.members):
            if t in members:
                jm, jc = members[t]
                codes |= _member(maths[l], controls[l], jm, jc).astype(dtype) << dtype.type(l)
        out.append(count_codes(codes, plan.width, weights))
    return out


def _count_range(levels: list[tuple[np.ndarray, np.ndarray]], plan: _Plan, pieces: list[tuple[int, int]],
                 count_tops: bool) -> list[tuple[list, list | None]]:
    """For each piece [lo, hi) of the range (a module's part of it): per k the (pattern codes,
    counts), and with count_tops per language a histogram of its math and control levels."""
    where = np.flatnonzero(_support(levels, plan))
    first = np.searchsorted(where, [lo for lo, _ in pieces])
    last = np.searchsorted(where, [hi for _, hi in pieces])
    if plan.packed:
        words = _packed_words(levels, where)
    else:
        gathered = [(np.take(math, where), np.take(control, where)) for math, control in levels]
    out = []
    for (lo, hi), a, b in zip(pieces, first.tolist(), last.tolist()):
        if plan.packed:  # few distinct words: decode each once, counted with its multiplicity
            distinct, weights = np.unique(words[a:b], return_counts=True)
            maths, controls = _unpack(distinct, plan.width)
        else:
            maths, controls, weights = [m[a:b] for m, _ in gathered], [c[a:b] for _, c in gathered], None
        counts = _pattern_counts(maths, controls, weights, plan)
        tops = None
        if count_tops:  # as stored (verify), from a histogram of each run's levels
            tops = [(np.bincount(math[lo:hi], minlength=256), np.bincount(control[lo:hi], minlength=256))
                    for math, control in levels]
        out.append((counts, tops))
    return out


def read_ranges(n_params: int) -> list[tuple[int, int]]:
    """[start, stop) ranges derive reads: GROUP_BUDGET parameters rounded up to whole chunks
    of the level arrays (READ_ALIGN, when set, instead of the chunk length)."""
    if n_params <= 0:
        return []
    align = READ_ALIGN or arrays.chunks_for((n_params,))[0]
    step = max(1, -(-GROUP_BUDGET // align)) * align
    return [(start, min(start + step, n_params)) for start in range(0, n_params, step)]


def _read_levels(root: Path, ref: RunRef, start: int, stop: int, preloaded: dict[str, np.ndarray]) -> np.ndarray:
    """Codes [start, stop) of one run: from memory for a run being committed, else read from the
    store and checked against the catalog's record (only the chunks that hold them)."""
    if ref.arrays_group in preloaded:
        return preloaded[ref.arrays_group][start:stop]
    return arrays.read(root, ref.levels, start, stop)


def derive(root: Path, model: str, analysis: str, seed: int, spans: list[Span], runs: dict[tuple[str, str], RunRef],
           preloaded: dict[str, np.ndarray] | None = None, count_tops: bool = False):
    """(selections, patterns) DataFrames for the languages that have both a math and a control run.

    Reads every run's level codes once, range by range in a thread pool (memory bounded by
    the range, not by the largest module), and counts per (module, k) how many parameters
    each subset of languages has math-only (see the notes above `_Plan`). `preloaded` maps
    an arrays_group to its level codes already in memory (a run being committed), which are
    then not read back from zarr. Every other read is checked against the run's array
    record (arrays.read: an array recorded before chunk digests existed is checked whole
    first). count_tops counts n_math_top / n_control_top in the stored codes (what `verify`
    compares) instead of taking the count level_codes guarantees."""
    preloaded = preloaded or {}
    pairs = {
        lang: (runs[(lang, "math")], runs[(lang, "control")])
        for lang in sorted({lang for lang, _ in runs})
        if (lang, "math") in runs and (lang, "control") in runs
    }
    for m, c in pairs.values():
        for ref in (m, c):
            if ref.arrays_group in preloaded:
                continue
            if ref.levels is None:
                raise MlarchError(f"run {ref.run_id} has no levels array recorded in the catalog: "
                                  "run `mlarch verify`, then remove the run with `mlarch rm` and re-ingest it")
    plan = _plan(pairs)
    extent = max((s.param_offset + s.n_params for s in spans), default=0)
    ranges = read_ranges(extent) if plan.ks else []

    def count(item: tuple[int, int]) -> tuple[list[int], list]:
        start, stop = item
        inside = [i for i, s in enumerate(spans) if s.param_offset < stop and s.param_offset + s.n_params > start]
        pieces = [(max(spans[i].param_offset, start) - start, min(spans[i].param_offset + spans[i].n_params, stop) - start)
                  for i in inside]
        levels = [(_read_levels(root, m, start, stop, preloaded), _read_levels(root, c, start, stop, preloaded))
                  for m, c in pairs.values()]
        return inside, _count_range(levels, plan, pieces, count_tops)

    parts: dict[int, list] = {}  # span index -> [(per-k counts, tops) of each of its pieces]
    with parallel.pool(THREADS) as pool:
        for inside, counted in pool.map(count, ranges):  # in order; each range's levels freed when counted
            for i, piece in zip(inside, counted):
                parts.setdefault(i, []).append(piece)

    selection_rows, pattern_rows = [], []
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    for first in range(0, len(plan.ks), 8):  # rows in the order of earlier versions: 8 k values at a time
        group = range(first, min(first + 8, len(plan.ks)))
        for i, span in enumerate(spans):
            pieces = parts.get(i, [])
            counted = {t: merge_counts([p[0][t] for p in pieces]) if pieces else empty for t in group}
            langs_of: dict[int, None] = {}
            for l, ((m, c), members) in enumerate(zip(pairs.values(), plan.members)):
                for t in (t for t in group if t in members):
                    langs_of.setdefault(t)
                    k, (jm, jc) = plan.ks[t], members[t]
                    values, counts = counted[t]
                    n_selected = int(counts[(values >> l) & 1 == 1].sum())
                    if count_tops:
                        math_hist = sum(p[1][l][0] for p in pieces) if pieces else np.zeros(256, np.int64)
                        control_hist = sum(p[1][l][1] for p in pieces) if pieces else np.zeros(256, np.int64)
                        math_tops, control_tops = int(math_hist[1:jm + 2].sum()), int(control_hist[1:jc + 2].sum())
                    else:
                        math_tops = control_tops = top_count(span.n_params, k)
                    selection_rows.append((model, analysis, k, seed, plan.langs[l], span.module, math_tops,
                                           control_tops, n_selected, m.run_id, c.run_id))
            for t in langs_of:
                for langs, n in named(*counted[t], plan.langs):
                    pattern_rows.append((model, analysis, plan.ks[t], seed, span.module, langs, n))

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
    found = dicts(con, f"SELECT owner, kind, {arrays.RECORD_COLUMNS} FROM arrays WHERE owner = ? AND kind = 'levels'",
                  [run_id])
    levels = arrays.catalog_record(found[0]) if found else None  # its path checked
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
