"""SIGKILL `mlarch eval` mid-grid: finished evaluations stay intact (items and record
digests), no half row is left, `gc` cleans the interrupted one and a rerun reuses the
finished evaluations."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mlarch
from mlarch.store.maintenance import gc, verify

pytestmark = pytest.mark.slow
GRID = ["prune:en@0.05"]


def long_data(folder) -> str:
    """200 items per language: each evaluation then runs for a second or more, so a kill
    shortly after an "archived" line lands while the next one is RUNNING."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures import LANGS, math_items

    folder.mkdir(parents=True, exist_ok=True)
    for lang in LANGS:
        with open(folder / f"{lang}.jsonl", "w", encoding="utf-8") as handle:
            for item in math_items(lang, 200):
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    return str(folder / "{lang}.jsonl")


def command(root, model_dir, data):
    cmd = [sys.executable, "-m", "mlarch", "--archive", str(root), "eval", "--model", str(model_dir["llama"]),
           "--langs", "en,de", "--task", "nll", "--data", data, "--batch-size", "1"]
    for spec in GRID:
        cmd += ["--intervene", spec]
    return cmd


def test_sigkill_mid_grid(llama_archive, model_dir, data, tmp_path):
    # kill moments after the first "archived" line: between evaluations, and (checked
    # below) at least once while one is RUNNING
    texts = long_data(tmp_path / "long")
    outcomes = [kill_and_check(llama_archive, tmp_path / f"copy{i}", model_dir, texts, delay)
                for i, delay in enumerate((0.0, 0.3))]
    assert outcomes[1] == 1, f"the kill 0.3 s into an evaluation found no RUNNING one: {outcomes}"


def kill_and_check(source, archive_copy, model_dir, data, delay) -> int:
    shutil.copytree(source, archive_copy)
    proc = subprocess.Popen(command(archive_copy, model_dir, data), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    seen, archived = [], threading.Event()

    def read():
        for line in proc.stderr:
            seen.append(line)
            if any(x.startswith("archived nll") for x in seen):  # the en baseline; de runs next
                archived.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert archived.wait(timeout=300), "".join(seen)
    time.sleep(delay)
    assert proc.poll() is None, "the eval ended before the kill: the kill would prove nothing"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    archive = mlarch.open(archive_copy)
    rows = archive.sql("SELECT eval_id, status, n_items FROM evaluations ORDER BY created_at")
    finished = rows.filter(rows["status"] == "FINISHED")
    assert finished.height >= 1
    assert set(rows["status"]) <= {"FINISHED", "RUNNING"}
    for eval_id, n_items in zip(finished["eval_id"], finished["n_items"]):
        assert archive.evaluation_items(eval_id).height == n_items
    unfinished = rows.filter(rows["status"] != "FINISHED")["eval_id"].to_list()
    for eval_id in unfinished:  # no half row: an unfinished evaluation has no items
        assert archive.evaluation_items(eval_id).height == 0
    problems = [c for c in verify(archive.root) if not c.ok]
    assert [c.object for c in problems] == [f"evaluation {e}" for e in unfinished]
    removed = gc(archive.root)
    assert len([r for r in removed if r.startswith("evaluation")]) == len(unfinished)
    assert all(c.ok for c in verify(archive.root))
    again = archive.evaluate(str(model_dir["llama"]), ["en", "de"], "nll", data, interventions=GRID,
                             device="cpu", batch_size=1)
    assert sorted(again.reused) == sorted(finished["eval_id"].to_list())
    assert len(again.written) == 2 * (1 + len(GRID)) - finished.height
    return len(unfinished)
