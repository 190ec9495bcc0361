"""Scoring overhead: `run_pass` (hooks on every scored module, norms accumulated) vs bare forward.

Same model (Gemma-3-270M, float32, cpu), same texts (the first N English starter math
items), same tokenization, batches (batch size 1, the CPU default) and padding.

The scoring pass stops at the output head's input (the head is tied to the embedding in
Gemma, so it is not scored and its logits are never computed). Two baselines:

* base  - the base model (model.model, no head): the fair baseline for the cost of the
          hooks, and the one the target (<= 1.10x) uses;
* full  - the full causal LM including the 262k-vocabulary logits (informational: the
          scoring pass is *cheaper* than this because it skips the head).

A diagnostic variant registers the same number of no-op forward pre-hooks on the base
model, separating Python hook dispatch from the norm arithmetic, and one instrumented
scoring pass reports the time spent inside the hooks (modules fed the same input
tensor, q/k/v and gate/up, reuse the first one's norms: 72 norm computations per
forward in Gemma-3 instead of 126).

Timing: the texts are split into chunks of --chunk texts; each round runs every variant on
one chunk (order rotated every round), so a scoring pass and its baseline run seconds apart
on the same texts. The target ratio is the median of those per-round ratios: on this shared
2-core machine a whole pass drifts +-10% between minutes, which the pairing cancels.

    .venv/bin/python bench/scoring_overhead.py [--quick] [--texts 16] [--chunk 4] [--repeats 7]
"""

from __future__ import annotations

import time

import _common
from _common import (QUIET, Bench, bad_rounds, bare_forward, drawn, interleave, load_model, median, model_folder,
                     paired_ratio, starter_texts)

TARGET = 1.10


def whole_passes(values: list[float], n_chunks: int) -> list[float]:
    """Per-chunk times summed into passes over all texts (complete passes only)."""
    return [sum(values[i : i + n_chunks]) for i in range(0, len(values) - n_chunks + 1, n_chunks)]


def main() -> None:
    bench = Bench("scoring_overhead", __doc__, repeats=7, quick_repeats=1, device_args=True, extra_args=lambda p: (
        p.add_argument("--texts", type=int, default=None, help="number of starter texts (default 16, --quick 4)"),
        p.add_argument("--chunk", type=int, default=4, help="texts per timed round (default 4)"),
        p.add_argument("--batch-size", type=int, default=None, help="default 1 on cpu, 16 on cuda (ingest's defaults)"),
        p.add_argument("--lang", default="en"),
    ))
    import torch

    from mlarch.ingest.scoring import NormCollector, run_pass, scored_modules

    n_texts = bench.args.texts or (4 if bench.quick else 16)
    pool = starter_texts(bench.args.lang, "math")  # 24 items; more are drawn with replacement, as ingest does
    texts = pool[:n_texts] if n_texts <= len(pool) else drawn(pool, n_texts)
    folder = model_folder(bench)
    clock = time.perf_counter()
    loaded = load_model(folder, bench.args.device)
    bench.log(f"loaded {folder.name} in {time.perf_counter() - clock:.1f} s")
    model, tokenizer = loaded.model, loaded.tokenizer
    modules = scored_modules(model)
    device = torch.device(bench.args.device)
    bs = bench.args.batch_size or (16 if device.type == "cuda" else 1)

    def scoring_pass(some=texts):
        return run_pass(model, tokenizer, modules, some, batch_size=bs, max_length=512, device=device)

    def noop_hooks_base(some):
        def hook(module, args, kwargs):
            return None

        handles = [m.module.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
        try:
            bare_forward(model, tokenizer, some, base=True, batch_size=bs)
        finally:
            for h in handles:
                h.remove()

    mlarch_accumulate = NormCollector._accumulate
    size = max(1, min(bench.args.chunk, n_texts))
    chunks = [texts[i : i + size] for i in range(0, n_texts, size)]

    def by_chunk(run):
        """A variant whose k-th call runs chunk k mod n: every round gives all variants one chunk."""
        calls = iter(range(10**9))
        return lambda: run(chunks[next(calls) % len(chunks)])

    variants = {
        "scoring (run_pass)": by_chunk(scoring_pass),
        "bare base model": by_chunk(lambda some: bare_forward(model, tokenizer, some, base=True, batch_size=bs)),
        "bare full model": by_chunk(lambda some: bare_forward(model, tokenizer, some, base=False, batch_size=bs)),
        "base + no-op hooks": by_chunk(noop_hooks_base),
    }
    # warm-up: one short pass of each (first calls allocate and tune kernels)
    short = texts[:2]
    run_pass(model, tokenizer, modules, short, batch_size=bs, max_length=512, device=device)
    bare_forward(model, tokenizer, short, base=True, batch_size=bs)
    bare_forward(model, tokenizer, short, base=False, batch_size=bs)
    rounds = bench.repeats * len(chunks)
    bench.log(f"timing {len(variants)} variants x {rounds} rounds ({len(chunks)} chunks of <= {size} of {n_texts} texts)")
    times = interleave(variants, rounds, log=bench.log)

    # instrumented passes: time spent inside the hooks
    contended = {k: list(v) for k, v in _common.LAST_CONTENDED.items()}
    inside = {"s": 0.0, "calls": 0}

    def timed_by(accumulate):
        def timed(self, name, args, kwargs):
            start = time.perf_counter()
            try:
                return accumulate(self, name, args, kwargs)
            finally:
                inside["s"] += time.perf_counter() - start
                inside["calls"] += 1

        return timed

    NormCollector._accumulate = timed_by(mlarch_accumulate)
    try:
        runs = []
        for _ in range(1 if bench.quick else 3):
            inside.update(s=0.0, calls=0)
            seconds, others, result = QUIET.measure(scoring_pass, bench.log)
            runs.append((inside["s"] / seconds, seconds, inside["s"], inside["calls"]))
    finally:
        NormCollector._accumulate = mlarch_accumulate
    share, instrumented, hook_s, calls = sorted(runs)[len(runs) // 2]  # the median share
    hooks = {"share": share, "pass_s": instrumented, "hook_s": hook_s, "calls": calls, "runs": runs}

    s, b, f, n = "scoring (run_pass)", "bare base model", "bare full model", "base + no-op hooks"
    passes = {name: whole_passes(values, len(chunks)) for name, values in times.items()}
    ours, base, full, noop = passes[s], passes[b], passes[f], passes[n]
    ratio_base = paired_ratio(times[s], times[b], bad_rounds(s, b))
    bench.row("scoring pass vs bare base model (target)", median(ours), median(base), ratio=ratio_base,
              target=f"<= {TARGET:.2f}x", passed=ratio_base <= TARGET, samples_ours=times[s], samples_baseline=times[b],
              note=f"median of per-round ratios over {len(times[s]) - len(bad_rounds(s, b))} uncontended rounds "
                   f"of {size} texts; times are whole passes over {n_texts} texts (sums of {len(chunks)} rounds): "
                   f"their ratio of medians {median(ours) / median(base):.3f}x, of sums {sum(ours) / sum(base):.3f}x")
    bench.row("scoring pass vs bare full model (with head)", median(ours), median(full),
              ratio=paired_ratio(times[s], times[f], bad_rounds(s, f)), target="info")
    bench.row("no-op hooks on base vs bare base model", median(noop), median(base),
              ratio=paired_ratio(times[n], times[b], bad_rounds(n, b)), target="info")
    bench.row("time inside hooks, share of pass", hook_s, instrumented, ratio=share, target="info",
              note=f"{calls} hook calls, {1e6 * hook_s / max(1, calls):.0f} us each; median of instrumented passes")
    bench.row("overhead implied by time inside hooks: pass / (pass - hooks)", instrumented, instrumented - hook_s,
              ratio=1 / (1 - share), target="info",
              note="much less noisy than wall-clock ratios: both numbers come from the same pass")
    bench.finish(details={
        "model": folder.name, "n_scored_modules": len(modules), "n_texts": n_texts, "batch_size": bs,
        "chunk": size, "n_tokens": result.n_tokens, "instrumented_hooks": hooks, "times": times, "contended_indices": contended,
        "target_baseline": "bare base model (model.model, no head), median of per-round ratios",
    })


if __name__ == "__main__":
    main()
