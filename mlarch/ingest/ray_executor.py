"""`--executor ray`: an ingest's units on a Ray cluster.

One Ray actor per GPU (or per share of the CPUs) loads the model once and scores the units
queued to it, each exactly as `--executor local` does (pipeline._score_run): it writes the
run's norms and level codes straight to the array store and returns a small manifest (array
records with their digests, provenance), never the arrays. The driver (this process) alone
writes the catalog, DuckDB having one writer: it commits each (seed, language) group of runs
as its manifests arrive, so a crash loses at most the units in flight, and a rerun skips
what is archived (config digests, as always). |W| is extracted by each worker (selection
needs it) and written once, by a worker, at the first commit of a new model.

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
import socket
import threading
import time
from collections import deque
from urllib.parse import urlsplit

import ray

from mlarch.errors import MlarchError, UsageError
from mlarch.ingest import pipeline
from mlarch.ingest.context import prepare

# a worker that dies is restarted (reloading the model) and its units retried this often
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
PROBE_TIMEOUT_S = 5.0
QUEUED_PER_WORKER = 2  # the next unit is waiting on a worker while the driver commits the last one
_FIX = ("start a cluster with `ray start --head`, pass its address (--ray-address HOST:PORT or RAY_ADDRESS), "
        "or leave both out for a local Ray instance")


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
        raise UsageError(f"Ray address {address!r} is not HOST:PORT: {_FIX}")
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UsageError(f"no Ray cluster answers at {address} ({exc.strerror or type(exc).__name__}): {_FIX}") from None


class RayExecutor:
    """Connects to (or starts) Ray, and runs a Plan's units on actors holding the model."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            check_reachable(self.address)
        self.started = False  # whether this executor called ray.init (and so shuts it down)
        self.workers: list = []

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
            where = self.address or "a local instance"
            raise UsageError(f"cannot start or join Ray ({where}): {_first_line(exc)}: {_FIX}") from None
        self.started = True

    def start(self, work) -> None:
        """Join or start Ray and start a worker per GPU (or share of the CPUs), at most one
        per unit to do; each imports torch and transformers, then waits for the work order."""
        self.connect()
        cfg, most = work.cfg, len(work.todo)
        resources = ray.cluster_resources()
        if work.device.type == "cuda":
            per = cfg.gpus_per_unit
            count = max(1, min(most, int(float(resources.get("GPU", 0)) // per)))
            options, self.described = {"num_gpus": per, "num_cpus": 1}, f"{per:g} GPU each"
        else:
            cpus = max(1, int(float(resources.get("CPU", 1))))
            count = max(1, min(most, cpus))
            per = max(1, cpus // count)  # torch in each worker uses its share (Ray sets OMP_NUM_THREADS)
            options, self.described = {"num_cpus": per}, f"{per} CPU{'s' if per > 1 else ''} each"
        actor = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
                           concurrency_groups={"io": 1})(ScoringWorker)
        self.workers = [actor.options(**options).remote() for _ in range(count)]

    def _device_type(self, cfg) -> str:
        """cuda where the cluster has GPUs for --gpus-per-unit (with --device auto or cuda),
        else cpu. A device index names a GPU of this machine, which Ray's workers do not see."""
        from mlarch.ingest import devices

        spec = devices.check(cfg.device)
        if spec == "mps" or spec.startswith("cuda:"):
            raise UsageError(f"--device {spec} names a device of this machine; with --executor ray each worker uses "
                             "the GPU Ray gives it: pass --device cuda, cpu or auto")
        if spec == "cpu":
            return "cpu"
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if spec == "cuda" and gpus < cfg.gpus_per_unit:
            raise MlarchError(f"--device cuda: the Ray cluster has {gpus:g} GPU(s), fewer than --gpus-per-unit "
                              f"{cfg.gpus_per_unit}: add GPU nodes, lower --gpus-per-unit or pass --device cpu")
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
        # 'auto' on CUDA is bf16 where the workers' GPU supports it: ask one
        probe = ray.remote(num_gpus=cfg.gpus_per_unit, num_cpus=0)(_bf16_supported)
        return device, "bfloat16" if _get(probe.remote()) else "float16"

    def close(self) -> None:
        """Stop the workers (freeing their GPU memory) and the Ray instance this executor started."""
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)  # frees its GPU memory now
            except Exception:  # noqa: BLE001 - gone already
                pass
        self.workers = []
        if self.started:
            ray.shutdown()
            self.started = False

    # -- the run -------------------------------------------------------------------------
    def run(self, work, reporter) -> None:
        """Score every unit of `work` on the workers and commit each language's runs as they arrive; the runs not
        committed are marked FAILED if anything fails."""
        self.start(work)
        order = ray.put(pipeline.work_order(work))
        reporter.message(f"ray: {len(self.workers)} worker(s) ({self.described}) loading {work.cfg.model} "
                         f"({work.kind}, {work.dtype}, {work.device.type})")
        infos = _get([worker.info.remote(order) for worker in self.workers])  # the loads, in parallel
        info = infos[0]["model"]
        if any(i["model"].weights_sha256 != info.weights_sha256 for i in infos):
            raise MlarchError(f"the Ray workers loaded different weights for {work.cfg.model} (their nodes hold "
                              "different files): give every node the same model files")
        pipeline.open_catalog(work)
        pipeline.check_model_row(work, info)
        _Driver(work, order, info, self.workers, reporter).run()


class _Driver:
    """The driver's loop: units queued to workers, manifests committed as groups complete."""

    def __init__(self, work, order, info, workers, reporter):
        self.work, self.order, self.info, self.workers, self.reporter = work, order, info, workers, reporter
        self.last = workers[0]  # a live worker, to write |W| from

    def write_magnitudes(self, path: str):
        return _get(self.last.write_magnitudes.remote(self.order, path))

    def run(self) -> None:
        work, reporter = self.work, self.reporter
        run_ids = pipeline._begin_runs(work, work.todo)
        queue = deque(zip(work.todo, run_ids))
        expected = {key: len(units) for key, units in work.commit_groups()}
        arrived: dict[tuple, list] = {}
        committed: set[str] = set()
        in_flight: dict = {}  # object ref -> (worker, unit)
        clock = time.perf_counter()

        def submit(worker) -> None:
            unit, run_id = queue.popleft()
            in_flight[worker.score.remote(self.order, unit, run_id)] = (worker, unit)

        reporter.start_pass(f"{len(work.todo)} units, {len(self.workers)} Ray worker(s)", len(work.todo))
        try:
            for _ in range(QUEUED_PER_WORKER):
                for worker in self.workers:
                    if queue:
                        submit(worker)
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                worker, unit = in_flight.pop(ready[0])
                pending = _get(ready[0], unit)
                self.last = worker
                if queue:
                    submit(worker)
                reporter.advance(1, pending.n_tokens)
                prov = pending.provenance
                reporter.message(f"scored {unit.label}: {pending.n_tokens:,} tokens in {prov['duration_s']:.2f} s "
                                 f"on {prov['host']}")
                key = (unit.seed, unit.lang)
                arrived.setdefault(key, []).append(pending)
                if len(arrived[key]) == expected[key]:
                    group = sorted(arrived.pop(key), key=lambda p: pipeline.ROLES.index(p.role))
                    pipeline._commit(work, self.info, unit.seed, group, self.write_magnitudes)
                    committed.update(p.run_id for p in group)
                    reporter.message(f"archived {unit.lang} seed {unit.seed}: "
                                     + ", ".join(f"{p.role} {p.run_id}" for p in group))
        except BaseException:
            pipeline._mark_failed(work.catalog_path, [r for r in run_ids if r not in committed])
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
                    ctx = prepare(order, pipeline.Reporter())
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
        """Score one unit, write its arrays; the manifest, without the level codes."""
        pending = pipeline._score_run(self._ready(order), unit, run_id).result()
        pending.levels = None  # the driver's derive reads them from the store
        return pending

    @ray.method(concurrency_group="io")
    def write_magnitudes(self, order, path: str):
        """|W| at `path` of the array store (once per model, under the driver's commit lock:
        beside any unit this worker is scoring)."""
        ctx = self._ready(order)
        return pipeline.write_array(ctx.order.store, path, ctx.magnitudes)

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
        raise MlarchError(f"a Ray worker failed{' on ' + unit.label if unit else ''}: {_first_line(exc)}") from None
    except ray.exceptions.RayActorError as exc:
        raise MlarchError(
            f"a Ray worker died{' scoring ' + unit.label if unit else ''} and was not restarted "
            f"({MAX_RESTARTS} restarts, {MAX_TASK_RETRIES} retries): {_first_line(exc)}: rerun the same command "
            "(archived units are skipped); `mlarch gc` removes the failed runs and their arrays") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
