"""Cost of --method mathneuro-bf16 (the authors' bf16 arithmetic) against the exact method, same work.

Same model, same texts (N starter math items drawn as ingest draws them), same batches
(batch size 1: the compat method's setting and the CPU default), and for each method the work
of one run from texts to level codes at the paper's k values:

* exact          - scoring.run_pass (per-sample norms summed in float64) + selection.model_levels
                   (|W| * norms in float32, top-k per matrix); model in float32 (ingest's CPU default);
* exact, bf16 fwd - the same on the bf16 model: the same forward as the compat method, so the
                   ratio to it is the cost of the bf16 arithmetic alone;
* mathneuro-bf16 - mathneuro.run_pass_bf16 (per-sample bf16 norms; then, per module and sample in
                   draw order, a full-size bf16 product and add) + mathneuro.model_levels_bf16.

The compat method's extra work grows as samples x scored parameters (two full-matrix bf16 ops
per sample), the exact method's as samples x (scored inputs) plus one selection: the ratio grows
with the number of samples. Variants run interleaved (round-robin, order rotated), medians kept.

    .venv/bin/python bench/mathneuro.py [--quick] [--texts 16] [--repeats 3] [--model smollm-random]
"""

from __future__ import annotations

import time

import _common
from _common import QUIET, Bench, clean_times, drawn, interleave, median, model_folder, starter_texts

KS = (0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.15)


def main() -> None:
    bench = Bench("mathneuro", __doc__, repeats=3, quick_repeats=1, device_args=True, extra_args=lambda p: (
        p.add_argument("--texts", type=int, default=None, help="samples per run (default 16, --quick 4)"),
    ))
    import numpy as np
    import torch

    from mlarch import selection
    from mlarch.ingest import loading, mathneuro, scoring
    from mlarch.store import spans as span_layout

    n_texts = bench.args.texts or (4 if bench.quick else 16)
    texts = drawn(starter_texts("en", "math"), n_texts, seed=1)
    device = torch.device(bench.args.device)
    folder = model_folder(bench)
    clock = time.perf_counter()
    models = {dtype: loading.load(str(folder), revision=None, device=device, dtype=dtype)
              for dtype in ("float32", "bfloat16")}
    bench.log(f"loaded {folder.name} (float32 and bfloat16) in {time.perf_counter() - clock:.1f} s")

    def prepared(loaded):
        modules = scoring.scored_modules(loaded.model)
        spans = span_layout.layout([(m.name, m.layer, m.n_rows, m.n_cols) for m in modules])
        magnitudes = np.empty(span_layout.total_params(spans), dtype=np.float32)
        for m, span in zip(modules, spans):
            m.magnitudes(out=magnitudes[span.params])
        return loaded, modules, spans, magnitudes

    f32, b16 = prepared(models["float32"]), prepared(models["bfloat16"])
    n_params = int(f32[3].size)
    def exact(setup):
        loaded, modules, spans, magnitudes = setup

        def run():
            start = time.perf_counter()
            result = scoring.run_pass(loaded.model, loaded.tokenizer, modules, texts, batch_size=1,
                                      max_length=512, device=device)
            middle = time.perf_counter()
            norms = np.empty(span_layout.total_norms(spans), dtype=np.float32)
            for span in spans:
                norms[span.norms] = result.norms[span.module]
            levels = selection.model_levels(spans, magnitudes, norms, KS)
            return levels, {"pass": middle - start, "levels": time.perf_counter() - middle}

        return run

    accumulating = []  # seconds in mathneuro.accumulate_bf16 (the full-size bf16 products and sums)
    accumulate = mathneuro.accumulate_bf16

    def timed_accumulate(per_sample, magnitudes):
        start = time.perf_counter()
        try:
            return accumulate(per_sample, magnitudes)
        finally:
            accumulating.append(time.perf_counter() - start)

    def compat():
        loaded, modules, spans, _ = b16
        accumulating.clear()
        start = time.perf_counter()
        result = mathneuro.run_pass_bf16(loaded.model, loaded.tokenizer, modules, texts, batch_size=1,
                                         max_length=None, device=device)
        middle = time.perf_counter()
        levels = mathneuro.model_levels_bf16(spans, result.scores, KS)
        return levels, {"pass": middle - start, "levels": time.perf_counter() - middle,
                        "of which bf16 accumulation": sum(accumulating)}

    variants = {"exact (float32)": exact(f32), "exact (bf16 forward)": exact(b16), "mathneuro-bf16": compat}
    mathneuro.accumulate_bf16 = timed_accumulate  # run_pass_bf16 looks it up at each call
    # warm-up on two texts (first calls allocate and pick kernels)
    short = texts[:2]
    for setup in (f32, b16):
        scoring.run_pass(setup[0].model, setup[0].tokenizer, setup[1], short, batch_size=1, max_length=512,
                         device=device)
    mathneuro.run_pass_bf16(b16[0].model, b16[0].tokenizer, b16[1], short, batch_size=1, max_length=None,
                            device=device)
    bench.log(f"timing {len(variants)} variants x {bench.repeats} rounds, {n_texts} texts, "
              f"{n_params:,} scored parameters")
    times = clean_times(interleave(variants, bench.repeats, log=bench.log))
    parts = {}  # variant -> part -> median over the measurements kept in `times` (uncontended if any)
    for name in variants:
        kept = _common.clean(_common.LAST_VALUES[name], _common.LAST_CONTENDED.get(name, []))
        parts[name] = {part: median([value[1][part] for value in kept]) for part in kept[0][1]}

    # the sets: how far the authors' arithmetic moves them from the exact sums (same bf16 forward)
    j = KS.index(0.01)
    a = selection.in_top(_common.LAST_VALUES["exact (bf16 forward)"][0][0], j)
    b = selection.in_top(_common.LAST_VALUES["mathneuro-bf16"][0][0], j)
    jaccard = float(np.count_nonzero(a & b) / np.count_nonzero(a | b))

    ours = times["mathneuro-bf16"]
    bench.row("mathneuro-bf16 vs exact (float32, the CPU default)", median(ours), median(times["exact (float32)"]),
              note=f"one run from {n_texts} texts to level codes at {len(KS)} k values, batch size 1")
    bench.row("mathneuro-bf16 vs exact on the same bf16 forward", median(ours), median(times["exact (bf16 forward)"]),
              note="the cost of the bf16 arithmetic (full-size products and sums per sample) and of its selection")
    accumulation = parts["mathneuro-bf16"]["of which bf16 accumulation"]
    bench.row("bf16 accumulation per sample per 1e8 scored parameters", accumulation / n_texts * 1e8 / n_params,
              unit="s", note="time in accumulate_bf16 (two full-size bf16 ops per sample and matrix), scaled")
    bench.finish(details={
        "texts": n_texts, "scored_parameters": n_params, "ks": KS, "parts_median_s": parts,
        "jaccard_top_0.01_exact_vs_bf16_same_forward": jaccard,
        "bf16_accumulator_bytes": 2 * n_params,
        "quiet": QUIET.summary(),
    })


if __name__ == "__main__":
    main()
