"""The `patterns` rows of a comparison at a k that was not archived, from the stored factors.

Archive.compare counts overlaps from the membership-pattern histogram that ingest archived
at each k it was given. For another k the same histogram follows from the per-parameter
math-only sets, re-thresholded as Archive.selection does: top-k of |W| x norms (an exact
run's scores) on math and not on control, or the stored level codes where a run archived
that k. Reads go a window of whole modules at a time: |W| once per window for every run,
each run's norms once, so memory stays bounded and no score array outlives its module."""

from __future__ import annotations

from mlarch.query.compare import ComparePlan, pair_runs
from mlarch.store import catalog
from mlarch.store.spans import groups as span_groups

# elements read at once (|W| float32 + level codes): whole modules up to about this many
WINDOW = 1 << 24


def _histogram(masks: list) -> dict[int, int]:
    """{membership bits: count} over the entries of a module, bit i set = in masks[i]; the
    empty membership left out (it counts toward no language)."""
    import numpy as np

    code = np.zeros(masks[0].size, dtype=np.uint64 if len(masks) > 16 else np.uint32)
    for i, mask in enumerate(masks):
        code |= mask.reshape(-1).astype(code.dtype) << code.dtype.type(i)
    if len(masks) <= 16:
        counts = np.bincount(code, minlength=1)
        bits = np.flatnonzero(counts)
        return {int(b): int(counts[b]) for b in bits if b}
    bits, counts = np.unique(code, return_counts=True)
    return {int(b): int(n) for b, n in zip(bits, counts) if b}


def patterns(archive, plan: ComparePlan) -> dict[str, list]:
    """The patterns rows (model, analysis, module, langs, n) of `plan`'s models at plan.k and
    plan.seed, over plan.langs only (what compare projects onto), as column lists."""
    from mlarch.selection import in_top, level_codes, scores

    out: dict[str, list] = {"model": [], "analysis": [], "module": [], "langs": [], "n": []}
    arrays, store = archive._arrays(), archive._array_store()
    for model, analysis in zip(plan.models, plan.analyses):
        with catalog.reading(archive.catalog_path) as con:
            runs = [pair_runs(con, model, analysis, lang, plan.seed) for lang in plan.langs]  # (math, control)
        info = {r: archive._run_arrays(r) for pair in runs for r in pair}
        k_index = {r: [float(v) for v in run["k_values"]] for r, run in info.items()}
        k_index = {r: ks.index(plan.k) if plan.k in ks else None for r, ks in k_index.items()}
        norms = {r: arrays.read(store, archive._record(r, "norms")) for r in info if k_index[r] is None}
        spans = sorted(archive._spans(model).values(), key=lambda s: s.param_offset)
        for window in span_groups(spans, WINDOW):
            start, stop = window[0].param_offset, window[-1].param_offset + window[-1].n_params
            magnitudes = arrays.read(store, archive._record(model, "magnitudes"), start, stop) if norms else None
            levels = {r: arrays.read(store, archive._record(r, "levels"), start, stop)
                      for r in info if k_index[r] is not None}
            for span in window:
                lo, hi = span.param_offset - start, span.param_offset - start + span.n_params
                mag = None if magnitudes is None else magnitudes[lo:hi].reshape(span.n_rows, span.n_cols)

                def top(run_id):
                    if k_index[run_id] is not None:
                        return in_top(levels[run_id][lo:hi], k_index[run_id])
                    return level_codes(scores(mag, norms[run_id][span.norms]), [plan.k]).reshape(-1) == 1

                masks = []
                for math_run, control_run in runs:
                    masks.append(top(math_run) & ~top(control_run))  # math-only: top-k math, not top-k control
                for bits, n in _histogram(masks).items():
                    out["model"].append(model)
                    out["analysis"].append(analysis)
                    out["module"].append(span.module)
                    out["langs"].append([lang for i, lang in enumerate(plan.langs) if bits >> i & 1])
                    out["n"].append(n)
    return out
