"""A shared read-only archive on S3, against a real S3-protocol server on 127.0.0.1 (moto's,
started here; never the network): `publish` uploads a snapshot of the catalog beside the
arrays, and a second "machine" (a fresh MLARCH_CACHE) opens `s3://BUCKET/PREFIX` and must get
the local archive's answers. The published objects are then damaged or edited on purpose (each
an error, never a plausible archive), writes are attempted (each one line, nothing changed),
and an update is published (fetched again; an unchanged one is not).

Also the review fixes of mlarch.store.array_store: no secret in any message, and no key built
from a catalog row outside the prefix."""

import hashlib
import json
import shutil
import uuid

import pytest

pytest.importorskip("s3fs", reason="arrays on S3 need s3fs: pip install 'mlarch[s3]'")
pytest.importorskip("moto.server", reason="the S3 test server is moto's: pip install 'mlarch[test-services]'")

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import mlarch  # noqa: E402
import s3_server  # noqa: E402
from fixtures import one_error  # noqa: E402
from mlarch.cli import cli  # noqa: E402
from mlarch.errors import MlarchError, UsageError  # noqa: E402
from mlarch.store import array_store, catalog, layout, remote_catalog  # noqa: E402

BUCKET = "mlarch-pub"
KS = [0.01, 0.05, 0.25]
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, its bucket, and the AWS_* settings pointing at it for this module's tests."""
    with s3_server.bucket_session(tmp_path_factory.mktemp("aws"), BUCKET) as session:
        yield session


def _ingest(root, model_dir, data, langs, **options):
    mlarch.open(root).ingest(str(model_dir["llama"]), langs, data["math"], data["control"], name=MODEL,
                             samples=4, top_k=KS, device="cpu", **options)


@pytest.fixture(scope="module")
def published(s3, tmp_path_factory, model_dir, data):
    """One configuration archived twice (arrays local; arrays on S3), the second published."""
    base = tmp_path_factory.mktemp("published")
    local, remote, url = base / "local", base / "remote", f"s3://{BUCKET}/shared"
    _ingest(local, model_dir, data, ["en", "de"])
    _ingest(remote, model_dir, data, ["en", "de"], arrays=url)
    info = mlarch.open(remote).publish(url)
    return {"local": local, "remote": remote, "url": url, "prefix": f"{BUCKET}/shared", "info": info}


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Another machine: a cache of its own (nothing fetched yet)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLARCH_CACHE", str(cache))
    return cache


def _clone(published, s3, tmp_path, name="clone"):
    """The published archive copied, folder and objects, to a prefix of its own (for tests that
    change what is published). Returns (root, url)."""
    fs = s3["fs"]
    root = tmp_path / name
    shutil.copytree(published["remote"], root)
    prefix = f"{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
    for key in fs.find(published["prefix"] + "/"):
        if "/published/" not in key and not key.endswith("/" + array_store.OWNER):  # the copy claims its own
            fs.copy(key, prefix + key[len(published["prefix"]):])
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE array_location SET url = ?", [f"s3://{prefix}"])
    con.close()
    return root, f"s3://{prefix}"


@pytest.fixture(scope="module")
def spare(published, s3, tmp_path_factory):
    """A second published copy whose objects tests damage (put back after each: `damaged`)."""
    root, url = _clone(published, s3, tmp_path_factory.mktemp("spare"))
    info = mlarch.open(root).publish(url)
    keys = {"manifest": f"{url[5:]}/{remote_catalog.MANIFEST}",
            "catalog": f"{url[5:]}/{remote_catalog.catalog_key(info['sha256'])}"}
    return {"root": root, "url": url, "keys": keys, "bodies": {k: s3["fs"].cat_file(key) for k, key in keys.items()}}


@pytest.fixture
def damaged(spare, s3):
    yield spare
    for name, key in spare["keys"].items():
        s3["fs"].pipe_file(key, spare["bodies"][name])


def _objects(s3, prefix) -> dict[str, str]:
    return {key: info["ETag"] for key, info in s3["fs"].find(prefix + "/", detail=True).items()}


def _sorted_rows(frame):
    return sorted(frame.drop([c for c in frame.columns if c.endswith("run_id")]).rows())


def test_a_second_machine_reads_the_published_archive_as_the_local_one(published, s3, machine):
    info = published["info"]
    assert info["url"] == published["url"] and info["runs"] == 4
    stored = _objects(s3, published["prefix"])
    manifest = json.loads(s3["fs"].cat_file(f"{published['prefix']}/published/manifest.json"))
    assert manifest["sha256"] == info["sha256"] and manifest["schema_version"] == catalog.latest_version()
    assert f"{published['prefix']}/published/catalog-{info['sha256']}.duckdb" in stored
    assert "remote" not in json.dumps(manifest)  # no local path of the publisher's

    shared, local = mlarch.open(published["url"]), mlarch.open(published["local"])
    assert shared.root.is_relative_to(machine)  # fetched into this machine's cache
    assert (shared.root / layout.SNAPSHOT).exists()
    assert not (shared.root / layout.ARRAYS).exists()  # arrays are read in place, on S3
    assert shared.compare(MODEL, "en,de").equals(local.compare(MODEL, "en,de"))
    for table in ("selections", "patterns", "set_sizes"):
        assert _sorted_rows(shared.sql(f"SELECT * FROM {table}")) == _sorted_rows(local.sql(f"SELECT * FROM {table}"))
    modules = local.sql("SELECT module FROM modules WHERE model = ? ORDER BY position", [MODEL])["module"].to_list()
    for module in modules[::14]:
        for lang, k in (("en", 0.05), ("de", 0.1)):  # archived k, and re-thresholded from |W| and norms
            assert np.array_equal(shared.selection(MODEL, lang, k, module), local.selection(MODEL, lang, k, module))
    checks = shared.verify()
    assert (checks["status"] == "ok").all(), checks.filter(checks["status"] != "ok")
    assert len(checks.filter(checks["check"] == "array digest")) == 9
    assert _objects(s3, published["prefix"]) == stored  # reading wrote nothing to the bucket

    # the CLI: --archive s3://... gives the local archive's output
    runner = CliRunner()
    for command in (["compare", "--model", MODEL, "--langs", "en,de"],
                    ["sql", "SELECT lang, k, sum(n_selected) AS n FROM set_sizes GROUP BY ALL ORDER BY ALL"]):
        theirs = runner.invoke(cli, ["--archive", published["url"], *command])
        ours = runner.invoke(cli, ["--archive", str(published["local"]), *command])
        assert theirs.exit_code == 0 and theirs.output == ours.output, theirs.output


def test_an_unchanged_archive_is_not_fetched_again_and_an_update_is(published, s3, machine, tmp_path):
    root, url = _clone(published, s3, tmp_path)
    mlarch.open(root).publish(url)
    first = mlarch.open(url).root / layout.CATALOG
    fetched = first.stat()
    assert len(mlarch.open(url).runs()) == 4
    again = first.stat()
    assert (again.st_ino, again.st_mtime_ns) == (fetched.st_ino, fetched.st_mtime_ns)  # the cached copy served
    # the publisher removes a run and publishes again: the reader fetches the new snapshot
    doomed = mlarch.open(root).runs().filter(lang="de", role="control")["run_id"][0]
    mlarch.open(root).rm([doomed])
    old = json.loads(s3["fs"].cat_file(f"{url[5:]}/published/manifest.json"))["catalog"]
    mlarch.open(root).publish(url)
    reader = mlarch.open(url)
    assert doomed not in reader.runs()["run_id"].to_list() and len(reader.runs()) == 3
    assert first.stat().st_ino != fetched.st_ino
    # the previous snapshot stays for readers still fetching it; the one before goes
    snapshots = [k for k in s3["fs"].find(f"{url[5:]}/published/") if k.endswith(".duckdb")]
    assert len(snapshots) == 2 and any(k.endswith(old) for k in snapshots)
    current = mlarch.open(root).publish(url)  # unchanged: the same object again, and the old one goes
    snapshots = [k for k in s3["fs"].find(f"{url[5:]}/published/") if k.endswith(".duckdb")]
    assert snapshots == [f"{url[5:]}/{remote_catalog.catalog_key(current['sha256'])}"]
    # a cached copy changed on this machine is fetched again, not trusted
    with open(first, "r+b") as handle:
        handle.truncate(first.stat().st_size // 2)
    assert len(mlarch.open(url).runs()) == 3
    assert not _failed(mlarch.open(url))


def _failed(archive):
    checks = archive.verify()
    return checks.filter(checks["status"] != "ok").rows()


@pytest.mark.parametrize("damage, expected", [
    ("flip", "does not match its manifest's sha256"),
    ("truncate", "its manifest says"),
    ("grow", "more than"),
    ("delete", "is missing"),
])
def test_a_damaged_published_catalog_is_an_error_not_an_archive(damaged, s3, machine, damage, expected):
    url, key, body = damaged["url"], damaged["keys"]["catalog"], damaged["bodies"]["catalog"]
    if damage == "flip":
        s3["fs"].pipe_file(key, body[:4096] + bytes([body[4096] ^ 1]) + body[4097:])
    elif damage == "truncate":
        s3["fs"].pipe_file(key, body[: len(body) // 2])
    elif damage == "grow":
        s3["fs"].pipe_file(key, body + b"\0" * 10)
    else:
        s3["fs"].rm_file(key)
    with pytest.raises(MlarchError, match=expected):
        mlarch.open(url)
    line = one_error(CliRunner().invoke(cli, ["--archive", url, "runs"]), 1)
    assert expected in line and "publish the archive again" in line
    folder = remote_catalog.cache_folder(url)
    assert sorted(p.name for p in folder.iterdir()) == [".fetch.lock"]  # no catalog, no partial download


def _edit_manifest(s3, damaged, change):
    manifest = json.loads(damaged["bodies"]["manifest"])
    change(manifest)
    s3["fs"].pipe_file(damaged["keys"]["manifest"], json.dumps(manifest).encode())


@pytest.mark.parametrize("change, expected, code", [
    (lambda m: m.update(catalog="published/../../elsewhere.duckdb"), "its catalog is not", 1),
    (lambda m: m.update(schema_version=catalog.latest_version() + 1), "newer than this mlarch", 2),
    (lambda m: m.update(size=1 << 50), "its size is not", 1),
    (lambda m: m.update(size=m["size"] - 1), "its manifest says", 1),
    (lambda m: m.update(sha256="0" * 64, catalog="published/catalog-" + "0" * 64 + ".duckdb"), "is missing", 1),
    (lambda m: m.update(arrays="s3://other-bucket/x"), "names arrays at", 1),
    (lambda m: m.update(format="something-else"), "not an mlarch manifest", 1),
    (lambda m: m.update(format_version=2), "upgrade mlarch", 2),
    (lambda m: m.update(schema_version=catalog.latest_version() - 1), "has schema version", 1),
])
def test_a_hostile_manifest_is_refused(damaged, s3, machine, change, expected, code):
    url = damaged["url"]
    _edit_manifest(s3, damaged, change)
    line = one_error(CliRunner().invoke(cli, ["--archive", url, "runs"]), code)
    assert expected in line, line
    assert not (remote_catalog.cache_folder(url) / layout.CATALOG).exists()


def test_a_published_catalogs_views_are_mlarchs_own(damaged, s3, machine, tmp_path):
    """A publisher may rewrite a view (set_sizes doubled) or add a macro shadowing a function
    the views call, with a manifest to match: every number read through them would lie. The
    fetched copy reads through the migrations' views; tables not mlarch's are refused."""
    def republish(*statements):
        local = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}.duckdb"
        local.write_bytes(damaged["bodies"]["catalog"])
        con = duckdb.connect(str(local))
        for statement in statements:
            con.execute(statement)
        con.execute("CHECKPOINT")
        con.close()
        body = local.read_bytes()
        sha = hashlib.sha256(body).hexdigest()
        s3["fs"].pipe_file(f"{damaged['url'][5:]}/{remote_catalog.catalog_key(sha)}", body)
        _edit_manifest(s3, damaged, lambda m: m.update(sha256=sha, size=len(body),
                                                       catalog=remote_catalog.catalog_key(sha)))

    honest = mlarch.open(damaged["root"])
    expected = _sorted_rows(honest.sql("SELECT * FROM set_sizes"))
    republish("CREATE OR REPLACE VIEW set_sizes AS SELECT * REPLACE (n_selected * 2 AS n_selected) FROM selections",
              "CREATE MACRO list_contains(l, x) AS true")
    shared = mlarch.open(damaged["url"])
    assert _sorted_rows(shared.sql("SELECT * FROM set_sizes")) == expected
    assert shared.compare(MODEL, "en,de").equals(honest.compare(MODEL, "en,de"))
    assert not _failed(shared)  # the catalog schema row included
    republish("ALTER TABLE selections RENAME TO selections_t", "CREATE VIEW selections AS SELECT * FROM selections_t")
    line = one_error(CliRunner().invoke(cli, ["--archive", damaged["url"], "runs"]), 1)
    assert "does not hold mlarch's tables" in line and "publish the archive again" in line, line


def test_a_manifest_that_is_not_json_is_refused(damaged, s3, machine):
    s3["fs"].pipe_file(damaged["keys"]["manifest"], b"\x00garbage")
    with pytest.raises(MlarchError, match="is not JSON"):
        mlarch.open(damaged["url"])


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("mlarch.ingest.loading.load", refuse)


def test_commands_that_write_are_refused_on_a_published_archive(published, s3, machine, model_dir, data,
                                                                 no_model_load, tmp_path):
    before = _objects(s3, published["prefix"])
    url, runner = published["url"], CliRunner()
    run_id = mlarch.open(url).runs()["run_id"][0]
    tar = tmp_path / "b.tar"
    mlarch.open(published["local"]).export_bundle(tar, model=MODEL)
    commands = [
        ["ingest", "--model", str(model_dir["llama"]), "--name", MODEL, "--langs", "bn", "--math", data["math"],
         "--control", data["control"], "--samples", "4", "--device", "cpu", "-q"],
        ["gc"], ["rm", run_id], ["rm", "--model", MODEL], ["import-bundle", str(tar)],
        ["sql", "--write", "DELETE FROM runs"],
        ["eval", "--model", str(model_dir["llama"]), "--name", MODEL, "--langs", "en", "--task", "nll", "--data",
         data["math"], "--device", "cpu", "-q"],
    ]
    for command in commands:
        line = one_error(runner.invoke(cli, ["--archive", url, *command]), 2)
        assert "read-only snapshot" in line and f"publish {url}" in line, (command, line)
    shared = mlarch.open(url)
    for call in (shared.gc, lambda: shared.rm([run_id]), lambda: shared.sql("DELETE FROM runs", write=True),
                 lambda: shared.import_bundle(tar)):
        with pytest.raises(UsageError, match="read-only snapshot"):
            call()
    assert _objects(s3, published["prefix"]) == before  # not an object changed or removed
    assert len(mlarch.open(url).runs()) == 4
    # publishing the fetched copy is no way around it
    with pytest.raises(UsageError, match="is a fetched copy"):
        remote_catalog.publish(shared.root, url)


def test_publish_refuses_an_archive_whose_arrays_are_elsewhere(published, s3, machine):
    line = one_error(CliRunner().invoke(cli, ["--archive", str(published["local"]), "publish", published["url"]]), 2)
    assert "keeps its arrays in its folder" in line
    other = f"s3://{BUCKET}/elsewhere"
    line = one_error(CliRunner().invoke(cli, ["--archive", str(published["remote"]), "publish", other]), 2)
    assert f"keeps its arrays at {published['url']}, not {other}" in line
    assert not s3["fs"].find(f"{BUCKET}/elsewhere/")
    line = one_error(CliRunner().invoke(cli, ["--archive", f"s3://{BUCKET}/nothing-here", "runs"]), 2)
    assert "nothing is published at" in line and "publish" in line
    line = one_error(CliRunner().invoke(cli, ["--archive", "gs://bucket/x", "runs"]), 2)
    assert "is a URL" in line


def test_publish_snapshots_what_is_committed(published, s3, machine, tmp_path):
    """A committed change that is still only in DuckDB's write-ahead log (its writer was
    killed before a checkpoint) is in the snapshot: the file alone would lack it."""
    root, url = _clone(published, s3, tmp_path)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("PRAGMA disable_checkpoint_on_shutdown")  # as a killed writer leaves it
    con.execute("UPDATE runs SET n_tokens = n_tokens + 1000 WHERE lang = 'en'")
    con.close()
    assert (root / "catalog.duckdb.wal").exists()
    mlarch.open(root).publish(url)
    local = mlarch.open(root).sql("SELECT run_id, n_tokens FROM runs ORDER BY run_id")
    assert mlarch.open(url).sql("SELECT run_id, n_tokens FROM runs ORDER BY run_id").equals(local)


# --- the review of array_store --------------------------------------------------------------
def test_no_secret_in_a_message(s3, tmp_path, monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    with pytest.raises(UsageError) as caught:
        array_store.parse(f"s3://AKIAEXAMPLE:{secret}@bucket/p")
    assert secret not in str(caught.value) and "***@" in str(caught.value)
    # an endpoint URL with user:password in it, unreachable: the one-line error names it without them
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.closed_port_url().replace("http://", f"http://u:{secret}@"))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(UsageError) as caught:
        array_store.parse(f"s3://{BUCKET}/p").probe()
    assert secret not in str(caught.value) and "http://***@127.0.0.1" in str(caught.value)
    # whatever a library puts in its message: the secret key's value, a presigned URL
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = array_store.parse(f"s3://{BUCKET}/p")
    text = str(store.trouble(RuntimeError(f"signing with {secret} failed for https://h/k?X-Amz-Signature=abc123"
                                          "&X-Amz-Credential=AKIA%2F2026")))
    assert secret not in text and "abc123" not in text and "AKIA%2F" not in text


@pytest.mark.parametrize("path", ["runs/../../other/x", "../x", "/abs/x", "runs//x", "runs/./x", "runs/x/"])
def test_a_key_from_a_catalog_row_stays_inside_the_prefix(s3, path):
    store = array_store.parse(f"s3://{BUCKET}/p")
    with pytest.raises(layout.UnsafePath):
        store.signature(path)
    with pytest.raises(layout.UnsafePath):
        with store.member(path, "zarr.json"):
            pass
    with pytest.raises(layout.UnsafePath):
        store.remove(path)
    assert store._key("runs/0123456789ab/levels/c/0") == f"{BUCKET}/p/runs/0123456789ab/levels/c/0"


def test_an_unreachable_endpoint_is_one_line(published, machine, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.closed_port_url())
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    line = one_error(CliRunner().invoke(cli, ["--archive", published["url"], "runs"]), 2)
    assert "cannot reach the S3 endpoint" in line and "AWS_ENDPOINT_URL" in line
    assert not machine.exists() or not any(machine.rglob("catalog.duckdb"))


def test_a_snapshot_larger_than_the_free_disk_is_not_fetched(damaged, s3, machine, monkeypatch):
    """A manifest may announce up to 64 GiB: the fetch checks the cache's free space first
    instead of filling the disk to find out (here the disk is made to look nearly full)."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    nearly_full = usage(1 << 30, (1 << 30) - (8 << 20), 8 << 20)
    monkeypatch.setattr(remote_catalog.shutil, "disk_usage", lambda path: nearly_full)
    line = one_error(CliRunner().invoke(cli, ["--archive", damaged["url"], "runs"]), 1)
    assert "bytes free: free some space or set MLARCH_CACHE to another folder" in line, line
    assert not (remote_catalog.cache_folder(damaged["url"]) / layout.CATALOG).exists()
