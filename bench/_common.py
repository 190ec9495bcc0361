"""Shared helpers for the benchmarks in bench/: arguments, repeated timing, tables, JSON.

Every benchmark script does

    from _common import Bench
    bench = Bench("name", __doc__)          # parses --quick / --repeats, sets torch threads
    ...
    bench.row("metric", ours, baseline, target=..., unit="s")
    bench.finish(details={...})           # prints the table, writes bench/results/name.json

Ratios are always against a baseline measured in the same process run. The machine is
noisy (2 shared cores), so variants are run interleaved (round-robin, the order rotated
each round) and medians are reported; `paired_ratio` also gives the median of the
per-round ratios, which is robust to slow drifts in machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

THREADS = 2


def set_threads(n: int = THREADS) -> None:
    """torch.set_num_threads(n) (the query benchmarks never import torch and skip this)."""
    import torch

    torch.set_num_threads(n)


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


@contextmanager
def timer(sink: list | dict, key: str | None = None):
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        if isinstance(sink, dict):
            sink[key] = sink.get(key, 0.0) + elapsed
        else:
            sink.append(elapsed)


# --- contention detection ------------------------------------------------------------
# The machine is shared: other processes running on the 2 cores make torch's 2 threads
# wait on each other and inflate a pass 2-10x. Every timed call therefore also measures
# how much CPU *other* processes used meanwhile (/proc/stat busy time minus this process
# tree's own CPU time); a measurement during which others used more than
# CONTENDED_CORES is flagged, retried after waiting for a quiet machine (bounded), and left
# out of the medians when clean measurements exist.

CONTENDED_CORES = 0.3
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_snapshot() -> tuple[float, float, float]:
    """(system busy CPU-seconds incl. steal, own CPU-seconds incl. children, wall time)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        values = [int(v) for v in fields]
        # user nice system idle iowait irq softirq steal [guest guest_nice are inside user]
        busy = sum(values[i] for i in (0, 1, 2, 5, 6, 7) if i < len(values)) / _HZ
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.perf_counter()


def others_cores(before, after) -> float:
    """Average number of cores used by other processes between two snapshots."""
    wall = after[2] - before[2]
    if wall <= 0:
        return 0.0
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


def wait_for_quiet(max_wait: float, log: Callable[[str], None] | None = None, probe: float = 0.5) -> float:
    """Sleep until other processes use < CONTENDED_CORES for `probe` seconds, at most `max_wait`.

    Returns the seconds waited."""
    start = time.perf_counter()
    announced = False
    while True:
        before = _cpu_snapshot()
        time.sleep(probe)
        load = others_cores(before, _cpu_snapshot())
        if load < CONTENDED_CORES or time.perf_counter() - start >= max_wait:
            return time.perf_counter() - start
        if log and not announced:
            log(f"  machine busy (other processes use {load:.1f} cores): waiting up to {max_wait:.0f} s")
            announced = True


class Quiet:
    """Retry budget shared by all timed calls of one benchmark."""

    def __init__(self, budget_s: float = 240.0, retries: int = 2, per_wait_s: float = 60.0):
        self.budget = budget_s
        self.retries = retries
        self.per_wait = per_wait_s
        self.waited = 0.0
        self.contended = 0
        self.retried = 0

    def measure(self, fn: Callable[[], object], log=None) -> tuple[float, float, object]:
        """(seconds, others' cores during the call, return value); retried while contended."""
        for attempt in range(self.retries + 1):
            if self.budget - self.waited > 0:
                self.waited += wait_for_quiet(min(self.per_wait, self.budget - self.waited), log)
            before = _cpu_snapshot()
            value = fn()
            after = _cpu_snapshot()
            seconds, others = after[2] - before[2], others_cores(before, after)
            if others < CONTENDED_CORES:
                return seconds, others, value
            if attempt < self.retries and self.budget - self.waited > 0:
                self.retried += 1
                if log:
                    log(f"  contended ({others:.1f} other cores during {seconds:.2f} s): retrying")
        self.contended += 1
        return seconds, others, value

    def summary(self) -> dict:
        return {"contended_cores_threshold": CONTENDED_CORES, "waited_s": round(self.waited, 1),
                "retried": self.retried, "kept_contended": self.contended}


QUIET = Quiet()


def interleave(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
               log: Callable[[str], None] | None = None, quiet: Quiet | None = None) -> dict[str, list[float]]:
    """Run each variant `repeats` times, round-robin with the order rotated every round.

    Returns name -> list of wall times (seconds); contended measurements (other processes
    busy, see Quiet) are retried, and if still contended are recorded as None-free values
    in `interleave.contended[name]` (indices) so callers can drop them."""
    quiet = quiet or QUIET
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    contended: dict[str, list[int]] = {n: [] for n in names}
    values: dict[str, list] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            if r < warmup:
                variants[name]()
                continue
            elapsed, others, value = quiet.measure(variants[name], log)
            values[name].append(value)
            if others >= CONTENDED_CORES:
                contended[name].append(len(times[name]))
            times[name].append(elapsed)
            if log:
                flag = f" (contended: others used {others:.1f} cores)" if others >= CONTENDED_CORES else ""
                log(f"  round {r + 1 - warmup}: {name} {elapsed:.3f} s{flag}")
    LAST_CONTENDED.clear()
    LAST_CONTENDED.update(contended)
    LAST_VALUES.clear()
    LAST_VALUES.update(values)
    return times


LAST_CONTENDED: dict[str, list[int]] = {}  # variant -> indices of contended measurements
LAST_VALUES: dict[str, list] = {}  # variant -> return value of each kept measurement


def clean(values: list[float], bad) -> list[float]:
    """values without the contended indices (all values if none is clean)."""
    bad = set(bad)
    kept = [v for i, v in enumerate(values) if i not in bad]
    return kept or list(values)


def clean_times(times: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per variant, the measurements of the last `interleave` that were not contended."""
    return {name: clean(values, LAST_CONTENDED.get(name, [])) for name, values in times.items()}


def bad_rounds(*names: str) -> set[int]:
    """Round indices in which any of the named variants was contended (last `interleave`)."""
    return {i for name in names for i in LAST_CONTENDED.get(name, [])}


def paired_ratio(ours: list[float], baseline: list[float], bad: set[int] | None = None) -> float:
    """Median of per-round ratios ours[i] / baseline[i] over rounds not in `bad` (if any remain)."""
    pairs = [(a, b) for i, (a, b) in enumerate(zip(ours, baseline)) if b and i not in (bad or set())]
    pairs = pairs or [(a, b) for a, b in zip(ours, baseline) if b]
    return median([a / b for a, b in pairs])


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": THREADS,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": "cpu",
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["mem_total_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    info.update(source_fingerprint())
    for module in ("torch", "numpy", "zarr", "duckdb", "polars", "transformers"):
        try:
            from importlib.metadata import version

            info[f"{module}_version"] = version(module)
        except Exception:  # noqa: BLE001 - informational only
            info[f"{module}_version"] = None
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = bool(torch.cuda.is_available())
    return info


def source_fingerprint() -> dict:
    """sha256 over mlarch/**/*.py (path + bytes) and the newest file: the code these numbers are for
    (others edit mlarch/ while benchmarks run; compare fingerprints before comparing results)."""
    import hashlib

    h = hashlib.sha256()
    newest, newest_name = 0.0, None
    for path in sorted((ROOT / "mlarch").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        h.update(rel.encode())
        h.update(path.read_bytes())
        mtime = path.stat().st_mtime
        if mtime > newest:
            newest, newest_name = mtime, rel
    return {"mlarch_source_sha256": h.hexdigest()[:16],
            "mlarch_newest_file": newest_name,
            "mlarch_newest_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(newest)) + "Z"}


@dataclass
class Row:
    metric: str
    ours: float
    baseline: float | None
    ratio: float | None
    target: str
    passed: bool | None
    unit: str = "s"
    note: str = ""
    samples_ours: list = field(default_factory=list)
    samples_baseline: list = field(default_factory=list)


class Bench:
    def __init__(self, name: str, doc: str | None = None, *, quick_repeats: int = 1, repeats: int = 3,
                 torch_threads: bool = True, extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
                 device_args: bool = False):
        parser = argparse.ArgumentParser(description=(doc or name).strip().splitlines()[0])
        parser.add_argument("--quick", action="store_true", help="~30 s smoke run (smaller sizes, 1 repeat)")
        parser.add_argument("--repeats", type=int, default=None,
                            help=f"timed repeats per variant (default {repeats}, --quick {quick_repeats})")
        parser.add_argument("--no-write", action="store_true", help="do not write bench/results/NAME.json")
        parser.add_argument("--tag", default=None, help="write bench/results/NAME-TAG.json (a second setting)")
        if device_args:  # the benchmarks that run a model on a chosen device
            parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the model runs")
            parser.add_argument("--model", default="gemma", choices=sorted(MODELS),
                                help="gemma: the demo's Gemma-3-270M (default); smollm-random: a SmolLM2-135M-shaped "
                                     "Llama with random weights built from its config (no download: for a GPU "
                                     "machine without network)")
        if extra_args:
            extra_args(parser)
        self.args = parser.parse_args()
        self.name = name
        self.quick = self.args.quick
        self.repeats = self.args.repeats or (quick_repeats if self.quick else repeats)
        if self.quick:  # a smoke run should not wait minutes for a quiet machine
            QUIET.budget = 30.0
        self.rows: list[Row] = []
        self.started = time.time()
        self.clock = time.perf_counter()
        if torch_threads:
            set_threads()
        self.machine = machine_info()
        self.machine["device"] = getattr(self.args, "device", "cpu")
        self.machine["model"] = getattr(self.args, "model", "gemma")
        if self.machine["device"].startswith("cuda"):
            import torch

            self.machine["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    def log(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.clock:7.1f}s] {text}", flush=True)

    def row(self, metric: str, ours: float, baseline: float | None = None, *, ratio: float | None = None,
            target: str = "", passed: bool | None = None, unit: str = "s", note: str = "",
            samples_ours=(), samples_baseline=()) -> Row:
        if ratio is None and baseline:
            ratio = ours / baseline
        row = Row(metric, ours, baseline, ratio, target, passed, unit, note,
                  list(samples_ours), list(samples_baseline))
        self.rows.append(row)
        return row

    def table(self) -> str:
        def fmt(v, unit=""):
            if v is None:
                return "-"
            if isinstance(v, float):
                if v != v:
                    return "nan"
                text = f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
            else:
                text = str(v)
            return f"{text} {unit}".strip()

        header = ("metric", "ours", "baseline", "ratio", "target", "pass")
        lines = [(r.metric, fmt(r.ours, r.unit), fmt(r.baseline, r.unit), fmt(r.ratio, "x") if r.ratio is not None
                  else "-", r.target or "-", "-" if r.passed is None else ("PASS" if r.passed else "FAIL"))
                 for r in self.rows]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
        out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
               "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
        notes = [f"  * {r.metric}: {r.note}" for r in self.rows if r.note]
        return "\n".join(out + (["notes:"] + notes if notes else []))

    def finish(self, details: dict | None = None) -> dict:
        self.machine["loadavg_end"] = list(os.getloadavg())
        end = source_fingerprint()
        if end["mlarch_source_sha256"] != self.machine.get("mlarch_source_sha256"):
            self.machine["mlarch_source_changed_during_run"] = end
            print(f"WARNING: mlarch/ changed while this benchmark ran (newest {end['mlarch_newest_file']} "
                  f"{end['mlarch_newest_mtime']}): the numbers may mix two versions")
        if "torch" in sys.modules and "torch_threads" not in self.machine:
            import torch

            self.machine["torch_threads"] = torch.get_num_threads()
            self.machine["cuda_available"] = bool(torch.cuda.is_available())
        result = {
            "benchmark": self.name,
            "quick": self.quick,
            "repeats": self.repeats,
            "argv": sys.argv[1:],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
            "duration_s": round(time.perf_counter() - self.clock, 2),
            "machine": self.machine,
            "rows": [asdict(r) for r in self.rows],
            "contention": QUIET.summary(),
            "details": details or {},
        }
        print()
        print(f"== {self.name}{' (quick)' if self.quick else ''}: {result['duration_s']} s, mlarch source "
              f"{self.machine.get('mlarch_source_sha256')} (newest {self.machine.get('mlarch_newest_file')} "
              f"{self.machine.get('mlarch_newest_mtime')}), "
              f"load average {self.machine['loadavg_start'][0]:.1f} -> {self.machine['loadavg_end'][0]:.1f}; "
              f"contention: {QUIET.summary()} ==")
        print(self.table())
        if not self.args.no_write:
            RESULTS.mkdir(parents=True, exist_ok=True)
            suffix = ("-quick" if self.quick else "") + (f"-{self.args.tag}" if self.args.tag else "")
            path = RESULTS / f"{self.name}{suffix}.json"
            path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
            print(f"wrote {path.relative_to(ROOT)}")
        return result


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    if isinstance(value, Path):
        return str(value)
    return str(value)


# --- shared model / data helpers -------------------------------------------------------

def gemma_folder() -> Path:
    """Folder of the demo's Gemma-3-270M transformers model (converted on first use)."""
    from mlarch.ingest import demo

    return demo.prepare()


def smollm_random_folder() -> Path:
    """A Llama with SmolLM2-135M's shape (30 blocks, hidden 576, 9 heads / 3 kv, MLP 1536;
    ~106 M scored parameters) and random weights, with the tests' byte-level tokenizer
    (small vocabulary, untied head). Built once by the tests' `build_model`: no download."""
    from fixtures import build_model

    from mlarch.cache import cache_dir

    folder = cache_dir() / "bench" / "smollm-random"
    if not (folder / "tiny-llama" / "config.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_model("llama", partial, layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder / "tiny-llama"


MODELS = {"gemma": gemma_folder, "smollm-random": smollm_random_folder}


def model_folder(bench: "Bench") -> Path:
    return MODELS[bench.args.model]()


def load_model(folder: Path | str, device: str = "cpu"):
    """mlarch's own loader, with ingest's dtype for the device (float32 on cpu, bfloat16 on
    cuda): LoadedModel with .model, .tokenizer."""
    import torch

    from mlarch.ingest import loading

    target = torch.device(device)
    return loading.load(str(folder), revision=None, device=target, dtype=loading.resolve_dtype("auto", target))


def synchronize(device) -> None:
    """Wait for queued GPU work, so that a timer stops when the work is done."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def starter_texts(lang: str, role: str) -> list[str]:
    from mlarch.ingest import sources

    return sources.resolve("starter").load(lang, role).texts


def drawn(texts: list[str], samples: int, seed: int = 1) -> list[str]:
    """The texts `ingest` draws: default_rng(seed).integers(0, n_items, samples), with replacement."""
    import numpy as np

    indices = np.random.default_rng(seed).integers(0, len(texts), size=samples)
    return [texts[i] for i in indices]


def bare_forward(model, tokenizer, texts: list[str], *, base: bool, batch_size: int = 1,
                 max_length: int = 512) -> int:
    """The forward passes of `run_pass` without hooks: the very batches it forwards
    (`scoring.batches`: same tokenization, length grouping and padding).

    base=True calls the base model (model.model: no output head), as the scoring pass stops at
    the head's input; base=False runs the full causal LM including the logits."""
    import torch

    from mlarch.ingest.scoring import batches

    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    inputs, _ = batches(tokenizer, texts, batch_size=batch_size, max_length=max_length, vocab=vocab)
    target = base_model(model) if base else model
    n_tokens = 0
    with torch.inference_mode():
        for batch in inputs:
            attention = batch.attention.to(device)
            target(input_ids=batch.input_ids.to(device), attention_mask=attention, use_cache=False)
            n_tokens += int(attention.sum())
    synchronize(device)
    return n_tokens


def base_model(model):
    """The decoder stack without the output head (model.model / model.transformer)."""
    prefix = getattr(model, "base_model_prefix", None)
    if prefix and hasattr(model, prefix):
        return getattr(model, prefix)
    for name in ("model", "transformer"):
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"cannot find the base model of {type(model).__name__}")


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def dir_bytes(path: Path) -> int:
    """Apparent size (sum of file sizes) of everything under `path`."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:
                pass
    return total


def du_bytes(path: Path) -> int:
    """Disk usage in bytes as `du -s -B1` reports it (allocated blocks)."""
    import subprocess

    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])
