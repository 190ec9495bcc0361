"""Where a run's write time goes, per stage and per candidate format, in CPU-seconds per billion level codes.

The per-run writes (bench/scaling.py: "level-code + norm writes (incl. digests)") are bound
by CPU on a 2-core machine, so their wall time is about their CPU-seconds over the cores.
This benchmark splits those CPU-seconds on real level codes (selection.level_codes at the
paper's 7 k values over random Llama-MLP-shaped scores, ~85% zeros) into the stages of one
chunk's path (mlarch/store/chunk_writes.py), one thread, 4 MiB chunks as the store writes
them:

  * the content digest `verify` recounts: since schema 7 the sha256 of each chunk
    (arrays.content_digest, one per pool thread); before it the whole array's sha256, one
    sequential stream: the same CPU-seconds, but only the chunked one spreads over cores;
  * the codec mlarch writes level codes with (blosc zstd level 1, bitshuffle, 512 KiB blosc
    blocks since issue 16) next to blosc's own block size (what earlier versions wrote)
    and other block sizes (the best one depends on the host's caches), and the sha256 +
    crc32c of the encoded chunks;
  * for comparison, formats mlarch does NOT write (each would need a format change and a
    catalog migration): blosc lz4 (bitshuffle) and other whole-array hashes (blake2b, sha1),
    with the compression ratio each codec gives. Chunk decode time is reported too, since
    reads (derive, `verify`) pay it.

Baseline row: one `np.partition` at the largest k over the same scores, one thread (the
reference of issue 16's "selection + writes + digests <= 2.5x one np.partition" target).

    .venv/bin/python bench/write_costs.py [--quick]
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from _common import Bench

CHUNK = 4 * 1024 * 1024  # arrays.chunks_for's 1-D chunk for level codes


def cpu_time(fn) -> float:
    """Best of three thread CPU-seconds of fn() (one thread: no contention from our own threads)."""
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    bench = Bench("write_costs", __doc__, torch_threads=False)
    import numcodecs.blosc as nb
    from google_crc32c import value as crc32c
    from numcodecs.blosc import BITSHUFFLE, Blosc

    from mlarch import selection
    from mlarch.ingest.config import PAPER_KS
    from mlarch.store import arrays

    nb.set_nthreads(1)  # one thread: the chunk-parallel write gives each chunk one
    rng = np.random.default_rng(0)
    rows, cols = (2048, 2048) if bench.quick else (8192, 2048)
    copies = 1 if bench.quick else 4
    scores = np.abs(rng.standard_normal((rows, cols), dtype=np.float32)) * \
        np.exp(0.5 * rng.standard_normal(cols)).astype(np.float32)
    ks = sorted(PAPER_KS)
    levels = np.concatenate([selection.level_codes(scores, ks).reshape(-1)] * copies)
    n = levels.size
    per_b = 1e9 / n
    bench.log(f"{n:,} level codes ({np.count_nonzero(levels) / n:.1%} non-zero), chunks of {CHUNK:,}")
    flat = scores.reshape(-1)
    count = selection.top_count(flat.size, ks[-1])
    partition = cpu_time(lambda: np.partition(flat, flat.size - count)) * 1e9 / flat.size
    bench.row("baseline: np.partition at the largest k, one thread", partition, unit="CPU-s/B")
    chunks = [levels[i:i + CHUNK] for i in range(0, n, CHUNK)]

    seconds = cpu_time(lambda: [hashlib.sha256(c).digest() for c in chunks]) * per_b
    bench.row("chunked content digest: sha256 per chunk (written since schema 7)", seconds, partition,
              unit="CPU-s/B", note="ratio: to the partition; spread over the write's pool threads")
    for name in ("sha256", "blake2b", "sha1"):
        seconds = cpu_time(lambda: hashlib.new(name, levels).digest()) * per_b
        bench.row(f"whole-array {name}{' (written before schema 7)' if name == 'sha256' else ' (not written)'}",
                  seconds, partition, unit="CPU-s/B", note="ratio: to the partition; one sequential stream")

    block = arrays._codecs(np.dtype(np.uint8), True)[0].blocksize
    for label, codec in ((f"blosc zstd-1 bitshuffle, {block >> 10} KiB blocks (written today)",
                          Blosc("zstd", 1, BITSHUFFLE, blocksize=block, typesize=1)),
                         ("blosc zstd-1 bitshuffle, blosc's blocks (written before issue 16)",
                          Blosc("zstd", 1, BITSHUFFLE, typesize=1)),
                         *((f"blosc zstd-1 bitshuffle, {size >> 10} KiB blocks (not written)",
                            Blosc("zstd", 1, BITSHUFFLE, blocksize=size, typesize=1))
                           for size in (1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22) if size != block),
                         ("blosc lz4-5 bitshuffle (not written)", Blosc("lz4", 5, BITSHUFFLE, typesize=1))):
        encoded = [codec.encode(c) for c in chunks]
        ratio = n / sum(len(e) for e in encoded)
        encode = cpu_time(lambda: [codec.encode(c) for c in chunks]) * per_b
        digests = cpu_time(lambda: [(hashlib.sha256(e).digest(), crc32c(e)) for e in encoded]) * per_b
        decode = cpu_time(lambda: [codec.decode(e) for e in encoded]) * per_b
        bench.row(f"{label}: encode", encode, partition, unit="CPU-s/B",
                  note=f"compresses {ratio:.2f}x; ratio: to the partition")
        bench.row(f"{label}: sha256 + crc32c of the encoded chunks", digests, unit="CPU-s/B")
        bench.row(f"{label}: decode (reads)", decode, unit="CPU-s/B")
    bench.finish({"n_levels": n, "chunk": CHUNK, "nonzero_share": float(np.count_nonzero(levels) / n)})


if __name__ == "__main__":
    main()
