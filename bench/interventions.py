"""Evaluation: intervention apply + undo, batched greedy generation, and the NLL pass's overhead.

Model: Gemma-3-270M from the demo (float32 on the CPU, 2 torch threads), loaded once by
mlarch's own loader. Three targets, each against a baseline measured in the same run:

1. apply + undo of one intervention <= 5% of one NLL evaluation of 64 items.
   Ours: `with interventions.applied(modules, plan): pass` (the gather of the old values,
   the write, and the scatter back on exit) for a prune plan and for a scale plan (x0.5).
   The plans are built without an archive: for every scored module (126 in Gemma) a
   uniformly random set of --set-fraction of its entries (default 0.39%, the size of a
   k = 0.01 math-only set; numpy default_rng(0).choice, sorted), wrapped in
   `interventions.Plan(parse("prune:en@0.01"), seed=1, changes=[ModuleChange...])`. A
   random set touches as many cache lines as a real one. Each timed call runs the
   `with` block --inner times (so that a measurement is long enough for the contention
   check's /proc/stat clock ticks); the time per apply + undo is reported.
   Baseline: `tasks.nll_pass` over 64 English starter math texts drawn with replacement
   from the 24 items as ingest draws them (`_common.drawn`, seed 1), batch size 1 (the
   CPU default), max_length 512. The NLL pass runs in 8 chunks of 8 texts (see 3.); a
   64-text evaluation is the sum of the 8 chunks of one repeat. Before timing, the script
   checks that inside the block the entries are 0 (prune) / x0.5 (scale) and that after
   it every scored weight is bit-identical to a copy taken before.

2. batched greedy generation >= 3x the tokens/s of a batch-1 `model.generate` loop, with
   identical completions. Prompts: 2-shot plain prompts (`tasks.build_prompt`, exemplars
   = the first 2 starter math items, questions = the next --prompts items, default 16),
   max_new_tokens 64. Ours: `tasks.generate(..., batch_size=16)` (length-sorted,
   left-padded batches, KV cache, stops at the stop strings per row; a batch runs until
   its last row stops). Baseline: for each prompt alone (no padding),
   `model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=...,
   pad_token_id=..., eos_token_id=...)` with **the same stopping criterion** (the stop
   strings "\\n\\n" and "\\nQ:" in the generated text, `tasks._stopping_criteria`), the
   same eos ids and pad id, and the same blank GenerationConfig (pure greedy), so the
   baseline stops as early as ours does: the strongest fair batch-1 loop. Both count the
   generated tokens kept the same way (`tasks._kept`: up to eos, cut at the stops with
   `answers.cut`); tokens/s = kept tokens / wall time of the whole call (tokenization and
   decoding included on both sides). Completions are compared string by string; for
   the first differing pair the script reports where they part and the batch-1 model's
   top-2 logit margin at that token (a float32 near-tie that the padded batch's
   different matrix shapes can flip).

3. NLL evaluation <= 1.2x a bare forward over the same tokens.
   Ours: `tasks.nll_pass`; baseline: the very batches it forwards (`scoring.batches`:
   same tokenization, length grouping, right padding) through the full causal LM,
   `model(input_ids=..., attention_mask=..., use_cache=False)`, computing the logits of
   every position and nothing else (`_common.bare_forward(base=False)`). At batch size
   1 (the CPU default, the target) and batch size 8 (info: an --batch-size choice). As in
   scoring_overhead, the 64 texts are split into 8 chunks of 8 and each round runs every
   variant on one chunk, so ours and its baseline run seconds apart on the same texts;
   the ratio is the median of per-round ratios. An instrumented pass reports the time
   inside `tasks._row_nll` (the log-softmax over the 262k vocabulary and the gather).

Timing: variants interleaved (order rotated every round), medians, contended
measurements retried or dropped (_common.Quiet, here with up to 900 s of waiting for a
quiet machine instead of 240: the run makes ~150 timed calls). Model load excluded.

    .venv/bin/python bench/interventions.py [--quick] [--repeats 3] [--texts 64] [--chunk 8] [--prompts 16]
"""

from __future__ import annotations

import time

import _common
from _common import (QUIET, Bench, bare_forward, clean, drawn, interleave, load_model, median,
                     model_folder, paired_ratio, starter_texts, synchronize)

TARGET_APPLY = 0.05  # apply + undo / one 64-item NLL evaluation
TARGET_GENERATE = 3.0  # batched tokens/s / batch-1 loop tokens/s
TARGET_NLL = 1.2  # nll_pass / bare forward
SET_FRACTION = 0.0039  # a k = 0.01 math-only set: ~0.39% of each matrix


def random_plan(modules, spec: str, fraction: float, seed: int = 0):
    """A Plan changing a uniformly random `fraction` of every scored module's entries."""
    import numpy as np

    from mlarch.evaluation import interventions

    rng = np.random.default_rng(seed)
    changes = []
    for position, module in enumerate(modules):
        size = int(round(module.n_params * fraction))
        indices = np.sort(rng.choice(module.n_params, size, replace=False)).astype(np.int64)
        changes.append(interventions.ModuleChange(module.name, position, indices))
    return interventions.Plan(intervention=interventions.parse(spec), seed=1, changes=changes,
                              n_set=sum(len(c.indices) for c in changes))


def check_plan(modules, plan) -> dict:
    """Inside the block the planned entries hold 0 / old x factor; after it, every weight is bit-identical."""
    import torch

    from mlarch.evaluation import interventions

    before = [m.module.weight.detach().clone() for m in modules]
    wrong_inside = 0
    with interventions.applied(modules, plan):
        with torch.no_grad():
            for module, change, old in zip(modules, plan.changes, before):
                flat = torch.from_numpy(change.indices)
                out_in = (lambda w: w.t() if module.kind == "conv1d" else w)  # noqa: E731
                now = out_in(module.module.weight).contiguous().reshape(-1)[flat]
                was = out_in(old).contiguous().reshape(-1)[flat]
                want = torch.zeros_like(was) if plan.intervention.kind == "prune" else was * plan.intervention.factor
                wrong_inside += int((now != want).sum())
    changed_after = sum(int((m.module.weight.detach() != old).sum()) for m, old in zip(modules, before))
    identical = all(torch.equal(m.module.weight.detach(), old) for m, old in zip(modules, before))
    return {"entries_changed": plan.n_changed, "wrong_inside": wrong_inside, "entries_differing_after": changed_after,
            "bit_identical_after": identical}


def bad_of(contended: dict[str, list[int]], *names: str) -> set[int]:
    """Round indices in which any of the named variants was contended (as _common.bad_rounds,
    for an interleave that is not the last one)."""
    return {i for name in names for i in contended.get(name, [])}


def whole_passes(values: list[float], n_chunks: int, bad=()) -> list[float]:
    """Per-chunk times summed into passes over all texts: complete repeats in which no chunk
    was contended (all complete repeats if none is clean)."""
    starts = range(0, len(values) - n_chunks + 1, n_chunks)
    passes = [sum(values[i : i + n_chunks]) for i in starts if not set(range(i, i + n_chunks)) & set(bad)]
    return passes or [sum(values[i : i + n_chunks]) for i in starts]


def main() -> None:
    bench = Bench("interventions", __doc__, repeats=3, quick_repeats=1, device_args=True, extra_args=lambda p: (
        p.add_argument("--texts", type=int, default=None, help="NLL texts (default 64, --quick 8)"),
        p.add_argument("--chunk", type=int, default=None, help="texts per timed NLL round (default 8, --quick 4)"),
        p.add_argument("--prompts", type=int, default=None, help="generation prompts (default 16, --quick 4)"),
        p.add_argument("--max-new-tokens", type=int, default=None, help="default 64, --quick 16"),
        p.add_argument("--gen-batch-size", type=int, default=16, help="batch size of tasks.generate (default 16)"),
        p.add_argument("--set-fraction", type=float, default=SET_FRACTION,
                       help=f"share of each matrix's entries a plan changes (default {SET_FRACTION})"),
        p.add_argument("--inner", type=int, default=None, help="apply + undo per timed call (default 10, --quick 3)"),
        p.add_argument("--lang", default="en"),
        p.add_argument("--quiet-budget", type=float, default=None,
                       help="seconds of waiting for a quiet machine, all calls together (default 900; --quick 30)"),
    ))
    import torch
    from transformers import GenerationConfig

    from mlarch.evaluation import answers, interventions, tasks
    from mlarch.ingest import sources
    from mlarch.ingest.scoring import scored_modules

    quick = bench.quick
    n_texts = bench.args.texts or (8 if quick else 64)
    chunk = bench.args.chunk or (4 if quick else 8)
    n_prompts = bench.args.prompts or (4 if quick else 16)
    max_new = bench.args.max_new_tokens or (16 if quick else 64)
    inner = bench.args.inner or (3 if quick else 10)
    lang = bench.args.lang
    # ~150 timed calls of 0.5-5 s plus 6 generation calls of 10-40 s: more waiting than
    # the shared default (240 s) allows is needed to keep them clear of the other sessions
    QUIET.budget = bench.args.quiet_budget or (30.0 if quick else 900.0)

    folder = model_folder(bench)
    clock = time.perf_counter()
    loaded = load_model(folder, bench.args.device)
    bench.log(f"loaded {folder.name} in {time.perf_counter() - clock:.1f} s")
    model, tokenizer = loaded.model, loaded.tokenizer
    device = torch.device(bench.args.device)
    modules = scored_modules(model)
    vocab = model.get_input_embeddings().weight.shape[0]

    # --- 1. plans ---------------------------------------------------------------------
    clock = time.perf_counter()
    plans = {"prune": random_plan(modules, f"prune:{lang}@0.01", bench.args.set_fraction),
             "scale": random_plan(modules, f"scale:{lang}@0.01:0.5", bench.args.set_fraction)}
    n_params = sum(m.n_params for m in modules)
    bench.log(f"plans: {plans['prune'].n_changed:,} of {n_params:,} scored entries "
              f"({100 * plans['prune'].n_changed / n_params:.3f}%) in {len(modules)} modules, "
              f"built in {time.perf_counter() - clock:.1f} s")
    checks = {kind: check_plan(modules, plan) for kind, plan in plans.items()}
    bench.log(f"checks: {checks}")
    if not all(c["bit_identical_after"] and c["wrong_inside"] == 0 for c in checks.values()):
        raise SystemExit(f"intervention check failed: {checks}")

    def apply_undo(plan):
        """`inner` apply + undo; returns (seconds to enter, seconds to exit) of each."""
        splits = []
        for _ in range(inner):
            start = time.perf_counter()
            with interventions.applied(modules, plan):
                synchronize(device)
                entered = time.perf_counter()
            synchronize(device)
            splits.append((entered - start, time.perf_counter() - entered))
        return splits

    # --- 3. NLL texts and chunks ------------------------------------------------------
    pool = starter_texts(lang, "math")
    texts = drawn(pool, n_texts)
    size = max(1, min(chunk, n_texts))
    chunks = [texts[i : i + size] for i in range(0, n_texts, size)]

    def by_chunk(run):
        """A variant whose k-th call runs chunk k mod n: every round gives all variants one chunk."""
        calls = iter(range(10**9))
        return lambda: run(chunks[next(calls) % len(chunks)])

    def nll(bs):
        def run(some):
            out = tasks.nll_pass(model, tokenizer, some, batch_size=bs, max_length=512, device=device)
            synchronize(device)
            return sum(out.n_tokens)
        return run

    def bare(bs):
        return lambda some: bare_forward(model, tokenizer, some, base=False, batch_size=bs, max_length=512)

    # warm-up: first calls allocate and pick kernels
    short = texts[:2]
    for bs in (1, 8):
        tasks.nll_pass(model, tokenizer, short, batch_size=bs, max_length=512, device=device)
        bare_forward(model, tokenizer, short, base=False, batch_size=bs)
    apply_undo(plans["prune"])

    A_P, A_S = "apply+undo prune", "apply+undo scale"
    N1, B1, N8, B8 = "nll_pass bs1", "bare forward bs1", "nll_pass bs8", "bare forward bs8"
    variants = {
        A_P: lambda: apply_undo(plans["prune"]),
        A_S: lambda: apply_undo(plans["scale"]),
        N1: by_chunk(nll(1)), B1: by_chunk(bare(1)),
        N8: by_chunk(nll(8)), B8: by_chunk(bare(8)),
    }
    rounds = bench.repeats * len(chunks)
    bench.log(f"timing {len(variants)} variants x {rounds} rounds ({len(chunks)} chunks of <= {size} of {n_texts} "
              f"texts; apply + undo x {inner} per call)")
    times = interleave(variants, rounds, log=bench.log)
    contended_nll = {k: list(v) for k, v in _common.LAST_CONTENDED.items()}
    splits = {k: [s for call in _common.LAST_VALUES[k] for s in call] for k in (A_P, A_S)}

    # instrumented NLL passes: time inside _row_nll
    row_nll = tasks._row_nll
    inside = {"s": 0.0, "calls": 0}

    def timed_row_nll(*args, **kwargs):
        start = time.perf_counter()
        try:
            return row_nll(*args, **kwargs)
        finally:
            inside["s"] += time.perf_counter() - start
            inside["calls"] += 1

    instrumented = {}
    tasks._row_nll = timed_row_nll
    try:
        for bs in (1, 8):
            runs = []
            for _ in range(1 if quick else 3):
                inside.update(s=0.0, calls=0)
                seconds, others, _ = QUIET.measure(lambda: nll(bs)(chunks[0]), bench.log)
                runs.append({"share": inside["s"] / seconds, "pass_s": seconds, "row_nll_s": inside["s"],
                             "calls": inside["calls"], "others_cores": round(others, 2)})
            instrumented[bs] = sorted(runs, key=lambda r: r["share"])[len(runs) // 2] | {"runs": runs}
    finally:
        tasks._row_nll = row_nll

    # --- 2. generation ----------------------------------------------------------------
    pairs = sources.resolve("starter").load(lang, "math").pairs
    exemplars = pairs[:2]
    questions = [q for q, _ in pairs[2 : 2 + n_prompts]]
    prompts = [tasks.build_prompt(exemplars, q, chat=False) for q in questions]
    eos = tasks._eos_ids(model, tokenizer)
    pad = tasks._pad_id(tokenizer, vocab)
    gen_bs = bench.args.gen_batch_size

    def ours_generate():
        out = tasks.generate(model, tokenizer, prompts, batch_size=gen_bs, max_new_tokens=max_new, max_length=512,
                             device=device)
        synchronize(device)
        return {"completions": out.completions, "n_tokens": out.n_tokens}

    def loop_generate():
        completions, n_tokens, generated = [], [], []
        saved = model.generation_config
        model.generation_config = GenerationConfig()  # pure greedy, as tasks.generate
        try:
            for prompt in prompts:
                encoded = tokenizer(prompt, return_tensors="pt")
                width = encoded["input_ids"].shape[1]
                with torch.inference_mode():
                    out = model.generate(
                        input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device),
                        do_sample=False, max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos,
                        stopping_criteria=tasks._stopping_criteria(tokenizer, answers.STOPS, width))
                ids = out[0, width:].tolist()
                completion, kept = tasks._kept(tokenizer, ids, set(eos), answers.STOPS)
                completions.append(completion)
                n_tokens.append(kept)
                generated.append(ids)
        finally:
            model.generation_config = saved
        synchronize(device)
        return {"completions": completions, "n_tokens": n_tokens, "ids": generated}

    G, L = f"tasks.generate bs{gen_bs}", "model.generate batch-1 loop"
    ours_generate()  # warm-up (one prompt each would not warm the batched shapes)
    bench.log(f"timing generation: {len(prompts)} prompts, max_new_tokens {max_new}, {bench.repeats} rounds")
    gen_times = interleave({G: ours_generate, L: loop_generate}, bench.repeats, log=bench.log)
    contended_gen = {k: list(v) for k, v in _common.LAST_CONTENDED.items()}
    gen_values = {k: list(v) for k, v in _common.LAST_VALUES.items()}

    # --- rows -------------------------------------------------------------------------
    # 1. apply + undo vs one 64-item NLL evaluation (bs 1: the sum of the chunks of one repeat)
    nll_passes = whole_passes(times[N1], len(chunks), contended_nll.get(N1, []))
    nll_eval = median(nll_passes)
    for name, kind in ((A_P, "prune"), (A_S, "scale")):
        per_op = [t / inner for t in clean(times[name], contended_nll.get(name, []))]
        ours = median(per_op)
        enter = median([s[0] for s in splits[name]])
        leave = median([s[1] for s in splits[name]])
        bench.row(f"apply + undo ({kind}) / NLL evaluation of {n_texts} items, bs1 (target)" if kind == "prune"
                  else f"apply + undo ({kind} x0.5) / NLL evaluation of {n_texts} items, bs1 (target)",
                  ours, nll_eval, target=f"<= {TARGET_APPLY:.2f}x", passed=ours / nll_eval <= TARGET_APPLY,
                  samples_ours=per_op, samples_baseline=nll_passes,
                  note=f"{plans[kind].n_changed:,} entries in {len(modules)} modules; apply {1e3 * enter:.1f} ms + "
                       f"undo {1e3 * leave:.1f} ms (medians of {len(splits[name])}); NLL evaluation = sum of "
                       f"{len(chunks)} chunk passes")

    # 2. generation
    seconds = {k: median(clean(v, contended_gen.get(k, []))) for k, v in gen_times.items()}
    ours_out, loop_out = gen_values[G][-1], gen_values[L][-1]
    tokens_ours, tokens_loop = sum(ours_out["n_tokens"]), sum(loop_out["n_tokens"])
    tps_ours, tps_loop = tokens_ours / seconds[G], tokens_loop / seconds[L]
    per_round = [(sum(o["n_tokens"]) / to) / (sum(b["n_tokens"]) / tb)
                 for o, b, to, tb in zip(gen_values[G], gen_values[L], gen_times[G], gen_times[L])]
    bad = bad_of(contended_gen, G, L)
    kept_rounds = [r for i, r in enumerate(per_round) if i not in bad] or per_round
    speedup = median(kept_rounds)
    same = [a == b for a, b in zip(ours_out["completions"], loop_out["completions"])]
    stable = {k: all(v["completions"] == vals[0]["completions"] for v in vals) for k, vals in gen_values.items()}
    bench.row(f"batched generation tokens/s / batch-1 loop (target), {len(prompts)} prompts x <= {max_new} tokens",
              tps_ours, tps_loop, ratio=speedup, target=f">= {TARGET_GENERATE:.0f}x", passed=speedup >= TARGET_GENERATE,
              unit="tok/s", samples_ours=gen_times[G], samples_baseline=gen_times[L],
              note=f"median of per-round ratios; seconds: ours {seconds[G]:.2f}, loop {seconds[L]:.2f}; "
                   f"kept tokens: ours {tokens_ours}, loop {tokens_loop}")
    bench.row("identical completions (batched vs batch-1 loop)", float(sum(same)), float(len(same)),
              target="all identical", passed=all(same), unit="",
              note=f"{sum(same)} of {len(same)} identical; each side the same in every round: {stable}")
    first_diff = None
    if not all(same):
        i = same.index(False)
        first_diff = describe_difference(model, tokenizer, prompts[i], loop_out["ids"][i], ours_out["completions"][i],
                                         loop_out["completions"][i], device)
        first_diff["prompt_index"] = i
        bench.log(f"first differing completion (prompt {i}): {first_diff}")

    # 3. NLL vs bare forward
    for bs, n, b in ((1, N1, B1), (8, N8, B8)):
        bad = bad_of(contended_nll, n, b)
        ratio = paired_ratio(times[n], times[b], bad)
        ours_p = whole_passes(times[n], len(chunks), contended_nll.get(n, []))
        base_p = whole_passes(times[b], len(chunks), contended_nll.get(b, []))
        bench.row(f"nll_pass / bare full-LM forward, bs{bs}" + (" (target)" if bs == 1 else " (info)"),
                  median(ours_p), median(base_p), ratio=ratio, target=f"<= {TARGET_NLL:.1f}x" if bs == 1 else "info",
                  passed=ratio <= TARGET_NLL if bs == 1 else None, samples_ours=times[n], samples_baseline=times[b],
                  note=f"median of per-round ratios over {len(times[n]) - len(bad)} uncontended rounds of {size} texts; "
                       f"times are whole passes over {n_texts} texts")
        share = instrumented[bs]["share"]
        bench.row(f"time inside _row_nll, share of an nll_pass, bs{bs}", instrumented[bs]["row_nll_s"],
                  instrumented[bs]["pass_s"], ratio=share, target="info",
                  note=f"one chunk of {len(chunks[0])} texts; pass / (pass - _row_nll) = {1 / (1 - share):.3f}x")

    bench.finish(details={
        "model": folder.name, "n_scored_modules": len(modules), "n_scored_params": n_params,
        "set_fraction": bench.args.set_fraction, "n_changed": plans["prune"].n_changed, "inner": inner,
        "checks": checks, "n_texts": n_texts, "chunk": size,
        "apply_undo_splits_s": splits, "instrumented_row_nll": instrumented,
        "generation": {"prompts": len(prompts), "shots": len(exemplars), "max_new_tokens": max_new,
                       "batch_size": gen_bs, "eos": eos, "pad": pad, "stops": list(answers.STOPS),
                       "seconds": seconds, "tokens": {"ours": tokens_ours, "loop": tokens_loop},
                       "n_tokens": {"ours": ours_out["n_tokens"], "loop": loop_out["n_tokens"]},
                       "identical": same, "stable_across_rounds": stable, "first_difference": first_diff,
                       "completions_ours": ours_out["completions"], "completions_loop": loop_out["completions"],
                       "per_round_speedup": per_round},
        "times": times, "generation_times": gen_times,
        "contended_indices": {"nll": contended_nll, "generation": contended_gen},
    })


def describe_difference(model, tokenizer, prompt: str, loop_ids: list[int], ours: str, loop: str, device) -> dict:
    """Where two completions part, and the batch-1 model's top-2 logit margin at the loop's token there."""
    import torch

    at = next((i for i, (a, b) in enumerate(zip(ours, loop)) if a != b), min(len(ours), len(loop)))
    # the first generated token whose decoded prefix passes the first differing character
    step = next((j for j in range(1, len(loop_ids) + 1)
                 if len(tokenizer.decode(loop_ids[:j], skip_special_tokens=True)) > at), len(loop_ids)) - 1
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0].tolist()
    ids = torch.tensor([prompt_ids + loop_ids[:step]], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    top = torch.topk(logits, 2)
    first, second = top.indices.tolist()
    return {"char": at, "ours": ours, "loop": loop, "token_step": step,
            "loop_token": tokenizer.decode([loop_ids[step]]) if step < len(loop_ids) else None,
            "top2_batch1": [tokenizer.decode([first]), tokenizer.decode([second])],
            "top2_logits_batch1": [float(v) for v in top.values.tolist()],
            "top2_margin_batch1": float(top.values[0] - top.values[1])}


if __name__ == "__main__":
    main()
