"""Arrays on object storage: an archive whose arrays live in an S3 bucket prefix, against a
real S3-protocol server on 127.0.0.1 (moto's, started and stopped here; never the network).

The same tiny model and data are archived twice, arrays local and arrays on S3, each in two
ingests (the second without --arrays: it reads the location from the catalog); everything
read back must be identical row by row. Then the bucket is damaged on purpose (an object
deleted or replaced), and the store is misconfigured (missing bucket, wrong credentials,
unreachable endpoint, another --arrays): each is a report or a one-line error."""

import json
import shutil
import time
import uuid

import pytest

pytest.importorskip("s3fs", reason="arrays on S3 need s3fs: pip install 'mlarch[s3]'")
pytest.importorskip("moto.server", reason="the S3 test server is moto's: pip install 'mlarch[test-services]'")

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import mlarch  # noqa: E402
import s3_server  # noqa: E402
from fixtures import one_error  # noqa: E402
from mlarch.cli import cli  # noqa: E402
from mlarch.errors import UsageError  # noqa: E402
from mlarch.store import array_store, arrays, bundle, catalog, maintenance  # noqa: E402

BUCKET = "mlarch-test"
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
def pair(s3, tmp_path_factory, model_dir, data):
    """Two archives of one configuration: arrays in arrays.zarr, and arrays on S3."""
    base = tmp_path_factory.mktemp("s3pair")
    local, remote, url = base / "local", base / "remote", f"s3://{BUCKET}/pair"
    _ingest(local, model_dir, data, ["en", "de"])
    _ingest(remote, model_dir, data, ["en"], arrays=url)
    _ingest(remote, model_dir, data, ["de"])  # the location comes from the catalog now
    return {"local": local, "remote": remote, "url": url, "prefix": f"{BUCKET}/pair"}


def _clone(pair, s3, tmp_path, name="clone"):
    """A copy of the S3 archive with its objects copied to a prefix of its own (for tests
    that change the bucket). Returns (root, prefix)."""
    fs = s3["fs"]
    root = tmp_path / name
    shutil.copytree(pair["remote"], root)
    prefix = f"{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
    for key in fs.find(pair["prefix"] + "/"):
        if not key.endswith("/" + array_store.OWNER):  # the copy is another archive: it claims its prefix itself
            fs.copy(key, prefix + key[len(pair["prefix"]):])
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE array_location SET url = ?", [f"s3://{prefix}"])
    con.close()
    return root, prefix


def _without_run_ids(frame: pl.DataFrame) -> list[tuple]:
    return sorted(frame.drop([c for c in frame.columns if c.endswith("run_id")]).rows())


def _runs(root) -> dict[tuple[str, str], str]:
    return {(r["lang"], r["role"]): r["run_id"] for r in mlarch.open(root).runs().iter_rows(named=True)}


def _modules(root) -> list[str]:
    return mlarch.open(root).sql("SELECT module FROM modules WHERE model = ? ORDER BY position", [MODEL])["module"].to_list()


def _failed(checks) -> list:
    return [c for c in checks if not c.ok]


def test_the_catalog_records_the_location_and_the_bucket_holds_the_arrays(pair, s3):
    assert array_store.recorded(pair["remote"] / "catalog.duckdb") == pair["url"]
    assert array_store.recorded(pair["local"] / "catalog.duckdb") is None
    assert isinstance(array_store.of(pair["local"]), array_store.LocalArrays)
    paths = mlarch.open(pair["remote"]).sql("SELECT path FROM arrays ORDER BY path")["path"].to_list()
    assert len(paths) == 2 * 4 + 1  # norms and levels of 4 runs, one |W|
    stored = set(s3["fs"].find(pair["prefix"] + "/"))
    for path in paths:
        assert f"{pair['prefix']}/{path}/zarr.json" in stored and f"{pair['prefix']}/{path}/c/0" in stored
    # nothing of the S3 archive's went to its folder
    assert not [p for p in (pair["remote"] / "arrays.zarr").rglob("*") if p.is_file()]
    # the provenance does not carry where arrays are (the catalog does): same records as local
    config = mlarch.open(pair["remote"]).sql("SELECT provenance FROM runs LIMIT 1")["provenance"][0]
    assert '"arrays"' not in config


def test_remote_arrays_give_the_local_archive_s_sets_row_by_row(pair):
    local, remote = mlarch.open(pair["local"]), mlarch.open(pair["remote"])
    for table in ("selections", "patterns"):
        query = f"SELECT * FROM {table}"
        assert _without_run_ids(remote.sql(query)) == _without_run_ids(local.sql(query)), table
    assert remote.compare(MODEL, "en,de").equals(local.compare(MODEL, "en,de"))
    # every stored array, whole: levels and norms of each (lang, role), and |W|
    local_runs, remote_runs = _runs(pair["local"]), _runs(pair["remote"])
    query = f"SELECT owner, kind, {arrays.RECORD_COLUMNS} FROM arrays ORDER BY path"
    records = {side: {(row["owner"], row["kind"]): arrays.ArrayRecord.from_row(row) for row in archive.sql(query).rows(
        named=True)} for side, archive in (("local", local), ("remote", remote))}
    assert len(records["remote"]) == len(records["local"]) == 9
    for (owner, kind), record in records["remote"].items():
        key = next((k for k, run_id in remote_runs.items() if run_id == owner), None)
        theirs = records["local"][(local_runs[key] if key else MODEL, kind)]
        assert record.sha256 == theirs.sha256, (owner, kind)
        assert np.array_equal(arrays.read(remote._array_store(), record), arrays.read(local._array_store(), theirs))
    # the API's reads, archived k and re-thresholded from |W| and norms, first and last module
    for module in _modules(pair["local"])[::14]:
        for lang in ("en", "de"):
            for k in (0.05, 0.1):
                assert np.array_equal(remote.selection(MODEL, lang, k, module), local.selection(MODEL, lang, k, module))


def test_verify_streams_every_remote_array_clean(pair):
    checks = maintenance.verify(pair["remote"])
    assert not _failed(checks), _failed(checks)
    assert [c.object for c in checks if c.check == "array store"] == [pair["url"]]
    assert len([c for c in checks if c.check == "array digest"]) == 9


def test_a_deleted_or_replaced_object_is_reported_and_refused(tmp_path, pair, s3):
    root, prefix = _clone(pair, s3, tmp_path)
    fs = s3["fs"]
    runs = _runs(root)
    module = _modules(root)[0]
    target = f"{prefix}/runs/{runs[('en', 'math')]}/levels/c/0"
    original = fs.cat_file(target)
    fs.rm_file(target)
    damaged = [("array digest", f"runs/{runs[('en', 'math')]}/levels"),
               ("set_sizes recount", f"{MODEL} math-vs-control seed 1")]  # its sets cannot be recounted
    failed = _failed(maintenance.verify(root))
    assert [(c.check, c.object) for c in failed] == damaged
    assert "missing" in failed[0].detail
    with pytest.raises(arrays.ArrayDamaged, match="is missing"):
        mlarch.open(root).selection(MODEL, "en", 0.05, module)
    # another run's chunk in its place (valid zarr, valid checksum, wrong run)
    fs.pipe_file(target, fs.cat_file(f"{prefix}/runs/{runs[('de', 'math')]}/levels/c/0"))
    failed = _failed(maintenance.verify(root))
    assert [(c.check, c.object) for c in failed] == damaged and "differs" in failed[0].detail
    with pytest.raises(arrays.ArrayDamaged, match="differs from the one written"):
        mlarch.open(root).selection(MODEL, "en", 0.05, module)
    fs.pipe_file(target, original)
    assert not _failed(maintenance.verify(root))
    # an edited zarr.json (the norms' float32 metadata on the uint8 levels), after this process
    # read the array: verify fetches and checks it again
    mlarch.open(root).selection(MODEL, "en", 0.05, module)
    meta = f"{prefix}/runs/{runs[('en', 'math')]}/levels/zarr.json"
    fs.pipe_file(meta, fs.cat_file(f"{prefix}/runs/{runs[('en', 'math')]}/norms/zarr.json"))
    failed = _failed(maintenance.verify(root))
    assert [(c.check, c.object) for c in failed][:1] == damaged[:1] and "zarr.json differs" in failed[0].detail


def test_gc_collects_orphans_in_the_bucket_and_rm_removes_only_its_groups(tmp_path, pair, s3):
    root, prefix = _clone(pair, s3, tmp_path)
    fs = s3["fs"]
    runs = _runs(root)
    doomed = runs[("de", "control")]
    orphan = "0123456789ab"  # a run id no row names
    sibling = f"{doomed}-keep"  # shares the doomed group's name as a prefix: rm must leave it
    for name in (orphan, sibling):
        fs.pipe_file(f"{prefix}/runs/{name}/levels/zarr.json", b"{}")
    failed = _failed(maintenance.verify(root))
    assert sorted(c.object for c in failed if c.check == "no orphan arrays") == [f"runs/{orphan}", f"runs/{sibling}"]
    plan = maintenance.rm(root, [doomed], dry_run=True)
    line = next(x for x in plan if x.startswith("arrays "))
    assert line.startswith(f"arrays s3://{prefix}/runs/{doomed} (") and not line.endswith("(0 bytes)")
    maintenance.rm(root, [doomed])
    stored = set(fs.find(prefix + "/"))
    assert not [k for k in stored if k.startswith(f"{prefix}/runs/{doomed}/")]
    assert f"{prefix}/runs/{sibling}/levels/zarr.json" in stored
    assert mlarch.open(root).sql("SELECT count(*) AS n FROM selections WHERE lang = 'de'")["n"][0] == 0
    removed = maintenance.gc(root)
    assert sorted(removed) == sorted([f"arrays runs/{orphan}", f"arrays runs/{sibling}"])
    assert not _failed(maintenance.verify(root))
    maintenance.rm(root, model=MODEL)
    left = {key[len(prefix) + 1:] for key in fs.find(prefix + "/")}
    assert left <= {"zarr.json", "runs/zarr.json", "models/zarr.json", array_store.OWNER}, left  # and the claim


def test_bundles_travel_between_remote_and_local_arrays(tmp_path, pair, s3):
    tar = tmp_path / "out.tar"
    info = bundle.export_bundle(pair["remote"], tar, model=MODEL)
    assert info["arrays"] == 9
    local = tmp_path / "imported"
    assert len(bundle.import_bundle(local, tar)["imported"]) == 4
    assert not _failed(maintenance.verify(local))
    reference = mlarch.open(pair["local"]).sql("SELECT * FROM selections")
    assert _without_run_ids(mlarch.open(local).sql("SELECT * FROM selections")) == _without_run_ids(reference)
    # into a new archive whose arrays are on S3 (as its first ingest would record them):
    # the arrays are checked in local staging, then uploaded to its prefix
    root, prefix = tmp_path / "remote-import", f"{BUCKET}/imported"
    root.mkdir()
    catalog.ensure_schema(root / "catalog.duckdb")
    array_store.record(root, array_store.for_ingest(root, f"s3://{prefix}"))
    assert len(bundle.import_bundle(root, tar)["imported"]) == 4
    assert len([k for k in s3["fs"].find(prefix + "/runs/") if k.endswith("/c/0")]) == 8
    assert not [p for p in (root / "arrays.zarr").rglob("*") if p.is_file()]
    assert not _failed(maintenance.verify(root))
    assert _without_run_ids(mlarch.open(root).sql("SELECT * FROM selections")) == _without_run_ids(reference)


def _cli_ingest(root, model_dir, data, *extra):
    return CliRunner().invoke(cli, ["--archive", str(root), "ingest", "--model", str(model_dir["llama"]),
                                    "--name", MODEL, "--langs", "en", "--math", data["math"], "--control",
                                    data["control"], "--samples", "4", "--top-k", ",".join(map(str, KS)),
                                    "--device", "cpu", "-q", *extra])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if an ingest gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("mlarch.ingest.loading.load", refuse)


def test_another_arrays_url_later_is_refused(pair, model_dir, data, no_model_load):
    line = one_error(_cli_ingest(pair["remote"], model_dir, data, "--arrays", f"s3://{BUCKET}/elsewhere"), 2)
    assert f"keeps its arrays at {pair['url']}" in line and "differs" in line
    line = one_error(_cli_ingest(pair["local"], model_dir, data, "--arrays", pair["url"]), 2)
    assert "keeps its arrays in its folder" in line
    # the recorded one again: nothing to do (the runs are archived), nothing loaded
    result = _cli_ingest(pair["remote"], model_dir, data, "--arrays", pair["url"])
    assert result.exit_code == 0 and "Nothing to do" in result.output, result.output


def test_no_secret_of_the_environment_is_printed(monkeypatch):
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_BEARER_TOKEN_BEDROCK"):
        monkeypatch.setenv(name, f"value-of-{name.lower()}")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    text = " ".join(f"value-of-{n.lower()}" for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "AWS_SECURITY_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_BEARER_TOKEN_BEDROCK"))
    assert array_store.redact(f"{text} in eu-west-1 http://user:pw@host/x?X-Amz-Signature=abc") == \
        "*** *** *** *** *** in eu-west-1 http://***@host/x?X-Amz-Signature=***"


def test_a_prefix_is_one_archives(tmp_path, pair, s3, model_dir, data, no_model_load):
    """Two archives given one prefix would each see the other's runs as orphans (gc deleting
    them) and write |W| over the other's: the prefix's owner object names its archive, a
    second archive is refused before any work, and a location row edited to point at another
    archive's prefix (the catalog is hostile) stops rm and gc before anything is removed."""
    fs = s3["fs"]
    assert json.loads(fs.cat_file(f"{pair['prefix']}/{array_store.OWNER}"))["archive"] == \
        array_store.identity(pair["remote"] / "catalog.duckdb")
    before = set(fs.find(pair["prefix"] + "/"))
    line = one_error(_cli_ingest(tmp_path / "second", model_dir, data, "--arrays", pair["url"]), 2)
    assert line == (f"Error: --arrays {pair['url']} already holds another mlarch archive's arrays: give this "
                    f"archive a prefix of its own (e.g. s3://{BUCKET}/second)"), line
    root, prefix = _clone(pair, s3, tmp_path)  # another archive (a copy of a catalog is the same one: made later)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE array_location SET recorded_at = recorded_at + INTERVAL 1 SECOND")
    con.close()
    assert maintenance.gc(root) == []  # claims its prefix
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE array_location SET url = ?", [pair["url"]])  # then its location row edited
    con.close()
    mine = array_store.identity(root / "catalog.duckdb")
    for remove in (lambda: maintenance.gc(root), lambda: maintenance.rm(root, model=MODEL),
                   lambda: mlarch.open(root).ingest(str(model_dir["llama"]), ["bn"], data["math"], data["control"],
                                                    name=MODEL, samples=4, top_k=KS, device="cpu")):
        with pytest.raises(array_store.StoreError, match=rf"^{pair['url']} holds the arrays of another mlarch archive "
                                                          rf".*this archive is {mine[:12]}\): nothing was changed"):
            remove()
    assert set(fs.find(pair["prefix"] + "/")) == before  # nothing of the first archive's removed or written
    owner = [c for c in maintenance.verify(root) if c.check == "array store owner"]
    assert len(owner) == 1 and not owner[0].ok and "never run gc here" in owner[0].detail
    assert not _failed(maintenance.verify(pair["remote"]))
    # an archive's prefix without the object (made before it): claimed by its next change
    fs.rm_file(f"{prefix}/{array_store.OWNER}")
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE array_location SET url = ?", [f"s3://{prefix}"])
    con.close()
    assert [c.detail for c in maintenance.verify(root) if c.check == "array store owner"][0].startswith("not claimed")
    maintenance.rm(root, model=MODEL, dry_run=True)  # a dry run changes nothing, not even the claim
    assert not fs.exists(f"{prefix}/{array_store.OWNER}")
    assert maintenance.gc(root) == []
    assert json.loads(fs.cat_file(f"{prefix}/{array_store.OWNER}"))["archive"] == \
        array_store.identity(root / "catalog.duckdb")


def test_two_first_ingests_on_one_empty_prefix_race(tmp_path, s3, monkeypatch):
    """Two new archives given one empty prefix at once both pass the first-ingest check (no
    claim, no arrays yet); their claims are conditional writes, so the second is refused and
    records no location, and the prefix names the first. Where the client cannot send the
    condition (botocore before 1.35), the claim is a plain write read back."""
    fs, url = s3["fs"], f"s3://{BUCKET}/race-{uuid.uuid4().hex[:8]}"
    first, second = tmp_path / "first", tmp_path / "second"
    stores = [array_store.for_ingest(root, url) for root in (first, second)]  # both checks pass: nothing there
    for root in (first, second):  # as the ingests' planning does
        root.mkdir()
        catalog.ensure_schema(root / "catalog.duckdb")
    array_store.record(first, stores[0])
    with pytest.raises(array_store.StoreError, match=r"holds the arrays of another mlarch archive .*nothing was changed"):
        array_store.record(second, stores[1])
    assert json.loads(fs.cat_file(f"{url[5:]}/{array_store.OWNER}"))["archive"] == \
        array_store.identity(first / "catalog.duckdb")
    assert array_store.recorded(second / "catalog.duckdb") is None  # rolled back with the refused claim

    sent, real = [], array_store._filesystem()

    class OldClient:  # botocore < 1.35 rejects the parameter before sending
        def __getattr__(self, name):
            return getattr(real, name)

        def pipe_file(self, path, data, **kwargs):
            sent.append(kwargs)
            if "IfNoneMatch" in kwargs:
                from botocore.exceptions import ParamValidationError

                raise ParamValidationError(report='Unknown parameter in input: "IfNoneMatch"')
            return real.pipe_file(path, data, **kwargs)

    third = array_store.parse(f"s3://{BUCKET}/race-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(array_store, "_filesystem", OldClient)
    third.claim("a" * 32)
    assert [("IfNoneMatch" in kw) for kw in sent] == [True, False]  # tried, then written plainly
    assert third.claimant() == "a" * 32


@pytest.mark.parametrize("url, expected", [
    (f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/p", "does not exist"),
    ("s3://Not_A_Bucket/p", "is not s3://BUCKET/PREFIX"),
    ("s3://mlarch-test/a/../b", "is not letters, digits"),
    ("gs://mlarch-test/p", "is not s3://BUCKET/PREFIX"),
])
def test_a_bad_bucket_is_one_line_before_any_work(tmp_path, s3, model_dir, data, no_model_load, url, expected):
    root = tmp_path / "arch"
    line = one_error(_cli_ingest(root, model_dir, data, "--arrays", url), 2)
    assert expected in line
    assert not (root / "catalog.duckdb").exists()


def test_wrong_credentials_are_one_line(tmp_path, s3, pair, model_dir, data, no_model_load, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys from now on
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    line = one_error(_cli_ingest(tmp_path / "arch", model_dir, data, "--arrays", f"s3://{BUCKET}/p"), 2)
    assert "was refused" in line and "AWS_ACCESS_KEY_ID" in line
    line = one_error(CliRunner().invoke(cli, ["--archive", str(pair["remote"]), "verify"]), 2)
    assert "was refused" in line


def test_an_unreachable_endpoint_is_one_line(tmp_path, s3, pair, model_dir, data, no_model_load, monkeypatch):
    module = _modules(pair["remote"])[0]
    warm = mlarch.open(pair["remote"])
    warm.selection(MODEL, "en", 0.05, module)  # its store found and probed while the endpoint answered
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.closed_port_url())
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's standard setting: no retries, a quick test
    started = time.monotonic()
    line = one_error(_cli_ingest(tmp_path / "arch", model_dir, data, "--arrays", f"s3://{BUCKET}/p"), 2)
    assert "cannot reach the S3 endpoint" in line and "AWS_ENDPOINT_URL" in line
    for command in (["verify"], ["gc"], ["rm", "--model", MODEL, "--dry-run"]):
        line = one_error(CliRunner().invoke(cli, ["--archive", str(pair["remote"]), *command]), 2)
        assert "cannot reach the S3 endpoint" in line, command
    with pytest.raises(UsageError, match="cannot reach the S3 endpoint"):
        mlarch.open(pair["remote"]).selection(MODEL, "en", 0.05, module)
    with pytest.raises(UsageError, match="cannot reach the S3 endpoint"):  # mid-session: not "damaged"
        warm.selection(MODEL, "de", 0.05, module)
    assert time.monotonic() - started < 60


def test_an_archive_url_without_a_published_archive_is_one_line_and_creates_no_folder(tmp_path, s3, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    # s3:// is a published archive (tests/test_s3_published.py): nothing published, no bucket
    line = one_error(CliRunner().invoke(cli, ["--archive", f"s3://{BUCKET}/archive", "runs"]), 2)
    assert "nothing is published at" in line and "publish" in line
    with pytest.raises(UsageError, match="does not exist"):
        mlarch.open("s3://no-such-bucket-here/archive")
    # another scheme is never a folder named 'gs:'
    line = one_error(CliRunner().invoke(cli, ["--archive", "gs://bucket/archive", "runs"]), 2)
    assert "is a URL" in line
    with pytest.raises(UsageError, match="is a URL"):
        mlarch.open("gs://bucket/archive")
    assert list(tmp_path.iterdir()) == []


def test_an_archive_from_before_s3_arrays_upgrades_and_reads_its_folder(archive_copy):
    from old_archives import downgrade_to_schema_5

    downgrade_to_schema_5(archive_copy)
    catalog._CHECKED.clear()
    store = array_store.of(archive_copy)  # migrates: no row, its arrays.zarr
    assert isinstance(store, array_store.LocalArrays) and store.folder == archive_copy / "arrays.zarr"
    archive = mlarch.open(archive_copy)
    assert archive.sql("SELECT max(version) AS v FROM schema_migrations")["v"][0] == catalog.latest_version()
    assert not _failed(maintenance.verify(archive_copy))


def test_an_edited_location_row_is_refused(tmp_path, pair, s3):
    root = tmp_path / "edited"
    shutil.copytree(pair["remote"], root)
    con = duckdb.connect(str(root / "catalog.duckdb"))
    con.execute("UPDATE array_location SET url = 's3://../etc'")
    con.close()
    line = one_error(CliRunner().invoke(cli, ["--archive", str(root), "verify"]), 2)
    assert "restore the catalog from a copy" in line
