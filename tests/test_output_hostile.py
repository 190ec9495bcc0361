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


# --- values Python cannot hold, types CSV cannot hold, bytes that are not UTF-8 ------------------

QUERY = ("SELECT 'infinity'::TIMESTAMP AS t, '-infinity'::DATE AS d, TIMESTAMP '2020-01-02 03:04:05' AS ok, "
         "'294247-01-01'::TIMESTAMP AS far, NULL::DATE AS none, '\\x00a'::BLOB AS b")


@pytest.mark.parametrize("fmt", ["table", "csv", "tsv", "json", "jsonl", "markdown", "latex"])
def test_sql_prints_infinite_dates_and_blobs_in_every_format(llama_archive, fmt):
    """DuckDB's infinity timestamps (and years past 9999) made polars panic while converting
    to Python (a Rust panic, not an Exception: ~190 lines of traceback); csv refused BLOBs."""
    import polars as pl

    frame = mlarch.open(llama_archive).sql(QUERY)
    assert frame["t"].to_physical().item() == 2**63 - 1 and frame.schema["b"] == pl.Binary  # the case is real
    result = run(llama_archive, "sql", QUERY, "--format", fmt)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "panicked" not in result.output
    for shown in ("infinity", "-infinity", "2020-01-02", "9223371244800000000 us from 1970-01-01"):
        assert shown in result.stdout, (shown, result.stdout)


def test_sql_from_stdin_that_is_not_utf8_is_one_line(llama_archive):
    result = CliRunner().invoke(cli, ["--archive", str(llama_archive), "sql", "-"], input=b"SELECT '\xff'")
    assert one_error(result, 2) == "Error: the SQL on standard input is not UTF-8 (byte 8: b'\\xff'): give the query in UTF-8"
    result = CliRunner().invoke(cli, ["--archive", str(llama_archive), "sql", "-"], input="SELECT 'é' AS x".encode())
    assert result.exit_code == 0 and "é" in result.stdout, result.output


def test_a_panic_inside_a_library_is_one_line(llama_archive, monkeypatch):
    """pyo3's PanicException derives from BaseException: the catch-all of Exception missed it."""
    from mlarch.cli import output

    class PanicException(BaseException):
        pass

    def panic(frame, fmt):
        raise PanicException("`NaiveDateTime + TimeDelta` overflowed")

    monkeypatch.setattr(output, "render", panic)
    result = run(llama_archive, "sql", "SELECT 1 AS x")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.splitlines() == ["Error: unexpected PanicException: `NaiveDateTime + TimeDelta` overflowed "
                                          "(MLARCH_DEBUG=1 shows the traceback)"]


@pytest.mark.parametrize("args, message", [
    (["--recompute", ""], "Error: --recompute is empty: pass the run id to score again (see `mlarch runs`)"),
    (["--recompute", "aaa", "bbb"], "Error: --recompute checks one run and RUN_IDS name runs to verify ('bbb'): "
                                    "pass one of them"),
])
def test_verify_recompute_refuses_an_empty_id_and_extra_ids(llama_archive, args, message):
    """`--recompute ''` ran a plain verify and exited 0; ids given with --recompute were dropped."""
    assert one_error(run(llama_archive, "verify", *args), 2) == message


def test_a_download_prints_no_line_of_pooch(tmp_path, monkeypatch):
    """pooch logs "Downloading data from ..." at INFO to stderr: under --quiet, and before a
    failed download's Error line, that made two lines. fetch silences it."""
    import logging

    import pooch

    from mlarch.errors import MlarchError
    from mlarch.ingest import corpora

    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    pooch.get_logger().setLevel(logging.INFO)  # pooch's own default
    said = []

    def retrieve(**kwargs):  # as pooch does, without a network
        logger = pooch.get_logger()
        if logger.isEnabledFor(logging.INFO):
            said.append(f"Downloading data from '{kwargs['url']}'")
        raise ConnectionError("offline")

    monkeypatch.setattr(pooch, "retrieve", retrieve)
    with pytest.raises(MlarchError, match="could not download"):
        corpora.fetch(corpora.FLORES_METADATA, None)
    assert said == []


@pytest.mark.parametrize("value", ["", " ", "\t"])
def test_an_empty_archive_option_is_refused(tmp_path, monkeypatch, value):
    """`--archive ''` silently meant ./mlarch-archive (an ingest would have filled it)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--archive", value, "runs"])
    assert one_error(result, 2) == (f"Error: --archive {value!r} names no folder: pass an archive folder, or leave "
                                    "--archive out for $MLARCH_ARCHIVE (else ./mlarch-archive)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["file", "under a file", "loop"])
def test_an_unusable_cache_variable_is_named(tmp_path, monkeypatch, kind, model_dir):
    """$MLARCH_CACHE pointing at a file was blamed on the network ("check the network") or on
    --archive; the error names the variable, before any download or work."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cache = {"file": tmp_path / "afile", "under a file": tmp_path / "afile" / "cache", "loop": tmp_path / "loop"}[kind]
    monkeypatch.setenv("MLARCH_CACHE", str(cache))
    result = CliRunner().invoke(cli, ["--archive", str(tmp_path / "arch"), "ingest", "--model", str(model_dir["llama"]),
                                      "--langs", "en", "--math", "mgsm", "--control", "starter", "--samples", "2",
                                      "-q", "--device", "cpu"])
    line = one_error(result, 1)
    assert line.startswith(f"Error: $MLARCH_CACHE ({cache}) cannot be a folder: ") and \
        line.endswith("; set MLARCH_CACHE to a folder mlarch may write"), line
    assert not (tmp_path / "arch").exists()


@pytest.mark.parametrize("args, expected", [
    (["nosuch"], "Error: No such command 'nosuch': see `mlarch --help`"),
    (["show", "a", "b"], "Error: Got unexpected extra argument (b): see `mlarch show --help`"),
])
def test_clicks_own_errors_name_a_fix(args, expected):
    """Click's messages ("No such command 'x'.") had no `: <fix>` part; bare `mlarch` printed
    its whole help flattened into one `Error:` line."""
    assert one_error(CliRunner().invoke(cli, args, prog_name="mlarch"), 2) == expected


def test_bare_mlarch_prints_its_help():
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: ") and "Commands:" in result.stderr and "Error:" not in result.stderr
    assert len(result.stderr.splitlines()) > 10  # the help as it is, not flattened
