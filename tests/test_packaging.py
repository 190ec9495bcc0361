"""What the package ships and promises beside its code: the license and citation files, and a
commit lock that needs no fcntl (Windows has none) yet still excludes and never follows a link."""

import ast
import hashlib
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import pytest

import mlarch
from mlarch.errors import MlarchError
from mlarch.store import layout

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, byte for byte (LF line ends)
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8").replace("\r\n", "\n")  # a CRLF checkout reads the same


# --- LICENSE and CITATION.cff ------------------------------------------------------

def test_license_file_is_the_apache_2_text_that_pyproject_declares():
    assert PROJECT["license"] == "Apache-2.0"
    assert "LICENSE" in PROJECT["license-files"]  # and so it ships in every wheel and sdist
    text = _text("LICENSE")
    assert " ".join(text.split()[:6]) == "Apache License Version 2.0, January 2004"
    assert hashlib.sha256(text.encode()).hexdigest() == APACHE_2_SHA256, "LICENSE is not the verbatim Apache-2.0 text"


def _cff_fields(text: str) -> dict[str, str]:
    """Top-level `key: value` lines of a YAML file (no YAML parser needed)."""
    fields = {}
    for line in text.splitlines():
        if line[:1].isalpha() and ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip().strip('"')
    return fields


def test_citation_file_names_this_version_the_license_and_the_paper():
    text = _text("CITATION.cff")
    fields = _cff_fields(text)
    for key in ("cff-version", "message", "title", "authors", "version", "license", "references"):
        assert key in fields, f"CITATION.cff lacks {key}"
    assert fields["cff-version"] == "1.2.0"
    assert fields["version"] == mlarch.__version__
    assert fields["license"] == PROJECT["license"]
    assert '- name: "The mlarch developers"' in text
    assert "arXiv:2606.18453" in text  # the paper whose analysis mlarch archives (docs/DESIGN)


def test_citation_file_parses_as_yaml_with_a_cited_paper():
    yaml = pytest.importorskip("yaml")  # transformers brings it; the line check above runs without it
    cff = yaml.safe_load(_text("CITATION.cff"))
    assert cff["version"] == mlarch.__version__ and cff["type"] == "software"
    assert cff["authors"] == [{"name": "The mlarch developers"}]
    (paper,) = cff["references"]
    assert paper["title"] == "LLM Parameters for Math Across Languages: Shared or Separate?"
    assert paper["year"] == 2026 and len(paper["authors"]) == 8
    assert all(a["family-names"] and a["given-names"] for a in paper["authors"])


# --- the commit lock without fcntl -------------------------------------------------

def _python(code: str, *args, timeout=120) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_opening_and_reading_an_archive_needs_no_fcntl(archive_copy):
    done = _python("""
        import sys
        from pathlib import Path
        sys.modules["fcntl"] = None  # as on Windows: importing it fails
        import mlarch
        from mlarch.errors import MlarchError
        from mlarch.store import layout
        archive = mlarch.open(sys.argv[1])
        print("runs", archive.runs().height)
        try:  # no flock and no LockFileEx at all: one clear line, not an ImportError or a hang
            with layout.commit_lock(Path(sys.argv[1])):
                print("locked without any lock")
        except MlarchError as exc:
            print("refused", exc)
    """, archive_copy)
    lines = done.stdout.splitlines()
    assert lines[0] == "runs 6"  # en, de, bn x math, control
    assert lines[1].startswith("refused cannot lock the commit lock") and len(lines) == 2, done.stdout


def test_a_commit_needs_only_filelock_not_fcntl(archive_copy):
    """filelock brings the platform's lock (LockFileEx on Windows, flock here); once it has,
    nothing mlarch imports may need fcntl, and a commit (gc) goes through."""
    done = _python("""
        import sys
        from pathlib import Path
        import filelock  # noqa: F401
        sys.modules["fcntl"] = None
        import mlarch
        from mlarch.store import layout, maintenance
        assert mlarch.open(sys.argv[1]).runs().height == 6
        print("gc", maintenance.gc(Path(sys.argv[1])))
        with layout.commit_lock(Path(sys.argv[1])):
            print("locked")
    """, archive_copy)
    assert done.stdout.splitlines()[-1] == "locked", done.stdout
    assert (archive_copy / layout.LOCK).is_file()


def test_no_module_of_mlarch_imports_fcntl():
    """Not even inside a function: the subprocess tests above only see the paths they run."""
    importers = []
    for path in sorted((ROOT / "mlarch").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "fcntl" for name in names):
                importers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not importers


# --- what the lock still does ----------------------------------------------------------

@pytest.mark.parametrize("target_exists", [False, True], ids=["dangling", "to-a-file"])
def test_commit_lock_refuses_a_link_planted_at_its_path(tmp_path, target_exists):
    outside = tmp_path / "outside"
    if target_exists:
        outside.write_bytes(b"keep me")
    root = tmp_path / "arch"
    root.mkdir()
    (root / layout.LOCK).symlink_to(outside)
    with pytest.raises(MlarchError, match="cannot open the commit lock .*symbolic link.*remove whatever is there") as err:
        with layout.commit_lock(root):
            pytest.fail("took the lock through a link")
    assert len(str(err.value).splitlines()) == 1
    assert outside.read_bytes() == b"keep me" if target_exists else not outside.exists()


def test_commit_lock_refuses_a_folder_at_its_path(tmp_path):
    (tmp_path / layout.LOCK).mkdir()
    with pytest.raises(MlarchError, match="cannot open the commit lock"):
        with layout.commit_lock(tmp_path):
            pytest.fail("took the lock on a folder")


HOLDER = """
    import sys, time
    from pathlib import Path
    from mlarch.store import layout
    root = Path(sys.argv[1])
    with layout.commit_lock(root):
        print("held", flush=True)
        time.sleep(1.0)
        (root / "holder-done").write_text("done")  # still inside the lock
"""


def test_a_second_process_waits_for_the_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        start = time.monotonic()
        with layout.commit_lock(tmp_path):
            waited = time.monotonic() - start
            assert (tmp_path / "holder-done").exists(), "took the lock while another process held it"
        assert waited > 0.3
    finally:
        holder.wait(timeout=60)
    assert holder.returncode == 0


def test_two_threads_take_turns(tmp_path):
    inside, overlaps = [], []

    def commit(n):
        with layout.commit_lock(tmp_path):
            inside.append(n)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            time.sleep(0.2)
            inside.remove(n)

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not overlaps
