"""Forged bundles (record digests recomputed, which anyone can do) and edited catalog rows that
declare sizes far past the arrays: each is refused in one line before the work or memory its
sizes would cost, and the archive is left as it was."""

import dataclasses
import hashlib
import io
import json
import tarfile

import numcodecs.blosc
import numpy as np
import pytest
import zarr.codecs

from mlarch.errors import MlarchError
from mlarch.store import arrays
from mlarch.store import bundle as bundle_mod
from mlarch.store import bundle_checks, records
from fixtures import one_error
import test_bundles_hostile as hostile
from test_bundles_hostile import _edit_catalog, _set, run

bundles, target = hostile.bundles, hostile.target  # its fixtures: an en-only archive, a bundle of all runs


def forge(src, dst, edit=None, members=None):
    """A copy of bundle `src` with its manifest edited, member bytes replaced (name -> bytes), and
    every run's and model's record digest recomputed from the edited rows, as a forger would."""
    def edited(manifest):
        if edit:
            edit(manifest)
        tables = {name: [dict(zip(t["columns"], map(bundle_checks.restore, row))) for row in t["rows"]]
                  for name, t in manifest["tables"].items()}
        models = manifest["tables"]["models"]
        at = models["columns"].index("record_sha256")
        for row, parsed in zip(models["rows"], tables["models"]):  # the runs: rewrite reseals them
            row[at] = records.model_digest(
                parsed, [m for m in tables["modules"] if m["model"] == parsed["model"]],
                [a for a in tables["arrays"] if a["path"] == f"{parsed['magnitudes_group']}/magnitudes"])

    return hostile.rewrite(src, dst, edited, replace=members)


def _no_placing(monkeypatch):
    """Stop an import at placement: a check that is missing shows as this error, not as hours of
    reads or gigabytes of memory."""
    def stop(*args, **kwargs):
        raise MlarchError("reached placement")
    monkeypatch.setattr(bundle_mod, "_place", stop)


def _lm_head(row):
    return row["module"] == "lm_head"


# --- 1. modules rows that do not tile the model's arrays --------------------------------------

@pytest.mark.parametrize("case", ["huge_rows", "huge_offset", "gap", "zero_rows", "n_params", "float_rows",
                                  "repeated_position", "levels_length"])
@pytest.mark.parametrize("into", ["new", "existing"])
def test_forged_modules_rows_are_refused_before_any_array_work(bundles, target, monkeypatch, case, into):
    def edit(manifest):
        if case == "huge_rows":  # derive would read 2**21 chunks past the end, under the commit lock
            assert _set(manifest, "modules", "n_rows", _lm_head, lambda r: 2 ** 40) == 1
            assert _set(manifest, "modules", "n_params", _lm_head, lambda r: 2 ** 40 * r["n_cols"]) == 1
        elif case == "huge_offset":  # read_ranges(2**50) builds 2**26 tuples
            assert _set(manifest, "modules", "param_offset", _lm_head, lambda r: 2 ** 50) == 1
        elif case == "gap":
            assert _set(manifest, "modules", "param_offset", _lm_head, lambda r: r["param_offset"] + 7) == 1
        elif case == "zero_rows":
            assert _set(manifest, "modules", "n_rows", _lm_head, lambda r: 0) == 1
        elif case == "n_params":
            assert _set(manifest, "modules", "n_params", _lm_head, lambda r: r["n_params"] + 1) == 1
        elif case == "float_rows":
            assert _set(manifest, "modules", "n_rows", _lm_head, lambda r: float(r["n_rows"])) == 1
        elif case == "repeated_position":
            assert _set(manifest, "modules", "position", _lm_head, lambda r: r["position"] - 1) == 1
        else:  # the modules are the model's, but a run's levels claim one entry more
            new_levels = lambda r: r["owner"] == bundles.new[0] and r["kind"] == "levels"  # noqa: E731
            assert _set(manifest, "arrays", "shape", new_levels, lambda r: [r["shape"][0] + 1]) == 1
            assert _set(manifest, "arrays", "nbytes", new_levels, lambda r: r["nbytes"] + 1) == 1
    bad = forge(bundles.all, target.tmp / "modules.tar", edit)
    _no_placing(monkeypatch)
    root = target.root if into == "existing" else target.tmp / "new"
    line = one_error(run(root, "import-bundle", str(bad)), 1)
    assert "refusing all of it" in line and "reached placement" not in line, line
    phrase = {"huge_rows": f"its modules hold {2 ** 45 + 15360:,} parameters, its |W| array 27,648",
              "float_rows": "a value of modules.n_rows is not an integer",
              "levels_length": "its levels array has 27,649 entries, its model's modules 27,648"}.get(
                  case, "module 'lm_head' is not laid out as mlarch lays modules out")
    assert phrase in line, line
    target.unchanged()
    assert not root.exists() or into == "existing"


def test_the_honest_bundle_passes_the_modules_checks(bundles, target):
    good = forge(bundles.all, target.tmp / "honest.tar")  # resealed, unchanged: the same digests
    assert run(target.root, "import-bundle", str(good)).exit_code == 0
    assert run(target.root, "verify").exit_code == 0


def reseal_catalog(root):
    """Every run's and model's record digest recomputed from the catalog's rows, as anyone can."""
    import duckdb

    con = duckdb.connect(str(root / "catalog.duckdb"))
    for (run_id,) in con.execute("SELECT run_id FROM runs WHERE status = 'FINISHED'").fetchall():
        con.execute("UPDATE runs SET record_sha256 = ? WHERE run_id = ?", [records.run_digest_in(con, run_id), run_id])
    for (model,) in con.execute("SELECT model FROM models").fetchall():
        con.execute("UPDATE models SET record_sha256 = ? WHERE model = ?", [records.model_digest_in(con, model), model])
    con.close()


def test_export_refuses_rows_edited_since_they_were_sealed(archive_copy, tmp_path):
    """An edited row would leave in a bundle that its import elsewhere refuses as altered, blaming
    the bundle: export refuses it, naming the catalog."""
    run_id = run(archive_copy, "sql", "SELECT run_id FROM runs ORDER BY run_id LIMIT 1", "--format", "csv"
                 ).stdout.splitlines()[1]
    _edit_catalog(archive_copy, "UPDATE runs SET n_samples = 9 WHERE run_id = ?", [run_id])
    out = tmp_path / "b.tar"
    line = one_error(run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(out)), 1)
    assert line == (f"Error: catalog of {archive_copy}: the rows of run {run_id} changed since it was archived (its "
                    "record digest differs): set the row back (`mlarch sql --write`) or restore the catalog from a "
                    "copy; nothing was exported")
    assert not out.exists()
    reseal_catalog(archive_copy)  # sealed again (as anyone can), it exports: verify's business, not export's
    assert run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(out)).exit_code == 0


def test_export_refuses_catalog_modules_rows_that_do_not_tile_the_arrays(archive_copy, tmp_path):
    _edit_catalog(archive_copy, "UPDATE modules SET n_rows = 2 ** 40, n_params = 2 ** 40 * n_cols "
                  "WHERE module = ?", ["lm_head"])
    reseal_catalog(archive_copy)  # past the record check: the layout check refuses it
    out = tmp_path / "b.tar"
    line = one_error(run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(out)), 1)
    assert line.startswith(f"Error: catalog of {archive_copy}: ") and "nothing was exported" in line, line
    assert f"its modules hold {2 ** 45 + 15360:,} parameters, its |W| array 27,648" in line, line
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


# --- 2. array rows whose shape names millions of chunk files -----------------------------------

HUGE = 2 ** 44  # 4,194,304 chunks: a member table of ~1 GB per array


def _no_huge_member_tables(monkeypatch):
    """member_names as it is, except that a table of more than 1,000 entries fails the test
    instead of being built."""
    original = bundle_checks.member_names

    def bounded(record):
        assert arrays.n_chunks((record["shape"][0],)) <= 1000, f"a member table for shape {record['shape']}"
        return original(record)
    monkeypatch.setattr(bundle_checks, "member_names", bounded)


def _huge(manifest):
    """Every |W| and levels row 2**44 long, with the modules rows to match (lm_head grows) and no
    chunk digests (rows made before schema 2 have none): a forgery every row check passes."""
    params = lambda r: r["kind"] in ("magnitudes", "levels")  # noqa: E731
    assert _set(manifest, "arrays", "shape", params, lambda r: [HUGE]) == 7
    assert _set(manifest, "arrays", "nbytes", params, lambda r: HUGE * (4 if r["kind"] == "magnitudes" else 1)) == 7
    _set(manifest, "modules", "n_rows", _lm_head, lambda r: (HUGE - r["param_offset"]) // r["n_cols"])
    _set(manifest, "modules", "n_params", _lm_head, lambda r: HUGE - r["param_offset"])
    arrays_table = manifest["tables"]["arrays"]
    at = arrays_table["columns"].index("chunk_sha256")
    arrays_table["columns"].pop(at)
    for row in arrays_table["rows"]:
        row.pop(at)


def test_array_rows_naming_more_files_than_the_bundle_holds_are_refused(bundles, target, monkeypatch):
    bad = forge(bundles.all, target.tmp / "huge.tar", _huge)
    _no_huge_member_tables(monkeypatch)
    _no_placing(monkeypatch)
    line = one_error(run(target.root, "import-bundle", str(bad)), 1)
    assert "files, more than its" in line and "refusing all of it" in line, line
    target.unchanged()


def test_export_refuses_array_rows_naming_more_files_than_are_stored(archive_copy, tmp_path, monkeypatch):
    _edit_catalog(archive_copy, "UPDATE arrays SET shape = [?], nbytes = ? * (CASE kind WHEN 'magnitudes' THEN 4 "
                  "ELSE 1 END), chunk_sha256 = NULL WHERE kind IN ('magnitudes', 'levels')", [HUGE, HUGE])
    _edit_catalog(archive_copy, "UPDATE modules SET n_rows = (? - param_offset) // n_cols, n_params = ? - param_offset "
                  "WHERE module = 'lm_head'", [HUGE, HUGE])
    reseal_catalog(archive_copy)
    _no_huge_member_tables(monkeypatch)
    out = tmp_path / "b.tar"
    line = one_error(run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(out)), 1)
    assert line.startswith(f"Error: catalog of {archive_copy}: ") and "nothing was exported" in line, line
    assert f"names {HUGE // (1 << 22) + 1:,} files, and 2 are stored" in line, line
    assert not out.exists()


# --- 3. zarr.json and chunks that decode to more than a chunk holds ----------------------------

def _crc32c(data: bytes) -> int:
    try:
        from google_crc32c import value
    except ImportError:  # zarr before 3.1 (the floor, 3.0.8) checksums with the crc32c package
        from crc32c import crc32c as value
    return value(data)


def _bomb(size: int) -> bytes:
    """A blosc stream of `size` zero bytes (a few KB) with the crc32c mlarch's chunks end in."""
    stream = numcodecs.blosc.compress(np.zeros(size, np.uint8), b"zstd", 9, 0, 0)
    return stream + np.uint32(_crc32c(stream)).tobytes()


def test_a_blosc_chunk_declaring_more_than_a_chunk_is_refused_before_decoding(bundles, target, monkeypatch):
    victim = f"runs/{bundles.new[0]}/levels"
    bomb = _bomb(64 << 20)  # 64 MiB from ~4 KB: the same stream declaring 2 GB is ~110 KB
    assert len(bomb) < 27648 + bundle_checks.CHUNK_OVERHEAD  # within the member size limit
    decoded = []
    original = zarr.codecs.BloscCodec._decode_single

    async def counting(self, chunk, spec):
        decoded.append(len(chunk))
        return await original(self, chunk, spec)
    monkeypatch.setattr(zarr.codecs.BloscCodec, "_decode_single", counting)
    levels = lambda r: r["path"] == victim  # noqa: E731
    bad = forge(bundles.all, target.tmp / "bomb.tar",
                lambda m: _set(m, "arrays", "chunk_sha256", levels, lambda r: [hashlib.sha256(bomb).hexdigest()]),
                {f"arrays/{victim}/c/0": bomb})
    line = one_error(run(target.root, "import-bundle", str(bad)), 1)
    assert f"array {victim}: chunk c/0 declares more bytes than a chunk of it holds (27,648)" in line, line
    assert len(bomb) - 4 not in decoded  # refused before blosc saw it (the crc32c is stripped first)
    target.unchanged()


@pytest.mark.parametrize("case", ["chunk_shape", "blosc_twice"])
def test_a_zarr_json_unlike_mlarchs_is_refused_in_a_bundle(bundles, target, case):
    victim = f"runs/{bundles.new[0]}/levels"
    with tarfile.open(bundles.all) as tar:
        meta = json.loads(tar.extractfile(f"arrays/{victim}/zarr.json").read())
    if case == "chunk_shape":  # chunks of 2**31 elements: one decode would allocate 2 GB
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [2 ** 31]
    else:  # a blosc inside a blosc: the inner header is never seen before it is decoded
        meta["codecs"].insert(1, meta["codecs"][1])
    raw = json.dumps(meta).encode()
    at = lambda r: r["path"] == victim  # noqa: E731
    bad = forge(bundles.all, target.tmp / "meta.tar",
                lambda m: _set(m, "arrays", "meta_sha256", at, lambda r: hashlib.sha256(raw).hexdigest()),
                {f"arrays/{victim}/zarr.json": raw})
    line = one_error(run(target.root, "import-bundle", str(bad)), 1)
    assert f"array {victim} has a zarr.json unlike the ones mlarch writes" in line, line
    target.unchanged()


def _written(tmp_path, data):
    record = arrays.write(tmp_path, "runs/x/levels", data)
    return record, tmp_path / "runs" / "x" / "levels"


@pytest.mark.parametrize("digests", ["chunk", "none"])
def test_local_reads_refuse_a_blosc_bomb_chunk(tmp_path, digests):
    """The chunk's recorded digest is the bomb's (a forged row), or there is none (an array
    written before schema 2, checked whole on its first read): refused before decoding either way."""
    record, folder = _written(tmp_path, (np.arange(8000) % 251).astype(np.uint8))
    bomb = _bomb(64 << 20)  # under the 8,064 bytes a stored chunk of it may have
    (folder / "c" / "0").write_bytes(bomb)
    chunks = (hashlib.sha256(bomb).hexdigest(),) if digests == "chunk" else None
    forged = dataclasses.replace(record, chunk_sha256=chunks)
    for read in (arrays.read, arrays.check):
        with pytest.raises(arrays.ArrayDamaged, match="chunk c/0 declares more bytes than a chunk of it holds"):
            read(tmp_path, forged)


def test_local_reads_refuse_blosc_inside_blosc(tmp_path):
    record, folder = _written(tmp_path, np.arange(1000, dtype=np.uint8))
    meta = json.loads((folder / "zarr.json").read_text())
    meta["codecs"].insert(1, meta["codecs"][1])
    (folder / "zarr.json").write_text(json.dumps(meta))
    unpinned = dataclasses.replace(record, meta_sha256=None)  # its zarr.json is not pinned by a digest
    with pytest.raises(arrays.ArrayDamaged, match="codecs are not the ones mlarch writes"):
        arrays.read(tmp_path, unpinned)


def test_honest_blosc_and_checksum_only_arrays_still_read(tmp_path):
    for data in (np.arange(5 << 20, dtype=np.uint8), np.linspace(0, 1, 1000, dtype=np.float32)):
        record = arrays.write(tmp_path, f"runs/x{data.dtype}/levels", data, compress=data.dtype == np.uint8)
        assert np.array_equal(arrays.read(tmp_path, record), data)
        assert arrays.check(tmp_path, record) == record.sha256


# --- 4. record digests: rows grouped once -----------------------------------------------------

class _Counted(list):
    """A list that counts the times it is iterated."""
    passes = 0

    def __iter__(self):
        type(self).passes += 1
        return super().__iter__()


def test_record_digests_read_the_sample_and_module_rows_once(monkeypatch):
    monkeypatch.setattr(records, "run_digest", lambda run, items, arrays_: run["record_sha256"])
    monkeypatch.setattr(records, "model_digest", lambda model, modules, arrays_: model["record_sha256"])
    runs = [{"run_id": f"r{i}", "record_sha256": "d"} for i in range(50)]
    models = [{"model": f"m{i}", "record_sha256": "d", "magnitudes_group": f"models/m{i}"} for i in range(20)]
    samples, modules = _Counted(), _Counted()
    samples.extend({"run_id": r["run_id"], "position": p, "item_index": p} for r in runs for p in range(10))
    modules.extend({"model": m["model"], "position": p} for m in models for p in range(10))
    tables = {"run_samples": samples, "modules": modules, "arrays": []}
    _Counted.passes = 0
    bundle_checks.check_record_digests(tables, {}, runs, models, "b.tar")
    assert _Counted.passes == 2  # one pass over each table, not one per run or model


# --- 7. provenance nested past Python's recursion limit ----------------------------------------

def test_deeply_nested_provenance_is_refused_in_one_line(bundles, target):
    depth = 100_000
    new = lambda r: r["run_id"] == bundles.new[0]  # noqa: E731
    with tarfile.open(bundles.all) as tar:
        items = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    manifest = json.loads(items[0][1])
    assert _set(manifest, "runs", "provenance", new, lambda r: "[" * depth + "]" * depth) == 1
    bad = target.tmp / "deep.tar"
    with tarfile.open(bad, "w") as out:  # not resealed: the digest check itself parses it
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
        for member, data in items[1:]:
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    line = one_error(run(target.root, "import-bundle", str(bad)), 1)
    assert f"run {bundles.new[0]}'s rows differ from its record digest" in line, line
    target.unchanged()


def test_a_recursion_error_in_a_digest_is_an_altered_bundle(monkeypatch):
    def deep(*args):
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")
    monkeypatch.setattr(records, "run_digest", deep)
    monkeypatch.setattr(records, "model_digest", deep)
    tables = {"run_samples": [], "modules": [], "arrays": []}
    with pytest.raises(MlarchError, match="run r1's rows differ from its record digest"):
        bundle_checks.check_record_digests(tables, {}, [{"run_id": "r1", "record_sha256": "d"}], [], "b.tar")
    with pytest.raises(MlarchError, match="model 'm1''s rows differ from its record digest"):
        bundle_checks.check_record_digests(tables, {}, [], [{"model": "m1", "record_sha256": "d",
                                                             "magnitudes_group": "models/m1"}], "b.tar")
