"""Chunked, compressed zarr v3 arrays, each with content digests recorded in the catalog.

A write records three digests: a sha256 of the array's content (what `verify` recounts), of
the stored zarr.json, and of every stored chunk. The content digest of an array written
since schema 7 (sha256_scheme 'chunks') is a sha256 over the sha256 of each chunk's raw
bytes, so the chunks hash on every core; older arrays keep their sha256 of the whole array
(sha256_scheme NULL), one sequential stream. A read goes through `_Checked`, a store
that refuses a missing chunk (zarr would fill it with zeros), a zarr.json that differs from
the recorded one (an edited dtype or codec) and a chunk whose bytes differ from the recorded
ones (damaged, or copied from another run). So a number read from an archive is the number
that was written, or a loud error. The store is the archive's arrays.zarr folder or its S3
prefix (mlarch.store.array_store); the checks are the same for both."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import threading
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

from mlarch import parallel
from mlarch.errors import MlarchError
from mlarch.wording import Phrase, error
from mlarch.store import layout
from mlarch.store.array_store import ArrayStore, LocalArrays, StoreError, UnsafeFile, coerce
from mlarch.store.chunk_writes import ChunkEncoder, c_bytes, chunk_content, write_chunks

_CHUNK_ELEMENTS = 1 << 22  # ~4 M elements: >= 1 MB chunks, whole rows per chunk
_CHUNK_KEY = re.compile(r"^c/(\d+)$")
META_LIMIT = 64 << 10  # an array's zarr.json: ~600 bytes as mlarch writes it
# Largest stored chunk over its raw bytes (zarr stores the edge chunk padded to full size):
# measured worst case 20 bytes (blosc header 16 + crc32c 4) for incompressible data of every
# dtype and length tried; the rest is margin.
CHUNK_OVERHEAD = 64
_CODE_BLOCK = 1 << 19  # blosc block of level codes (bench/write_costs.py)


@dataclass(frozen=True)
class ArrayRecord:
    """What the catalog's `arrays` table holds of one array. meta_sha256 and chunk_sha256 are
    None for arrays written before schema version 2 (then only structure is checked on read);
    sha256_scheme is None for arrays written before schema version 7 (sha256 is then `whole`'s,
    not `content_digest`'s)."""
    path: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    nbytes: int
    meta_sha256: str | None = None
    chunk_sha256: tuple[str, ...] | None = None
    sha256_scheme: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> ArrayRecord:
        """The record of an `arrays` catalog row (a dict)."""
        chunks = row.get("chunk_sha256")
        return cls(row["path"], row["dtype"], tuple(int(n) for n in row["shape"]), row["sha256"], int(row["nbytes"]),
                   row.get("meta_sha256"), tuple(chunks) if chunks is not None else None, row.get("sha256_scheme"))


class ArrayDamaged(MlarchError):
    """An array's stored bytes are not what the catalog recorded."""


def catalog_record(row: dict) -> ArrayRecord:
    """The record of an `arrays` catalog row that has `owner` and `kind` too. A catalog is a file
    nobody vetted, so the row's path must be the one mlarch makes for its owner and kind: no
    row can point a read at another run's arrays, or at a key (an S3 request) of its choosing."""
    owner, kind, path = row.get("owner"), row.get("kind"), row.get("path")
    try:
        expected = layout.owned_array_path(owner, kind)
    except layout.UnsafePath as exc:
        raise ArrayDamaged(f"the catalog's arrays row {str(path)[:120]!r}: {exc}: {_EDITED}") from None
    if path != expected:
        raise ArrayDamaged(f"the catalog's row of the {kind} array of {owner!r} names {str(path)[:120]!r}, not "
                           f"{expected!r}: {_EDITED}")
    try:
        return ArrayRecord.from_row(row)
    except (TypeError, ValueError, KeyError) as exc:  # a NULL or non-number shape, size, ...
        raise ArrayDamaged(f"the catalog's row of array {path} is damaged ({type(exc).__name__}): {_EDITED}") from None


_EDITED = "the catalog was edited; restore it from a copy (a published archive: publish it again)"


# Columns of the catalog's `arrays` table that make an ArrayRecord (with `owner` and `kind`).
RECORD_COLUMNS = "path, dtype, shape, sha256, nbytes, meta_sha256, chunk_sha256, sha256_scheme"
CHUNKED = "chunks"  # sha256_scheme of a content digest made by content_digest (schema 7 on)


def whole(data: np.ndarray) -> str:
    """sha256 of the C-order bytes, prefixed by dtype and shape so reshapes differ: the content
    digest of arrays written before schema 7."""
    data = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(c_bytes(data))
    return h.hexdigest()


def combine(dtype: str, shape: tuple[int, ...], parts: Iterable[bytes]) -> str:
    """The content digest of an array from chunk_content of each of its chunks, in order."""
    h = hashlib.sha256(f"{CHUNKED}{dtype}{tuple(shape)}".encode())
    for part in parts:
        h.update(part)
    return h.hexdigest()


def content_digest(data: np.ndarray, threads: int | None = None) -> str:
    """The content digest of `data` as record.sha256 holds it since schema 7: combine() over the
    sha256 of each chunk (chunks_for) in C order. One sha256 over 1 GB takes ~4-5 s on this
    machine's cores (no SHA extensions) and cannot be split; chunk digests run in `threads`
    threads (default one per core: hashlib releases the GIL), and the writer takes them in
    the thread that already holds each chunk (mlarch.store.chunk_writes)."""
    data = np.ascontiguousarray(data)
    step = chunks_for(data.shape)[0]
    starts = range(0, data.shape[0], step)
    with ThreadPoolExecutor(max(1, min(threads or parallel.cores(), len(starts) or 1))) as pool:
        parts = list(pool.map(lambda first: chunk_content(data[first:first + step]), starts))
    return combine(data.dtype.str, data.shape, parts)


def chunks_for(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The chunk shape mlarch stores an array of `shape` in (about _CHUNK_ELEMENTS elements per chunk, whole rows for
    2-D)."""
    if len(shape) == 1:
        return (max(1, min(shape[0], _CHUNK_ELEMENTS)),)
    rows = max(1, min(shape[0], _CHUNK_ELEMENTS // max(1, shape[1])))
    return (rows, *shape[1:])


def n_chunks(shape: tuple[int, ...]) -> int:
    """How many chunks an array of `shape` has in that chunking."""
    per = chunks_for(shape)
    count = 1
    for size, chunk in zip(shape, per):
        count *= -(-size // chunk)
    return count


def _codecs(dtype: np.dtype, compress: bool) -> list:
    """Bitshuffled blosc (lz4 for float magnitudes, zstd level 1 for level codes) and a
    crc32c of every stored chunk, so a flipped bit fails the read, not just `verify`.

    Measured on Gemma-3-270M (100 M parameters, 2 cores): |W| in float32 compresses 1.85x
    in 0.26 s (zstd level 3 alone: 2.3x in 2.4 s); level codes 5.5x in 0.19 s (zstd 3: 5.2x
    in 0.5 s). Level codes go in blosc blocks of 512 KiB (since issue 16; blosc's own choice
    for them is far smaller): zstd encodes 4 MiB chunks in ~20% less CPU and decodes them
    ~20% faster at the same ratio (5.29x), measured on random-score codes. compress=False
    (small norm vectors) keeps only the crc32c."""
    if not compress:
        return [Crc32cCodec()]
    if dtype.kind == "f":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]
    return [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", blocksize=_CODE_BLOCK), Crc32cCodec()]


def _sha(value) -> str:
    return hashlib.sha256(value.as_buffer_like()).hexdigest()


class _Recording(WrapperStore):
    """Writes through to a store and keeps the sha256 of every value written under `path`."""

    def __init__(self, store, path: str = "", seen: dict | None = None):
        super().__init__(store)
        self.path, self.seen, self.lock = path, {} if seen is None else seen, threading.Lock()

    def _with_store(self, store):
        return type(self)(store, self.path, self.seen)

    def _note(self, key: str, value) -> None:
        if key.startswith(self.path + "/"):
            digest_ = _sha(value)
            with self.lock:
                self.seen[key[len(self.path) + 1:]] = digest_

    async def set(self, key, value):
        self._note(key, value)
        await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        self._note(key, value)
        await self._store.set_if_not_exists(key, value)

    async def _set_many(self, values: Iterable):
        values = list(values)
        for key, value in values:
            self._note(key, value)
        await self._store._set_many(values)


class _Checked(WrapperStore):
    """Reads through to a store and refuses what the catalog's record does not vouch for."""

    def __init__(self, store, record: ArrayRecord, location: ArrayStore | None = None, remember: bool = False):
        super().__init__(store)
        self.record, self.location, self.remember = record, location, remember
        self.blosc = False  # set by _open once zarr.json says its chunks are blosc streams

    def _with_store(self, store):
        copy = type(self)(store, self.record, self.location, self.remember)
        copy.blosc = self.blosc
        return copy

    def _meta_key(self, key: str):
        """Where a remote array's zarr.json, once checked against its recorded digest, is
        kept for later reads in this process (one request saved per read; the chunks are
        still fetched and checked every time, and `check` always fetches it)."""
        if not self.remember or self.record.meta_sha256 is None or key != self.record.path + "/zarr.json":
            return None
        return (self.location.url, self.record.path, self.record.meta_sha256)

    def _failed(self, exc: Exception):
        """A remote store's failure (endpoint gone, credentials revoked) as its one-line
        error: it says nothing about the bytes, so it must not read as damage."""
        if self.location is not None and self.location.remote:
            return self.location.trouble(exc)
        return exc

    def _check(self, key: str, value, byte_range) -> None:
        prefix = self.record.path + "/"
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name == "zarr.json":
            if value is None:
                raise ArrayDamaged(f"array {self.record.path} has no zarr.json: {_RESTORE}")
            if self.record.meta_sha256 is not None and _sha(value) != self.record.meta_sha256:
                raise ArrayDamaged(f"array {self.record.path}: zarr.json differs from the one recorded at "
                                   f"ingest (edited metadata): {_RESTORE}")
            return
        match = _CHUNK_KEY.match(name or "")
        if match is None:
            return  # group metadata above the array, probed by zarr: not ours to vouch for
        index = int(match.group(1))
        if value is None:
            raise ArrayDamaged(f"array {self.record.path}: chunk {name} is missing (it would read as zeros): {_RESTORE}")
        if self.blosc and byte_range is None:
            self._check_blosc(name, value)
        expected = self.record.chunk_sha256
        if expected is None:
            return
        if byte_range is not None or index >= len(expected) or _sha(value) != expected[index]:
            raise ArrayDamaged(f"array {self.record.path}: chunk {name} differs from the one written at ingest "
                               f"(damaged, or copied from elsewhere): {_RESTORE}")

    def _check_blosc(self, name: str, value) -> None:
        """blosc allocates what a chunk's header declares (bytes 4-8: decoded size, 8-12: block
        size) before it decodes: a 108 KB stream of zeros can declare 2 GB. A chunk of this
        array decodes to its raw bytes (the edge chunk padded to full size), never more."""
        raw = chunks_for(self.record.shape)[0] * np.dtype(self.record.dtype).itemsize
        header = value.as_numpy_array()[:16].tobytes()
        if len(header) == 16 and (int.from_bytes(header[4:8], "little") > raw
                                  or int.from_bytes(header[8:12], "little") > raw):
            raise ArrayDamaged(f"array {self.record.path}: chunk {name} declares more bytes than a chunk of it holds "
                               f"({raw:,}): {_RESTORE}")

    def _limit(self, key: str) -> int | None:
        """The most bytes the stored object at `key` can hold (a chunk: its raw bytes plus
        CHUNK_OVERHEAD), or None for keys that are not this array's."""
        if key == self.record.path + "/zarr.json":
            return META_LIMIT
        if key.startswith(self.record.path + "/") and _CHUNK_KEY.match(key[len(self.record.path) + 1:]):
            return chunks_for(self.record.shape)[0] * np.dtype(self.record.dtype).itemsize + CHUNK_OVERHEAD
        return None

    def _local(self) -> bool:
        """Whether the files are read here, from a local arrays.zarr (_read_local)."""
        return isinstance(self.location, LocalArrays)

    def _read_local(self, key: str, limit: int | None, byte_range) -> bytes | None:
        """The bytes of local file `key` (None: missing), opened by LocalArrays.open_file (no
        link, pipe or device, on the way or at the end) and refused by its size before reading."""
        prefix = self.record.path + "/"
        path, name = (self.record.path, key[len(prefix):]) if key.startswith(prefix) else ("", key)
        try:
            opened = self.location.open_file(path, name)
        except UnsafeFile as exc:
            raise ArrayDamaged(f"array {self.record.path}: {exc}: {_RESTORE}") from None
        if opened is None:
            return None
        handle, info = opened
        with handle:
            if limit is not None and info.st_size > limit:
                raise ArrayDamaged(f"array {self.record.path}: {name} is larger than any of its objects can be "
                                   f"({limit:,} bytes): {_RESTORE}")
            if byte_range is None:  # one byte past its size: a file grown since fstat fails its digest
                return handle.read(info.st_size + 1)
            if isinstance(byte_range, RangeByteRequest):
                handle.seek(byte_range.start)
                return handle.read(max(0, byte_range.end - byte_range.start))
            if isinstance(byte_range, OffsetByteRequest):
                handle.seek(byte_range.offset)
            elif isinstance(byte_range, SuffixByteRequest):
                handle.seek(max(0, info.st_size - byte_range.suffix))
            else:
                raise TypeError(f"unexpected byte range {byte_range!r}")
            return handle.read()

    async def get(self, key, prototype, byte_range=None):
        remembered = self._meta_key(key) if byte_range is None else None
        if remembered is not None and remembered in _CHECKED_META:
            return prototype.buffer.from_bytes(_CHECKED_META[remembered])
        # a whole object is asked for one byte past the most it can hold: a planted 400 MB
        # "chunk" costs a few MB and a loud error, never the memory to read it whole
        limit = self._limit(key) if byte_range is None else None
        if self._local():  # in a thread, as zarr's LocalStore reads
            data = await asyncio.to_thread(self._read_local, key, limit, byte_range)
            value = None if data is None else prototype.buffer.from_bytes(data)
        else:
            try:
                value = await self._store.get(key, prototype, RangeByteRequest(0, limit + 1) if limit else byte_range)
            except Exception as exc:
                raise self._failed(exc) from exc
        if limit and value is not None and len(value) > limit:
            raise ArrayDamaged(f"array {self.record.path}: {key[len(self.record.path) + 1:]} is larger than any "
                               f"of its objects can be ({limit:,} bytes): {_RESTORE}")
        self._check(key, value, byte_range)
        if remembered is not None:  # it matched the recorded digest: these are the recorded bytes
            _CHECKED_META[remembered] = value.to_bytes()
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        if self._local():  # every file through get's checks, concurrently as zarr's LocalStore reads them
            return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))
        try:
            values = await self._store.get_partial_values(prototype, key_ranges)
        except Exception as exc:
            raise self._failed(exc) from exc
        for (key, byte_range), value in zip(key_ranges, values):
            self._check(key, value, byte_range)
        return values

    async def _get_many(self, requests):
        requests = list(requests)
        if self._local():
            for key, prototype, byte_range in requests:
                yield key, await self.get(key, prototype, byte_range)
            return
        async for key, value in self._store._get_many(requests):
            self._check(key, value, None)
            yield key, value


_RESTORE = "run `mlarch verify` to list damage, then restore the archive from a copy or re-ingest the run"
_CHECKED_META: dict[tuple, bytes] = {}  # (store url, array path, meta sha256) -> zarr.json bytes (remote reads)


def write(root: ArrayStore | Path, path: str, data: np.ndarray, compress: bool = True,
          threads: int | None = None) -> ArrayRecord:
    """Write `data` at `path` inside the array store `root` (an ArrayStore, or the folder of a
    local zarr store) (overwriting) and return its record.

    zarr writes the zarr.json; the chunks are hashed (content), encoded, digested (stored bytes)
    and stored chunk-parallel in `threads` threads (default: one per core;
    mlarch.store.chunk_writes), reading `data` in place: no second copy of the array is made.
    A codec chain that chunk_writes does not reproduce byte for byte is left to zarr's own
    write, while content_digest runs beside it."""
    data = np.ascontiguousarray(data)
    location = coerce(root)
    if isinstance(location, LocalArrays):  # a model's group is named after it: a planted link there
        try:  # would have zarr write (and clear a `magnitudes` folder) wherever it points
            location.refuse_links(path)
        except layout.UnsafePath as exc:
            raise MlarchError(f"cannot write array {path} under {location.where()}: {exc}: mlarch follows no link "
                              f"inside {layout.ARRAYS}; remove the link (`mlarch verify` lists it)") from None
    target = location.zarr_store(read_only=False)
    store = _Recording(target, path)
    try:
        with ThreadPoolExecutor(1) as hasher:
            array = zarr.create_array(
                store=store,
                name=path,
                shape=data.shape,
                dtype=data.dtype,
                chunks=chunks_for(data.shape),
                compressors=_codecs(data.dtype, compress),
                overwrite=True,
                # every chunk is stored: skipping zarr's all-fill-value test per chunk (a full
                # compare) cuts the write of 100 MB of level codes from ~0.45 s to ~0.06 s
                config={"write_empty_chunks": True},
            )
            count = n_chunks(data.shape)
            encoder = ChunkEncoder.of(array.metadata, data)
            if encoder is not None:
                chunk_sha, parts = write_chunks(target, path, data, encoder, count, threads)
                content = combine(data.dtype.str, data.shape, parts)
            else:
                hashed = hasher.submit(content_digest, data, threads)
                if data.size:
                    array[...] = data
                chunk_sha, content = None, hashed.result()
    except StoreError:
        raise
    except Exception as exc:
        if location.remote:  # endpoint, credentials, bucket: one line naming the fix
            raise location.trouble(exc) from None
        if not isinstance(exc, OSError):
            raise
        raise error(MlarchError, f"cannot write array {path} under {location.where()}: {exc.strerror or exc}: "
                    "free disk space or choose a writable ", Phrase("archive folder", "--archive")) from None
    if chunk_sha is None:
        try:
            chunk_sha = tuple(store.seen[f"c/{i}"] for i in range(count))
        except KeyError as exc:  # zarr changed its key encoding: fail now, not on the first read
            raise MlarchError(f"array {path}: zarr stored no chunk {exc.args[0]}: "
                              "this zarr version is not supported") from None
    return ArrayRecord(path, data.dtype.str, tuple(data.shape), content, data.nbytes, store.seen["zarr.json"], chunk_sha,
                       CHUNKED)


def _open(location: ArrayStore, record: ArrayRecord, remember: bool = False):
    checked = _Checked(location.zarr_store(read_only=True), record, location, remember)
    try:
        # zarr_format=3: only zarr.json is asked for (no probes for v2 files: requests, on S3)
        array = zarr.open_array(store=checked, path=record.path, mode="r", zarr_format=3)
    except (ArrayDamaged, StoreError):
        raise
    except (FileNotFoundError, KeyError) as exc:
        raise ArrayDamaged(f"array {record.path} is missing from {location.where()}: {_RESTORE}") from exc
    except Exception as exc:  # zarr raises assorted errors for a missing or unparsable node
        raise ArrayDamaged(f"array {record.path} in {location.where()} cannot be opened ({type(exc).__name__}): "
                           f"{_RESTORE}") from exc
    # structure against the catalog: the only check an array from before chunk digests gets
    if array.shape != record.shape or array.dtype.str != record.dtype or array.chunks != chunks_for(record.shape):
        raise ArrayDamaged(f"array {record.path}: stored shape/dtype/chunks {array.shape} {array.dtype.str} "
                           f"{array.chunks} differ from the catalog's {record.shape} {record.dtype}: {_RESTORE}")
    # blosc only as _codecs writes it (one stream, under the crc32c), so its header can be
    # checked before anything is decoded (a blosc inside another could declare any size)
    codecs = [type(c) for c in array.metadata.codecs]
    if BloscCodec in codecs:
        if codecs != [BytesCodec, BloscCodec, Crc32cCodec]:
            raise ArrayDamaged(f"array {record.path}: its zarr.json codecs are not the ones mlarch writes: {_RESTORE}")
        if array.store_path.store is not checked:  # the chunks would be read without the header check
            raise MlarchError(f"array {record.path}: zarr reads through another store: this zarr version is not "
                              "supported")
        checked.blosc = True
    return array


_VOUCHED: set[tuple] = set()  # arrays without chunk digests whose sha256 this process checked, as they were then
_VOUCHED_LOCK = threading.Lock()


def read(root: ArrayStore | Path, record: ArrayRecord, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """The array of `record`, or elements [start, stop) of a 1-D array (only those chunks are
    read and checked). Raises ArrayDamaged unless every byte read is the one recorded.
    An array written before chunk digests existed is checked whole (its sha256) on its first
    read in a process: a partial read could not tell its chunks from another run's."""
    location = coerce(root)
    if record.chunk_sha256 is None:
        # names, sizes and times (ETags on S3) of its files: one that changed since is checked again
        key = (record.path, record.sha256, location.signature(record.path))
        with _VOUCHED_LOCK:
            vouched = key in _VOUCHED
        if not vouched:
            if check(location, record) != record.sha256:
                raise ArrayDamaged(f"array {record.path} does not match its recorded sha256: {_RESTORE}")
            with _VOUCHED_LOCK:
                _VOUCHED.add(key)
    array = _open(location, record, remember=location.remote)
    try:
        return array[...] if start is None and stop is None else array[start:stop]
    except (ArrayDamaged, StoreError):
        raise
    except Exception as exc:  # a failed crc32c or codec: damaged bytes
        message = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ArrayDamaged(f"array {record.path} cannot be decoded ({message}): {_RESTORE}") from exc


def check(root: ArrayStore | Path, record: ArrayRecord, threads: int | None = None) -> str:
    """The content digest of the stored array as `record`'s scheme defines it, streamed chunk by
    chunk (memory bounded), every chunk checked on the way. Compare with record.sha256.

    `threads` (default one per core, at most 4) read the next chunks (fetch, chunk digest,
    crc32c, blosc) while this thread takes them in order, holding at most threads + 1 chunks.
    For sha256_scheme 'chunks' the readers hash their chunk too, so the whole check runs on
    every core; an older record's sha256 of the whole array is one sequential stream in this
    thread (`bench/verify_reads.py` compares it with reading and hashing in turn)."""
    if record.sha256_scheme not in (None, CHUNKED):
        raise ArrayDamaged(f"array {record.path} records digest scheme {str(record.sha256_scheme)[:20]!r}, which "
                           f"this mlarch does not know: {_RESTORE}")
    chunked = record.sha256_scheme == CHUNKED
    array = _open(coerce(root), record)
    h = hashlib.sha256(f"{np.dtype(record.dtype).str}{record.shape}".encode())
    step = chunks_for(record.shape)[0]
    starts = iter(range(0, record.shape[0] if record.shape else 1, step))

    def part(first: int):
        raw = np.ascontiguousarray(array[first:first + step] if record.shape else array[...])
        return chunk_content(raw) if chunked else raw

    workers = max(1, threads or min(4, parallel.cores()))
    pool = ThreadPoolExecutor(workers)
    parts = []
    try:
        ahead = deque(pool.submit(part, first) for first in itertools.islice(starts, workers))
        while ahead:  # in order: the hash takes the chunks as the array holds them
            chunk = ahead.popleft().result()
            following = next(starts, None)
            if following is not None:
                ahead.append(pool.submit(part, following))
            if chunked:
                parts.append(chunk)
            else:
                h.update(c_bytes(chunk))
    except (ArrayDamaged, StoreError):
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ArrayDamaged(f"array {record.path} cannot be decoded ({message}): {_RESTORE}") from exc
    finally:  # after a failure the reads not yet started are dropped
        pool.shutdown(wait=True, cancel_futures=True)
    return combine(np.dtype(record.dtype).str, record.shape, parts) if chunked else h.hexdigest()
