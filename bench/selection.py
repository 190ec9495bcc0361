"""Selection: `level_codes` (top-k at the paper's 7 k values) over every module of Gemma-3-270M.

Scores are real: |W| of every scored module times real activation norms from a short
`run_pass` over English starter math texts. Ours: `level_codes(scores, PAPER_KS)` per
module (uint8 level per parameter: all 7 nested top-k sets, ties lowest flat index
first), over modules in mlarch's thread pool as `selection.model_levels` runs it in
ingest. Baseline: one `numpy.partition` per matrix with a single kth (the largest k's
threshold, n - floor(0.15 n)), i.e. the least work any exact top-k needs, over modules in
the same pool (the same cores for both: the headline). Target: ours takes <= 2x the
baseline's time. Also reported: np.partition as numpy runs it alone (one thread, one
matrix after another), both on one thread, and throughput in parameters per second.

A traced run attributes level_codes' time to its source lines (whatever the current code
is), to show where the extra time goes.

    .venv/bin/python bench/selection.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from _common import (Bench, bad_rounds, clean_times, gemma_folder, interleave, load_model, median, paired_ratio,
                     starter_texts)

TARGET = 2.0


def line_profile(functions, run) -> list[tuple[str, int, float, str]]:
    """Wall time per source line of `functions` while `run()` executes (sys.settrace).

    Profiles whatever mlarch's code is now (no copy to go stale). Tracing costs a few
    microseconds per line event, small next to numpy calls over millions of elements."""
    import linecache
    from collections import defaultdict

    codes = {f.__code__ for f in functions}
    spent: dict[tuple[str, int], float] = defaultdict(float)
    current: dict[int, tuple[tuple[str, int], float]] = {}

    def local(frame, event, arg):
        now = time.perf_counter()
        key = id(frame)
        if key in current and current[key][1] is not None:
            where, since = current[key]
            spent[where] += now - since
        if event == "line":
            current[key] = ((frame.f_code.co_filename, frame.f_lineno), time.perf_counter())
        elif event == "return":
            current.pop(key, None)
            parent = id(frame.f_back) if frame.f_back is not None else None
            if parent in current:  # the caller's line resumes
                current[parent] = (current[parent][0], time.perf_counter())
        return local

    def tracer(frame, event, arg):
        if frame.f_code not in codes:
            return None
        parent = id(frame.f_back) if frame.f_back is not None else None
        if parent in current and current[parent][1] is not None:  # charge callee time to the callee only
            where, since = current[parent]
            spent[where] += time.perf_counter() - since
            current[parent] = (where, None)
        return local

    import sys

    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
    rows = [(file, line, seconds, linecache.getline(file, line).strip()) for (file, line), seconds in spent.items()]
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    bench = Bench("selection", __doc__, repeats=5, quick_repeats=1, extra_args=lambda p: (
        p.add_argument("--norm-texts", type=int, default=None, help="texts for the real norms (default 4, --quick 1)"),
    ))
    import torch

    from mlarch.ingest.pipeline import PAPER_KS
    from mlarch.ingest.scoring import run_pass, scored_modules
    from mlarch.selection import level_codes, module_levels, scores, top_count

    ks = list(PAPER_KS)
    folder = gemma_folder()
    loaded = load_model(folder)
    modules = scored_modules(loaded.model)
    n_texts = bench.args.norm_texts or (1 if bench.quick else 4)
    result = run_pass(loaded.model, loaded.tokenizer, modules, starter_texts("en", "math")[:n_texts],
                      batch_size=1, max_length=512, device=torch.device("cpu"))
    pairs = [(m.magnitudes(), result.norms[m.name]) for m in modules]
    del loaded, result
    if bench.quick:
        pairs = pairs[: len(pairs) // 4]
    mats = [scores(w, norms) for w, norms in pairs]
    n_params = sum(s.size for s in mats)
    kth = [s.size - top_count(s.size, max(ks)) for s in mats]
    bench.log(f"{len(mats)} score matrices, {n_params / 1e6:.1f} M parameters (norms from {n_texts} texts)")

    def ours():
        for s in mats:
            level_codes(s, ks)

    def baseline():
        for s, k in zip(mats, kth):
            np.partition(s.reshape(-1), k)

    ours()  # warm-up
    from mlarch import parallel

    pool = parallel.pool()  # the pool selection.model_levels uses: one thread per core, at most 4
    by_size = sorted(mats, key=lambda s: -s.size)

    def ours_pool():  # what ingest runs: level_codes over modules, largest first
        list(pool.map(lambda s: level_codes(s, ks), by_size))

    def baseline_pool():
        list(pool.map(lambda s: np.partition(s.reshape(-1), s.size - top_count(s.size, max(ks))), by_size))

    pairs_by_size = sorted(pairs, key=lambda p: -p[0].size)

    def with_scores_pool():  # from |W| and norms: the score matrix, then level_codes (before issue 16)
        list(pool.map(lambda p: level_codes(scores(*p), ks), pairs_by_size))

    def module_levels_pool():  # from |W| and norms, scores made a block of rows at a time (model_levels now)
        list(pool.map(lambda p: module_levels(*p, ks), pairs_by_size))

    one, base, ours_p, base_p = ("level_codes, one thread", "np.partition, one thread",
                                 "level_codes, mlarch's pool", "np.partition, same pool")
    with_s, blocked = "scores + level_codes, pool", "module_levels, pool"
    times = interleave({one: ours, base: baseline, ours_p: ours_pool, base_p: baseline_pool,
                        with_s: with_scores_pool, blocked: module_levels_pool}, bench.repeats, log=bench.log)
    kept = clean_times(times)
    from mlarch import selection as selection_module

    traced = [f for f in vars(selection_module).values()
              if callable(f) and getattr(f, "__module__", None) == selection_module.__name__ and hasattr(f, "__code__")]
    lines = line_profile(traced, ours)

    def ratio_of(a: str, b: str) -> float:
        return paired_ratio(times[a], times[b], bad_rounds(a, b))

    o, b, op = median(kept[one]), median(kept[base]), median(kept[ours_p])
    threads = pool._max_workers
    bp = median(kept[base_p])
    headline = ratio_of(ours_p, base_p)
    bench.row(f"both in the same {threads}-thread pool: level_codes / np.partition", op, bp,
              ratio=headline, target=f"<= {TARGET:.0f}x", passed=headline <= TARGET,
              note="median of per-round time ratios; level_codes over modules in mlarch.parallel.pool, as "
                   "selection.model_levels runs it in ingest, vs one np.partition per matrix in that same pool")
    bench.row("from |W| and norms, same pool: module_levels / scores() + level_codes", median(kept[blocked]),
              median(kept[with_s]), ratio=ratio_of(blocked, with_s), target="info",
              note="model_levels now (candidates' scores made a block of rows at a time in modules of >= "
                   "selection._BLOCKED_FROM parameters; Gemma-3-270M's scored modules are all smaller, so the "
                   "same code runs on both sides here) vs the whole score matrix first; the same bytes")
    bench.row("throughput, both in the same pool (M params/s)", n_params / op / 1e6, n_params / bp / 1e6,
              ratio=bp / op, target="info", unit="")
    bench.row(f"level_codes in the pool ({threads} threads) / np.partition alone (one thread)", op, b,
              ratio=ratio_of(ours_p, base), target="info",
              note="the baseline as numpy runs it by itself: ours is given more cores than it")
    bench.row("per thread: level_codes on one thread / np.partition on one thread", o, b, ratio=ratio_of(one, base),
              target="info", note="the same work on one core")
    ties = sum(int(np.count_nonzero(s.reshape(-1) == np.partition(s.reshape(-1), k)[k])) for s, k in
               zip(mats[:16], kth[:16]))
    total = sum(r[2] for r in lines)
    print("\nwhere level_codes spends its time (one traced run over all modules, by source line):")
    for file, line, seconds, text in lines[:12]:
        print(f"  {Path(file).name}:{line:<4d} {seconds:7.3f} s {100 * seconds / total:5.1f}%  {text[:90]}")
    print(f"  (traced total {total:.3f} s; np.partition on one thread {b:.3f} s)")
    pool.shutdown()
    bench.finish(details={
        "model": folder.name, "n_matrices": len(mats), "n_params": n_params, "k_values": ks,
        "norm_texts": n_texts, "line_profile": [
            {"file": Path(f).name, "line": ln, "seconds": sec, "source": text} for f, ln, sec, text in lines[:30]],
        "times": times,
        "entries_equal_to_threshold_first16": ties,
    })


if __name__ == "__main__":
    main()
