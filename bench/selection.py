"""Selection: `level_codes` (top-k at the paper's 7 k values) over every module of Gemma-3-270M.

Scores are real: |W| of every scored module times real activation norms from a short
`run_pass` over English starter math texts. Ours: `level_codes(scores, PAPER_KS)` per
module (uint8 level per parameter: all 7 nested top-k sets, ties lowest flat index
first). Baseline: one `numpy.partition` per matrix with a single kth (the largest k's
threshold, n - floor(0.15 n)), i.e. the least work any exact top-k needs. Reported in
scored parameters per second; target: ours takes <= 2x the baseline's time.

A traced run attributes level_codes' time to its source lines (whatever the current code
is), to show where the extra time goes. `level_codes_prototype` below is an alternative
written for this benchmark (checked to give identical output), timed for comparison.

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


def level_codes_prototype(scores: np.ndarray, ks) -> np.ndarray:
    """A suggested rewrite of level_codes (same output, checked on every module), for comparison only.

    Differences from mlarch's level_codes:
    * the thresholds of the smaller k come from nested in-place partitions of shrinking
      views of the already partitioned copy (15% -> 10% -> 5% ...), instead of one
      multi-kth np.partition of the gathered candidates (several times slower than even a
      full sort here);
    * levels are counted with one vectorised compare per k (how many thresholds are >=
      the value) instead of per-k boolean-mask assignments; only entries equal to a
      threshold go through the tie rule (lowest flat index first)."""
    from mlarch.ingest.selection import level_codes, top_count

    flat = scores.reshape(-1)
    n = flat.size
    counts = [top_count(n, k) for k in ks]
    levels = np.zeros(n, dtype=np.uint8)
    cmax = max(counts, default=0)
    if cmax <= 0:
        return levels.reshape(scores.shape)
    if cmax >= n:
        return level_codes(scores, ks)
    part = np.partition(flat, n - cmax)
    top = part[n - cmax:]  # view: the cmax largest values, unordered
    lowest = part[n - cmax]
    thresholds = [np.inf] * len(ks)
    view, size = top, cmax
    for j in range(len(ks) - 1, -1, -1):  # counts shrink with k: partition ever smaller views in place
        c = counts[j]
        if c == 0:
            continue
        if c < size:
            view.partition(size - c)
            view, size = view[size - c:], c
        thresholds[j] = view[0]
    candidates = np.flatnonzero(flat >= lowest)  # ascending flat indices (may hold extra ties)
    values = flat[candidates]
    above = np.zeros(values.size, dtype=np.uint8)
    for t in thresholds:  # number of thresholds >= value = level - 1 for strictly-above entries
        above += values <= t
    sub = np.where(above < len(ks), above + np.uint8(1), np.uint8(0)).astype(np.uint8)
    for j in range(len(ks) - 1, -1, -1):  # entries equal to a threshold: lowest index first
        if counts[j] == 0:
            continue
        t = thresholds[j]
        need = counts[j] - int(np.count_nonzero(top > t))  # every entry > t lies in `top`
        if need:
            sub[np.flatnonzero(values == t)[:need]] = j + 1
    levels[candidates] = sub
    return levels.reshape(scores.shape)


def main() -> None:
    bench = Bench("selection", __doc__, repeats=5, quick_repeats=1, extra_args=lambda p: (
        p.add_argument("--norm-texts", type=int, default=None, help="texts for the real norms (default 4, --quick 1)"),
    ))
    import torch

    from mlarch.ingest.pipeline import PAPER_KS
    from mlarch.ingest.scoring import run_pass, scored_modules
    from mlarch.ingest.selection import level_codes, scores, top_count

    ks = list(PAPER_KS)
    folder = gemma_folder()
    loaded = load_model(folder)
    modules = scored_modules(loaded.model)
    n_texts = bench.args.norm_texts or (1 if bench.quick else 4)
    result = run_pass(loaded.model, loaded.tokenizer, modules, starter_texts("en", "math")[:n_texts],
                      batch_size=1, max_length=512, device=torch.device("cpu"))
    mats = [scores(m.magnitudes(), result.norms[m.name]) for m in modules]
    del loaded, result
    if bench.quick:
        mats = mats[: len(mats) // 4]
    n_params = sum(s.size for s in mats)
    kth = [s.size - top_count(s.size, max(ks)) for s in mats]
    bench.log(f"{len(mats)} score matrices, {n_params / 1e6:.1f} M parameters (norms from {n_texts} texts)")

    def ours():
        for s in mats:
            level_codes(s, ks)

    def baseline():
        for s, k in zip(mats, kth):
            np.partition(s.reshape(-1), k)

    def prototype():
        for s in mats:
            level_codes_prototype(s, ks)

    prototype_identical = all(np.array_equal(level_codes(s, ks), level_codes_prototype(s, ks)) for s in mats)
    bench.log(f"prototype output identical to level_codes on all {len(mats)} modules: {prototype_identical}")
    ours()  # warm-up
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(2)

    def ours_threads():  # numpy releases the GIL in partition, compares and nonzero
        list(pool.map(lambda s: level_codes(s, ks), sorted(mats, key=lambda s: -s.size)))

    times = interleave({"level_codes (7 k)": ours, "np.partition (1 kth)": baseline, "prototype": prototype,
                        "level_codes, 2 threads": ours_threads}, bench.repeats, log=bench.log)
    kept = clean_times(times)
    from mlarch.ingest import selection as selection_module

    traced = [f for f in vars(selection_module).values()
              if callable(f) and getattr(f, "__module__", None) == selection_module.__name__ and hasattr(f, "__code__")]
    lines = line_profile(traced, ours)

    o, b = median(kept["level_codes (7 k)"]), median(kept["np.partition (1 kth)"])
    ratio = paired_ratio(times["level_codes (7 k)"], times["np.partition (1 kth)"],
                         bad_rounds("level_codes (7 k)", "np.partition (1 kth)"))
    bench.row("selection time, all modules: level_codes / np.partition", o, b, ratio=ratio,
              target=f"<= {TARGET:.0f}x", passed=ratio <= TARGET,
              note="median of per-round time ratios")
    bench.row("throughput (M params/s)", n_params / o / 1e6, n_params / b / 1e6, ratio=b / o, target="info", unit="")
    pr = paired_ratio(times["prototype"], times["np.partition (1 kth)"], bad_rounds("prototype", "np.partition (1 kth)"))
    tr = paired_ratio(times["level_codes, 2 threads"], times["np.partition (1 kth)"],
                      bad_rounds("level_codes, 2 threads", "np.partition (1 kth)"))
    bench.row("level_codes over modules in a 2-thread pool / np.partition (1 thread)",
              median(kept["level_codes, 2 threads"]), b, ratio=tr, target="info",
              note="wall time; ingest's selection runs between passes, when torch's threads are idle")
    bench.row("bench prototype rewrite / np.partition", median(kept["prototype"]), b, ratio=pr, target="info",
              note=f"not mlarch code: level_codes_prototype in this file; identical output: {prototype_identical}")
    ties = sum(int(np.count_nonzero(s.reshape(-1) == np.partition(s.reshape(-1), k)[k])) for s, k in
               zip(mats[:16], kth[:16]))
    total = sum(r[2] for r in lines)
    print("\nwhere level_codes spends its time (one traced run over all modules, by source line):")
    for file, line, seconds, text in lines[:12]:
        print(f"  {Path(file).name}:{line:<4d} {seconds:7.3f} s {100 * seconds / total:5.1f}%  {text[:90]}")
    print(f"  (traced total {total:.3f} s; np.partition baseline {b:.3f} s)")
    bench.finish(details={
        "model": folder.name, "n_matrices": len(mats), "n_params": n_params, "k_values": ks,
        "norm_texts": n_texts, "line_profile": [
            {"file": Path(f).name, "line": ln, "seconds": sec, "source": text} for f, ln, sec, text in lines[:30]],
        "times": times,
        "entries_equal_to_threshold_first16": ties, "prototype_identical": prototype_identical,
    })


if __name__ == "__main__":
    main()
