"""Storage: bytes on disk per scored parameter for each additional (language, seed).

A real archive: Gemma-3-270M ingested with the starter set at the paper's 7 k values,
first English, then German (a second `ingest` call, so the second language is an
"additional (language, seed)" in every sense). For each run the folders
`arrays.zarr/runs/<run_id>/levels` and `.../norms` are measured (apparent size = sum of
file sizes, and `du -B1` allocated blocks); a (language, seed) is its math + control run.

Compared against
* float32 full scores: 4 bytes per parameter per run (8 per (language, seed));
  target: stored runs at least 15x smaller;
* the entropy bound of the stored selection data: the empirical (order-0) entropy of
  each run's uint8 level codes, in bits per parameter; target: stored levels within 2x.

Also reported: the whole archive's growth (catalog included) when German is added, and
the once-per-model |W| array.

    .venv/bin/python bench/storage.py [--quick] [--samples 24]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Bench, dir_bytes, du_bytes, gemma_folder, median

TARGET_VS_FLOAT32 = 15.0
TARGET_VS_ENTROPY = 2.0


def entropy_bits(levels: np.ndarray) -> float:
    counts = np.bincount(levels, minlength=256).astype(np.float64)
    p = counts[counts > 0] / levels.size
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    bench = Bench("storage", __doc__, repeats=1, quick_repeats=1, extra_args=lambda p: (
        p.add_argument("--samples", type=int, default=None, help="samples per run (default 24 = the demo's, --quick 2)"),
        p.add_argument("--langs", default="en,de", help="first language, then each additional one"),
    ))
    import mlarch
    from mlarch.store import catalog, layout
    from mlarch.store.spans import read_spans

    samples = bench.args.samples or (2 if bench.quick else 24)
    langs = bench.args.langs.split(",")
    folder = gemma_folder()
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    root = work / "archive"
    sizes_after = {}
    try:
        archive = mlarch.open(root)
        for lang in langs:
            clock = time.perf_counter()
            archive.ingest(str(folder), [lang], "starter", "starter", samples=samples, device="cpu")
            sizes_after[lang] = {"archive_apparent": dir_bytes(root), "archive_du": du_bytes(root),
                                 "catalog": (root / layout.CATALOG).stat().st_size}
            bench.log(f"ingested {lang} ({samples} samples per role) in {time.perf_counter() - clock:.1f} s; "
                      f"archive {sizes_after[lang]['archive_apparent'] / 2**20:.1f} MiB")
        runs = archive.sql("SELECT run_id, lang, role, seed, arrays_group, model FROM runs "
                           "WHERE status = 'FINISHED' ORDER BY lang, role")
        model = runs["model"][0]
        n_params = int(archive.sql("SELECT n_scored_params FROM models")[0, 0])
        with catalog.reading(archive.catalog_path) as con:
            spans = read_spans(con, model)
        store = root / layout.ARRAYS
        per_run = []
        for row in runs.iter_rows(named=True):
            group = store / row["arrays_group"]
            levels = np.concatenate([archive.levels(row["run_id"], s.module).ravel() for s in spans])
            h = entropy_bits(levels)
            h_modules = sum(entropy_bits(levels[s.params]) * s.n_params for s in spans) / n_params
            del levels
            rec = {
                "run_id": row["run_id"], "lang": row["lang"], "role": row["role"], "seed": row["seed"],
                "levels_bytes": dir_bytes(group / "levels"), "norms_bytes": dir_bytes(group / "norms"),
                "levels_du": du_bytes(group / "levels"), "norms_du": du_bytes(group / "norms"),
                "entropy_bits_per_param": h, "entropy_bits_per_param_per_module": h_modules,
            }
            rec["entropy_bound_bytes"] = h * n_params / 8
            per_run.append(rec)
        model_group = store / layout.model_group(model)
        magnitudes_bytes = dir_bytes(model_group)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nper run (apparent bytes; du in parentheses):")
    for r in per_run:
        print(f"  {r['lang']} {r['role']:7s} levels {r['levels_bytes'] / 2**20:7.2f} MiB ({r['levels_du'] / 2**20:.2f}) "
              f"norms {r['norms_bytes'] / 1024:6.1f} KiB  entropy {r['entropy_bits_per_param']:.4f} bits/param "
              f"-> bound {r['entropy_bound_bytes'] / 2**20:.2f} MiB; stored/bound "
              f"{r['levels_bytes'] / r['entropy_bound_bytes']:.3f}")
    pairs = {}
    for r in per_run:
        pairs.setdefault((r["lang"], r["seed"]), []).append(r)
    pair_bytes = {f"{lang}/{seed}": sum(r["levels_bytes"] + r["norms_bytes"] for r in rs)
                  for (lang, seed), rs in pairs.items()}
    pair_du = {f"{lang}/{seed}": sum(r["levels_du"] + r["norms_du"] for r in rs) for (lang, seed), rs in pairs.items()}
    bytes_per_param = median([b / n_params for b in pair_bytes.values()])
    vs_float32 = median([8 * n_params / b for b in pair_bytes.values()])
    bench.row("bytes/param per (language, seed): float32 full scores / ours", bytes_per_param, 8.0, ratio=vs_float32,
              unit="B/param", target=f">= {TARGET_VS_FLOAT32:.0f}x smaller", passed=vs_float32 >= TARGET_VS_FLOAT32,
              note="math + control run: levels + norms arrays, apparent size; baseline 2 runs x 4 bytes")
    vs_float32_du = median([8 * n_params / b for b in pair_du.values()])
    bench.row("same, du (allocated blocks)", median([b / n_params for b in pair_du.values()]), 8.0,
              ratio=vs_float32_du, unit="B/param", target=f">= {TARGET_VS_FLOAT32:.0f}x smaller",
              passed=vs_float32_du >= TARGET_VS_FLOAT32)
    ratios = [r["levels_bytes"] / r["entropy_bound_bytes"] for r in per_run]
    bench.row("stored levels / order-0 entropy bound (worst run)", max(r["levels_bytes"] for r in per_run) / n_params,
              median([r["entropy_bound_bytes"] for r in per_run]) / n_params, ratio=max(ratios), unit="B/param",
              target=f"<= {TARGET_VS_ENTROPY:.0f}x", passed=max(ratios) <= TARGET_VS_ENTROPY,
              note=f"per run: {', '.join(f'{x:.3f}' for x in ratios)}; entropy "
                   f"{median([r['entropy_bits_per_param'] for r in per_run]):.4f} bits/param")
    if len(langs) > 1:
        first, second = langs[0], langs[1]
        growth = sizes_after[second]["archive_apparent"] - sizes_after[first]["archive_apparent"]
        bench.row(f"whole archive growth adding {second} (catalog incl.) / n_params", growth / n_params, 8.0,
                  ratio=8 * n_params / growth, unit="B/param", target="info",
                  note=f"catalog {sizes_after[first]['catalog'] / 2**20:.1f} -> {sizes_after[second]['catalog'] / 2**20:.1f} MiB")
    bench.row("once per model: |W| magnitudes array", magnitudes_bytes / n_params, 4.0, ratio=4 * n_params / magnitudes_bytes,
              unit="B/param", target="info")
    bench.finish(details={
        "model": folder.name, "n_scored_params": n_params, "samples_per_role": samples, "langs": langs,
        "per_run": per_run, "per_lang_seed_bytes": pair_bytes, "per_lang_seed_du": pair_du,
        "archive_sizes_after": sizes_after, "magnitudes_bytes": magnitudes_bytes,
        "codec": "zarr v3, blosc zstd level 1 bitshuffled + crc32c, 4 Mi-element chunks (mlarch.store.arrays)",
    })


if __name__ == "__main__":
    main()
