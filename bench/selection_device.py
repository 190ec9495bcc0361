"""Selection on the scoring device: `selection_device.model_levels_torch` (scores + level codes
with torch ops, on CUDA) against `selection.model_levels` (numpy, mlarch's thread pool, on the
host), on random Llama-shaped bf16 weights at 0.1 B and 1 B scored parameters (bench/scaling.py's
shapes), the paper's 7 k values.

Ours: scores + level codes on the device, then the uint8 codes copied to the host (what
ingest would keep), timed with a synchronize; the codes must equal the numpy path's, byte
for byte. Two ways: model_levels_torch over |W| concatenated on the device, and
weights_levels, what ingest runs on CUDA: from each module's bf16 weight, one module at a
time on a side stream, its codes copied to the host as it finishes (also its peak device
memory beyond the weights, in units of the largest module's float32 scores). Baseline: the
numpy path on the host CPU on the same |W| and norms. Needs only numpy and torch (no zarr,
duckdb or polars), so it runs on a lent GPU machine. With --forward, also one run's scoring
passes of a random Llama of each size (500 samples x 82 tokens, batch 16, bf16 on CUDA),
so issue 16's GPU ratio (post-processing per run <= 0.25x the run's forward time) can be read
off: selection_over_forward is the device selection + copy over those passes (the host's
level-code writes come on top: bench/scaling.py measures them per core).

    python3 bench/selection_device.py --device cuda --out selection-device-cuda.json
    .venv/bin/python bench/selection_device.py --device cpu --quick      # smoke test here
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

PAPER_KS = (0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="0.1,1", help="sizes from bench/scaling.py's SHAPES (default 0.1,1)")
    parser.add_argument("--quick", action="store_true", help="size 0.02 only, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(BENCH / "results" / "selection-device.json"))
    parser.add_argument("--forward", action="store_true",
                        help="also time one run's scoring forward passes (a random Llama of each size, bf16 on CUDA, "
                             "500 samples x 82 tokens, batch 16; --quick: 16 samples) for issue 16's GPU ratio")
    args = parser.parse_args()

    import numpy as np
    import torch

    from mlarch import selection
    from mlarch.selection_device import model_levels_torch, weights_levels
    from mlarch.store import spans as span_layout
    from scaling import module_list

    device = torch.device(args.device)
    sizes = ["0.02"] if args.quick else args.sizes.split(",")
    repeats = 1 if args.quick else args.repeats

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    info = {"device": str(device), "torch": torch.__version__, "numpy": np.__version__,
            "host_cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_start": list(os.getloadavg()),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "ks": PAPER_KS}
    rows = []
    for size in sizes:
        spans = span_layout.layout(module_list(size))
        n = span_layout.total_params(spans)
        gen = torch.Generator(device=device).manual_seed(0)
        magnitudes = torch.empty(n, dtype=torch.float32, device=device)
        weights = []
        for span in spans:  # bf16 weights as checkpoints hold them, |W| in float32 as ingest keeps it
            w = torch.randn(span.n_rows * span.n_cols, generator=gen, device=device, dtype=torch.float32)
            weights.append(w.to(torch.bfloat16).view(span.n_rows, span.n_cols))
            magnitudes[span.params] = weights[-1].view(-1).abs().to(torch.float32)
        norms = (torch.rand(span_layout.total_norms(spans), generator=gen, device=device) * 50 + 1)
        magnitudes_host, norms_host = magnitudes.cpu().numpy(), norms.cpu().numpy()
        sync()

        model_levels_torch(spans[:2], magnitudes, norms, PAPER_KS)  # warm-up: kernels, allocator
        sync()
        ours, copies, codes = [], [], None
        for _ in range(repeats):
            sync()
            clock = time.perf_counter()
            on_device = model_levels_torch(spans, magnitudes, norms, PAPER_KS)
            sync()
            selected = time.perf_counter()
            codes = on_device.cpu().numpy()
            done = time.perf_counter()
            ours.append(done - clock)
            copies.append(done - selected)
            del on_device
        ingest_path, ingest_codes = [], None
        largest = max(span.n_params for span in spans)
        for _ in range(repeats):
            sync()
            if device.type == "cuda":
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            clock = time.perf_counter()
            ingest_codes = weights_levels(weights, spans, norms_host, PAPER_KS)  # ends with its last copy
            ingest_path.append(time.perf_counter() - clock)
        ingest_peak = ((torch.cuda.max_memory_allocated() - base) / (4 * largest)) if device.type == "cuda" else None
        clock = time.perf_counter()
        expected = selection.model_levels(spans, magnitudes_host, norms_host, PAPER_KS)
        numpy_s = time.perf_counter() - clock
        identical = bool(np.array_equal(codes, expected)) and bool(np.array_equal(ingest_codes, expected))
        mismatches = 0 if identical else int(np.count_nonzero(codes != expected))
        row = {"size": size, "n_params": n, "device_s_incl_copy": sorted(ours)[len(ours) // 2],
               "device_s_all": ours, "copy_to_host_s": sorted(copies)[len(copies) // 2],
               "numpy_host_s": numpy_s, "identical_to_numpy": identical, "mismatches": mismatches,
               "ingest_path_s": sorted(ingest_path)[len(ingest_path) // 2], "ingest_path_s_all": ingest_path,
               "ingest_path_peak_x_largest_module_scores": ingest_peak}
        row["speedup"] = numpy_s / row["device_s_incl_copy"]
        row["device_s_per_b"] = row["device_s_incl_copy"] / (n / 1e9)
        row["numpy_s_per_b"] = numpy_s / (n / 1e9)
        rows.append(row)
        print(json.dumps(row), flush=True)
        row["ingest_path_speedup"] = numpy_s / row["ingest_path_s"]
        if args.forward:  # issue 16's GPU target: post-processing per run <= 0.25x its forward passes
            row.update(scoring_passes(size, device, samples=16 if args.quick else 500))
            row["selection_over_forward"] = row["ingest_path_s"] / row["forward_s"]
            print(json.dumps({k: row[k] for k in ("size", "forward_s", "tokens", "selection_over_forward")}), flush=True)
        del magnitudes, weights, norms, magnitudes_host, norms_host, expected, codes, ingest_codes
        if device.type == "cuda":
            torch.cuda.empty_cache()
            row["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    info["loadavg_end"] = list(os.getloadavg())
    result = {"benchmark": "selection-device", "quick": args.quick, "repeats": repeats, "machine": info, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not all(r["identical_to_numpy"] for r in rows):
        sys.exit("level codes on the device differ from the numpy path's")


def scoring_passes(size: str, device, *, samples: int, tokens: int = 82, batch: int = 16) -> dict:
    """Seconds of one run's scoring passes: a random Llama of bench/scaling.py's shape `size`
    (untied head; bf16 on CUDA as ingest loads it there, float32 on a CPU), `samples` texts of
    `tokens` tokens (the starter texts' mean under the Gemma tokenizer) in batches of `batch`,
    through ingest's NormCollector (hooks on every scored module, stopped at the head's input).
    Random ids of one length: no padding, so no tokenizer is needed on the device machine."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlarch.ingest import scoring
    from scaling import SHAPES

    hidden, inter, kv, blocks, vocab = SHAPES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                         num_attention_heads=hidden // 64, num_key_value_heads=kv // 64, vocab_size=vocab,
                         max_position_embeddings=512, tie_word_embeddings=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    modules = scoring.scored_modules(model)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, vocab, (samples, tokens), generator=gen, device=device)
    collector = scoring.NormCollector(model, modules, device)

    def passes(rows) -> None:
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            mask = torch.ones_like(chunk)
            collector.start_batch(mask.to(torch.float32))
            try:
                model(input_ids=chunk, attention_mask=mask, use_cache=False)
            except scoring._StopForward:  # the head's input reached: what a scoring pass computes
                pass

    try:
        with torch.inference_mode():
            passes(ids[:batch])  # warm-up: kernels, allocator
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock = time.perf_counter()
            passes(ids)
            collector.result()  # the norms on the host, as a run ends
            forward_s = time.perf_counter() - clock
    finally:
        collector.remove()
    scored = sum(m.n_params for m in modules)
    return {"forward_s": forward_s, "tokens": samples * tokens, "forward_batch": batch,
            "forward_dtype": str(dtype).removeprefix("torch."), "forward_scored_params": scored}


if __name__ == "__main__":
    main()
