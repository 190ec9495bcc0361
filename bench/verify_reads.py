"""`arrays.check` (what `verify`, the Ray driver's manifest check and bundle imports run): its
chunk reads ahead of the hash, vs reading and hashing in turn (before).

Two digests are checked: an array written since schema 7 (content digest over chunk digests:
the reading threads hash their chunks too) and the same array's record as an earlier version
wrote it (the whole array's sha256: one sequential stream behind the read-ahead). The
baseline reads and hashes the whole sha256 in turn (the code before both changes).

The arrays: level codes (selection.level_codes at the paper's 7 k over random Llama-MLP-shaped
scores, ~15% non-zero, blosc zstd-1) and float32 magnitudes (blosc lz4), written with
`arrays.write` into a local zarr store; each checked in turn (the code before:
`_check_in_turn` below, the same reads and hash without the pool) and with the default
read-ahead, interleaved, page cache warm for all. Each must give its record's digest.

    .venv/bin/python bench/verify_reads.py [--quick]
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np

from _common import Bench, interleave, median, paired_ratio


def _check_in_turn(root, record) -> str:
    """arrays.check as it was: each chunk read, then hashed, one after another."""
    from mlarch.store import arrays

    array = arrays._open(arrays.coerce(root), record)
    h = hashlib.sha256(f"{np.dtype(record.dtype).str}{record.shape}".encode())
    step = arrays.chunks_for(record.shape)[0]
    for first in range(0, record.shape[0], step):
        h.update(memoryview(np.ascontiguousarray(array[first:first + step])).cast("B"))
    return h.hexdigest()


def main() -> None:
    bench = Bench("verify_reads", __doc__, torch_threads=False)
    from mlarch import selection
    from mlarch.ingest.config import PAPER_KS
    from mlarch.store import arrays

    rng = np.random.default_rng(0)
    scores = np.abs(rng.standard_normal((8192, 2048), dtype=np.float32)) * \
        np.exp(0.5 * rng.standard_normal(2048)).astype(np.float32)
    copies = 2 if bench.quick else 32
    levels = np.concatenate([selection.level_codes(scores, sorted(PAPER_KS)).reshape(-1)] * copies)
    magnitudes = np.concatenate([scores.reshape(-1)] * (copies // 2))
    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    try:
        root = work / "arrays.zarr"
        records = {"level codes": arrays.write(root, "r/levels", levels),
                   "float32 magnitudes": arrays.write(root, "m/magnitudes", magnitudes)}
        del levels, magnitudes
        for label, record in records.items():
            old = dataclasses.replace(record, sha256=_check_in_turn(root, record), sha256_scheme=None)

            def in_turn(old=old):
                assert _check_in_turn(root, old) == old.sha256

            def ahead(old=old):
                assert arrays.check(root, old) == old.sha256

            def chunked(record=record):
                assert arrays.check(root, record) == record.sha256

            times = interleave({"in turn": in_turn, "read ahead": ahead, "chunked": chunked}, bench.repeats,
                               warmup=1, log=bench.log)
            for name, what in (("read ahead", "whole sha256, read ahead"),
                               ("chunked", "chunked digest (schema 7), read and hashed ahead")):
                bench.row(f"check of {record.nbytes / 1e9:.2f} GB of {label}: {what} vs in turn",
                          median(times[name]), median(times["in turn"]), ratio=paired_ratio(times[name], times["in turn"]),
                          samples_ours=times[name], samples_baseline=times["in turn"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bench.finish({"copies": copies})


if __name__ == "__main__":
    main()
