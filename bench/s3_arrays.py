"""Remote arrays: `Archive.selection` of one module with the arrays on an S3-protocol server
vs on local disk, ratios in one run (target: S3 <= 2x local).

Two archives of one configuration (a small random Llama, hidden 256, MLP 1024, 2 blocks;
English, 8 samples, 3 k values): one keeps its arrays in its folder, the other in a bucket
of moto's S3 server, started here in a process of its own on 127.0.0.1 (as a real server
would be: it shares no interpreter lock with the reader). Measured, interleaved round-robin
(medians and the median of per-round ratios):

  * warm: one Archive per store, its catalog lookups cached (a loop over modules, as charts
    and interventions do): the array reads alone (per read: the array's zarr.json and the
    chunks of the module's range, each checked against the catalog's digests);
  * cold: a new Archive per call (each call also reads the catalog);
  * sql: a query of the set_sizes view touches no arrays (same speed expected; listed to show it).
  * published: the S3 archive published (`mlarch publish`) and opened as s3://BUCKET/PREFIX
    from a fresh cache: the first open fetches the catalog (timed once); later opens read the
    manifest (one GET) and use the cached catalog: `sql` and a new-Archive `selection` vs
    the local archive.

    .venv/bin/python bench/s3_arrays.py [--quick] [--repeats 15]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import Bench, median, paired_ratio

TARGET = 2.0
MODEL = "bench-llama"
BUCKET = "mlarch-bench"


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(variants: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Each variant `repeats` times, round-robin with the order rotated each round."""
    names = list(variants)
    times = {name: [] for name in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            elapsed = timed(variants[name])
            if r >= warmup:
                times[name].append(elapsed)
    return times


def main() -> None:
    bench = Bench("s3_arrays", __doc__, repeats=15, quick_repeats=5)
    import fixtures
    import mlarch
    import s3_server

    work = Path(tempfile.mkdtemp(prefix="mlarch-bench-s3-"))
    model = fixtures.build_model("llama", work, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                 num_key_value_heads=2)
    math, control = fixtures.write_data(work / "data")
    with s3_server.process() as endpoint:
        env = s3_server.environment(endpoint, work)
        saved = s3_server.apply(env)
        try:
            s3_server.make_bucket(endpoint, BUCKET, env)
            roots = {"local": work / "local", "s3": work / "s3"}
            for name, root in roots.items():
                started = time.perf_counter()
                mlarch.open(root).ingest(str(model), ["en"], math, control, name=MODEL, samples=8,
                                         top_k=[0.01, 0.05, 0.25], device="cpu",
                                         **({"arrays": f"s3://{BUCKET}/bench"} if name == "s3" else {}))
                bench.log(f"ingest with arrays {name}: {time.perf_counter() - started:.2f} s")
            modules = mlarch.open(roots["local"]).sql(
                "SELECT module, n_params FROM modules WHERE model = ? ORDER BY n_params DESC", [MODEL])
            module, n_params = modules.row(len(modules) // 2)  # a middle-sized one
            bench.log(f"module {module}: {n_params:,} parameters")
            warm = {name: mlarch.open(root) for name, root in roots.items()}
            for archive in warm.values():
                archive.selection(MODEL, "en", 0.05, module)  # caches the catalog lookups

            def selection_warm(name):
                return lambda: warm[name].selection(MODEL, "en", 0.05, module)

            def selection_cold(name):
                return lambda: mlarch.open(roots[name]).selection(MODEL, "en", 0.05, module)

            def rethreshold_warm(name):  # a k not archived: |W| and both runs' norms read too
                return lambda: warm[name].selection(MODEL, "en", 0.1, module)

            def sql(name):
                return lambda: warm[name].sql("SELECT lang, k, sum(n_selected) FROM set_sizes GROUP BY ALL")

            import numpy as np

            assert np.array_equal(warm["s3"].selection(MODEL, "en", 0.05, module),
                                  warm["local"].selection(MODEL, "en", 0.05, module))
            for label, make, target in (("selection, warm Archive", selection_warm, TARGET),
                                        ("selection at a k not archived, warm", rethreshold_warm, None),
                                        ("selection, new Archive per call", selection_cold, None),
                                        ("sql over set_sizes (no arrays)", sql, None)):
                times = interleaved({"s3": make("s3"), "local": make("local")}, bench.repeats)
                ratio = paired_ratio(times["s3"], times["local"])
                bench.log(f"{label}: s3 {median(times['s3']) * 1e3:.1f} ms, local {median(times['local']) * 1e3:.1f} ms, "
                          f"ratio {ratio:.2f}")
                bench.row(label, median(times["s3"]), median(times["local"]), ratio=ratio,
                          target=f"<= {target}x" if target else "", passed=(ratio <= target) if target else None,
                          samples_ours=times["s3"], samples_baseline=times["local"])
            published_rows(bench, roots, work, f"s3://{BUCKET}/bench", module)
        finally:
            s3_server.restore(saved)
    bench.finish(details={"module": module, "n_params": n_params, "server": "moto (subprocess, 127.0.0.1)"})


def published_rows(bench, roots, work: Path, url: str, module: str) -> None:
    """The published read-only archive (mlarch publish; --archive s3://...) vs the local one."""
    import os

    import mlarch

    started = time.perf_counter()
    info = mlarch.open(roots["s3"]).publish(url)
    bench.log(f"publish: {time.perf_counter() - started:.2f} s ({info['size']:,} bytes of catalog)")
    os.environ["MLARCH_CACHE"] = str(work / "reader-cache")  # a second machine: nothing fetched yet
    started = time.perf_counter()
    mlarch.open(url)
    bench.log(f"first open of {url} (manifest, catalog fetched and checked): {time.perf_counter() - started:.3f} s")
    query = "SELECT lang, k, sum(n_selected) AS n FROM set_sizes GROUP BY ALL ORDER BY ALL"
    assert mlarch.open(url).sql(query).equals(mlarch.open(roots["local"]).sql(query))
    for label, make in (("published: sql over set_sizes, new Archive per call",
                         lambda where: lambda: mlarch.open(where).sql(query)),
                        ("published: selection, new Archive per call",
                         lambda where: lambda: mlarch.open(where).selection(MODEL, "en", 0.05, module))):
        times = interleaved({"s3": make(url), "local": make(roots["local"])}, bench.repeats)
        ratio = paired_ratio(times["s3"], times["local"])
        bench.log(f"{label}: published {median(times['s3']) * 1e3:.1f} ms, local {median(times['local']) * 1e3:.1f} "
                  f"ms, ratio {ratio:.2f}")
        bench.row(label, median(times["s3"]), median(times["local"]), ratio=ratio, target="",
                  passed=None, samples_ours=times["s3"], samples_baseline=times["local"])


if __name__ == "__main__":
    main()
