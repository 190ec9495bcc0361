"""Determinism: how many selected parameters move when only the float summation order changes.

The same ingest (model, texts, seed, k values) is run under several settings that change
nothing but the order of float32 sums in the forward pass: torch's thread count (1 or 2)
and the batch size (1, or 4: padded batches of length-sorted samples). Each setting runs
`run_pass` over the texts ingest draws (`default_rng(seed).integers`, the demo's 24
samples per language and role by default) and then `selection.model_levels` on the
concatenated |W| and norms, exactly as ingest does. The reference setting (2 threads,
batch 1: the CPU default the README's demo ran with) runs twice in this process, first and
last, and once more in a fresh process (new allocations, as a second `mlarch ingest` has),
to show whether an unchanged setting reproduces its selection bit for bit.

Reported against the reference, per setting:
  * norms: how many of the per-column activation-norm sums differ, and by how much
    (relative; float32 rounding is ~6e-8);
  * per k, for every run: parameters in the reference's top-k set but not in this
    setting's (each such entry is swapped for another: the set sizes are exact);
  * per k, for every language: the math-only set's size (the demo's `n_selected`) and how
    many parameters' math-only membership differs.
Selection itself is deterministic (|W| * norms per module, then an exact top-k with ties
broken by index), so every difference comes from the norms.

    .venv/bin/python bench/determinism.py [--quick] [--langs en,hi] [--samples 24] [--batch 4]

MKL's conditional numerical reproducibility mode is read from the environment at MKL's
first call (set later, it has no effect), so it is measured by running the script under it:

    MKL_CBWR=AUTO,STRICT .venv/bin/python bench/determinism.py --tag mkl-strict
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import MODELS, Bench, drawn, load_model, starter_texts

REFERENCE = (2, 1)  # (torch threads, batch size)
ROLES = ("math", "control")


def prepare(model_name: str, langs: list[str], samples: int, seed: int):
    """(model, tokenizer, scored modules, spans, {(lang, role): drawn texts}) as ingest has them."""
    from mlarch.ingest.scoring import scored_modules
    from mlarch.store.spans import layout

    loaded = load_model(MODELS[model_name]())
    modules = scored_modules(loaded.model)
    spans = layout([(m.name, m.layer, m.n_rows, m.n_cols) for m in modules])
    texts = {(lang, role): drawn(starter_texts(lang, role), samples, seed=seed) for lang in langs for role in ROLES}
    return loaded.model, loaded.tokenizer, modules, spans, texts


def pass_norms(model, tokenizer, modules, spans, texts, threads: int, batch: int) -> tuple[dict, float]:
    """({(lang, role): concatenated float32 norms as ingest stores them}, seconds in the passes)."""
    import torch

    from mlarch.ingest.scoring import run_pass
    from mlarch.store.spans import total_norms

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    norms, seconds = {}, 0.0
    try:
        for key, some in texts.items():
            result = run_pass(model, tokenizer, modules, some, batch_size=batch, max_length=512,
                              device=torch.device("cpu"))
            seconds += result.seconds
            flat = np.empty(total_norms(spans), dtype=np.float32)
            for span in spans:
                flat[span.norms] = result.norms[span.module]
            norms[key] = flat
    finally:
        torch.set_num_threads(before)
    return norms, seconds


def child(out: str, model_name: str, langs: str, samples: str, seed: str) -> None:
    """A fresh process: the reference setting's norms, saved to `out` (.npz)."""
    setup = prepare(model_name, langs.split(","), int(samples), int(seed))
    norms, seconds = pass_norms(*setup, *REFERENCE)
    np.savez(out, seconds=seconds, **{"/".join(key): value for key, value in norms.items()})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    bench = Bench("determinism", __doc__, repeats=1, quick_repeats=1, extra_args=lambda p: (
        p.add_argument("--model", default="gemma", choices=sorted(MODELS),
                       help="gemma: the demo's Gemma-3-270M (default); smollm-random: no download"),
        p.add_argument("--langs", default=None, help="starter languages (default en,hi; --quick en)"),
        p.add_argument("--samples", type=int, default=None, help="samples per language and role (default 24, "
                                                                 "--quick 6)"),
        p.add_argument("--batch", type=int, default=4, help="the batch size compared with batch 1 (default 4)"),
        p.add_argument("--seed", type=int, default=1),
    ))
    from mlarch.ingest.pipeline import PAPER_KS
    from mlarch.selection import in_top, math_only, model_levels, top_count

    args = bench.args
    langs = (args.langs or ("en" if bench.quick else "en,hi")).split(",")
    samples = args.samples or (6 if bench.quick else 24)
    ks = list(PAPER_KS)
    setup = prepare(args.model, langs, samples, args.seed)
    model, _, modules, spans, texts = setup
    magnitudes = np.concatenate([m.magnitudes().reshape(-1) for m in modules])
    n_params = magnitudes.size
    counts = {k: sum(top_count(s.n_params, k) for s in spans) for k in ks}  # each run's top-k set size
    model_name = Path(getattr(model.config, "_name_or_path", "") or args.model).name
    mkl_cbwr = os.environ.get("MKL_CBWR")  # MKL's reproducibility mode (read when MKL starts)
    bench.log(f"{args.model}: {len(modules)} scored modules, {n_params / 1e6:.1f} M parameters; "
              f"{', '.join(langs)} x math/control, {samples} samples each, seed {args.seed}; "
              f"MKL_CBWR={mkl_cbwr or '(unset)'}")

    def fresh_process() -> tuple[dict, float]:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "norms.npz")
            done = subprocess.run([sys.executable, __file__, "--child", out, args.model, ",".join(langs),
                                   str(samples), str(args.seed)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"fresh process failed: {done.stderr[-2000:]}")
            with np.load(out) as saved:
                return {tuple(key.split("/")): saved[key] for key in saved.files if key != "seconds"}, \
                    float(saved["seconds"])

    def run(threads: int, batch: int, fresh: bool = False) -> tuple[dict, dict, float]:
        """(norms per run, levels per run, seconds in the passes) under one setting."""
        norms, seconds = fresh_process() if fresh else pass_norms(*setup, threads, batch)
        levels = {key: model_levels(spans, magnitudes, flat, ks) for key, flat in norms.items()}
        return norms, levels, seconds

    def compare(ref, other) -> dict:
        (ref_norms, ref_levels, _), (norms, levels, _) = ref, other
        out = {"norms": {}, "swapped": {}, "math_only": {}}
        for key in ref_norms:
            a, b = ref_norms[key].astype(np.float64), norms[key].astype(np.float64)
            rel = np.abs(a - b) / np.maximum(np.abs(a), np.finfo(np.float32).tiny)
            out["norms"]["/".join(key)] = {"differing": int(np.count_nonzero(a != b)), "of": int(a.size),
                                           "max_rel": float(rel.max()), "median_rel_of_differing":
                                           float(np.median(rel[a != b])) if np.any(a != b) else 0.0}
        for j, k in enumerate(ks):
            out["swapped"][k] = {"/".join(key): int(np.count_nonzero(in_top(ref_levels[key], j)
                                                                     & ~in_top(levels[key], j)))
                                 for key in ref_levels}
            out["math_only"][k] = {}
            for lang in langs:
                m0 = math_only(ref_levels[(lang, "math")], ref_levels[(lang, "control")], j)
                m1 = math_only(levels[(lang, "math")], levels[(lang, "control")], j)
                out["math_only"][k][lang] = {"size_reference": int(m0.sum()), "size": int(m1.sum()),
                                             "membership_differs": int(np.count_nonzero(m0 != m1))}
        return out

    def label(threads, batch):
        return f"{threads} thread{'s' if threads > 1 else ''}, batch {batch}"

    ref_name = label(*REFERENCE)
    settings = [(ref_name, REFERENCE, False), (f"{ref_name}, fresh process", REFERENCE, True),
                (label(1, 1), (1, 1), False), (label(REFERENCE[0], args.batch), (REFERENCE[0], args.batch), False),
                (label(1, args.batch), (1, args.batch), False), (f"{ref_name} (again)", REFERENCE, False)]
    results, seconds = {}, {}
    reference = None
    for name, (threads, batch), fresh in settings:
        clock = time.perf_counter()
        outcome = run(threads, batch, fresh)
        seconds[name] = outcome[2]
        bench.log(f"{name}: passes {outcome[2]:.1f} s, total {time.perf_counter() - clock:.1f} s")
        if reference is None:
            reference = outcome
            continue
        results[name] = compare(reference, outcome)
        del outcome

    print(f"\nagainst {ref_name}: parameters swapped in/out of a run's top-k set (worst run), "
          f"and the largest change of a language's math-only set size")
    header = "k        top-k size  " + "  ".join(f"{name[:22]:>22}" for name in results)
    print(header)
    for k in ks:
        cells = []
        for name, r in results.items():
            swapped = max(r["swapped"][k].values())
            size = max(abs(v["size"] - v["size_reference"]) for v in r["math_only"][k].values())
            cells.append(f"{swapped:>9,} / {size:>+4,d} size")
        print(f"{k:<8} {counts[k]:>11,}  " + "  ".join(f"{c:>22}" for c in cells))

    main_k = 0.01 if 0.01 in ks else ks[0]  # the demo's tables are at k = 0.01
    for name, r in results.items():
        differing = sum(v["differing"] for v in r["norms"].values())
        total = sum(v["of"] for v in r["norms"].values())
        max_rel = max(v["max_rel"] for v in r["norms"].values())
        swapped = {k: max(r["swapped"][k].values()) for k in ks}
        worst_k = max(ks, key=lambda k: swapped[k])
        moves = {k: max(abs(v["size"] - v["size_reference"]) for v in r["math_only"][k].values()) for k in ks}
        worst_move = max(ks, key=lambda k: moves[k])
        same = "(again)" in name or "fresh process" in name
        target = "0 (identical)" if same else "report"
        bench.row(f"{name}: norm sums differing", differing, total, ratio=differing / total, unit="", target=target,
                  passed=(differing == 0) if same else None, note=f"largest relative difference {max_rel:.2e}")
        bench.row(f"{name}: top-k entries swapped, worst run, k = {main_k}", swapped[main_k], counts[main_k],
                  ratio=swapped[main_k] / counts[main_k], unit="", target=target,
                  passed=(sum(swapped.values()) == 0) if same else None,
                  note=f"baseline column: the top-k set size; most at any k: {swapped[worst_k]} of "
                       f"{counts[worst_k]:,} at k = {worst_k}")
        bench.row(f"{name}: change of a math-only set size, k = {main_k} (largest over languages)", moves[main_k],
                  None, unit="", target=target, passed=(max(moves.values()) == 0) if same else None,
                  note=f"largest at any k: {moves[worst_move]} at k = {worst_move}")
    bench.finish(details={
        "model": model_name, "n_params": n_params, "langs": langs, "samples": samples, "seed": args.seed,
        "k_values": ks, "top_k_sizes": counts, "MKL_CBWR": mkl_cbwr, "reference": ref_name, "pass_seconds": seconds,
        "comparisons": results,
    })


if __name__ == "__main__":
    main()
