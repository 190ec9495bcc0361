"""Crash safety and concurrency with real subprocesses.

SIGKILL an ingest at 20 moments spread over its scoring, array-writing and commit
phases; each time the process must really die of the SIGKILL (return code -9), the
earlier runs must be intact, `verify` clean after `gc`, and a rerun must complete with the
same sets as an uninterrupted ingest. Queries from other processes keep working while an
ingest runs.

The kill moments come from an uninterrupted run of the very workload that is killed (de
and bn onto an archive holding en): the times of its stderr lines from "|W| of ..." (work
starts) to "archived bn ..." (the last commit is done). Each moment is placed after the
last line before it, at the same fraction of the gap to the next line, so the drift of a
busy machine does not add up across the run."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import mlarch
from mlarch.store.maintenance import gc, verify

KILL_POINTS = 20
# stderr lines of `ingest --langs de,bn`, in order: |W| extracted and de math scored, the
# passes end, each language's selection, writes and commit end with its "archived" line
EVENTS = ("|W| of", "de math", "de control", "archived de", "bn math", "bn control", "archived bn")
PHASES = ("|W| + de math pass", "de control pass", "de select/write/commit", "bn math pass",
          "bn control pass", "bn select/write/commit", "after the last commit")
pytestmark = pytest.mark.slow


def ingest_command(root, model_dir, data, langs):
    return [sys.executable, "-m", "mlarch", "--archive", str(root), "ingest", "--model", str(model_dir["llama"]),
            "--langs", langs, "--math", data["math"], "--control", data["control"], "--samples", "6",
            "--top-k", "0.01,0.05,0.25"]


def start(command):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


class Watch:
    """Reads a process's stderr in a thread and notes when each line arrived, so the test
    can wait for a line without blocking on the pipe."""

    def __init__(self, proc):
        self.proc, self.lines, self.ended = proc, [], False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append((time.monotonic(), line))
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def time_of(self, prefix):
        """When the first line starting with `prefix` arrived; None if none did (yet)."""
        return next((at for at, line in self.lines if line.startswith(prefix)), None)

    def wait_for(self, prefix, timeout=300):
        deadline = time.monotonic() + timeout
        with self.changed:
            while (at := self.time_of(prefix)) is None:
                if self.ended or time.monotonic() > deadline:
                    raise AssertionError(f"the ingest printed no {prefix!r} line: {self.text()}")
                self.changed.wait(timeout=1)
        return at

    def seen(self):
        """How many of EVENTS have arrived."""
        with self.changed:
            return sum(self.time_of(event) is not None for event in EVENTS)

    def text(self):
        self.thread.join(timeout=60)
        return "".join(line for _, line in self.lines)


def kill_schedule(marks, points):
    """(event index, seconds after it) for `points` moments evenly over marks[0]..marks[-1]:
    after the last event before the moment, at its fraction of the gap to the next event."""
    window = marks[-1] - marks[0]
    schedule = []
    for point in range(points):
        moment = marks[0] + window * (point + 0.5) / points
        anchor = max(i for i, at in enumerate(marks[:-1]) if at <= moment)
        schedule.append((anchor, moment - marks[anchor]))
    return schedule


@pytest.fixture(scope="module")
def base(llama_archive, model_dir, data, tmp_path_factory):
    """An archive holding en only, and the times of EVENTS in an uninterrupted ingest of de
    and bn onto a copy of it: the workload the kill test kills."""
    folder = tmp_path_factory.mktemp("crash")
    only_en = folder / "en"
    mlarch.open(only_en).ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=6,
                                top_k=[0.01, 0.05, 0.25], device="cpu")
    timing = folder / "timing"
    shutil.copytree(only_en, timing)
    proc = start(ingest_command(timing, model_dir, data, "de,bn"))
    watch = Watch(proc)
    assert proc.wait(timeout=300) == 0, watch.text()
    watch.text()  # every line read
    marks = [watch.time_of(event) for event in EVENTS]
    assert None not in marks and marks == sorted(marks), watch.text()
    return only_en, marks


def snapshot(root):
    archive = mlarch.open(root)
    return (archive.sql("SELECT * FROM set_sizes WHERE lang = 'en' ORDER BY ALL"),
            archive.sql("SELECT run_id, status, n_tokens, provenance FROM runs WHERE lang = 'en' ORDER BY run_id"))


def changes(before, after):
    """'' when the two snapshots are equal, else what differs (for the failure message)."""
    out = []
    for name, a, b in zip(("set_sizes", "runs"), before, after):
        if a.equals(b):
            continue
        if a.shape != b.shape or a.columns != b.columns:
            out.append(f"{name}: {a.shape} -> {b.shape}\n{b}")
            continue
        for column in a.columns:
            if not a[column].equals(b[column]):
                rows = [i for i, (x, y) in enumerate(zip(a[column], b[column])) if x != y][:3]
                out.append(f"{name}.{column} differs in rows {rows}: {[a[column][i] for i in rows]} -> "
                           f"{[b[column][i] for i in rows]}")
    return "; ".join(out)


def test_sigkill_at_twenty_moments(base, model_dir, data, llama_archive, tmp_path):
    only_en, marks = base
    before = snapshot(only_en)
    reference = mlarch.open(llama_archive).sql(
        "SELECT k, seed, lang, module, n_math_top, n_control_top, n_selected FROM set_sizes ORDER BY ALL")
    report, phases = [], [0] * len(PHASES)
    for point, (anchor, delay) in enumerate(kill_schedule(marks, KILL_POINTS)):
        root = tmp_path / f"kill{point}"
        shutil.copytree(only_en, root)
        proc = start(ingest_command(root, model_dir, data, "de,bn"))
        watch = Watch(proc)
        at = watch.wait_for(EVENTS[anchor]) + delay
        time.sleep(max(0.0, at - time.monotonic()))
        phase = watch.seen() - 1  # the events that had arrived when the signal went
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
        assert code == -signal.SIGKILL, (
            f"kill point {point} ({PHASES[phase]}): the ingest was not killed, it exited {code}: {watch.text()}")
        phases[phase] += 1
        changed = changes(before, snapshot(root))
        assert not changed, f"kill point {point} ({PHASES[phase]}): en runs changed: {changed}"
        left = mlarch.open(root).sql("SELECT lang, status FROM runs WHERE lang <> 'en' ORDER BY lang, role")
        removed = gc(root)
        failed = [c for c in verify(root) if not c.ok]
        assert not failed, f"kill point {point}: {failed}"
        report.append(f"kill {point:2d}: {PHASES[phase]:<24} rc {code}; runs left "
                      f"{', '.join(f'{r[0]} {r[1]}' for r in left.iter_rows()) or 'none'}; gc removed {len(removed)}")
        mlarch.open(root).ingest(str(model_dir["llama"]), ["de", "bn"], data["math"], data["control"], samples=6,
                                 top_k=[0.01, 0.05, 0.25], device="cpu")
        assert not [c for c in verify(root) if not c.ok]
        final = mlarch.open(root).sql(
            "SELECT k, seed, lang, module, n_math_top, n_control_top, n_selected FROM set_sizes ORDER BY ALL")
        assert final.equals(reference), f"kill point {point}: rerun gave other sets"
    kills = sum(phases)
    summary = (f"{kills} of {KILL_POINTS} SIGKILLs killed the ingest (rc -9); by phase: "
               + ", ".join(f"{name} {n}" for name, n in zip(PHASES, phases)))
    print("\n" + "\n".join(report) + "\n" + summary)
    assert kills == KILL_POINTS, summary
    # spread over the work: most phases got a kill, and nearly all came before the last commit ended
    assert sum(n > 0 for n in phases[:-1]) >= 4 and phases[-1] <= 2, summary


def test_queries_keep_working_during_an_ingest(base, model_dir, data, tmp_path):
    only_en, _ = base
    root = tmp_path / "busy"
    shutil.copytree(only_en, root)
    proc = start(ingest_command(root, model_dir, data, "de,bn") + ["--force"])
    # compare needs two archived languages: en and the one already archived before (en alone is
    # compared with itself through the SQL views instead)
    queries = [["sql", "SELECT * FROM set_sizes WHERE lang = 'en'"], ["sql", "SELECT count(*) FROM runs"], ["runs"],
               ["models"]]
    attempts = failures = 0
    while proc.poll() is None:
        for args in queries:
            out = subprocess.run([sys.executable, "-m", "mlarch", "--archive", str(root), *args],
                                 capture_output=True, text=True, timeout=120)
            attempts += 1
            failures += out.returncode != 0
    assert proc.returncode == 0, proc.stderr.read()
    assert attempts >= 3 and failures == 0


def test_two_ingests_at_once(base, model_dir, data, tmp_path):
    only_en, _ = base
    root = tmp_path / "two"
    shutil.copytree(only_en, root)
    first = start(ingest_command(root, model_dir, data, "de"))
    second = start(ingest_command(root, model_dir, data, "bn"))
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.wait(timeout=300) == 0, second.stderr.read()
    archive = mlarch.open(root)
    assert archive.sql("SELECT DISTINCT lang FROM set_sizes ORDER BY lang")["lang"].to_list() == ["bn", "de", "en"]
    assert not [c for c in verify(root) if not c.ok]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm(base, model_dir, data, tmp_path, sig):
    only_en, marks = base
    root = tmp_path / "interrupted"
    shutil.copytree(only_en, root)
    before = snapshot(root)
    proc = start(ingest_command(root, model_dir, data, "de,bn"))
    watch = Watch(proc)
    # halfway through de's selection, writes and commit (its passes are done)
    at = watch.wait_for("de control") + (marks[3] - marks[2]) * 0.5
    time.sleep(max(0.0, at - time.monotonic()))
    assert watch.time_of("archived bn") is None  # still working
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0, watch.text()
    after = snapshot(root)
    assert after[0].equals(before[0]) and after[1].equals(before[1])
    gc(root)
    assert not [c for c in verify(root) if not c.ok]


def test_exception_inside_the_model(base, model_dir, data, tmp_path, monkeypatch):
    only_en, _ = base
    root = tmp_path / "broken"
    shutil.copytree(only_en, root)
    before = snapshot(root)
    from transformers.models.llama import modeling_llama

    def explode(self, *args, **kwargs):
        raise RuntimeError("boom inside the model")

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", explode)
    with pytest.raises(RuntimeError, match="boom"):
        mlarch.open(root).ingest(str(model_dir["llama"]), ["de"], data["math"], data["control"], samples=6,
                                 top_k=[0.01, 0.05, 0.25], device="cpu")
    archive = mlarch.open(root)
    # both runs of the language were registered before its first pass: both end FAILED
    assert archive.sql("SELECT status FROM runs WHERE lang = 'de'")["status"].to_list() == ["FAILED", "FAILED"]
    after = snapshot(root)
    assert after[0].equals(before[0]) and after[1].equals(before[1])
    assert any(line.endswith("(tiny-llama, FAILED)") for line in gc(root))
    assert not [c for c in verify(root) if not c.ok]


def test_full_disk_while_writing_arrays(base, model_dir, data, tmp_path, monkeypatch):
    only_en, _ = base
    root = tmp_path / "full"
    shutil.copytree(only_en, root)
    before = snapshot(root)
    from mlarch.store import arrays

    real_write = arrays.write

    def full_disk(store, path, data_, **options):
        if path.endswith("/levels"):
            raise OSError(28, "No space left on device")
        return real_write(store, path, data_, **options)

    monkeypatch.setattr(arrays, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        mlarch.open(root).ingest(str(model_dir["llama"]), ["de"], data["math"], data["control"], samples=6,
                                 top_k=[0.01, 0.05, 0.25], device="cpu")
    after = snapshot(root)
    assert after[0].equals(before[0]) and after[1].equals(before[1])
    gc(root)
    assert not [c for c in verify(root) if not c.ok]
    monkeypatch.setattr(arrays, "write", real_write)
    mlarch.open(root).ingest(str(model_dir["llama"]), ["de"], data["math"], data["control"], samples=6,
                             top_k=[0.01, 0.05, 0.25], device="cpu")
    assert not [c for c in verify(root) if not c.ok]


HOLD_THE_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()  # until the test lets go
"""


def hold_commit_lock(root):
    """Another process holding the archive's commit lock (a plain flock), until its stdin gets a line."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(root / ".commit.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


WAITING = "waiting for another mlarch process to finish writing"


@pytest.mark.parametrize("command", ["gc", "rm", "ingest"])
def test_a_commit_behind_another_process_says_it_waits(archive_copy, model_dir, data, command):
    """rm, gc and ingest (at its commit) wait for a commit lock another process holds: they say
    so once, on stderr, instead of looking hung, and finish once it is released."""
    archive = mlarch.open(archive_copy)
    run_id = archive.sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    args = {"gc": ["gc"], "rm": ["rm", run_id],
            "ingest": ingest_command(archive_copy, model_dir, data, "en")[5:] + ["--seeds", "2"]}[command]
    holder = hold_commit_lock(archive_copy)
    proc = None
    try:
        proc = start([sys.executable, "-m", "mlarch", "--archive", str(archive_copy), *args])
        watch = Watch(proc)
        watch.wait_for(WAITING, timeout=120)
        time.sleep(0.5)
        assert proc.poll() is None, watch.text()  # the lock really is held: it waits
        assert archive.sql("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).item() == 1
        assert archive.sql("SELECT count(*) FROM runs WHERE seed = 2 AND status = 'FINISHED'").item() == 0
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert proc.wait(timeout=300) == 0, watch.text()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=60)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    waits = [line for _, line in watch.lines if WAITING in line]
    assert waits == [f"{WAITING} {archive_copy} (its commit lock is held) ...\n"], watch.text()
    if command == "rm":
        assert archive.sql("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).item() == 0
    if command == "ingest":
        assert archive.sql("SELECT count(*) FROM runs WHERE seed = 2 AND status = 'FINISHED'").item() == 2


def test_rm_dry_run_does_not_wait_for_the_commit_lock(archive_copy):
    run_id = mlarch.open(archive_copy).sql("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").item()
    holder = hold_commit_lock(archive_copy)
    try:
        done = subprocess.run([sys.executable, "-m", "mlarch", "--archive", str(archive_copy), "rm", "--dry-run",
                               run_id], capture_output=True, text=True, timeout=60)
        assert holder.poll() is None  # still held throughout
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert done.returncode == 0 and f"would remove run {run_id}" in done.stdout, done.stderr
    assert done.stderr == ""
