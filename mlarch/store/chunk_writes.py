"""Chunk-parallel writes of a 1-D array's chunks, each hashed, encoded, digested and stored in a pool thread.

zarr's own write encodes every chunk (blosc runs in its worker threads) but then appends the
crc32c (a copy) and takes mlarch's chunk sha256 in its one event-loop thread, with up to its
concurrency limit of chunks in flight (~60 MB more peak memory at 1 B parameters of level
codes, measured by bench/scaling.py), so part of each chunk waits on one thread. Here every
chunk's whole path (the sha256 of its raw bytes for the content digest, blosc, crc32c, the
sha256 of its stored bytes, store) runs in one of the pool's threads; blosc,
google_crc32c, hashlib and the file write release the GIL, so the chunks use every core and
only the chunks in flight are held (one raw and one encoded chunk per thread), never a second
copy of the array.

The stored bytes are the ones zarr writes for the same zarr.json: `ChunkEncoder.of` builds an
encoder only for the codec chains mlarch writes (bytes [+ blosc] + crc32c, little-endian, 1-D,
fill value padding the last chunk) and returns None for anything else, so the caller lets zarr
write those (tests/test_arrays_parallel.py compares the bytes with zarr's own path)."""

from __future__ import annotations

import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numcodecs.blosc import BITSHUFFLE, NOSHUFFLE, SHUFFLE, Blosc
from zarr.core.buffer import cpu
from zarr.core.sync import sync

from mlarch import parallel

_SHUFFLES = {"noshuffle": NOSHUFFLE, "shuffle": SHUFFLE, "bitshuffle": BITSHUFFLE}


def c_bytes(data: np.ndarray) -> np.ndarray:
    """The C-order bytes of `data` as a uint8 view (no copy when contiguous), for hashlib to read in place."""
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def chunk_content(raw: np.ndarray) -> bytes:
    """sha256 (raw digest) of one chunk's elements in C order, the last chunk unpadded: what
    mlarch.store.arrays.combine makes an array's content digest of."""
    return hashlib.sha256(c_bytes(raw)).digest()


class ChunkEncoder:
    """Encodes chunk i of a 1-D array into the bytes zarr stores for it (see `of`)."""

    def __init__(self, step: int, fill, blosc: Blosc | None, keys, crc32c):
        self.step, self.fill, self.blosc, self.keys, self.crc32c = step, fill, blosc, keys, crc32c

    @classmethod
    def of(cls, metadata, data: np.ndarray) -> ChunkEncoder | None:
        """The encoder for `data` stored as `metadata` (a zarr v3 ArrayV3Metadata), or None when
        its layout is not one this module reproduces byte for byte."""
        if data.ndim != 1 or sys.byteorder != "little" or data.dtype.byteorder == ">":
            return None
        try:  # zarr 3.1's crc32c; a zarr that uses another library writes its chunks itself
            from google_crc32c import value as crc32c
        except ImportError:
            return None
        try:
            version, chunks, key = metadata.zarr_format, tuple(metadata.chunks), metadata.encode_chunk_key((1,))
            codecs = [codec.to_dict() for codec in metadata.codecs]
        except (AttributeError, TypeError):  # a zarr whose metadata reads otherwise writes its chunks itself
            return None
        if version != 3 or len(chunks) != 1 or key != "c/1":  # "c/1": the keys reads check (arrays._CHUNK_KEY)
            return None
        if not codecs or codecs[0].get("name") != "bytes" or codecs[-1] != {"name": "crc32c"}:
            return None
        if codecs[0].get("configuration", {}).get("endian", "little") != "little":
            return None
        blosc = None
        if len(codecs) == 3:
            config = codecs[1].get("configuration", {})
            if codecs[1].get("name") != "blosc" or config.get("shuffle") not in _SHUFFLES \
                    or config.get("typesize") != data.dtype.itemsize:
                return None
            options = dict(cname=config["cname"], clevel=int(config["clevel"]), shuffle=_SHUFFLES[config["shuffle"]],
                           blocksize=int(config.get("blocksize", 0)))
            try:
                blosc = Blosc(**options, typesize=int(config["typesize"]))
            except TypeError:  # numcodecs < 0.16: no typesize argument, and zarr's own write of that
                return None  # era gives other bytes (typesize 1 in the header): let zarr write them
        elif len(codecs) != 2:
            return None
        return cls(int(chunks[0]), metadata.fill_value, blosc, metadata.encode_chunk_key, crc32c)

    def encode(self, data: np.ndarray, index: int) -> bytes:
        """The stored bytes of chunk `index`: the last chunk padded to full length with the fill
        value (zarr stores whole chunks), blosc if configured, then the crc32c, little-endian."""
        raw = data[index * self.step:(index + 1) * self.step]
        if raw.size < self.step:
            padded = np.full(self.step, self.fill, dtype=data.dtype)
            padded[:raw.size] = raw
            raw = padded
        body = self.blosc.encode(raw) if self.blosc is not None else raw.tobytes()  # crc32c wants read-only bytes
        return b"".join((body, self.crc32c(body).to_bytes(4, "little")))


def write_chunks(store, path: str, data: np.ndarray, encoder: ChunkEncoder, count: int,
                 threads: int | None = None) -> tuple[tuple[str, ...], list[bytes]]:
    """Encode, digest and store chunks 0..count-1 of `data` under `path` in `store` (a zarr store,
    set from the pool threads through zarr's event loop). Returns the sha256 (hex) of each stored
    chunk and chunk_content of each raw chunk, in chunk order."""

    def one(index: int) -> tuple[str, bytes]:
        content = chunk_content(data[index * encoder.step:(index + 1) * encoder.step])
        stored = encoder.encode(data, index)
        sha = hashlib.sha256(stored).hexdigest()
        sync(store.set(f"{path}/{encoder.keys((index,))}", cpu.Buffer.from_bytes(stored)))
        return sha, content

    if count == 0:
        return (), []
    # a thread per core: each holds one raw and one encoded chunk (a few MB), not a module
    pool = ThreadPoolExecutor(max(1, min(threads or parallel.cores(), count)))
    try:
        futures = [pool.submit(one, index) for index in range(count)]
        done = [future.result() for future in futures]
        return tuple(sha for sha, _ in done), [content for _, content in done]
    finally:  # after a failure the chunks not yet started are not written
        pool.shutdown(wait=True, cancel_futures=True)
