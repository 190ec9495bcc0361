"""The files inside an array's folder (zarr.json, c/<i>) and the folders on the way to them
come from whoever made the archive folder (rsync, a shared disk): a link to an identical copy
outside, to /dev/zero or to a folder, or a named pipe where a folder belongs, is refused by
every read, verify and export-bundle before anything is read through it, and no write or
removal goes through it."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from mlarch.errors import MlarchError
from mlarch.store import layout
from mlarch.store.arrays import ArrayDamaged

from fixtures import one_error

MODULE = "model.layers.0.self_attn.q_proj"


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def _en_math(archive_root: Path) -> str:
    return mlarch.open(archive_root).sql("SELECT run_id FROM runs WHERE lang = 'en' AND role = 'math'").item()


def _folder(archive_root: Path, which: str) -> tuple[Path, str]:
    """(the folder to replace, the array path whose reads pass through it)."""
    run_id = _en_math(archive_root)
    group = mlarch.open(archive_root).sql("SELECT magnitudes_group FROM models").item()
    arrays = archive_root / layout.ARRAYS
    return {
        "levels/c": (arrays / "runs" / run_id / "levels" / "c", f"runs/{run_id}/levels"),
        "norms/c": (arrays / "runs" / run_id / "norms" / "c", f"runs/{run_id}/norms"),
        "magnitudes/c": (arrays / group / "magnitudes" / "c", f"{group}/magnitudes"),
        "levels": (arrays / "runs" / run_id / "levels", f"runs/{run_id}/levels"),
        "run group": (arrays / "runs" / run_id, f"runs/{run_id}/levels"),
    }[which]


def _read(archive_root: Path, array: str):
    """Read the array at `array` path through the public API (a fresh Archive)."""
    archive = mlarch.open(archive_root)
    if array.endswith("/levels"):
        return archive.levels(_en_math(archive_root), MODULE)
    if array.endswith("/norms"):
        return archive.norms(_en_math(archive_root))
    return archive.magnitudes("tiny-llama", MODULE)


def _verify_fail(archive_root: Path, array: str) -> str:
    """The detail of verify's FAIL row for `array` (verify must exit 1 naming it)."""
    result = run(archive_root, "verify", "--format", "tsv")
    line = one_error(result, 1)
    assert array in line, line
    rows = [row.split("\t") for row in result.stdout.splitlines()]
    failed = [row for row in rows if len(row) >= 4 and row[1] == array and row[2] == "FAIL"]
    assert failed, result.stdout[-3000:]
    return failed[0][3]


@pytest.mark.parametrize("which", ["levels/c", "norms/c", "magnitudes/c", "levels", "run group"])
def test_a_folder_linked_to_an_identical_copy_outside_is_refused_by_reads_verify_and_export(
        archive_copy, tmp_path, which):
    """The copy's bytes are the recorded ones, so every digest agrees: only the link gives it
    away. Before, reads, verify and export-bundle went through it (export packed it)."""
    folder, array = _folder(archive_copy, which)
    outside = tmp_path / "outside" / folder.name
    shutil.copytree(folder, outside)
    shutil.rmtree(folder)
    folder.symlink_to(outside, target_is_directory=True)
    assert folder.is_symlink() and not filecmp.dircmp(folder, outside).diff_files  # the case: identical bytes
    with pytest.raises(ArrayDamaged, match="lies behind a symbolic link") as err:
        _read(archive_copy, array)
    assert isinstance(err.value, MlarchError) and array in str(err.value)
    assert "lies behind a symbolic link" in _verify_fail(archive_copy, array)
    bundle = tmp_path / "out.tar"
    line = one_error(run(archive_copy, "export-bundle", _en_math(archive_copy), "-o", str(bundle)), 1)
    assert "symbolic link" in line and "nothing was exported" in line, line
    assert not list(tmp_path.glob("out.tar*"))
    if which in ("levels/c", "levels"):  # rm of another run derives from this one's levels: refused, loudly
        de = mlarch.open(archive_copy).sql("SELECT run_id FROM runs WHERE lang = 'de' AND role = 'math'").item()
        assert "lies behind a symbolic link" in one_error(run(archive_copy, "rm", de), 1)
    # rm of the run (the model, for |W|) removes the link, never what it points to
    before = sorted((p.relative_to(outside.parent), p.read_bytes() if p.is_file() else None)
                    for p in outside.parent.rglob("*"))
    result = run(archive_copy, "rm", *(["--model", "tiny-llama"] if which == "magnitudes/c" else
                                       [_en_math(archive_copy)]))
    if which == "run group":  # a linked group stops rm before anything is removed (layout.checked_group)
        assert "symbolic link" in one_error(result, 1)
    else:
        assert result.exit_code == 0, result.output
        assert not os.path.lexists(folder)
    assert sorted((p.relative_to(outside.parent), p.read_bytes() if p.is_file() else None)
                  for p in outside.parent.rglob("*")) == before


@pytest.mark.parametrize("planted", ["link to /dev/zero", "named pipe", "plain file"])
def test_a_chunk_folder_that_is_no_folder_is_named_not_read_as_missing(archive_copy, planted):
    """`levels/c` replaced by a link to /dev/zero, a named pipe or a file: the error names what
    is there (before: 'chunk c/0 is missing', as if it had been deleted). In a process of its
    own with a timeout: a read that waited on the pipe would fail the test, not hang it."""
    folder, array = _folder(archive_copy, "levels/c")
    shutil.rmtree(folder)
    if planted == "link to /dev/zero":
        folder.symlink_to("/dev/zero")
        assert folder.is_symlink() and folder.is_char_device()
        expected = "c/0 lies behind a symbolic link"
    elif planted == "named pipe":
        os.mkfifo(folder)
        assert folder.is_fifo()
        expected = "which is a named pipe, not a folder"
    else:
        folder.write_bytes(b"\0" * 64)
        expected = "which is a file, not a folder"
    read = f"import mlarch; mlarch.open({str(archive_copy)!r}).levels({_en_math(archive_copy)!r}, {MODULE!r})"
    done = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "ArrayDamaged" in done.stderr and expected in done.stderr, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "mlarch", "--archive", str(archive_copy), "verify", "--format", "tsv"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"{array}\tFAIL" in done.stdout and expected in done.stdout, done.stdout[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_named_pipe_in_place_of_a_chunk_is_never_opened(archive_copy):
    """A pipe (or device) where a chunk belongs is refused by its lstat, before any open: opening
    one has effects of its own (here, a writer waiting on the pipe would be let through)."""
    folder, array = _folder(archive_copy, "levels/c")
    chunk = folder / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(chunk)!r}, 'wb'); print('released')"],
                              stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(ArrayDamaged, match="c/0 is not a plain file \\(a named pipe\\)"):
            _read(archive_copy, array)
        with pytest.raises(subprocess.TimeoutExpired):
            writer.wait(timeout=2)  # still waiting: no reader opened the pipe
    finally:
        if writer.poll() is None:
            os.close(os.open(chunk, os.O_RDONLY | os.O_NONBLOCK))  # let it go
        writer.wait(timeout=30)


def test_ingest_never_writes_through_a_link_planted_where_a_models_group_belongs(model_dir, data, tmp_path):
    """A model's |W| group is named after the model (models/<slug>-<hash>): a folder from
    elsewhere may hold a link there (to a project folder, say). Before, ingest wrote zarr.json
    and the chunk through it, after clearing the `magnitudes` folder it found there."""
    root = tmp_path / "arch"
    outside = tmp_path / "outside"
    (outside / "magnitudes").mkdir(parents=True)
    (outside / "magnitudes" / "notes.txt").write_text("precious")
    group = root / layout.ARRAYS / layout.model_group("tiny-llama")
    group.parent.mkdir(parents=True)
    group.symlink_to(outside, target_is_directory=True)
    result = run(root, "ingest", "--model", str(model_dir["llama"]), "--name", "tiny-llama", "--langs", "en",
                 "--math", data["math"], "--control", data["control"], "--samples", "2", "--top-k", "0.05",
                 "--device", "cpu", "-q")
    line = one_error(result, 1)
    assert "symbolic link" in line and layout.model_group("tiny-llama") in line, line
    assert sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*")) == ["magnitudes",
                                                                                     "magnitudes/notes.txt"]
    assert (outside / "magnitudes" / "notes.txt").read_text() == "precious"
    assert group.is_symlink()  # left for the user (verify lists it)
