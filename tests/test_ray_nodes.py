"""`--executor ray` on a Ray cluster of two nodes (issue 14), both on this machine, on 127.0.0.1.

tests/test_ray_executor.py runs a one-node instance, where only one ScoringWorker ever exists.
Here each node has one CPU, so the executor starts a worker on each (one per node) and the
units are spread over two worker processes: each loads the model, the driver compares what
they loaded, |W| is written by whichever worker delivered the last manifest (also by one that
Ray restarted meanwhile, which loads the model again), and the archive is still the local
ingest's, row by row. The workers themselves say where they scored: each run's provenance
names the Ray node of its worker ("ray_node"), and both nodes appear.
"""

import json
import logging
import os
import time
from collections import Counter
from importlib import resources

import pytest

import mlarch
from mlarch.store.maintenance import verify

# Before ray is imported (as in tests/test_ray_executor.py): every Ray address on 127.0.0.1,
# no usage report, no token (loopback only, this module's cluster)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'mlarch[ray]'")
from ray.cluster_utils import Cluster  # noqa: E402 - after the settings above
from mlarch.ingest import ray_executor  # noqa: E402
# the one-node module's ingest options, reporter and row-by-row comparison (no test of its is imported)
# and its module-scoped local_archive fixture (the same ingest scored in this process), built again for this module
from test_ray_executor import (LANGS, OPTIONS, Recording, _arrays, _assert_same_archive, _runs,  # noqa: E402
                               local_archive)  # noqa: F401 - a fixture

OBJECT_STORE = 100 * 1024 * 1024  # per node; the workers return small manifests, never arrays
NODE_START_S = 180  # generous: on a loaded machine a node's processes take a while to register


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and one added node, 1 CPU each, this process connected to the head; the
    set of their node ids. Both stopped afterwards, also when a start or a test fails."""
    if ray.is_initialized():  # another module's session
        ray.shutdown()
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE, include_dashboard=False)
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes(timeout=NODE_START_S)
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert len(nodes) == 2, ray.nodes()
        yield nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def _scored_on(root, run_ids) -> Counter:
    """How many of `run_ids` each Ray node scored, as the runs' provenance records it."""
    archive = mlarch.open(root)
    return Counter(archive.run(run_id)["provenance"]["ray_node"] for run_id in run_ids)


@pytest.mark.slow
def test_two_nodes_share_the_units_and_give_the_local_archive(two_nodes, local_archive, model_dir, data, tmp_path):
    """Workers started before planning (this process's session is open: `prestart`), one per node."""
    root = tmp_path / "arch"
    reporter = Recording()
    result = mlarch.open(root).ingest(str(model_dir["llama"]), LANGS, data["math"], data["control"],
                                      executor="ray", reporter=reporter, **OPTIONS)
    assert len(result.written) == 6 and not result.skipped
    assert reporter.passes == [("6 units, 2 Ray worker(s)", 6, "units")]
    assert any(line.startswith("ray: 2 worker(s) (1 CPU each) loading ") for line in reporter.lines), reporter.lines
    # the workers' own word: both nodes scored, each at least the units queued to it at the start
    scored_on = _scored_on(root, result.written)
    assert set(scored_on) == two_nodes, (scored_on, two_nodes)
    # and each progress line says which node: the host alone is the same for both
    assert {line.rsplit("(node ", 1)[1].rstrip(")") for line in reporter.lines if line.startswith("scored ")} == \
        {node[:8] for node in two_nodes}, reporter.lines
    assert min(scored_on.values()) >= ray_executor.QUEUED_PER_WORKER, scored_on
    # |W| (written by one of the workers), every run's arrays and the derived sets: as scored locally
    _assert_same_archive(root, local_archive)
    import jsonschema  # the extra provenance key keeps runs valid under the shipped schema

    schema = json.loads((resources.files("mlarch.schemas") / "run_provenance.schema.json").read_text())
    for run_id in result.written:
        jsonschema.validate(mlarch.open(root).run(run_id)["provenance"], schema)


def _restart(worker, timeout: float = 300) -> None:
    """Kill `worker`'s process and wait until Ray has restarted it (another process, no model loaded)."""
    before = ray.get(worker.__ray_call__.remote(lambda w: os.getpid()), timeout=timeout)
    ray.kill(worker, no_restart=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # a call the old process answers before it dies says so: ask again
            pid, loaded = ray.get(worker.__ray_call__.remote(lambda w: (os.getpid(), w.ctx is not None)), timeout=60)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue  # restarting
        if pid != before:
            assert not loaded, "a restarted worker holds a model"
            return
    raise AssertionError(f"Ray did not restart the worker within {timeout} s")


@pytest.mark.slow
def test_workers_started_after_planning_and_a_restarted_one_writes_magnitudes(two_nodes, local_archive, model_dir,
                                                                               data, tmp_path, monkeypatch):
    """Without `prestart` the workers start once the plan is made (RayExecutor.start): as many as
    there are units, at most one per node; one language, two units, one on each node. The worker
    asked to write |W| was restarted by Ray just before (its node lost it after its last
    manifest): it loads the model again, and |W| is the local ingest's."""
    monkeypatch.setattr(ray_executor, "PRESTART", False)
    writers = []
    write_magnitudes = ray_executor._Driver.write_magnitudes

    def after_a_restart(driver, path):
        _restart(driver.last)
        writers.append(driver.last)
        return write_magnitudes(driver, path)

    monkeypatch.setattr(ray_executor._Driver, "write_magnitudes", after_a_restart)
    root = tmp_path / "arch"
    reporter = Recording()
    result = mlarch.open(root).ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"],
                                      executor="ray", reporter=reporter, **OPTIONS)
    assert reporter.passes == [("2 units, 2 Ray worker(s)", 2, "units")]
    assert _scored_on(root, result.written) == Counter({node: 1 for node in two_nodes})
    assert len(writers) == 1  # a new model: |W| written once, at the first commit
    ours, local = mlarch.open(root), mlarch.open(local_archive)
    assert _runs(ours) == [row for row in _runs(local) if row[0] == "en"]
    assert _arrays(ours) == [row for row in _arrays(local) if row[0] in ("en", "model")]
    sizes = "SELECT k, seed, lang, module, n_math_top, n_control_top, n_selected FROM set_sizes ORDER BY ALL"
    assert ours.sql(sizes).rows() == [row for row in local.sql(sizes).rows() if row[2] == "en"]
    assert not [c for c in verify(root) if not c.ok]
