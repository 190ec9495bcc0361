"""Crash safety and concurrency with real subprocesses.

SIGKILL an ingest at 20 moments spread over its scoring, array-writing and commit
phases; each time the earlier runs must be intact, `verify` clean after `gc`, and a rerun
must complete with the same sets as an uninterrupted ingest. Queries from other processes
keep working while an ingest runs."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import mlarch
from mlarch.store.maintenance import gc, verify

KILL_POINTS = 20
pytestmark = pytest.mark.slow


def ingest_command(root, model_dir, data, langs):
    return [sys.executable, "-m", "mlarch", "--archive", str(root), "ingest", "--model", str(model_dir["llama"]),
            "--langs", langs, "--math", data["math"], "--control", data["control"], "--samples", "6",
            "--top-k", "0.01,0.05,0.25"]


def start(command):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def wait_for_loading(proc):
    """Block until the ingest says it is loading the model (imports are done)."""
    for line in proc.stderr:
        if line.startswith("loading "):
            return time.monotonic()
    raise AssertionError("the ingest ended before loading the model")


@pytest.fixture(scope="module")
def base(llama_archive, model_dir, data, tmp_path_factory):
    """An archive holding en only, and a reference with en, de, bn ingested without interruption."""
    folder = tmp_path_factory.mktemp("crash")
    only_en = folder / "en"
    mlarch.open(only_en).ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=6,
                                top_k=[0.01, 0.05, 0.25], device="cpu")
    proc = start(ingest_command(only_en.with_name("timing"), model_dir, data, "en,de,bn"))
    loaded = wait_for_loading(proc)
    assert proc.wait(timeout=300) == 0
    phase = time.monotonic() - loaded  # model load, scoring, writes, commits
    return only_en, phase


def snapshot(root):
    archive = mlarch.open(root)
    return (archive.sql("SELECT * FROM set_sizes WHERE lang = 'en' ORDER BY ALL"),
            archive.sql("SELECT run_id, status, n_tokens, provenance FROM runs WHERE lang = 'en' ORDER BY run_id"))


def test_sigkill_at_twenty_moments(base, model_dir, data, llama_archive, tmp_path):
    only_en, phase = base
    before = snapshot(only_en)
    reference = mlarch.open(llama_archive).sql(
        "SELECT k, seed, lang, module, n_math_top, n_control_top, n_selected FROM set_sizes ORDER BY ALL")
    survived = 0
    for point in range(KILL_POINTS):
        root = tmp_path / f"kill{point}"
        shutil.copytree(only_en, root)
        proc = start(ingest_command(root, model_dir, data, "de,bn"))
        loaded = wait_for_loading(proc)
        time.sleep(max(0.0, loaded + phase * (point + 0.5) / KILL_POINTS - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        after = snapshot(root)
        assert after[0].equals(before[0]) and after[1].equals(before[1]), f"kill point {point}: en runs changed"
        gc(root)
        failed = [c for c in verify(root) if not c.ok]
        assert not failed, f"kill point {point}: {failed}"
        mlarch.open(root).ingest(str(model_dir["llama"]), ["de", "bn"], data["math"], data["control"], samples=6,
                                 top_k=[0.01, 0.05, 0.25], device="cpu")
        assert not [c for c in verify(root) if not c.ok]
        final = mlarch.open(root).sql(
            "SELECT k, seed, lang, module, n_math_top, n_control_top, n_selected FROM set_sizes ORDER BY ALL")
        assert final.equals(reference), f"kill point {point}: rerun gave other sets"
        survived += 1
    assert survived == KILL_POINTS


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
    only_en, phase = base
    root = tmp_path / "interrupted"
    shutil.copytree(only_en, root)
    before = snapshot(root)
    proc = start(ingest_command(root, model_dir, data, "de,bn"))
    loaded = wait_for_loading(proc)
    time.sleep(max(0.0, loaded + phase * 0.4 - time.monotonic()))
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
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
