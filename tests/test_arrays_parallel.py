"""Chunk-parallel array writes (mlarch.store.chunk_writes through arrays.write): the stored
bytes and every digest are the ones of zarr's own serial write, which archives written before
them hold and `verify` checks.

The reference here is spelled independently of mlarch's write: zarr.create_array(data=...)
into a plain LocalStore (zarr encodes and stores every chunk itself), its files read back from
disk and hashed, and the content digests built from their definitions: since schema 7 a
sha256 over "chunks", the dtype and shape, then the sha256 of each chunk's C-order bytes;
before it (records without sha256_scheme, still verified) the sha256 of the dtype and shape,
then the whole array's C-order bytes. Chunks are made small so every array has many, with a
partial last one."""

import dataclasses
import errno
import hashlib
import inspect
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from numcodecs.blosc import Blosc
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from mlarch.errors import MlarchError
from mlarch.store import arrays, chunk_writes

# numcodecs < 0.16 (the declared floor is 0.14) has no Blosc(typesize=): there zarr writes the
# chunks itself (chunk_writes.ChunkEncoder.of gives None), so the encoder's own cases do not apply
ENCODES = "typesize" in inspect.signature(Blosc.__init__).parameters
needs_encoder = pytest.mark.skipif(not ENCODES, reason="numcodecs < 0.16: zarr writes the chunks itself")

CHUNK = 4096


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(arrays, "_CHUNK_ELEMENTS", CHUNK)


def _levels(n: int, seed: int = 0) -> np.ndarray:
    """Level codes as selection makes them: mostly 0, codes 1..7 in growing shares."""
    u = np.random.default_rng(seed).random(n)
    return (7 - np.digitize(u, [0.0001, 0.001, 0.01, 0.025, 0.05, 0.1, 0.15])).astype(np.uint8)


def _reference(folder: Path, path: str, data: np.ndarray, compress: bool) -> dict:
    """zarr's own write of `data`: the stored files' bytes, and the three digests taken from them."""
    zarr.create_array(store=LocalStore(str(folder)), name=path, data=data, chunks=arrays.chunks_for(data.shape),
                      compressors=arrays._codecs(data.dtype, compress), overwrite=True,
                      config={"write_empty_chunks": True})
    base = folder / path
    files = {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    count = -(-data.size // CHUNK)
    return {"files": files, "sha256": _content(data), "meta": hashlib.sha256(files["zarr.json"]).hexdigest(),
            "chunks": tuple(hashlib.sha256(files[f"c/{i}"]).hexdigest() for i in range(count))}


def _content(data: np.ndarray) -> str:
    """The schema-7 content digest by its definition (chunks of CHUNK elements, the last one short)."""
    h = hashlib.sha256(f"chunks{data.dtype.str}{data.shape}".encode())
    for first in range(0, data.size, CHUNK):
        h.update(hashlib.sha256(data[first:first + CHUNK].tobytes()).digest())
    return h.hexdigest()


def _whole(data: np.ndarray) -> str:
    """The content digest of arrays written before schema 7, by its definition."""
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.tobytes())
    return h.hexdigest()


def _stored(folder: Path, path: str) -> dict[str, bytes]:
    base = folder / path
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


CASES = [  # (dtype, compress, elements): levels, |W| magnitudes, norms; empty, one, chunk edges
    *[(np.uint8, True, n) for n in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 10 * CHUNK + 17)],
    (np.float32, True, 3 * CHUNK + 5),
    (np.float32, False, 2 * CHUNK + 1),
    (np.float32, False, 300),
]


def _data(dtype, n: int) -> np.ndarray:
    if dtype == np.uint8:
        return _levels(n)
    return np.random.default_rng(1).lognormal(0.0, 0.5, n).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype, compress, n", CASES)
def test_parallel_write_stores_zarrs_bytes_and_digests(tmp_path, dtype, compress, n, threads):
    data = _data(dtype, n)
    ref = _reference(tmp_path / "ref", "runs/r/levels", data, compress)
    record = arrays.write(tmp_path / "ours", "runs/r/levels", data, compress=compress, threads=threads)
    assert _stored(tmp_path / "ours", "runs/r/levels") == ref["files"]
    assert record.sha256 == ref["sha256"] and record.sha256_scheme == "chunks"
    assert record.meta_sha256 == ref["meta"]
    assert record.chunk_sha256 == ref["chunks"]
    assert (record.shape, record.dtype, record.nbytes) == ((n,), data.dtype.str, data.nbytes)


def test_verify_and_reads_accept_a_parallel_write(tmp_path):
    data = _levels(7 * CHUNK + 100, seed=3)
    record = arrays.write(tmp_path, "runs/a/levels", data, threads=4)
    assert arrays.check(tmp_path, record) == record.sha256
    assert np.array_equal(arrays.read(tmp_path, record), data)
    start, stop = 2 * CHUNK - 3, 5 * CHUNK + 9
    assert np.array_equal(arrays.read(tmp_path, record, start, stop), data[start:stop])


@pytest.mark.parametrize("scheme", ["chunks", None])
@pytest.mark.parametrize("threads", [None, 1, 2, 5])
@pytest.mark.parametrize("dtype, compress, n", [c for c in CASES if c[2] > CHUNK])
def test_check_reads_ahead_and_hashes_in_order(tmp_path, monkeypatch, dtype, compress, n, threads, scheme):
    """arrays.check (verify's recount) reads chunks ahead in a pool while one thread combines them
    in order: the digest is the record's scheme's by its definition (an array from before schema
    7 recorded its whole sha256), and the reads really ran in the pool."""
    data = _data(dtype, n)
    record = arrays.write(tmp_path, "runs/r/levels", data, compress=compress)
    expected = _content(data)
    if scheme is None:  # the record as an archive made before schema 7 holds it
        expected = _whole(data)
        record = dataclasses.replace(record, sha256=expected, sha256_scheme=None)
    assert expected != (_whole(data) if scheme else _content(data))
    readers = []
    getitem = zarr.Array.__getitem__

    def noted(self, selection):
        readers.append(threading.current_thread().name)
        return getitem(self, selection)

    hashers = []
    content = arrays.chunk_content

    def hashed(raw):
        hashers.append(threading.current_thread().name)
        return content(raw)

    monkeypatch.setattr(zarr.Array, "__getitem__", noted)
    monkeypatch.setattr(arrays, "chunk_content", hashed)
    assert arrays.check(tmp_path, record, threads=threads) == expected == record.sha256
    assert len(readers) == -(-n // CHUNK)  # one read per chunk
    assert threading.main_thread().name not in readers  # every read in the pool, none by the hashing thread
    if threads != 1:
        assert len(set(readers)) > 1, readers
    # schema 7: each chunk hashed by the thread that read it; before: one stream in this thread
    assert sorted(hashers) == (sorted(readers) if scheme else [])


def test_check_refuses_a_scheme_it_does_not_know_or_a_crossed_one(tmp_path):
    data = _levels(3 * CHUNK + 1, seed=5)
    record = arrays.write(tmp_path, "runs/a/levels", data)
    with pytest.raises(arrays.ArrayDamaged, match="digest scheme 'blake3'"):
        arrays.check(tmp_path, dataclasses.replace(record, sha256_scheme="blake3"))
    # an older record's scheme on a new digest (or the reverse) recounts to another value: verify's mismatch
    assert arrays.check(tmp_path, dataclasses.replace(record, sha256_scheme=None)) == _whole(data) != record.sha256


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("damage", ["edited", "missing"])
def test_check_refuses_damage_in_any_chunk(tmp_path, where, damage):
    """A chunk edited or removed anywhere (beyond the read-ahead window too) is ArrayDamaged, not a digest."""
    data = _levels(11 * CHUNK + 5, seed=4)
    record = arrays.write(tmp_path, "runs/a/levels", data)
    index = {"first": 0, "middle": 6, "last": 11}[where]
    chunk = tmp_path / "runs/a/levels" / "c" / str(index)
    if damage == "missing":
        chunk.unlink()
    else:
        stored = bytearray(chunk.read_bytes())
        stored[len(stored) // 2] ^= 0x01
        chunk.write_bytes(bytes(stored))
    with pytest.raises(arrays.ArrayDamaged):
        arrays.check(tmp_path, record, threads=2)


def test_a_rewrite_replaces_every_chunk_of_the_old_array(tmp_path):
    arrays.write(tmp_path, "runs/a/levels", _levels(9 * CHUNK, seed=1))  # more chunks than the new one
    data = _levels(2 * CHUNK + 1, seed=2)
    record = arrays.write(tmp_path, "runs/a/levels", data)
    assert sorted(_stored(tmp_path, "runs/a/levels")) == ["c/0", "c/1", "c/2", "zarr.json"]
    assert arrays.check(tmp_path, record) == record.sha256


def test_zarrs_own_write_is_the_fallback_and_gives_the_same_record(tmp_path, monkeypatch):
    data = _levels(5 * CHUNK + 3, seed=4)
    ours = arrays.write(tmp_path / "a", "runs/a/levels", data)
    monkeypatch.setattr(chunk_writes.ChunkEncoder, "of", classmethod(lambda cls, metadata, data: None))
    theirs = arrays.write(tmp_path / "b", "runs/a/levels", data)
    assert ours == theirs
    assert _stored(tmp_path / "a", "runs/a/levels") == _stored(tmp_path / "b", "runs/a/levels")


@needs_encoder
def test_the_encoder_refuses_layouts_it_does_not_reproduce(tmp_path):
    def metadata(data, compressors, **options):
        return zarr.create_array(store=LocalStore(str(tmp_path)), name="x", shape=data.shape, dtype=data.dtype,
                                 chunks=(4,) * data.ndim, compressors=compressors, overwrite=True, **options).metadata

    flat = np.zeros(10, np.uint8)
    assert chunk_writes.ChunkEncoder.of(metadata(flat, arrays._codecs(flat.dtype, True)), flat) is not None
    square = np.zeros((4, 4), np.uint8)
    assert chunk_writes.ChunkEncoder.of(metadata(square, arrays._codecs(square.dtype, True)), square) is None
    assert chunk_writes.ChunkEncoder.of(metadata(flat, [ZstdCodec()]), flat) is None  # no crc32c, another codec
    dotted = metadata(flat, arrays._codecs(flat.dtype, True), chunk_key_encoding={"name": "v2", "separator": "."})
    assert chunk_writes.ChunkEncoder.of(dotted, flat) is None  # keys reads would not check
    big = np.zeros(10, ">f4")
    assert chunk_writes.ChunkEncoder.of(metadata(big, arrays._codecs(big.dtype, True)), big) is None


def test_a_write_holds_no_second_copy_of_the_array(tmp_path, monkeypatch):
    """Only the chunks in flight: a few chunks per thread (numpy's and Python's allocations are
    both traced), not the array again."""
    monkeypatch.setattr(arrays, "_CHUNK_ELEMENTS", 1 << 16)
    data = _levels(1 << 24, seed=5)  # 16 MiB, 256 chunks
    tracemalloc.start()
    try:
        arrays.write(tmp_path / "warm", "runs/w/levels", data[: 1 << 16], threads=2)  # imports, pools
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        arrays.write(tmp_path / "ours", "runs/a/levels", data, threads=2)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < data.nbytes / 8, peak  # measured: ~0.6 MiB of 16 MiB


@needs_encoder
def test_a_failed_chunk_write_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    real = LocalStore.set

    async def full_disk(self, key, value):
        if "/c/" in key and key.endswith("/c/3"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    with pytest.raises(MlarchError) as failed:
        arrays.write(tmp_path, "runs/a/levels", _levels(40 * CHUNK), threads=2)
    written = list((tmp_path / "runs/a/levels/c").iterdir())
    assert len(written) < 10, "the chunks queued after the failure were written anyway"
    message = str(failed.value)
    assert "\n" not in message
    assert "cannot write array runs/a/levels" in message and "No space left on device" in message
    assert "free disk space" in message


def test_remote_arrays_get_the_same_bytes_and_digests(tmp_path):
    pytest.importorskip("s3fs", reason="arrays on S3 need s3fs")
    pytest.importorskip("moto.server", reason="the S3 test server is moto's")
    import s3_server

    from mlarch.store import array_store

    data = _levels(4 * CHUNK + 11, seed=6)
    local = arrays.write(tmp_path / "local", "runs/a/levels", data)
    with s3_server.threaded() as endpoint:
        env = s3_server.environment(endpoint, tmp_path)
        saved = s3_server.apply(env)
        try:
            s3_server.make_bucket(endpoint, "hw-bucket", env)
            remote = array_store.parse("s3://hw-bucket/archive")
            record = arrays.write(remote, "runs/a/levels", data, threads=3)
            assert record == local
            assert arrays.check(remote, record) == record.sha256
            assert np.array_equal(arrays.read(remote, record), data)
        finally:
            s3_server.restore(saved)
