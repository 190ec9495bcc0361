"""Ours vs the per-sample full-matrix method (the original MathNeuro code's cost model).

Reference: batch size 1; after every sample, for every scored module, add |W| * norm_s
into a full-size float32 score matrix (`acc += absW * norm_s`, |W| precomputed once),
then top-k per matrix. The tuned reference does the same accumulation in place with
`acc.addcmul_(absW, norm_s)` (no temporary, ~40% faster): the stronger baseline, so it
is the headline and the one the >= 50x target is judged against; the plain one is
reported beside it.
Both references select with mlarch's own `level_codes` (the same tie rule), over modules
in the same thread pool as mlarch (`mlarch.parallel.pool`), so any difference in the
selected sets comes from the scores, and any difference in time from the score work.

Ours: the hooks add each sample's norm vector into a float64 accumulator (length `in`);
after the pass, `selection.model_levels`: score = |W| * norms once per module in float32
and `level_codes` at the 7 k values, modules over a thread pool (what ingest runs).

(a) Score work alone - everything except the forward passes - at 16, 64, 256 (the
    target's size) and 500 samples (the paper's, and the CLI's default). Per-sample norm vectors are captured once per distinct starter item
    (English math, 24 items; ingest draws samples with replacement from them), then both
    methods are replayed from them. The norm computation inside the hooks (shared by both
    methods) is part of the forward-pass cost measured by scoring_overhead.py. Model:
    Gemma-3-270M (100 M scored parameters) at every size.
(b) End to end on 16 samples: `run_pass` + selection vs a reference pass with its own
    hooks (per-sample `vector_norm` over tokens) + full-matrix accumulation + selection.
    Ours runs as ingest does (batch 1 on CPU, 16 on CUDA); the reference is per sample
    (the same token ids: both take their batches from `scoring.batches`).

`--device cuda` runs the passes and the reference's accumulation on the GPU (selection
stays on the CPU, as in ingest); `--model smollm-random` needs no download.

Selected sets: level codes of ours and of the references are compared as masks at each
of the 7 k values for every module. The script ends with one `verdict:` line per
target size saying whether the target was met against the tuned reference.

    .venv/bin/python bench/vs_full_matrix.py [--quick] [--sizes 16,64,256,500] [--e2e-samples 16]
"""

from __future__ import annotations

import time

import numpy as np

import _common
from _common import (QUIET, Bench, bad_rounds, clean_times, drawn, interleave, load_model, median, model_folder,
                     paired_ratio, starter_texts)

TARGET = 50.0
TARGET_SAMPLES = 256  # where the >= 50x target is set
PAPER_SAMPLES = 500  # MathNeuro's (and the CLI's default) samples per run


def main() -> None:
    bench = Bench("vs_full_matrix", __doc__, repeats=3, quick_repeats=1, device_args=True, extra_args=lambda p: (
        p.add_argument("--sizes", default=None, help="sample counts for (a) (default 16,64,256,500; --quick 4,16)"),
        p.add_argument("--e2e-samples", type=int, default=None, help="samples for (b) (default 16, --quick 3)"),
        p.add_argument("--skip-e2e", action="store_true"),
    ))
    import torch

    from mlarch.ingest.pipeline import PAPER_KS
    from mlarch.ingest.scoring import batches, output_head, run_pass, scored_modules
    from mlarch import parallel
    from mlarch.selection import level_codes, model_levels, scores
    from mlarch.store.spans import layout

    quick = bench.quick
    if not quick:  # references of 10-40 s per call: the default 240 s of waiting ran out under load
        QUIET.budget = 600.0
    sizes = [int(x) for x in (bench.args.sizes or ("4,16" if quick else "16,64,256,500")).split(",")]
    e2e_n = bench.args.e2e_samples or (3 if quick else 16)
    ks = list(PAPER_KS)
    device = torch.device(bench.args.device)  # passes and the reference's accumulation run here
    folder = model_folder(bench)
    clock = time.perf_counter()
    loaded = load_model(folder, bench.args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    modules = scored_modules(model)
    names = [m.name for m in modules]
    mags = {m.name: m.magnitudes() for m in modules}  # per model, once: not part of either timing
    abs_w = {name: torch.from_numpy(mags[name]).to(device) for name in names}
    n_params = sum(m.n_params for m in modules)
    spans = layout([(m.name, m.layer, m.n_rows, m.n_cols) for m in modules])
    mags_flat = np.concatenate([mags[name].reshape(-1) for name in names])

    def by_module(levels):
        return {span.module: levels[span.params].reshape(span.n_rows, span.n_cols) for span in spans}

    def select_each(matrices):
        """The references' selection: level_codes per module in mlarch's pool, largest first."""
        order = sorted(names, key=lambda name: -matrices[name].size)
        with parallel.pool() as pool:
            return dict(zip(order, pool.map(lambda name: level_codes(matrices[name], ks), order)))
    bench.log(f"loaded {folder.name}: {len(modules)} scored modules, {n_params / 1e6:.1f} M parameters "
              f"({time.perf_counter() - clock:.1f} s)")

    items = starter_texts("en", "math")[: (6 if quick else 24)]
    clock = time.perf_counter()
    item_norms = []  # per distinct item: {module: float32 norm vector of that one sample}
    for text in items:
        item_norms.append(run_pass(model, tokenizer, modules, [text], batch_size=1, max_length=512, device=device).norms)
    item_norms_t = [{k: torch.from_numpy(v).to(device) for k, v in d.items()} for d in item_norms]
    bench.log(f"captured per-sample norms of {len(items)} items in {time.perf_counter() - clock:.1f} s")

    def ours(idx):
        sums = {name: np.zeros(mags[name].shape[1], dtype=np.float64) for name in names}
        for s in idx:  # what each hook call adds after computing the sample's norms
            norms_s = item_norms[s]
            for name in names:
                sums[name] += norms_s[name]
        norms = np.concatenate([sums[name] for name in names]).astype(np.float32)
        return by_module(model_levels(spans, mags_flat, norms, ks))

    def reference(idx, tuned=False):
        acc = {name: torch.zeros(mags[name].shape, dtype=torch.float32, device=device) for name in names}
        for s in idx:
            norms_s = item_norms_t[s]
            for name in names:
                if tuned:
                    acc[name].addcmul_(abs_w[name], norms_s[name][None, :])
                else:
                    acc[name] += abs_w[name] * norms_s[name][None, :]
        return select_each({name: acc[name].cpu().numpy() for name in names})

    def explain(report, idx, tuned):
        """For each differing mask: both methods' scores of the swapped entries and the k threshold."""
        from mlarch.selection import top_count

        gaps, consistent = [], []
        cache = {}  # module -> (float64 norm sums, the reference's float32 scores)
        for w in report["largest_differences"]:
            name, j = w["module"], w["j"]
            if name not in cache:
                sums = np.zeros(mags[name].shape[1], dtype=np.float64)
                acc = torch.zeros(mags[name].shape, dtype=torch.float32, device=device)
                for s_ in idx:
                    sums += item_norms[s_][name]
                    if tuned:
                        acc.addcmul_(abs_w[name], item_norms_t[s_][name][None, :])
                    else:
                        acc += abs_w[name] * item_norms_t[s_][name][None, :]
                cache[name] = (sums, acc.cpu().numpy().reshape(-1))
            sums, ref_scores = cache[name]
            ours_scores = scores(mags[name], sums.astype(np.float32)).reshape(-1)
            exact = (mags[name].astype(np.float64) * sums[None, :]).reshape(-1)  # float64 truth
            ours_only = [i for i in w["flat_indices"] if ours_levels_of(name, i, j)]
            ref_only = [i for i in w["flat_indices"] if not ours_levels_of(name, i, j)]
            if ours_only and ref_only:
                consistent.append(bool(min(exact[ours_only]) >= max(exact[ref_only])))
            count = top_count(ours_scores.size, ks[j])
            thr_o = np.partition(ours_scores, ours_scores.size - count)[ours_scores.size - count]
            thr_r = np.partition(ref_scores, ref_scores.size - count)[ref_scores.size - count]
            w["entries"] = [{"flat_index": i, "ours": float(ours_scores[i]), "reference": float(ref_scores[i]),
                             "rel_gap_to_threshold_ours": float(abs(ours_scores[i] - thr_o) / thr_o),
                             "rel_diff_ours_vs_reference": float(abs(ours_scores[i] - ref_scores[i]) / ref_scores[i])}
                            for i in w["flat_indices"]]
            w["threshold_ours"], w["threshold_reference"] = float(thr_o), float(thr_r)
            gaps += [e["rel_gap_to_threshold_ours"] for e in w["entries"]]
        report["max_rel_gap_of_differing_entries"] = max(gaps, default=0.0)
        report["ours_consistent_with_float64_order"] = f"{sum(consistent)} of {len(consistent)} differing masks"
        report["explained_masks"] = len(report["largest_differences"])
        report["unexplained_masks"] = report["masks"] - report["identical_masks"] - len(report["largest_differences"])
    current_ours = [None]

    def ours_levels_of(name, flat_index, j):
        level = int(current_ours[0][name].reshape(-1)[flat_index])
        return level != 0 and level <= j + 1

    sweep, agreement = {}, {}
    for n in sizes:
        idx = np.random.default_rng(1).integers(0, len(items), size=n)
        ref_repeats = max(1, round(bench.repeats * min(1.0, (16 / n) ** 0.5))) if not quick else 1
        bench.log(f"(a) {n} samples: {ref_repeats} round(s) of ours / reference / tuned reference")
        times = interleave({"ours": lambda: ours(idx), "reference": lambda: reference(idx),
                            "tuned reference": lambda: reference(idx, tuned=True)}, ref_repeats, log=bench.log)
        kept = clean_times(times)
        values = dict(_common.LAST_VALUES)
        extra = []
        for _ in range(max(0, 9 - len(kept["ours"])) if not quick else 0):  # ours is cheap: 9 samples (it is noisy)
            seconds, others, _ = QUIET.measure(lambda: ours(idx), bench.log)
            if others < _common.CONTENDED_CORES:
                extra.append(seconds)
        # a variant whose every interleaved measurement was contended keeps them (nothing better),
        # and says so in its row and the verdict
        dirty = {name for name in times if len(_common.LAST_CONTENDED.get(name, [])) == len(times[name])}
        if "ours" in dirty and extra:
            dirty.discard("ours")
            ours_t = extra
        else:
            ours_t = kept["ours"] + extra
        sweep[n] = {"ours": ours_t, "reference": kept["reference"], "tuned reference": kept["tuned reference"],
                    "all": times, "contended": dict(_common.LAST_CONTENDED), "only_contended": sorted(dirty)}
        agreement[n] = {"reference": compare_levels(values["ours"][-1], values["reference"][-1], ks),
                        "tuned reference": compare_levels(values["ours"][-1], values["tuned reference"][-1], ks)}
        current_ours[0] = values["ours"][-1]
        explain(agreement[n]["tuned reference"], idx, tuned=True)
        bench.log(f"  ours {median(ours_t):.2f} s, reference {median(kept['reference']):.2f} s, "
                  f"tuned {median(kept['tuned reference']):.2f} s; identical masks "
                  f"{agreement[n]['reference']['fraction_identical_masks']:.4f} / "
                  f"{agreement[n]['tuned reference']['fraction_identical_masks']:.4f}")
        del values

    verdicts = []
    for n in sizes:
        o, r, t = median(sweep[n]["ours"]), median(sweep[n]["reference"]), median(sweep[n]["tuned reference"])
        # the headline is the stronger (in-place addcmul_) reference; the target is set at TARGET_SAMPLES
        is_target = n == TARGET_SAMPLES
        dirty = sweep[n]["only_contended"]
        warn = f"UNRELIABLE: {', '.join(dirty)} measured only while other processes used the cores" if dirty else ""
        first = ("ratio = speed-up (reference time / our time); reference: acc.addcmul_(absW, norm_s) per sample"
                 if n == sizes[0] else "")
        bench.row(f"(a) score work, {n} samples: tuned in-place reference / ours", o, t, ratio=t / o,
                  target=f">= {TARGET:.0f}x" if is_target else ("info (paper's size)" if n == PAPER_SAMPLES else "info"),
                  passed=(t / o >= TARGET) if is_target else None, note="; ".join(x for x in (first, warn) if x))
        bench.row(f"(a) score work, {n} samples: plain reference (acc += absW * norm_s) / ours", o, r, ratio=r / o,
                  target="info", note=warn)
        if is_target or n == PAPER_SAMPLES:
            verdicts.append(f"{n} samples: {t / o:.1f}x faster than the tuned in-place reference "
                            + (f"(target >= {TARGET:.0f}x: {'met' if t / o >= TARGET else 'MISSED'})" if is_target
                               else "(no target at this size)") + f"; {r / o:.1f}x vs the plain reference"
                            + (f" - {warn}" if warn else ""))
    lo, hi = min(sizes), max(sizes)
    slope = {key: (median(sweep[hi][key]) - median(sweep[lo][key])) / (hi - lo)
             for key in ("ours", "reference", "tuned reference")}
    bench.row("(a) marginal cost per sample: tuned reference / ours", slope["ours"], slope["tuned reference"],
              ratio=slope["tuned reference"] / slope["ours"] if slope["ours"] > 0 else float("inf"), target="info",
              unit="s/sample", note=f"ours {1e3 * slope['ours']:.2f} ms/sample (replaying the hooks' float64 adds), tuned reference "
                                    f"{1e3 * slope['tuned reference']:.0f} ms/sample, plain reference "
                                    f"{1e3 * slope['reference']:.0f} ms/sample")
    headline = "tuned reference"
    frac = min(a[headline]["fraction_identical_masks"] for a in agreement.values())
    frac_entries = min(a[headline]["fraction_identical_entries"] for a in agreement.values())
    gap = max(a[headline].get("max_rel_gap_of_differing_entries", 0.0) for a in agreement.values())
    unexplained = sum(max(0, a[headline].get("unexplained_masks", 0)) for a in agreement.values())
    consistent = "; ".join(f"{n}: {a[headline].get('ours_consistent_with_float64_order')}" for n, a in agreement.items())
    plain_frac = min(a["reference"]["fraction_identical_masks"] for a in agreement.values())
    bench.row("selected sets identical to the tuned reference (fraction of module x k masks)", frac, 1.0, ratio=frac,
              target="~1.0", unit="", note=f"min over sample counts (plain reference: {plain_frac:.4f}); see "
                                           "details.agreement for the differing parameters")
    worst_n = min(agreement, key=lambda n: agreement[n][headline]["fraction_identical_entries"])
    w = agreement[worst_n][headline]
    bench.row("selected entries identical to the tuned reference (fraction)", frac_entries, 1.0, ratio=frac_entries,
              target="~1.0", unit="", note=f"{w['differing_params']} of {w['selected_params']} selected "
                                           f"(parameter, k) entries differ at {worst_n} samples")
    bench.row("largest relative score gap to the k threshold among differing entries", gap, None, unit="",
              target="< 1e-5 (float near-tie)", passed=gap < 1e-5 and unexplained == 0,
              note=f"differences are threshold swaps within float32 rounding; ours agrees with the float64 order in: "
                   f"{consistent}")

    e2e = {}
    if not bench.args.skip_e2e:
        texts = drawn(starter_texts("en", "math"), e2e_n, seed=1)
        head, _ = output_head(model)
        e2e_batch = 16 if device.type == "cuda" else 1  # ours as ingest runs it; the reference is per sample

        class Stop(Exception):
            pass

        def ours_e2e():
            result = run_pass(model, tokenizer, modules, texts, batch_size=e2e_batch, max_length=512, device=device)
            norms = np.concatenate([result.norms[name] for name in names])
            return by_module(model_levels(spans, mags_flat, norms, ks))

        def reference_e2e(tuned=False):
            acc = {name: torch.zeros(mags[name].shape, dtype=torch.float32, device=device) for name in names}
            current = {}
            handles = []

            def hook_for(name):
                def hook(module, args):
                    current[name] = torch.linalg.vector_norm(args[0][0].float(), dim=0)  # (tokens, in) -> in
                return hook

            def stop(module, args):
                raise Stop

            for m in modules:
                handles.append(m.module.register_forward_pre_hook(hook_for(m.name)))
            if head is not None and all(m.module is not head for m in modules):
                handles.append(head.register_forward_pre_hook(stop))
            try:
                vocab = model.get_input_embeddings().weight.shape[0]
                inputs, _ = batches(tokenizer, texts, batch_size=1, max_length=512, vocab=vocab)
                with torch.inference_mode():
                    for batch in inputs:  # batch 1: no padding, so the hooks' norms cover the sample's tokens
                        x = batch.input_ids.to(device)
                        try:
                            model(input_ids=x, attention_mask=batch.attention.to(device), use_cache=False)
                        except Stop:
                            pass
                        for name in names:
                            if tuned:
                                acc[name].addcmul_(abs_w[name], current[name][None, :])
                            else:
                                acc[name] += abs_w[name] * current[name][None, :]
            finally:
                for h in handles:
                    h.remove()
            return select_each({name: acc[name].cpu().numpy() for name in names})

        ours_e2e()  # warm-up (short passes would not warm the same shapes)
        bench.log(f"(b) end to end on {e2e_n} samples, {bench.repeats} rounds")
        times = interleave({"ours": ours_e2e, "reference": reference_e2e,
                            "tuned reference": lambda: reference_e2e(tuned=True)}, bench.repeats, log=bench.log)
        kept = clean_times(times)
        values = dict(_common.LAST_VALUES)
        e2e = {"samples": e2e_n, "all": times, "contended": dict(_common.LAST_CONTENDED),
               "agreement": {"reference": compare_levels(values["ours"][-1], values["reference"][-1], ks)}}
        bench.row(f"(b) end to end, {e2e_n} samples: tuned in-place reference / ours", median(kept["ours"]),
                  median(kept["tuned reference"]),
                  ratio=paired_ratio(times["tuned reference"], times["ours"], bad_rounds("tuned reference", "ours")),
                  target="report", note="forward passes included; model load excluded")
        bench.row(f"(b) end to end, {e2e_n} samples: plain reference / ours", median(kept["ours"]),
                  median(kept["reference"]),
                  ratio=paired_ratio(times["reference"], times["ours"], bad_rounds("reference", "ours")),
                  target="report")
        a = e2e["agreement"]["reference"]
        bench.row("(b) selected sets identical (reference pass's own norms)", a["fraction_identical_masks"], 1.0,
                  ratio=a["fraction_identical_masks"], target="~1.0", unit="",
                  note=f"{a['differing_params']} of {a['selected_params']} selected parameter-k entries differ")

    bench.finish(details={
        "verdict": verdicts,
        "model": folder.name, "n_scored_modules": len(modules), "n_scored_params": n_params, "k_values": ks,
        "distinct_items": len(items), "sizes": sizes,
        "sweep": {str(n): v for n, v in sweep.items()}, "slope_s_per_sample": slope,
        "agreement": {str(n): v for n, v in agreement.items()}, "end_to_end": e2e,
        "reference_definition": "acc += absW * norm_s per sample per module (float32, |W| precomputed); "
                                "tuned: acc.addcmul_(absW, norm_s); selection: level_codes in mlarch's thread pool",
    })
    for line in verdicts:  # said plainly, last, so a missed target is not lost in the table
        print(f"verdict: {line}")


def compare_levels(ours: dict, ref: dict, ks) -> dict:
    """Mask agreement at every k for every module, and what the differing entries look like."""
    from mlarch.selection import in_top

    masks = identical = differing = selected = 0
    worst = []
    for name, a in ours.items():
        b = ref[name]
        for j in range(len(ks)):
            ma, mb = in_top(a, j), in_top(b, j)
            masks += 1
            selected += int(ma.sum())
            diff = int(np.count_nonzero(ma != mb))
            if diff == 0:
                identical += 1
            else:
                differing += diff
                worst.append({"module": name, "k": ks[j], "j": j, "params_differing": diff, "selected": int(ma.sum()),
                              "flat_indices": np.flatnonzero((ma != mb).reshape(-1))[:6].tolist()})
    worst.sort(key=lambda w: -w["params_differing"])
    return {"masks": masks, "identical_masks": identical, "fraction_identical_masks": identical / masks,
            "differing_params": differing, "selected_params": selected,
            "fraction_identical_entries": 1 - differing / max(1, selected), "largest_differences": worst[:40]}


if __name__ == "__main__":
    main()
