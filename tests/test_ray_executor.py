"""`--executor ray` on a real Ray instance that this module starts on 127.0.0.1 (and stops).

The same tiny model and texts ingested here and on Ray give the same archive, row by row:
run digests, array digests, set sizes and patterns. An unreachable --ray-address is one
line before any model loads. A worker killed with SIGKILL while it scores is restarted by
Ray, its unit retried, and the archive verifies after gc. A driver killed after its first
commit and before its last keeps what it committed (readers see whole units only, before gc
too), leaves RUNNING runs that gc removes, and a rerun skips the committed units and completes
the rest."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlarch
from fixtures import one_error
from mlarch.cli import cli
from mlarch.errors import MlarchError
from mlarch.ingest import units
from mlarch.progress import RichReporter
from mlarch.store.maintenance import gc, verify

# Before ray is imported: every Ray address on 127.0.0.1 (Ray 2.60 otherwise advertises the
# host's interface address), no usage report, no token (loopback only, this module's instance)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'mlarch[ray]'")
from mlarch.ingest import ray_executor  # noqa: E402 - imports ray: after the settings above

LANGS = ["en", "de", "bn"]
OPTIONS = dict(samples=6, top_k=[0.01, 0.05, 0.25], seeds=[1], device="cpu")


@pytest.fixture(scope="module")
def ray_session():
    """One Ray instance for the module (its start costs seconds): 2 CPUs, loopback only."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 * 1024,
             log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_archive(tmp_path_factory, model_dir, data):
    root = tmp_path_factory.mktemp("local") / "arch"
    mlarch.open(root).ingest(str(model_dir["llama"]), LANGS, data["math"], data["control"], **OPTIONS)
    return root


def _runs(archive):
    return archive.sql("SELECT lang, role, seed, config_digest, status, n_tokens, n_truncated, k_values, in_use "
                       "FROM runs ORDER BY lang, role").rows()


def _arrays(archive):
    """(lang, role or 'model', kind, sha256, shape, chunk digests) of every array."""
    return archive.sql(
        "SELECT coalesce(r.lang, 'model'), coalesce(r.role, ''), a.kind, a.sha256, a.shape, a.chunk_sha256 "
        "FROM arrays a LEFT JOIN runs r ON r.run_id = a.owner ORDER BY ALL").rows()


def _derived(archive):
    sizes = archive.sql("SELECT k, seed, lang, module, n_math_top, n_control_top, n_selected FROM set_sizes "
                        "ORDER BY ALL").rows()
    patterns = archive.sql("SELECT k, seed, module, langs, n_params FROM patterns ORDER BY ALL").rows()
    return sizes, patterns


def _assert_same_archive(ours, reference):
    a, b = mlarch.open(ours), mlarch.open(reference)
    assert _runs(a) == _runs(b)
    assert _arrays(a) == _arrays(b)
    assert _derived(a) == _derived(b)
    assert a.sql("SELECT model, weights_sha256, dtype, n_modules, n_scored_params FROM models").rows() == \
        b.sql("SELECT model, weights_sha256, dtype, n_modules, n_scored_params FROM models").rows()
    assert not [c for c in verify(ours) if not c.ok]


class Recording(units.Reporter):
    """A reporter that keeps what the ingest said."""

    def __init__(self):
        self.passes, self.lines = [], []

    def start_pass(self, label, total, unit="samples"):
        self.passes.append((label, total, unit))

    def message(self, text):
        self.lines.append(text)


def test_ray_gives_the_local_archive_row_by_row(ray_session, local_archive, model_dir, data, tmp_path):
    root = tmp_path / "arch"
    archive = mlarch.open(root)
    reporter = Recording()
    result = archive.ingest(str(model_dir["llama"]), LANGS, data["math"], data["control"], executor="ray",
                            reporter=reporter, **OPTIONS)
    assert len(result.written) == 6 and not result.skipped
    assert reporter.passes == [("6 units, 1 Ray worker(s)", 6, "units")]  # one per node; the bar counts units
    assert sum(line.startswith("scored ") for line in reporter.lines) == 6
    _assert_same_archive(root, local_archive)
    sizes, patterns = _derived(archive)
    assert len({row[2] for row in sizes}) == 3 and any(len(row[3]) == 3 for row in patterns)  # all 3 languages
    provenance = archive.run(result.written[0])["provenance"]
    assert provenance["config"]["executor"] == "ray"
    assert provenance["sample_indices"] == mlarch.open(local_archive).run(
        mlarch.open(local_archive).sql("SELECT run_id FROM runs WHERE lang = 'en' AND role = 'math'").item()
    )["provenance"]["sample_indices"]
    # a rerun skips what is archived, from either executor: the digests are the same
    again = archive.ingest(str(model_dir["llama"]), LANGS, data["math"], data["control"], executor="local", **OPTIONS)
    assert not again.written and len(again.skipped) == 6


def test_unreachable_address_is_one_line_before_the_model_loads(model_dir, data, tmp_path, monkeypatch):
    from mlarch.ingest import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load", no_load)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "arch"
    base = ["--archive", str(root), "ingest", "--model", str(model_dir["llama"]), "--langs", "en",
            "--math", data["math"], "--control", data["control"], "--samples", "3", "--device", "cpu"]
    started = time.monotonic()
    line = one_error(CliRunner().invoke(cli, base + ["--executor", "ray", "--ray-address", f"127.0.0.1:{port}"]), 2)
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in line and "ray start --head" in line
    assert time.monotonic() - started < 10
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert "no Ray cluster answers" in one_error(CliRunner().invoke(cli, base + ["--executor", "ray"]), 2)
    line = one_error(CliRunner().invoke(cli, base + ["--ray-address", "127.0.0.1:1"]), 2)
    assert "--ray-address applies to --executor ray only" in line
    line = one_error(CliRunner().invoke(cli, base + ["--executor", "ray", "--gpus-per-unit", "0"]), 2)
    assert "--gpus-per-unit" in line
    assert not root.exists()


def _scoring_workers(title: str = "ray::ScoringWorker.score") -> list[int]:
    """Pids of Ray workers whose process title starts with `title` (Ray sets it to the actor
    class, and to class.method while a method runs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith(title):
                found.append(int(entry.name))
    return found


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return True
        if state == "Z":  # dead, not yet reaped by its parent (the raylet)
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_a_worker_killed_while_scoring_is_retried(ray_session, model_dir, data, tmp_path):
    options = {**OPTIONS, "samples": 120}  # units long enough to be caught scoring (under load too)
    reference = tmp_path / "reference"
    mlarch.open(reference).ingest(str(model_dir["llama"]), LANGS, data["math"], data["control"], **options)
    root = tmp_path / "arch"
    outcome = {}

    def ingest():
        try:
            outcome["result"] = mlarch.open(root).ingest(str(model_dir["llama"]), LANGS, data["math"],
                                                         data["control"], executor="ray", **options)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=ingest)
    thread.start()
    # generous: on a loaded machine the workers' start (torch import, model load) alone can take
    # minutes; the loop ends as soon as one is caught
    deadline, killed = time.monotonic() + 600, None
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        pids = _scoring_workers()
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.005)
    thread.join(timeout=300)
    assert killed is not None, "no worker was caught scoring"
    assert _gone(killed), f"worker {killed} survived SIGKILL"
    assert "error" not in outcome, outcome.get("error")
    assert len(outcome["result"].written) == 6
    gc(root)
    _assert_same_archive(root, reference)


DRIVER = """
import sys, mlarch
root, model, math, control, address, samples = sys.argv[1:7]
mlarch.open(root).ingest(model, ["en", "de", "bn"], math, control, samples=int(samples),
                         top_k=[0.01, 0.05, 0.25], device="cpu", executor="ray", ray_address=address,
                         progress=False)
"""
KILLED_SAMPLES = 40  # the killed driver's and the rerun's (the same config digests)


def _finished(catalog) -> int | None:
    """FINISHED runs in the catalog, read-only for one query (None while the driver holds it)."""
    import duckdb

    try:
        con = duckdb.connect(str(catalog), read_only=True)
    except duckdb.Error:
        return None
    try:
        return con.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0]
    except duckdb.Error:  # not migrated yet
        return None
    finally:
        con.close()


def _kill_driver_after_a_commit(root, model_dir, data, ray_address) -> None:
    """Start the driver in a process of its own and SIGKILL it once at least one unit group is
    committed (a FINISHED run in the catalog) while units are still scoring."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).parent.parent)}
    args = [sys.executable, "-c", DRIVER, str(root), str(model_dir["llama"]), data["math"], data["control"],
            ray_address, str(KILLED_SAMPLES)]
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    catalog = root / "catalog.duckdb"
    deadline, under_way = time.monotonic() + 600, False  # generous: see the worker test
    while time.monotonic() < deadline and driver.poll() is None:
        if catalog.exists() and (_finished(catalog) or 0) > 0:
            under_way = True
            break
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    assert under_way, "the driver was not caught after a commit" + (
        f" (it exited {driver.returncode}: {driver.stderr.read()[-300:]})" if driver.poll() is not None else "")
    assert driver.wait(timeout=30) == -signal.SIGKILL, driver.stderr.read()
    deadline = time.monotonic() + 60  # Ray ends the dead driver's workers: none may write after gc
    while _scoring_workers("ray::ScoringWorker") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _scoring_workers("ray::ScoringWorker"), "the dead driver's workers still run"


def _readers_see_complete_units(root) -> dict[str, list]:
    """What a reader sees between the crash and gc: only committed (lang, seed) groups. Every
    run a derived row names is FINISHED, every language in set_sizes has its full set of rows
    (modules x k) and both roles FINISHED, and `compare` or `selection` of an uncommitted
    language fails loudly (never half a set). Returns the set_sizes rows per language."""
    archive = mlarch.open(root)
    not_finished = archive.sql(
        "SELECT DISTINCT r.run_id, r.status FROM selections s JOIN runs r "
        "ON r.run_id IN (s.math_run_id, s.control_run_id) WHERE r.status <> 'FINISHED' OR NOT r.in_use").rows()
    assert not not_finished, f"derived rows name runs that are not finished: {not_finished}"
    both_roles = set(archive.sql(
        "SELECT lang FROM runs WHERE status = 'FINISHED' AND in_use GROUP BY lang "
        "HAVING count(DISTINCT role) = 2")["lang"].to_list())
    n_modules = archive.sql("SELECT n_modules FROM models").item()
    counts = dict(archive.sql("SELECT lang, count(*) FROM set_sizes GROUP BY lang").rows())
    assert set(counts) == both_roles, (counts, both_roles)
    assert all(n == n_modules * len(OPTIONS["top_k"]) for n in counts.values()), (counts, n_modules)
    model = archive.sql("SELECT model FROM models").item()
    committed = sorted(both_roles)
    missing = [lang for lang in LANGS if lang not in both_roles]
    with pytest.raises(MlarchError, match=f"language {', '.join(missing)} is not archived"):
        archive.compare(model, LANGS)  # an uncommitted language is missing, not half there
    if len(committed) >= 2:
        assert archive.compare(model, committed).height > 0
    module = archive.sql("SELECT module FROM modules ORDER BY position LIMIT 1").item()
    for lang in LANGS:
        if lang in both_roles:
            assert archive.selection(model, lang, 0.05, module).any()
        else:
            with pytest.raises(MlarchError, match="has no math and control runs"):
                archive.selection(model, lang, 0.05, module)
    return {lang: archive.sql("SELECT k, seed, module, n_math_top, n_control_top, n_selected, math_run_id, "
                              "control_run_id FROM set_sizes WHERE lang = ? ORDER BY ALL", [lang]).rows()
            for lang in committed}


@pytest.mark.slow
def test_a_killed_driver_leaves_what_gc_removes_and_a_rerun_completes(ray_session, model_dir, data, tmp_path):
    root = tmp_path / "arch"
    _kill_driver_after_a_commit(root, model_dir, data, ray_session)
    archive = mlarch.open(root)
    survivors = set(archive.sql("SELECT run_id FROM runs WHERE status = 'FINISHED' AND in_use")["run_id"]
                    .to_list())
    unfinished = archive.sql("SELECT count(*) FROM runs WHERE status = 'RUNNING'").item()
    # the kill came after at least one commit and before the last
    assert 0 < len(survivors) < 6 and unfinished == 6 - len(survivors), (survivors, unfinished)
    sizes_before = _readers_see_complete_units(root)  # before gc: readers see whole units only
    removed = gc(root)  # the runs the driver had begun and not committed: their process is gone
    assert any(line.startswith("run ") and line.endswith("RUNNING)") for line in removed), removed
    assert not [line for line in removed if any(run_id in line for run_id in survivors)], removed
    assert not [c for c in verify(root) if not c.ok]
    result = mlarch.open(root).ingest(str(model_dir["llama"]), LANGS, data["math"], data["control"],
                                      executor="ray", ray_address=None,
                                      **{**OPTIONS, "samples": KILLED_SAMPLES})
    # what the dead driver committed is kept and skipped, the rest written
    assert set(result.skipped) == survivors and len(result.written) == 6 - len(survivors)
    archive = mlarch.open(root)
    assert archive.sql("SELECT count(*) FROM runs WHERE status = 'FINISHED' AND in_use").item() == 6
    for lang, rows in sizes_before.items():  # the surviving sets are unchanged by the rerun
        assert archive.sql("SELECT k, seed, module, n_math_top, n_control_top, n_selected, math_run_id, "
                           "control_run_id FROM set_sizes WHERE lang = ? ORDER BY ALL", [lang]).rows() == rows
    gc(root)
    assert not [c for c in verify(root) if not c.ok]


def test_a_worker_error_names_its_own_cause(ray_session):
    """A worker's error that is not mlarch's is shown as the worker raised it (type and message),
    not as the first line of Ray's wrapper, which names only the actor and its process."""
    @ray.remote
    def fails():
        raise ValueError("the cause, in the worker")

    with pytest.raises(MlarchError) as caught:
        ray_executor._get(fails.remote())
    assert str(caught.value) == "a Ray worker failed: ValueError: the cause, in the worker"


def test_the_overall_bar_says_units(capsys):
    """The Ray driver's bar counts units: its summary line (a notebook without widgets) says so,
    and a scoring pass still counts samples."""
    reporter = RichReporter()
    reporter.live = False
    reporter.start_pass("6 units, 2 Ray worker(s)", 6, unit="units")
    reporter.advance(6, 600)
    reporter.end_pass()
    reporter.start_pass("en math seed 1", 4)
    reporter.advance(4, 40)
    reporter.end_pass()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("6 units, 2 Ray worker(s): 6/6 units ·"), lines
    assert lines[1].startswith("en math seed 1: 4/4 samples ·"), lines


def test_a_forged_manifest_from_a_worker_is_refused_and_nothing_committed(ray_session, model_dir, data, tmp_path,
                                                                           monkeypatch):
    """A worker that returns a manifest whose norms record the stored array does not match (another
    mlarch, a bug, bad intent): the driver refuses it in one line and commits none of its runs."""

    class Forging(ray_executor.ScoringWorker):  # defined here: Ray ships it to its workers by value
        def score(self, order, unit, run_id):
            import dataclasses

            pending = super().score(order, unit, run_id)
            forged = [(kind, dataclasses.replace(r, sha256="0" * 64) if kind == "norms" else r)
                      for kind, r in pending.records]
            return dataclasses.replace(pending, records=forged)

    monkeypatch.setattr(ray_executor, "ScoringWorker", Forging)
    root = tmp_path / "arch"
    with pytest.raises(MlarchError, match=r"^a Ray worker's manifest for .* records a sha256 of its norms array"):
        mlarch.open(root).ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], executor="ray",
                                 **OPTIONS)
    archive = mlarch.open(root)
    assert archive.sql("SELECT count(*) FROM runs WHERE status = 'FINISHED'").item() == 0
    assert archive.sql("SELECT count(*) FROM runs WHERE status = 'FAILED'").item() == 2
    assert archive.sql("SELECT count(*) FROM arrays").item() == 0 and archive.sql("SELECT count(*) FROM models").item() == 0


def test_workers_get_aws_settings_but_no_credential(monkeypatch):
    """The runtime_env (readable by anyone with cluster access) carries settings by name only:
    a bearer token or key botocore reads, or one an unknown AWS_* variable holds, stays here."""
    settings = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1", "AWS_PROFILE": "lab",
                "AWS_SHARED_CREDENTIALS_FILE": "/etc/aws/credentials", "AWS_CA_BUNDLE": "/etc/ssl/lab.pem",
                "AWS_MAX_ATTEMPTS": "3"}
    secrets = {"AWS_CONTAINER_AUTHORIZATION_TOKEN": "bearer-secret", "AWS_BEARER_TOKEN_S3": "bearer-secret",
               "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1338/creds", "AWS_ACCESS_KEY_ID": "AKIA",
               "AWS_SECRET_ACCESS_KEY": "key-secret", "AWS_SESSION_TOKEN": "session-secret",
               "AWS_SOME_FUTURE_TOKEN": "future-secret"}
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {**settings, **secrets}.items():
        monkeypatch.setenv(name, value)
    assert ray_executor.aws_settings() == settings


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (tests/s3_server.py) with a bucket, its AWS_* settings applied."""
    pytest.importorskip("s3fs", reason="arrays on S3 need s3fs: pip install 'mlarch[s3]'")
    pytest.importorskip("moto.server", reason="the S3 test server is moto's: pip install 'mlarch[test-services]'")
    import s3_server

    with s3_server.threaded() as endpoint:
        env = s3_server.environment(endpoint, tmp_path_factory.mktemp("aws"))
        # the workers get no keys (only ray_executor.AWS_FORWARDED): as on a cluster node, they read
        # a credentials file, which the forwarded AWS_SHARED_CREDENTIALS_FILE names
        Path(env["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
            f"[default]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n")
        saved = s3_server.apply(env)
        try:
            s3_server.make_bucket(endpoint, "ray-bucket", env)
            yield endpoint
        finally:
            s3_server.restore(saved)


def test_ray_with_arrays_on_s3_gives_the_local_s3_archive(ray_session, s3, model_dir, data, tmp_path):
    """--executor ray --arrays s3://...: the workers (started by a Ray instance that predates the
    AWS settings, as on a cluster) write to the bucket, the driver checks and commits; the same
    archive as a local ingest into the same bucket, and verify is clean."""
    langs = ["en", "de"]
    reference, root = tmp_path / "local", tmp_path / "ray"
    mlarch.open(reference).ingest(str(model_dir["llama"]), langs, data["math"], data["control"],
                                  arrays="s3://ray-bucket/local", **OPTIONS)
    result = mlarch.open(root).ingest(str(model_dir["llama"]), langs, data["math"], data["control"],
                                      executor="ray", arrays="s3://ray-bucket/ray", **OPTIONS)
    assert len(result.written) == 4
    assert not [p for p in (root / "arrays.zarr").rglob("*") if p.is_file()]  # every array went to the bucket
    _assert_same_archive(root, reference)
    assert mlarch.open(root).sql("SELECT url FROM array_location").item() == "s3://ray-bucket/ray"
    forwarded = ray_executor.aws_settings()  # what the workers' runtime_env carried
    assert forwarded["AWS_ENDPOINT_URL"] == s3 and "AWS_SHARED_CREDENTIALS_FILE" in forwarded
    assert not set(forwarded) & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # keys stay on the driver
