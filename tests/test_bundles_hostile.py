"""Hostile bundles and edited catalog rows: nothing they say may make mlarch write, remove or
run anything outside the archive folder, and a refused import leaves the archive as it was."""

import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from mlarch.store import bundle as bundle_mod
from mlarch.store import bundle_checks
from mlarch.store import layout
from mlarch.store.maintenance import leftover_staging
from fixtures import one_error


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def snapshot(root: Path) -> list:
    """Every file, folder and link under root with its size and content digest."""
    found = []
    for folder, dirs, files in os.walk(root):  # never follows links
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found.append((rel, "link", os.readlink(path)))
            elif path.is_dir():
                found.append((rel, "dir"))
            else:
                found.append((rel, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()))
    return sorted(found)


@pytest.fixture(scope="module")
def bundles(llama_archive, tmp_path_factory):
    """An archive holding the en runs (imported), and a bundle of all six runs: the de and bn
    runs are new to that archive, so a hostile copy of it reaches every step of an import."""
    folder = tmp_path_factory.mktemp("bundles")
    source = mlarch.open(llama_archive)
    en = source.sql("SELECT run_id FROM runs WHERE lang = 'en' ORDER BY run_id")["run_id"].to_list()
    new = source.sql("SELECT run_id FROM runs WHERE lang <> 'en' ORDER BY run_id")["run_id"].to_list()
    assert run(llama_archive, "export-bundle", *en, "-o", str(folder / "en.tar")).exit_code == 0
    assert run(llama_archive, "export-bundle", "--model", "tiny-llama", "-o", str(folder / "all.tar")).exit_code == 0
    base = folder / "base"
    assert run(base, "import-bundle", str(folder / "en.tar")).exit_code == 0
    return SimpleNamespace(all=folder / "all.tar", base=base, en=en, new=new)


@pytest.fixture
def target(bundles, tmp_path):
    """A copy of the en-only archive, an `outside` folder next to it, and the state of both."""
    root = tmp_path / "arch"
    shutil.copytree(bundles.base, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    (outside / "runs").mkdir()
    (outside / "runs" / "keep.txt").write_text("precious too")
    state = SimpleNamespace(root=root, outside=outside, tmp=tmp_path)
    state.before = snapshot(root)
    state.outside_before = snapshot(outside)

    def unchanged():
        assert snapshot(outside) == state.outside_before
        assert snapshot(root) == state.before
        assert not list(tmp_path.glob("pwned*"))
    state.unchanged = unchanged
    return state


def rewrite(src: Path, dst: Path, edit=None, rename=None, extra=(), drop=(), reseal=True, replace=None) -> Path:
    """A copy of bundle `src` with its manifest edited, members renamed, added, dropped or their
    bytes replaced (`replace`: name -> bytes). With `reseal`, run record digests are recomputed
    the way a forger would."""
    with tarfile.open(src) as tar:
        items = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    assert items[0][0].name == "manifest.json"
    manifest = json.loads(items[0][1])
    if edit:
        edit(manifest)
    if reseal:
        _reseal(manifest)
    with tarfile.open(dst, "w") as out:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
        for member, data in items[1:]:
            if member.name in drop:
                continue
            if replace and member.name in replace:
                data = replace[member.name]
                member.size = len(data)
            if rename:
                member.name = rename(member.name)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
        for info, data in extra:
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def _reseal(manifest: dict) -> None:
    from mlarch.store import records

    tables = {name: [dict(zip(t["columns"], map(bundle_checks.restore, row))) for row in t["rows"]]
              for name, t in manifest["tables"].items()}
    runs = manifest["tables"]["runs"]
    if "record_sha256" not in runs["columns"]:
        return
    at = runs["columns"].index("record_sha256")
    for row, run_row in zip(runs["rows"], tables["runs"]):
        samples = sorted((s for s in tables["run_samples"] if s["run_id"] == run_row["run_id"]),
                         key=lambda s: s["position"])
        row[at] = records.run_digest(run_row, [s["item_index"] for s in samples],
                                     [a for a in tables["arrays"] if a["owner"] == run_row["run_id"]])


def table(manifest: dict, name: str) -> dict:
    return manifest["tables"][name]


def levels_row(manifest: dict, run_id: str) -> list:
    arrays = table(manifest, "arrays")
    cols = arrays["columns"]
    return next(r for r in arrays["rows"] if r[cols.index("owner")] == run_id and r[cols.index("kind")] == "levels")


def refused(result, *phrases):
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def test_column_name_injection_is_refused(bundles, target):
    pwned = target.tmp / "pwned.csv"

    def edit(manifest):  # INSERT INTO runs (c1..c7, <evil>, c9..) VALUES (?...) runs three statements
        columns = table(manifest, "runs")["columns"]
        at = columns.index("n_tokens")
        columns[at] = (f"n_tokens) SELECT {', '.join(['NULL'] * (at + 1))} WHERE false; "
                       f"COPY (SELECT 42) TO '{pwned}'; INSERT INTO runs ({', '.join(columns[:at + 1])}")
    bad = rewrite(bundles.all, target.tmp / "inject.tar", edit)
    result = run(target.root, "import-bundle", str(bad))
    assert not pwned.exists()
    refused(result, "which this archive's catalog lacks", "upgrade mlarch")
    target.unchanged()


def test_newer_schema_column_is_refused_before_any_copy(bundles, target):
    def edit(manifest):
        runs = table(manifest, "runs")
        runs["columns"].append("energy_joules")
        for row in runs["rows"]:
            row.append(12.5)
    bad = rewrite(bundles.all, target.tmp / "newer.tar", edit)
    result = run(target.root, "import-bundle", str(bad))
    refused(result, "column runs.energy_joules", "upgrade mlarch")
    target.unchanged()
    assert not list((target.root / "arrays.zarr" / "runs").glob(f"{bundles.new[0]}*"))


@pytest.mark.parametrize("where", ["", "runs", "outside-absolute", "../../outside", "other-run", "models"])
def test_array_path_outside_its_group_is_refused(bundles, target, where):
    victim = bundles.new[0]
    path = {"": "", "runs": "runs", "outside-absolute": str(target.outside), "../../outside": "../../outside",
            "other-run": f"runs/{bundles.en[0]}/levels", "models": "models"}[where]
    original = f"runs/{victim}/levels"

    def edit(manifest):
        row = levels_row(manifest, victim)
        row[table(manifest, "arrays")["columns"].index("path")] = path

    def rename(name):  # members follow the edited path, as a crafted bundle's would
        return f"arrays/{path}/{name[len(f'arrays/{original}/'):]}" if name.startswith(f"arrays/{original}/") else name
    bad = rewrite(bundles.all, target.tmp / "path.tar", edit, rename)
    result = run(target.root, "import-bundle", str(bad))
    refused(result, "refusing all of it", f"not '{original}'")
    target.unchanged()


@pytest.mark.parametrize("field,value", [("arrays_group", "runs"), ("arrays_group", "../outside"),
                                         ("run_id", "../../outside")])
def test_run_row_outside_its_group_is_refused(bundles, target, field, value):
    victim = bundles.new[0]

    def edit(manifest):
        runs = table(manifest, "runs")
        cols = runs["columns"]
        row = next(r for r in runs["rows"] if r[cols.index("run_id")] == victim)
        row[cols.index(field)] = value
        if field == "run_id":  # a consistent forgery: the group and arrays follow the id
            row[cols.index("arrays_group")] = f"runs/{value}"
            for name in ("arrays", "run_samples"):
                t = table(manifest, name)
                key = t["columns"].index("owner" if name == "arrays" else "run_id")
                for r in t["rows"]:
                    if r[key] == victim:
                        r[key] = value
    bad = rewrite(bundles.all, target.tmp / "row.tar", edit)
    refused(run(target.root, "import-bundle", str(bad)), "refusing all of it")
    target.unchanged()


def test_rows_the_catalog_rejects_leave_no_arrays_behind(bundles, target):
    def edit(manifest):  # passes every check before the INSERT, which cannot cast it
        runs = table(manifest, "runs")
        at = runs["columns"].index("n_samples")
        runs["rows"][-1][at] = "many"
    bad = rewrite(bundles.all, target.tmp / "cast.tar", edit)
    refused(run(target.root, "import-bundle", str(bad)), "does not fit this archive's catalog", "refusing all of it")
    target.unchanged()  # the arrays placed before the INSERT are gone again


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
def test_link_or_device_member_is_refused(bundles, target, kind):
    chunk = f"arrays/runs/{bundles.new[0]}/levels/c/0"
    info = tarfile.TarInfo(chunk)
    info.type = kind
    info.linkname = str(target.outside / "keep.txt") if kind == tarfile.SYMTYPE else "manifest.json"
    bad = rewrite(bundles.all, target.tmp / "link.tar", drop={chunk}, extra=[(info, None)])
    refused(run(target.root, "import-bundle", str(bad)), "is not a regular file")
    target.unchanged()


@pytest.mark.parametrize("extra", ["evil.sh", "arrays/runs/{id}/levels/c/1", "arrays/runs/{id}/levels/c/0",
                                   "arrays/runs/{id}/levels/../../../../pwned"])
def test_member_not_named_by_the_manifest_is_refused(bundles, target, extra):
    name = extra.format(id=bundles.new[0])
    info = tarfile.TarInfo(name)
    info.size = 4
    bad = rewrite(bundles.all, target.tmp / "extra.tar", extra=[(info, b"boom")])
    result = run(target.root, "import-bundle", str(bad))
    refused(result, "appears twice" if name.endswith("c/0") else "is not a file of an array its manifest names")
    target.unchanged()


def _bomb_members(bundles, size: int):
    """The real bundle's members, but the first new run's levels chunk declares `size` zero
    bytes (its data None): only the size checks stand between it and the disk."""
    with tarfile.open(bundles.all) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    chunk = f"arrays/runs/{bundles.new[0]}/levels/c/0"
    big = next(m for m, _ in members if m.name == chunk)
    big.size = size
    return [(m, None if m is big else data) for m, data in members]


class _Zeros(io.RawIOBase):
    def __init__(self, size):
        self.left = size

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self):
        return True


def test_gzip_bomb_writes_nothing(bundles, target):
    bomb = target.tmp / "bomb.tar"  # a .tar name, gzip inside
    with gzip.open(bomb, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for member, data in _bomb_members(bundles, 64 << 20):
            tar.addfile(member, io.BytesIO(data) if data is not None else io.BufferedReader(_Zeros(member.size)))
    assert bomb.stat().st_size < 1 << 20
    limit = 1 << 20  # no file the import writes may exceed 1 MiB (Python ignores SIGXFSZ: EFBIG)
    done = subprocess.run(
        [sys.executable, "-m", "mlarch", "--archive", str(target.root), "import-bundle", str(bomb)],
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 1, done.stderr
    assert "gzip-compressed: decompress it first" in done.stderr
    assert not list(target.root.glob(".import-*"))
    target.unchanged()


def test_oversized_member_is_refused_before_extraction(bundles, target):
    bomb = target.tmp / "sparse.tar"  # a plain tar whose member declares 256 MiB (a hole on disk)
    with open(bomb, "wb") as out:
        for member, data in _bomb_members(bundles, 256 << 20):
            out.write(member.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            if data is None:
                out.seek(member.size + -member.size % 512, os.SEEK_CUR)
            else:
                out.write(data + bytes(-len(data) % 512))
        out.write(bytes(1024))
    result = run(target.root, "import-bundle", str(bomb))
    refused(result, "declares 268,435,456 bytes, more than its array can occupy")
    assert not list(target.root.glob(".import-*"))
    target.unchanged()


def test_import_stages_under_an_owner_name_that_gc_can_judge(bundles, target, monkeypatch):
    seen = []

    def stop(root, staging, *args):
        seen.append(staging)
        assert staging.is_dir() and staging.parent == target.root
        raise bundle_mod.MlarchError("stopped here")
    monkeypatch.setattr(bundle_mod, "_merge", stop)
    refused(run(target.root, "import-bundle", str(bundles.all)), "stopped here")
    assert layout.staging_owner(seen[0].name) == (layout.host_tag(), os.getpid())
    assert not seen[0].exists()  # removed on the way out
    # a killed importer's folder (dead pid) goes with gc; a live one's and another host's stay
    dead = target.root / f".import-{layout.host_tag()}-999999999-0123abcd"
    live = target.root / f".import-{layout.host_tag()}-{os.getpid()}-0123abcd"
    remote = target.root / ".import-00000000-999999999-0123abcd"
    for folder in (dead, live, remote):
        (folder / "arrays").mkdir(parents=True)
    assert leftover_staging(target.root) == [dead.name]
    result = run(target.root, "gc")
    assert result.exit_code == 0 and f"removed staging folder {dead.name}" in result.stdout, result.output
    assert not dead.exists() and live.exists() and remote.exists()
    assert leftover_staging(target.root) == []


def _edit_catalog(root: Path, sql: str, params) -> None:
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute(sql, params)
    con.close()


@pytest.mark.parametrize("where", ["absolute", "relative", "other-run"])
@pytest.mark.parametrize("command", ["rm", "gc"])
def test_edited_arrays_group_stops_rm_and_gc(archive_copy, tmp_path, where, command):
    outside = tmp_path / "outside"
    (outside / "runs").mkdir(parents=True)
    (outside / "keep.txt").write_text("precious")
    run_ids = mlarch.open(archive_copy).sql("SELECT run_id FROM runs ORDER BY run_id")["run_id"].to_list()
    group = {"absolute": str(outside), "relative": "../../outside", "other-run": f"runs/{run_ids[1]}"}[where]
    _edit_catalog(archive_copy, "UPDATE runs SET arrays_group = ? WHERE run_id = ?", [group, run_ids[0]])
    if command == "gc":  # a FAILED run: gc removes it, and would take its group along
        _edit_catalog(archive_copy, "UPDATE runs SET status = 'FAILED' WHERE run_id = ?", [run_ids[0]])
    before, outside_before = snapshot(archive_copy), snapshot(outside)
    result = run(archive_copy, command, *([run_ids[0]] if command == "rm" else []))
    refused(result, f"run {run_ids[0]}: arrays path", "the catalog row was edited", "nothing was removed")
    assert snapshot(outside) == outside_before and snapshot(archive_copy) == before


def test_symlinked_runs_folder_stops_rm(archive_copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    runs = archive_copy / "arrays.zarr" / "runs"
    shutil.move(runs, outside / "runs")  # every run's arrays now lie outside, behind a link
    runs.symlink_to(outside / "runs")
    run_id = mlarch.open(archive_copy).sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    before, outside_before = snapshot(archive_copy), snapshot(outside)
    refused(run(archive_copy, "rm", run_id), "leads through a symbolic link", "nothing was removed")
    assert (outside / "runs" / run_id).is_dir()
    assert snapshot(outside) == outside_before and snapshot(archive_copy) == before


def test_export_refuses_a_row_pointing_outside(archive_copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "zarr.json").write_text("{}")
    path = mlarch.open(archive_copy).sql("SELECT path FROM arrays WHERE kind = 'levels' LIMIT 1").item()
    _edit_catalog(archive_copy, "UPDATE arrays SET path = ? WHERE path = ?", [str(outside), path])
    result = run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(tmp_path / "out.tar"))
    refused(result, "nothing was exported")
    assert not list(tmp_path.glob("out.tar*"))


def test_parquet_export_path_cannot_break_out_of_sql(archive_copy, tmp_path):
    folder = tmp_path / "it's'); COPY (SELECT 42) TO 'pwned.csv'; --"
    result = run(archive_copy, "export", str(folder))
    assert result.exit_code == 0, result.output
    assert (folder / "runs.parquet").is_file() and (folder / "overlap_global.parquet").is_file()
    assert not list(tmp_path.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))


def _set(manifest: dict, name: str, column: str, where, value) -> int:
    """Set `column` to value(row) in the rows of table `name` where where(row); returns how many."""
    t = table(manifest, name)
    cols = t["columns"]
    hits = 0
    for row in t["rows"]:
        named = dict(zip(cols, row))
        if where(named):
            row[cols.index(column)] = value(named)
            hits += 1
    return hits


@pytest.mark.parametrize("case", ["n_samples", "item_index", "swap_en_bn", "no_digest"])
def test_edited_run_records_in_a_bundle_are_refused(bundles, target, case):
    """Careless edits (no digest recomputed): issue 11 item 3."""
    def edit(manifest):
        if case == "n_samples":
            assert _set(manifest, "runs", "n_samples", lambda r: r["run_id"] == bundles.new[0], lambda r: r["n_samples"] + 1)
        elif case == "item_index":
            assert _set(manifest, "run_samples", "item_index", lambda r: r["run_id"] == bundles.new[0] and r["position"] == 0,
                        lambda r: r["item_index"] + 1) == 1
        elif case == "swap_en_bn":  # the bn runs of the bundle are new to the target: relabel them de <-> bn
            assert _set(manifest, "runs", "lang", lambda r: r["lang"] in ("de", "bn"),
                        lambda r: "bn" if r["lang"] == "de" else "de") == 4
        else:
            assert _set(manifest, "runs", "record_sha256", lambda r: r["run_id"] == bundles.new[0], lambda r: None)
    bad = rewrite(bundles.all, target.tmp / "edited.tar", edit=edit, reseal=False)
    refused(run(target.root, "import-bundle", str(bad)), "refusing all of it")
    target.unchanged()
    # the same bundle unedited imports
    good = rewrite(bundles.all, target.tmp / "plain.tar", reseal=False)
    assert run(target.root, "import-bundle", str(good)).exit_code == 0
    assert run(target.root, "verify").exit_code == 0


def test_format_1_bundle_without_digests_is_refused(bundles, target):
    """A forger's shortcut: claim the old format (no record digests) and relabel runs."""
    def edit(manifest):
        manifest["version"] = 1
        for name in ("runs", "models", "arrays"):
            t = table(manifest, name)
            for column in ("record_sha256", "meta_sha256", "chunk_sha256"):
                if column in t["columns"]:
                    at = t["columns"].index(column)
                    t["columns"].pop(at)
                    for row in t["rows"]:
                        row.pop(at)
        assert _set(manifest, "runs", "lang", lambda r: r["lang"] in ("de", "bn"),
                    lambda r: "bn" if r["lang"] == "de" else "de") == 4
    bad = rewrite(bundles.all, target.tmp / "v1.tar", edit=edit, reseal=False)
    refused(run(target.root, "import-bundle", str(bad)), "format version 1", "export the bundle again")
    target.unchanged()


@pytest.mark.parametrize("case", ["unknown", "claims_whole"])
def test_an_edited_digest_scheme_is_refused(bundles, target, case):
    """A bundle row whose sha256_scheme (schema 7) names a scheme mlarch never wrote, or claims
    the older whole-array digest for a chunked one: refused, resealed like a forger would."""
    new_levels = lambda r: r["owner"] == bundles.new[0] and r["kind"] == "levels"  # noqa: E731

    def edit(manifest):
        assert _set(manifest, "arrays", "sha256_scheme", new_levels,
                    lambda r: "blake3" if case == "unknown" else None) == 1
    bad = rewrite(bundles.all, target.tmp / "scheme.tar", edit=edit)
    phrase = "digest scheme 'blake3'" if case == "unknown" else "the bundle was altered"
    refused(run(target.root, "import-bundle", str(bad)), phrase, "refusing all of it")
    target.unchanged()


def test_a_bundle_from_before_chunked_digests_imports_and_verifies(llama_archive, target, tmp_path):
    """What a schema-6 mlarch exported: no sha256_scheme column, every array's sha256 over its
    whole bytes. It imports beside chunked rows, keeps its digests, and verifies."""
    from old_archives import downgrade_to_schema_6

    old = tmp_path / "old"
    shutil.copytree(llama_archive, old)
    downgrade_to_schema_6(old)
    source = mlarch.open(old)
    bn = source.sql("SELECT run_id FROM runs WHERE lang = 'bn' ORDER BY run_id")["run_id"].to_list()
    assert run(old, "export-bundle", *bn, "-o", str(tmp_path / "upgraded.tar")).exit_code == 0

    def drop_column(manifest):  # as the older exporter wrote it
        t = table(manifest, "arrays")
        at = t["columns"].index("sha256_scheme")
        assert {row[at] for row in t["rows"]} == {None}
        t["columns"].pop(at)
        for row in t["rows"]:
            row.pop(at)
    older = rewrite(tmp_path / "upgraded.tar", tmp_path / "older.tar", edit=drop_column, reseal=False)
    assert run(target.root, "import-bundle", str(older)).exit_code == 0
    archive = mlarch.open(target.root)
    schemes = archive.sql("SELECT owner, sha256_scheme FROM arrays WHERE kind <> 'magnitudes'").rows()
    assert {owner for owner, scheme in schemes if scheme is None} == set(bn)
    assert {scheme for owner, scheme in schemes if owner not in bn} == {"chunks"}
    assert run(target.root, "verify").exit_code == 0


def test_export_refuses_an_object_larger_than_its_array_allows(archive_copy, tmp_path):
    """A planted 1 GiB "chunk" (sparse here) is not copied into the bundle: the export stops
    before filling the disk with what any import would refuse."""
    path = mlarch.open(archive_copy).sql("SELECT path FROM arrays WHERE kind = 'levels' LIMIT 1").item()
    chunk = archive_copy / "arrays.zarr" / path / "c" / "0"
    with open(chunk, "r+b") as f:
        f.truncate(1 << 30)
    result = run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(tmp_path / "out.tar"))
    refused(result, "nothing was exported", f"array object arrays/{path}/c/0 is 1,073,741,824 bytes, more than the")
    assert not list(tmp_path.glob("out.tar*"))


# --- export checks what it packs; import creates nothing for a bundle it refuses ----------------

def test_export_refuses_a_link_loop_inside_arrays_zarr(archive_copy, tmp_path):
    """arrays.zarr/runs/<id> made a link to itself: pathlib raises RuntimeError (not OSError)
    for such a loop; the export names it in one line instead of the catch-all."""
    run_id = mlarch.open(archive_copy).sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    group = archive_copy / "arrays.zarr" / "runs" / run_id
    shutil.rmtree(group)
    group.symlink_to(group)
    with pytest.raises(OSError, match="symbolic links"):  # the loop is real
        group.stat()
    result = run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(tmp_path / "out.tar"))
    line = one_error(result, 1)
    assert f"runs/{run_id}" in line and "symbolic link loop" in line and "nothing was exported" in line, line
    assert not list(tmp_path.glob("out.tar*"))


@pytest.mark.parametrize("damage", ["chunk", "zarr.json"])
def test_export_refuses_an_array_that_differs_from_its_catalog_digests(archive_copy, tmp_path, damage):
    """A damaged chunk or an edited zarr.json is refused at export (pointing to verify), not
    packed for an import elsewhere to refuse."""
    path = mlarch.open(archive_copy).sql("SELECT path FROM arrays WHERE kind = 'levels' ORDER BY path LIMIT 1").item()
    target = archive_copy / "arrays.zarr" / path / ("c/0" if damage == "chunk" else "zarr.json")
    before = target.read_bytes()
    if damage == "chunk":
        target.write_bytes(b"garbage\n")
    else:
        meta = json.loads(before)
        meta["attributes"] = {"edited": True}  # still a valid zarr.json of the same array
        target.write_text(json.dumps(meta))
    assert target.read_bytes() != before
    result = run(archive_copy, "export-bundle", "--model", "tiny-llama", "-o", str(tmp_path / "out.tar"))
    line = one_error(result, 1)
    assert path in line and "run `mlarch verify`" in line and "nothing was exported" in line, line
    assert not list(tmp_path.glob("out.tar*"))


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) // 2])
    return dst


def _damaged_chunk(bundles, dst: Path) -> Path:
    """The bundle with one chunk of a new run overwritten: it passes every check of the
    manifest and headers, and fails only once extracted (after an archive was made)."""
    with tarfile.open(bundles.all) as tar:
        chunk = next(m.name for m in tar.getmembers()
                     if m.name.startswith(f"arrays/runs/{bundles.new[0]}/levels/c/"))
        size = tar.getmember(chunk).size
    info = tarfile.TarInfo(chunk)
    info.size = size
    return rewrite(bundles.all, dst, drop={chunk}, extra=[(info, b"\x00" * size)], reseal=False)


@pytest.mark.parametrize("case", ["garbage", "empty", "truncated", "no_manifest", "bad_version", "damaged_chunk"])
def test_a_refused_import_into_a_new_path_leaves_nothing(bundles, tmp_path, case):
    """A mistyped --archive and a bad bundle: the one-line refusal, and no empty archive
    (nor the folders above it) left behind, also when the bundle fails after its scan."""
    bad = tmp_path / f"{case}.tar"
    if case == "garbage":
        bad.write_bytes(b"garbage\n")
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "truncated":
        _truncated(bundles.all, bad)
    elif case == "no_manifest":
        with tarfile.open(bad, "w"):
            pass
    elif case == "bad_version":
        rewrite(bundles.all, bad, edit=lambda manifest: manifest.update(version=float("nan")), reseal=False)
    else:
        _damaged_chunk(bundles, bad)
    root = tmp_path / "typo" / "arch"
    before = snapshot(tmp_path)
    one_error(run(root, "import-bundle", str(bad)), 1)
    assert not (tmp_path / "typo").exists()
    assert snapshot(tmp_path) == before


def test_a_refused_import_into_an_empty_folder_leaves_it_empty(bundles, tmp_path):
    root = tmp_path / "arch"
    root.mkdir()
    one_error(run(root, "import-bundle", str(_damaged_chunk(bundles, tmp_path / "damaged.tar"))), 1)
    assert root.is_dir() and list(root.iterdir()) == []
    assert run(root, "import-bundle", str(bundles.all)).exit_code == 0  # the same folder takes a good one
    assert run(root, "verify").exit_code == 0


@pytest.mark.parametrize("version", [float("nan"), "3", 2.5, True, None])
def test_a_manifest_version_that_is_no_integer_is_malformed_not_newer(bundles, target, version):
    bad = rewrite(bundles.all, target.tmp / "version.tar", edit=lambda manifest: manifest.update(version=version),
                  reseal=False)
    line = one_error(run(target.root, "import-bundle", str(bad)), 1)
    assert "is not an integer" in line and "refusing all of it" in line and "upgrade" not in line, line
    target.unchanged()
