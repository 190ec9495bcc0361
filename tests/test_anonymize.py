"""`export-bundle --anonymize` (issue 13): no host name and no absolute path survives in any
file of the bundle, the manifest says it was anonymized, the bundle imports and verifies
clean, and edits are still refused (anonymized or not)."""

import io
import json
import re
import socket
import tarfile
from pathlib import Path

import duckdb
import polars as pl
import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from mlarch.errors import MlarchError
from mlarch.store.anonymize import PLACEHOLDER, Scrubber, anonymous_path, config_digest_of

# /a/b... not inside a URL or a relative path, nor after a placeholder (<anonymized>/{lang}/en.jsonl)
ABSOLUTE = re.compile(r"(?<![\w.~:/\\<>-])(?:/[^\s/\"']+){2,}")


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def strings(value):
    """Every string in a JSON value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)


def folders(model_dir, data) -> list[str]:
    """Where the fixture archive's inputs lie: the folders of the model and the data, and the
    session's temporary folder above them (it names the user: /tmp/pytest-of-<user>/...)."""
    return [str(Path(model_dir["llama"]).parent), str(Path(data["math"]).parent.parent),
            str(Path(model_dir["llama"]).parents[1])]


def _table(manifest: dict, name: str) -> list[dict]:
    table = manifest["tables"][name]
    return [dict(zip(table["columns"], row)) for row in table["rows"]]


def host_named(text: str) -> bool:
    """Whether `text` names this machine (as a word: a short host name such as "vm" is in
    many words)."""
    return re.search(rf"(?<![A-Za-z0-9_-]){re.escape(socket.gethostname())}(?![A-Za-z0-9_-])", text) is not None


def test_anonymized_bundle_leaks_nothing_and_imports_clean(llama_archive, model_dir, data, tmp_path):
    plain, anonymized = tmp_path / "plain.tar", tmp_path / "anon.tar"
    assert run(llama_archive, "export-bundle", "--model", "tiny-llama", "-o", str(plain)).exit_code == 0
    result = run(llama_archive, "export-bundle", "--model", "tiny-llama", "--anonymize", "-o", str(anonymized))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(", anonymized")
    hidden = folders(model_dir, data)
    raw_plain, raw = plain.read_bytes(), anonymized.read_bytes()
    # the plain bundle holds them all (else this test could not fail) ...
    assert all(s.encode() in raw_plain for s in hidden)
    plain_strings = list(strings(json.loads(members(plain)["manifest.json"])))
    assert any(ABSOLUTE.search(s) for s in plain_strings) and any(host_named(s) for s in plain_strings)
    # ... and no byte of the anonymized one does: manifest, array files, tar headers
    assert [s for s in hidden if s.encode() in raw] == []
    files = members(anonymized)
    manifest = json.loads(files["manifest.json"])
    assert [s for s in strings(manifest) if ABSOLUTE.search(s) or s.startswith("/") or host_named(s)] == []
    for name, content in files.items():  # zarr.json and chunks too
        assert all(s.encode() not in content for s in hidden), name
        if name.endswith(".json"):
            assert not host_named(content.decode()), name
    with tarfile.open(anonymized) as tar:  # no owner names in the headers
        assert {(m.uname, m.gname) for m in tar.getmembers()} == {("", "")}
    record = manifest["anonymized"]
    assert record["placeholder"] == PLACEHOLDER and record["values_replaced"] > 0
    assert record["by"] == "export-bundle --anonymize" and "runs.config_digest" in record["rederived"]
    assert any("absolute paths" in kind for kind in record["replaced"]) and "hub ids of models and data sets" in record["kept"]
    # no digest that covered a path or host name survives: each could confirm a guessed one
    plain_manifest = json.loads(members(plain)["manifest.json"])
    covered = [row[column] for table, column in (("runs", "config_digest"), ("runs", "record_sha256"),
                                                  ("models", "record_sha256"), ("analyses", "config_digest"))
               for row in _table(plain_manifest, table)]
    assert len(covered) == 2 * len(manifest["run_ids"]) + 2 and all(len(d) == 64 for d in covered)
    assert [d for d in covered if d.encode() in raw] == []
    # the new configuration digests: one per configuration, derived from the bundle alone
    runs = _table(manifest, "runs")
    assert [r["config_digest"] for r in runs] == [config_digest_of(r) for r in runs]
    assert len({r["config_digest"] for r in runs}) == len(runs)
    assert all(json.loads(r["provenance"])["config_digest"] == r["config_digest"] for r in runs)

    target = tmp_path / "laptop"
    assert run(target, "import-bundle", str(anonymized)).exit_code == 0
    archive = mlarch.open(target)
    verified = archive.verify()
    assert set(verified["status"]) == {"ok"}, verified.filter(pl.col("status") == "FAIL").rows()
    assert "record digest" in set(verified["check"]) and "analysis record" not in set(verified["check"])
    run_id = archive.runs().filter(role="math", lang="en")["run_id"][0]
    provenance = archive.run(run_id)["provenance"]
    assert provenance["host"] == PLACEHOLDER and provenance["anonymized"]["by"] == "export-bundle --anonymize"
    assert provenance["model"]["source"] == f"{PLACEHOLDER}/tiny-llama"
    assert list(provenance["data"]["files"]) == [f"{PLACEHOLDER}/en.jsonl"]
    assert provenance["config"]["math"] == f"{PLACEHOLDER}/{{lang}}.jsonl"
    assert archive.runs()["dataset"].to_list().count(f"{PLACEHOLDER}/{{lang}}.jsonl") == 3
    assert archive.models()["source"].to_list() == [f"{PLACEHOLDER}/tiny-llama"]
    assert archive.sql("SELECT count(*) FROM runs WHERE host IS NOT NULL OR pid IS NOT NULL").item() == 0
    # the results are the source archive's
    query = "SELECT * FROM overlap_by_layer ORDER BY ALL"
    assert archive.sql(query).equals(mlarch.open(llama_archive).sql(query))
    with pytest.raises(MlarchError, match="anonymized bundle"):
        archive.recompute(run_id, "cpu")


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """`src` with its manifest edited (no digest recomputed: a careless edit)."""
    files = members(src)
    manifest = json.loads(files.pop("manifest.json"))
    edit(manifest)
    with tarfile.open(dst, "w") as out:
        for name, content in [("manifest.json", json.dumps(manifest).encode()), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            out.addfile(info, io.BytesIO(content))
    return dst


def _edit_provenance(change):
    def edit(manifest):
        runs = manifest["tables"]["runs"]
        at = runs["columns"].index("provenance")
        provenance = json.loads(runs["rows"][0][at])
        change(provenance)
        runs["rows"][0][at] = json.dumps(provenance)
    return edit


def test_edits_are_refused_anonymized_or_not(llama_archive, tmp_path):
    plain, anonymized = tmp_path / "plain.tar", tmp_path / "anon.tar"
    mlarch.open(llama_archive).export_bundle(plain, model="tiny-llama")
    mlarch.open(llama_archive).export_bundle(anonymized, model="tiny-llama", anonymize=True)
    fewer_tokens = _edit_provenance(lambda p: p.update(n_tokens=p["n_tokens"] - 1))
    cases = {
        "anonymized, then edited": _rewrite(anonymized, tmp_path / "a1.tar", fewer_tokens),
        "plain, edited": _rewrite(plain, tmp_path / "p1.tar", fewer_tokens),
        # anonymizing by hand is an edit too, marker or not: only export re-seals, from verified rows
        "plain, host dropped by hand": _rewrite(plain, tmp_path / "p2.tar", _edit_provenance(
            lambda p: p.update(host=PLACEHOLDER))),
        "plain, host dropped, marked anonymized": _rewrite(plain, tmp_path / "p3.tar", lambda m: (
            _edit_provenance(lambda p: p.update(host=PLACEHOLDER, anonymized={"by": "export-bundle --anonymize"}))(m),
            m.update(anonymized={"placeholder": PLACEHOLDER}))),
    }
    for case, bundle in cases.items():
        result = run(tmp_path / case.replace(" ", "-").replace(",", ""), "import-bundle", str(bundle))
        assert result.exit_code == 1, case
        assert "rows differ from its record digest: the bundle was altered" in result.stderr, case
    assert run(tmp_path / "honest", "import-bundle", str(anonymized)).exit_code == 0


def test_anonymize_refuses_records_that_do_not_verify(archive_copy, tmp_path):
    con = duckdb.connect(str(archive_copy / "catalog.duckdb"))
    run_id = con.execute("SELECT run_id FROM runs ORDER BY run_id LIMIT 1").fetchone()[0]
    con.execute("UPDATE runs SET provenance = json_merge_patch(provenance, '{\"seed\": 7}') WHERE run_id = ?", [run_id])
    con.close()
    out = tmp_path / "b.tar"
    result = run(archive_copy, "export-bundle", "--model", "tiny-llama", "--anonymize", "-o", str(out))
    assert result.exit_code == 1 and f"run {run_id}'s rows differ from its record digest" in result.stderr
    assert "nothing was exported" in result.stderr and not out.exists()
    assert not list(tmp_path.glob("b.tar*"))


def test_paths_and_hosts_are_scrubbed_everywhere():
    assert anonymous_path("/home/alice/data/{lang}/math.jsonl") == f"{PLACEHOLDER}/{{lang}}/math.jsonl"
    assert anonymous_path("/home/alice/flores/{lang}.txt") == f"{PLACEHOLDER}/{{lang}}.txt"
    assert anonymous_path("C:\\Users\\bob\\models\\llama") == f"{PLACEHOLDER}/llama"
    assert anonymous_path("~/models/llama/") == f"{PLACEHOLDER}/llama"
    assert anonymous_path("~alice/models/llama") == f"{PLACEHOLDER}/llama"
    scrub = Scrubber(["gpu-node-17", "x"])
    value = {
        "host": "gpu-node-17", "source": "/scratch/bob/llama", "hub": "Qwen/Qwen2.5-0.5B", "named": "gemma-3-270m",
        "relative": "data/{lang}.jsonl", "url": "https://huggingface.co/google/gemma-3-270m",
        "note": "read /scratch/bob/en.jsonl on gpu-node-17", "short": "x", "boxed": "xylophone",
        "files": {"/a/en/math.jsonl": "1", "/b/en/math.jsonl": "2"}, "list": ["/srv/data/x.csv", 3, None],
        "unc": "\\\\server\\share\\m.gguf",
        "tilde": "~alice/data/{lang}.jsonl", "said": "read ~alice/data/en.jsonl",
        "login_url": "https://alice:s3cret@data.example.org/x.jsonl",
        # public names a reader needs to reproduce: kept (--help says so)
        "hub_data": "hf:alice/mgsm:test:{lang}", "hub_file": "hf://datasets/alice/mgsm@0123abc/test/en.jsonl",
    }
    out = scrub.value(value)
    assert out == {
        "host": PLACEHOLDER, "source": f"{PLACEHOLDER}/llama", "hub": "Qwen/Qwen2.5-0.5B", "named": "gemma-3-270m",
        "relative": "data/{lang}.jsonl", "url": "https://huggingface.co/google/gemma-3-270m",
        "note": f"read {PLACEHOLDER}/en.jsonl on {PLACEHOLDER}", "short": PLACEHOLDER, "boxed": "xylophone",
        "files": {f"{PLACEHOLDER}/math.jsonl": "1", f"{PLACEHOLDER}/math.jsonl'": "2"},
        "list": [f"{PLACEHOLDER}/x.csv", 3, None], "unc": f"{PLACEHOLDER}/m.gguf",
        "tilde": f"{PLACEHOLDER}/{{lang}}.jsonl", "said": f"read {PLACEHOLDER}/en.jsonl",
        "login_url": f"https://{PLACEHOLDER}@data.example.org/x.jsonl",
        "hub_data": "hf:alice/mgsm:test:{lang}", "hub_file": "hf://datasets/alice/mgsm@0123abc/test/en.jsonl",
    }
    assert value["source"] == "/scratch/bob/llama"  # a copy: the caller's rows are not changed
