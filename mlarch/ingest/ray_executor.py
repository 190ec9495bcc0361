"""`--executor ray`: an ingest's units on a Ray cluster.

One Ray actor per GPU (on a cluster without GPUs, per node) loads the model once and scores the units
queued to it, each exactly as `--executor local` does (units.score_run): it writes the
run's norms and level codes straight to the array store and returns a small manifest (array
records with their digests, provenance), never the arrays. The driver (this process) alone
writes the catalog, DuckDB having one writer: it checks each manifest as untrusted input
(mlarch/ingest/manifests.py: the run it sent, exactly that run's arrays, digests recounted
from the store) and commits each (seed, language) group of runs as its manifests arrive
(mlarch/ingest/commit.py), so a crash loses at most the units in flight, and a rerun skips
what is archived (config digests, as always). |W| is extracted by each worker (selection
needs it) and written once, by a worker, at the first commit of a new model.

On a running cluster the workers start before planning (`prestart`): their imports of torch
and transformers overlap the driver's own imports and its reading of the sources.

A worker that dies (killed, out of memory, its node lost) is restarted by Ray, which loads
the model again and retries the units it held (max_restarts, max_task_retries); a retried
unit rewrites the same arrays. When the retries run out the driver marks the runs it has not
committed FAILED: `mlarch gc` removes them and their arrays, a rerun does the rest.

The workers must see the archive's array store at the same location as the driver (one
machine, a shared file system, or arrays on object storage) and have mlarch installed.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

import ray

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, Phrase, error
from mlarch.ingest import commit, manifests, units
from mlarch.ingest.config import ROLES
from mlarch.ingest.context import ModelInfo, prepare
from mlarch.store import array_store, layout

# a worker that dies is restarted (reloading the model) and its units retried this often
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
PROBE_TIMEOUT_S = 5.0
# MLARCH_RAY_PRESTART=0 starts the workers after planning, as before `prestart` (bench/ray_executor.py compares)
PRESTART = os.environ.get("MLARCH_RAY_PRESTART", "1") != "0"
QUEUED_PER_WORKER = 2  # the next unit is waiting on a worker while the driver commits the last one
_FIX = ("start a cluster with `ray start --head`, pass its address (", Arg("ray_address", shown="HOST:PORT"),
        " or RAY_ADDRESS), or leave both out for a local Ray instance")


def check_reachable(address: str) -> None:
    """Refuse an address nothing listens on, at once: ray.init would retry for a minute."""
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise error(UsageError, f"Ray address {address!r} is not HOST:PORT: ", *_FIX)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise error(UsageError, f"no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}): ",
                    *_FIX) from None


class RayExecutor:
    """Connects to (or starts) Ray, and runs a Plan's units on actors holding the model."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            check_reachable(self.address)
        self.started = False  # whether this executor called ray.init (and so shuts it down)
        self.workers: list = []
        self.remote_arrays = False  # whether the workers were given the AWS settings

    # -- the cluster ---------------------------------------------------------------------
    def connect(self) -> None:
        """Join the cluster at the address, else start a local Ray instance sized to this
        machine. A session the caller opened already (a notebook, a test) is used as is."""
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report sent anywhere
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        try:
            if self.address:
                ray.init(address=self.address, **quiet)
            else:  # on 127.0.0.1: pipeline.ingest set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before ray was imported
                ray.init(address="local", **quiet)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            if ray.is_initialized():  # half started (a local instance's processes): stop what it left
                ray.shutdown()
            where = self.address or "a local instance"
            raise error(UsageError, f"cannot start or join Ray ({where}): {_first_line(exc)}: ", *_FIX) from None
        self.started = True

    def prestart(self, root, cfg) -> None:
        """On a running cluster (an address, or a session the caller opened), start the workers
        before planning: their processes import torch and transformers while this one imports
        them too and reads the sources (the model loads once the plan is made). As many as the
        ingest can have units; `start` stops those the plan does not need. A local instance is
        started only after planning, so bad input is refused before that costly start."""
        if not PRESTART or not (self.address or ray.is_initialized()):
            return
        self.connect()
        from mlarch.ingest import devices

        device_type = "cpu" if devices.check(cfg.device) == "cpu" else self._device_type(cfg)
        catalog_path = Path(root) / layout.CATALOG
        try:  # planning checks the location properly; here only: do the workers need the AWS settings
            remote = bool(cfg.arrays) or (catalog_path.is_file() and array_store.recorded(catalog_path) is not None)
        except MlarchError:
            return  # planning reports it
        self._spawn(device_type, cfg, len(cfg.langs) * len(ROLES) * len(cfg.seeds), remote)

    def start(self, work) -> None:
        """Join or start Ray and start a worker per GPU (or per node, without GPUs), at most one
        per unit to do; each imports torch and transformers, then waits for the work order.
        Workers `prestart` started are kept (as many as there are units), the others stopped."""
        if self.workers and self.remote_arrays != work.array_store.remote:
            self.close(keep_ray=True)  # prestarted for the other kind of store
        if self.workers:
            keep = max(1, min(len(self.workers), len(work.todo)))
            for worker in self.workers[keep:]:
                ray.kill(worker, no_restart=True)
            self.workers = self.workers[:keep]
            return
        self.connect()
        self._spawn(work.device.type, work.cfg, len(work.todo), work.array_store.remote)

    def _spawn(self, device_type: str, cfg, most: int, remote_arrays: bool) -> None:
        """Start min(`most`, slots) ScoringWorker actors on `device_type` (slots: GPUs by --gpus-per-unit, else
        CPUs); with `remote_arrays` they get the driver's AWS settings."""
        self.remote_arrays = remote_arrays
        resources = ray.cluster_resources()
        if device_type == "cuda":
            per = cfg.gpus_per_unit
            count = max(1, min(most, int(float(resources.get("GPU", 0)) // per)))
            options, self.described = {"num_gpus": per, "num_cpus": 1}, f"{per:g} GPU each"
        else:
            # one worker per node, using its CPUs (torch's threads): one copy of the model per
            # machine, one start (process, torch import, load) per machine. A worker per CPU
            # would hold a model per core and, on 2 cores, made a 6-unit ingest ~2x slower to start.
            nodes = [int(float(n["Resources"].get("CPU", 0))) for n in ray.nodes() if n.get("Alive")]
            nodes = [cpus for cpus in nodes if cpus >= 1] or [max(1, int(float(resources.get("CPU", 1))))]
            count = max(1, min(most, len(nodes)))
            per = min(nodes)  # fits on every node (Ray sets OMP_NUM_THREADS to it)
            options = {"num_cpus": per, "scheduling_strategy": "SPREAD"}
            self.described = f"{per} CPU{'s' if per > 1 else ''} each"
        settings = aws_settings() if remote_arrays else {}
        if settings:  # the workers write where the driver checks and commits (a cluster may run elsewhere)
            options["runtime_env"] = {"env_vars": settings}
        actor = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
                           concurrency_groups={"io": 1})(ScoringWorker)
        for _ in range(count):  # one at a time: close() kills those started if a later start fails
            self.workers.append(actor.options(**options).remote())

    def _device_type(self, cfg) -> str:
        """cuda where the cluster has GPUs for --gpus-per-unit (with --device auto or cuda),
        else cpu. A device index names a GPU of this machine, which Ray's workers do not see."""
        from mlarch.ingest import devices

        spec = devices.check(cfg.device)
        if spec == "mps" or spec.startswith("cuda:"):
            raise error(UsageError, Arg("device", spec), " names a device of this machine; with ",
                        Arg("executor", "ray"), " each worker uses the GPU Ray gives it: pass ", Arg("device", "cuda"),
                        Phrase(", 'cpu' or 'auto'", ", cpu or auto"))
        if spec == "cpu":
            return "cpu"
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if spec == "cuda" and gpus < cfg.gpus_per_unit:
            raise error(MlarchError, Arg("device", "cuda"), f": the Ray cluster has {gpus:g} GPU(s), fewer than ",
                        Arg("gpus_per_unit", cfg.gpus_per_unit), ": add GPU nodes, lower ", Arg("gpus_per_unit"),
                        " or pass ", Arg("device", "cpu"))
        return "cuda" if gpus >= cfg.gpus_per_unit else "cpu"

    def resolve(self, cfg):
        """(torch.device, dtype) of the workers (planning's question: the dtype is part of
        every unit's identity). Joins Ray only when the answer depends on the cluster."""
        import torch

        from mlarch.ingest import devices, loading

        if devices.check(cfg.device) == "cpu":
            return torch.device("cpu"), loading.resolve_dtype(cfg.dtype, torch.device("cpu"))
        self.connect()
        device = torch.device(self._device_type(cfg))
        if device.type == "cpu" or cfg.dtype != "auto":
            return device, loading.resolve_dtype(cfg.dtype, device)
        # 'auto' on CUDA is bf16 where the workers' GPU supports it: ask one (a prestarted worker holds a GPU)
        if self.workers:
            return device, "bfloat16" if _get(self.workers[0].bf16_supported.remote()) else "float16"
        probe = ray.remote(num_gpus=cfg.gpus_per_unit, num_cpus=0)(_bf16_supported)
        return device, "bfloat16" if _get(probe.remote()) else "float16"

    def close(self, keep_ray: bool = False) -> None:
        """Stop the workers (freeing their GPU memory) and the Ray instance this executor started (unless `keep_ray`)."""
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)  # frees its GPU memory now
            except Exception:  # noqa: BLE001 - gone already
                pass
        self.workers = []
        if self.started and not keep_ray:
            ray.shutdown()
            self.started = False

    # -- the run -------------------------------------------------------------------------
    def run(self, work, reporter) -> None:
        """Score every unit of `work` on the workers and commit each language's runs as they arrive; the runs not
        committed are marked FAILED if anything fails."""
        self.start(work)
        local_order = units.work_order(work)
        order = ray.put(local_order)
        reporter.message(f"ray: {len(self.workers)} worker(s) ({self.described}) loading {work.cfg.model} "
                         f"({work.kind}, {work.dtype}, {work.device.type})")
        infos = _get([worker.info.remote(order) for worker in self.workers])  # the loads, in parallel
        info = infos[0]["model"]
        if not all(isinstance(i.get("model"), ModelInfo) and i["model"].dtype == work.dtype for i in infos):
            raise MlarchError(f"a Ray worker did not describe {work.cfg.model} as loaded in {work.dtype}: check that "
                              "every worker runs this mlarch version")
        if any(i["model"] != info for i in infos):
            raise MlarchError(f"the Ray workers loaded different weights for {work.cfg.model} (their nodes hold "
                              "different files): give every node the same model files")
        commit.open_catalog(work)
        commit.check_model_row(work, info)
        _Driver(work, local_order, order, info, self.workers, reporter).run()


class _Driver:
    """The driver's loop: units queued to workers, manifests committed as groups complete."""

    def __init__(self, work, local_order, order, info, workers, reporter):
        self.work, self.order, self.info, self.workers, self.reporter = work, order, info, workers, reporter
        self.local_order, self.spans = local_order, info.spans()  # what a worker's manifest is checked against
        self.last = workers[0]  # a live worker, to write |W| from

    def write_magnitudes(self, path: str):
        record = _get(self.last.write_magnitudes.remote(self.order, path))
        return manifests.check_magnitudes(self.local_order, self.spans, path, record)

    def run(self) -> None:
        work, reporter = self.work, self.reporter
        run_ids = commit.begin_runs(work, work.todo)
        queue = deque(zip(work.todo, run_ids))
        expected = {key: len(units) for key, units in work.commit_groups()}
        arrived: dict[tuple, list] = {}
        committed: set[str] = set()
        in_flight: dict = {}  # object ref -> (worker, unit, run id)
        clock = time.perf_counter()

        def submit(worker) -> None:
            unit, run_id = queue.popleft()
            in_flight[worker.score.remote(self.order, unit, run_id)] = (worker, unit, run_id)

        start_units(reporter, f"{len(work.todo)} units, {len(self.workers)} Ray worker(s)", len(work.todo))
        try:
            for _ in range(QUEUED_PER_WORKER):
                for worker in self.workers:
                    if queue:
                        submit(worker)
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                worker, unit, run_id = in_flight.pop(ready[0])
                # untrusted until it is exactly the run sent, as stored (a duplicate is another run's)
                pending = manifests.check_manifest(self.local_order, self.spans, unit, run_id, _get(ready[0], unit))
                self.last = worker
                if queue:
                    submit(worker)
                reporter.advance(1, pending.n_tokens)
                prov = pending.provenance
                node = prov.get("ray_node")
                reporter.message(f"scored {unit.label}: {pending.n_tokens:,} tokens in {prov['duration_s']:.2f} s "
                                 f"on {prov['host']}" + (f" (node {node[:8]})" if _is_node_id(node) else ""))
                key = (unit.seed, unit.lang)
                arrived.setdefault(key, []).append(pending)
                if len(arrived[key]) == expected[key]:
                    group = sorted(arrived.pop(key), key=lambda p: ROLES.index(p.role))
                    commit.commit(work, self.info, unit.seed, group, self.write_magnitudes)
                    committed.update(p.run_id for p in group)
                    reporter.message(f"archived {unit.lang} seed {unit.seed}: "
                                     + ", ".join(f"{p.role} {p.run_id}" for p in group))
        except BaseException:
            commit.mark_failed(work.catalog_path, [r for r in run_ids if r not in committed])
            raise
        finally:
            reporter.end_pass()
        work.result.written.extend(r for r in run_ids if r in committed)  # in plan order
        seconds = time.perf_counter() - clock
        reporter.message(f"ray: {len(run_ids)} units in {seconds:.1f} s on {len(self.workers)} worker(s)")


class ScoringWorker:
    """A Ray actor: the model, loaded once, and the units sent to it, scored in turn.

    The work order (the plan's part that scoring needs) comes with every call rather than to
    the constructor: a worker that Ray restarts after a crash loads the model again from the
    call it retries, and no constructor argument must outlive the driver's reference to it."""

    def __init__(self):
        self.ctx, self.error = None, None
        self.lock = threading.Lock()  # write_magnitudes runs beside score (its own concurrency group)
        from mlarch.ingest import loading  # noqa: F401 - MKL_CBWR before torch, then torch
        import transformers  # noqa: F401 - the slow imports, once per worker process

    def _ready(self, order):
        with self.lock:
            if self.ctx is None and self.error is None:
                try:
                    ctx = prepare(order, units.Reporter())
                    ctx.extract_magnitudes()  # inline: every unit's selection needs |W|
                    self.ctx = ctx
                except MlarchError as exc:  # handed to the driver as it is
                    self.error = exc
        if self.error is not None:
            raise self.error
        return self.ctx

    def info(self, order) -> dict:
        """Load the model of `order` (once) and say what was loaded, on which host and process."""
        ctx = self._ready(order)
        return {"model": ctx.info, "host": socket.gethostname(), "pid": os.getpid()}

    def score(self, order, unit, run_id: str):
        """Score one unit, write its arrays; the manifest, without the level codes. Its provenance
        names the Ray node that scored it ("ray_node"), beside the host."""
        pending = units.score_run(self._ready(order), unit, run_id).result()
        pending.levels = None  # the driver's derive reads them from the store
        # the host alone does not tell apart two nodes of one machine (or a worker Ray moved after a restart)
        pending.provenance["ray_node"] = ray.get_runtime_context().get_node_id()
        return pending

    def bf16_supported(self) -> bool:
        """Whether this worker's GPU computes in bfloat16 (what --dtype auto picks on CUDA)."""
        return _bf16_supported()

    @ray.method(concurrency_group="io")
    def write_magnitudes(self, order, path: str):
        """|W| at `path` of the array store (once per model, under the driver's commit lock:
        beside any unit this worker is scoring)."""
        ctx = self._ready(order)
        return units.write_array(ctx.order.store, path, ctx.magnitudes)

# Sent to workers: settings only, by name. A runtime_env is stored in the cluster's job
# metadata, which anyone with access to the cluster (its dashboard, its GCS) can read, so no
# credential goes (keys, session and bearer tokens, container-credential tokens, any variable
# botocore adds later): nodes use their own credentials, from the files named here or their role.
AWS_FORWARDED = frozenset({
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_STS", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT", "AWS_S3_US_EAST_1_REGIONAL_ENDPOINT",
    "AWS_STS_REGIONAL_ENDPOINTS", "AWS_S3_USE_ARN_REGION", "AWS_S3_DISABLE_MULTIREGION_ACCESS_POINTS",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CA_BUNDLE",
    "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_DEFAULTS_MODE",
    "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",  # what an S3-compatible server takes
})


def aws_settings() -> dict[str, str]:
    """The driver's AWS settings (endpoint, region, profile, config and credentials file
    paths, CA bundle, retries), for workers writing to arrays on S3: a Ray instance started
    earlier, or a cluster node, has another environment. Only AWS_FORWARDED's names go."""
    return {name: value for name, value in os.environ.items() if name in AWS_FORWARDED}


def start_units(reporter, label: str, total: int) -> None:
    """The overall bar counts units, not samples: say so where the reporter takes a unit name
    (a caller's own reporter with the older start_pass(label, total) still works)."""
    import inspect

    try:
        takes_unit = "unit" in inspect.signature(reporter.start_pass).parameters
    except (TypeError, ValueError):
        takes_unit = False
    if takes_unit:
        reporter.start_pass(label, total, unit="units")
    else:
        reporter.start_pass(label, total)


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _get(refs, unit=None):
    """ray.get, with a worker's own error raised as it is and a worker lost for good as one line."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MlarchError):
            raise cause from None
        # the worker's own error, not the first line of Ray's wrapper (which names only the actor and its pid)
        what = f"{type(cause).__name__}: {_first_line(cause)}" if isinstance(cause, BaseException) else _first_line(exc)
        raise MlarchError(f"a Ray worker failed{' on ' + unit.label if unit else ''}: {what}") from None
    except ray.exceptions.RayActorError as exc:
        raise MlarchError(
            f"a Ray worker died{' scoring ' + unit.label if unit else ''} and was not restarted "
            f"({MAX_RESTARTS} restarts, {MAX_TASK_RETRIES} retries): {_first_line(exc)}: rerun the same command "
            "(archived units are skipped); `mlarch gc` removes the failed runs and their arrays") from None


def _is_node_id(value) -> bool:
    """Whether a manifest's "ray_node" is a Ray node id (hex) that a progress line may print."""
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{16,128}", value) is not None  # the schema's pattern


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
