"""Hostile text on its way to the terminal or the model loader: catalog text and planted
file names print as visible escapes (never a forged row or a terminal escape sequence), and a
device or hub id with a trailing newline (which a regex's `$` lets through) is refused."""

import json

import pytest
from click.testing import CliRunner

import mlarch
from fixtures import one_error
from mlarch.cli import cli
from mlarch.errors import UsageError

# what a planted folder name holds to forge a row of verify's report, then erase the line
FORGED = "x\nrecord digest      run 000000000000                       ok\x1b[2K"


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def test_runs_prints_catalog_text_with_escapes_visible(archive_copy):
    """A hand-edited (or imported) catalog value with ESC sequences and a newline prints as
    escapes on its own row of `mlarch runs`."""
    edit = ("UPDATE runs SET dataset = 'gsm8k' || chr(27) || ']0;pwned' || chr(7) || chr(10) || 'forged' "
            "WHERE lang = 'de' AND role = 'math'")
    assert run(archive_copy, "sql", "--write", edit).exit_code == 0
    result = run(archive_copy, "runs")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 + 6  # header, rule, one line per run: the newline forged none
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert sum(r"gsm8k\x1b]0;pwned\x07\nforged" in line for line in lines) == 1


def test_verify_prints_a_planted_orphan_name_escaped(archive_copy):
    """A folder planted in arrays.zarr/runs (as a key in a shared bucket prefix) is one FAIL
    row whose name shows its newline and ESC; it forges no `ok` row. json keeps it exact."""
    (archive_copy / "arrays.zarr" / "runs" / FORGED).mkdir()
    result = run(archive_copy, "verify")
    assert result.exit_code == 1, result.output
    assert "\x1b" not in result.output
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.startswith("record digest      run 000000000000")]
    orphan = [line for line in lines if line.startswith("no orphan arrays")]
    assert len(orphan) == 1 and r"runs/x\nrecord digest" in orphan[0] and r"ok\x1b[2K" in orphan[0]
    assert "FAIL" in orphan[0]
    rows = json.loads(run(archive_copy, "verify", "--format", "json").stdout)
    assert [r["status"] for r in rows if FORGED in str(r["object"])] == ["FAIL"]


def test_device_with_a_trailing_newline_is_refused(model_dir, data, tmp_path):
    """'cpu\\n' names no device (a `^...$` regex took it): refused in one line, nothing made."""
    archive = tmp_path / "arch"
    with pytest.raises(UsageError) as caught:
        mlarch.open(archive).ingest(str(model_dir["llama"]), ["en"], data["math"], data["control"], samples=2,
                                    top_k=[0.05], device="cpu\n")
    assert str(caught.value) == r"unknown device 'cpu\n': use auto, cpu, cuda, cuda:N (e.g. cuda:0) or mps"
    result = run(archive, "ingest", "--model", str(model_dir["llama"]), "--langs", "en", "--math", data["math"],
                 "--control", data["control"], "--device", "cpu\n")
    assert one_error(result, 2) == r"Error: unknown device 'cpu\n': use auto, cpu, cuda, cuda:N (e.g. cuda:0) or mps"
    assert not archive.exists()


def test_hub_id_with_a_trailing_newline_is_no_hub_id(data, tmp_path, monkeypatch):
    """'org/model\\n' is neither a local path nor a hub id: 'does not exist', before any download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run(tmp_path / "arch", "ingest", "--model", "org/model\n", "--name", "x", "--langs", "en",
                 "--math", data["math"], "--control", data["control"], "--device", "cpu")
    line = one_error(result, 1)
    assert line.startswith("Error: model path org/model") and "does not exist" in line
