"""Ray executor overhead: `mlarch ingest --executor ray` vs `--executor local` on this machine.

The workload: the tiny test model (tests/fixtures.py, tiny-llama) on 3 languages (en, de,
bn), math and control, one seed: 6 units, each in a fresh archive, run as the CLI a user
runs (a new Python process per ingest). Ray's one-time start (a Ray instance on 127.0.0.1
with 2 CPUs, held by a process of its own as a cluster is left running) is timed and
reported apart; the ray ingests join it with --ray-address. Each ray ingest still starts its own workers (a process
per worker that imports torch and transformers and loads the model): that cost is in the
ratio, and shown apart from the scoring, from the ingest's own progress lines. On a running
cluster the workers start before the driver plans (their imports overlap its own); the variant
"ray-late" (MLARCH_RAY_PRESTART=0) starts them after planning, as before, for a ratio in the same run.

Target: ray <= 1.3x local (median of paired rounds, variants interleaved).

    .venv/bin/python bench/ray_executor.py [--quick] [--samples 6,120]
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, Bench, median, paired_ratio

TARGET = 1.3
LANGS = "en,de,bn"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


HOLDER = """
import signal, sys, time, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
signal.signal(signal.SIGTERM, lambda *args: (ray.shutdown(), sys.exit(0)))
while True:
    time.sleep(1)
"""


def start_cluster(env: dict) -> tuple[subprocess.Popen, str, float]:
    """A Ray instance on 127.0.0.1 with 2 CPUs, held by a process of its own (as a cluster is
    left running); that process (ended by SIGTERM), the address, seconds until it answered."""
    clock = time.perf_counter()
    head = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    address = head.stdout.readline().strip()
    if not address:
        head.kill()
        raise SystemExit("the Ray instance did not start")
    return head, address, time.perf_counter() - clock


def ingest(root: Path, model: Path, data: tuple[str, str], samples: int, env: dict, extra: list[str]) -> dict:
    """One CLI ingest; its wall time and, from its stderr lines, when the workers were ready."""
    command = [sys.executable, "-m", "mlarch", "--archive", str(root), "ingest", "--model", str(model), "--langs",
               LANGS, "--math", data[0], "--control", data[1], "--samples", str(samples), "--top-k",
               "0.01,0.05,0.25", "--device", "cpu", *extra]
    clock = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    times = {}
    for line in proc.stderr:
        for key, pattern in (("loading", r"^(ray: \d+ worker|loading )"), ("first_scored", r"^(scored |archived )")):
            if key not in times and re.search(pattern, line):
                times[key] = time.perf_counter() - clock
    out = proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"ingest failed: {command}\n{out}")
    times["total"] = time.perf_counter() - clock
    shutil.rmtree(root, ignore_errors=True)
    return times


def main() -> None:
    bench = Bench("ray_executor", __doc__, repeats=3, quick_repeats=1, torch_threads=False, extra_args=lambda p: (
        p.add_argument("--samples", default=None, help="samples per unit, comma-separated (default 6,120; --quick 6)"),
    ))
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise SystemExit("Ray is not installed: pip install 'mlarch[ray]'")

    from fixtures import build_model, write_data

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    # Ray on 127.0.0.1 only (2.60 otherwise advertises the host's interface address), no usage
    # report, no token (a loopback instance of this script's own)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    model = build_model("llama", work)
    data = write_data(work / "data")
    samples_list = [int(s) for s in (bench.args.samples or ("6" if bench.quick else "6,120")).split(",")]
    head = None
    details = {"samples": samples_list, "langs": LANGS, "rounds": {}}
    try:
        head, address, start_s = start_cluster(env)
        bench.log(f"Ray instance on {address}: {start_s:.1f} s")
        bench.row("Ray one-time start (a local instance, ready)", start_s, note="reported apart: not in the ratios")
        for samples in samples_list:
            runs = {"local": [], "ray": [], "ray-late": []}
            for round_ in range(bench.repeats):
                order = ["local", "ray", "ray-late"] if round_ % 2 == 0 else ["ray-late", "ray", "local"]
                for variant in order:
                    extra = ["--executor", "ray", "--ray-address", address] if variant != "local" else []
                    # ray-late: the workers start after planning, as before prestart (MLARCH_RAY_PRESTART=0)
                    variant_env = {**env, "MLARCH_RAY_PRESTART": "0" if variant == "ray-late" else "1"}
                    times = ingest(work / f"arch-{variant}", model, data, samples, variant_env, extra)
                    runs[variant].append(times)
                    bench.log(f"samples {samples} round {round_} {variant}: {times['total']:.2f} s "
                              f"(workers ready / first unit at {times.get('first_scored', float('nan')):.2f} s)")
            local = [t["total"] for t in runs["local"]]
            ray_ = [t["total"] for t in runs["ray"]]
            ratio = paired_ratio(ray_, local)
            bench.row(f"ingest 3 langs x 2 roles, {samples} samples/unit: ray vs local", median(ray_), median(local),
                      ratio=ratio, target=f"<= {TARGET}x", passed=ratio <= TARGET, samples_ours=ray_,
                      samples_baseline=local)
            late = [t["total"] for t in runs["ray-late"]]
            bench.row(f"  {samples} samples: workers started after planning (before prestart) vs local", median(late),
                      median(local), ratio=paired_ratio(late, local), note="MLARCH_RAY_PRESTART=0",
                      samples_ours=late, samples_baseline=local)
            ready_ray = [t["first_scored"] - t["loading"] for t in runs["ray"]]
            ready_local = [t["first_scored"] - t["loading"] for t in runs["local"]]
            bench.row(f"  {samples} samples: from 'loading' to the first unit done", median(ready_ray),
                      median(ready_local), note="ray: worker processes start, import torch, load the model")
            after_ray = [t["total"] - t["first_scored"] for t in runs["ray"]]
            after_local = [t["total"] - t["first_scored"] for t in runs["local"]]
            bench.row(f"  {samples} samples: after the first unit", median(after_ray), median(after_local))
            details["rounds"][samples] = runs
    finally:
        if head is not None and head.poll() is None:
            head.send_signal(signal.SIGTERM)  # the instance this script started: ray.shutdown() there
            try:
                head.wait(timeout=120)
            except subprocess.TimeoutExpired:
                head.kill()
        shutil.rmtree(work, ignore_errors=True)
    bench.finish(details)


if __name__ == "__main__":
    main()
