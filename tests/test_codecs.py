"""Every stored chunk carries a crc32c, so a flipped byte fails the read (README, "Trusting
an archive"): also a flip that the compressor would decode without complaint."""

import json

import numcodecs.blosc
import numpy as np
import pytest
import zarr

import mlarch
from mlarch.errors import MlarchError
from mlarch.store import layout


def stored(root, kind):
    """(run_id, array path) of the first math run's `kind` array."""
    archive = mlarch.open(root)
    run_id = archive.sql("SELECT run_id FROM runs WHERE role = 'math' ORDER BY lang LIMIT 1")["run_id"][0]
    path = archive.sql(f"SELECT path FROM arrays WHERE owner = '{run_id}' AND kind = '{kind}'")["path"][0]
    return archive, run_id, root / layout.ARRAYS / path


def silent_flip(payload: bytes) -> int:
    """A byte past blosc's 16-byte header whose flip blosc still decodes, to other data."""
    clean = numcodecs.blosc.decompress(payload)
    for i in range(16, len(payload)):
        bad = bytearray(payload)
        bad[i] ^= 0x01
        try:
            if numcodecs.blosc.decompress(bytes(bad)) != clean:
                return i
        except Exception:  # noqa: BLE001 - blosc caught this one itself: try the next byte
            continue
    raise AssertionError("every flip broke blosc: nothing left for the crc32c to catch")


@pytest.mark.parametrize("kind, codecs", [("levels", ["bytes", "blosc", "crc32c"]), ("norms", ["bytes", "crc32c"])])
def test_a_flipped_byte_fails_the_read(archive_copy, kind, codecs):
    archive, run_id, folder = stored(archive_copy, kind)
    meta = json.loads((folder / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == codecs  # the crc32c covers the stored (compressed) bytes
    chunk = folder / "c" / "0"
    raw = chunk.read_bytes()
    payload = raw[:-4]  # the crc32c codec appends its 4 bytes
    position = silent_flip(payload) if kind == "levels" else len(payload) // 2
    damaged = bytearray(raw)
    damaged[position] ^= 0x01
    chunk.write_bytes(bytes(damaged))
    # zarr alone, past mlarch's own checks: the crc32c is what refuses the chunk
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(store=str(archive_copy / layout.ARRAYS), path=folder.relative_to(
            archive_copy / layout.ARRAYS).as_posix(), mode="r")[...]
    module = archive.sql("SELECT module FROM modules ORDER BY position LIMIT 1")["module"][0]
    read = archive.levels if kind == "levels" else lambda run, _module: archive.norms(run)
    with pytest.raises(MlarchError):
        read(run_id, module)
    chunk.write_bytes(raw)  # restored: the same reads succeed
    assert np.asarray(read(run_id, module) if kind == "levels" else archive.norms(run_id)[module]).size > 0
