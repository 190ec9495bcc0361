"""Chunked, compressed zarr v3 arrays with a content digest recorded for each one."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from mlarch.errors import MlarchError

_CHUNK_ELEMENTS = 1 << 22  # ~4 M elements: >= 1 MB chunks, whole rows per chunk


@dataclass(frozen=True)
class ArrayRecord:
    path: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    nbytes: int


def digest(data: np.ndarray) -> str:
    """sha256 of the C-order bytes, prefixed by dtype and shape so reshapes differ."""
    data = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(memoryview(data).cast("B"))
    return h.hexdigest()


def chunks_for(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 1:
        return (max(1, min(shape[0], _CHUNK_ELEMENTS)),)
    rows = max(1, min(shape[0], _CHUNK_ELEMENTS // max(1, shape[1])))
    return (rows, *shape[1:])


def _codecs(dtype: np.dtype, compress: bool) -> list:
    """Bitshuffled blosc (lz4 for float magnitudes, zstd level 1 for level codes) and a
    crc32c of every stored chunk, so a flipped bit fails the read, not just `verify`.

    Measured on Gemma-3-270M (100 M parameters, 2 cores): |W| in float32 compresses 1.85x
    in 0.26 s (zstd level 3 alone: 2.3x in 2.4 s); level codes 5.5x in 0.19 s (zstd 3: 5.2x
    in 0.5 s). compress=False (small norm vectors) keeps only the crc32c."""
    if not compress:
        return [Crc32cCodec()]
    cname, clevel = ("lz4", 5) if dtype.kind == "f" else ("zstd", 1)
    return [BloscCodec(cname=cname, clevel=clevel, shuffle="bitshuffle"), Crc32cCodec()]


def write(root: Path, path: str, data: np.ndarray, compress: bool = True) -> ArrayRecord:
    """Write `data` at `path` inside the zarr store `root` (overwriting) and return its record.

    The sha256 runs in a second thread while zarr compresses and writes (hashlib releases
    the GIL), so the digest costs no wall time on a machine with two cores."""
    data = np.ascontiguousarray(data)
    with ThreadPoolExecutor(1) as pool:
        sha = pool.submit(digest, data)
        zarr.create_array(
            store=str(root),
            name=path,
            data=data,
            chunks=chunks_for(data.shape),
            compressors=_codecs(data.dtype, compress),
            overwrite=True,
            # every chunk is stored: skipping zarr's all-fill-value test per chunk (a full
            # compare) cuts the write of 100 MB of level codes from ~0.45 s to ~0.06 s
            config={"write_empty_chunks": True},
        )
        return ArrayRecord(path, data.dtype.str, tuple(data.shape), sha.result(), data.nbytes)


def read(root: Path, path: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """The array at `path`, or elements [start, stop) of a 1-D array (only those chunks are read)."""
    try:
        array = zarr.open_array(store=str(root), path=path, mode="r")
        return array[...] if start is None and stop is None else array[start:stop]
    except (FileNotFoundError, KeyError) as exc:
        raise MlarchError(
            f"array {path} is missing from {root}: run `mlarch verify` to list damage"
        ) from exc
    except Exception as exc:  # zarr raises assorted errors for a missing node
        if type(exc).__name__ in {"ArrayNotFoundError", "NodeNotFoundError", "GroupNotFoundError"}:
            raise MlarchError(
                f"array {path} is missing from {root}: run `mlarch verify` to list damage"
            ) from exc
        raise
