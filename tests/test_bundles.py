"""Portable bundles (export, import, tamper detection) and Parquet export."""

import hashlib
import io
import json
import tarfile

import polars as pl
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli


def run(archive, *args):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args])


def tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_bundle_round_trip_into_empty_and_existing_archive(llama_archive, tmp_path):
    source = mlarch.open(llama_archive)
    bundle = tmp_path / "llama.tar"
    result = run(llama_archive, "export-bundle", "--model", "tiny-llama", "-o", str(bundle))
    assert result.exit_code == 0, result.output
    target = tmp_path / "laptop"
    assert run(target, "import-bundle", str(bundle)).stdout.startswith("Imported 6 run(s), skipped 0")
    copy = mlarch.open(target)
    for query in ("SELECT * FROM overlap_by_layer ORDER BY ALL", "SELECT * FROM set_sizes ORDER BY ALL",
                  "SELECT * FROM language_unique ORDER BY ALL",
                  "SELECT run_id, provenance FROM runs ORDER BY run_id"):
        assert copy.sql(query).equals(source.sql(query)), query
    run_id = source.sql("SELECT run_id FROM runs LIMIT 1").item()
    assert (copy.scores(run_id, "lm_head") == source.scores(run_id, "lm_head")).all()
    assert run(target, "import-bundle", str(bundle)).stdout.startswith("Imported 0 run(s), skipped 6")
    assert run(target, "verify").exit_code == 0


def test_partial_bundle_extends_comparisons(llama_archive, tmp_path):
    source = mlarch.open(llama_archive)
    ids = source.sql("SELECT run_id FROM runs WHERE lang IN ('en', 'de')")["run_id"].to_list()
    bundle = tmp_path / "two.tar"
    assert run(llama_archive, "export-bundle", *ids, "-o", str(bundle)).exit_code == 0
    target = tmp_path / "t"
    assert run(target, "import-bundle", str(bundle)).exit_code == 0
    assert mlarch.open(target).sql("SELECT DISTINCT lang FROM set_sizes ORDER BY lang")["lang"].to_list() == ["de", "en"]
    expected = source.sql("SELECT * FROM overlap_global WHERE lang_a = 'de' AND lang_b = 'en' ORDER BY ALL")
    assert mlarch.open(target).sql("SELECT * FROM overlap_global ORDER BY ALL").equals(expected)


def test_tampered_bundle_is_refused_and_archive_unchanged(llama_archive, tmp_path):
    bundle = tmp_path / "b.tar"
    assert run(llama_archive, "export-bundle", "--model", "tiny-llama", "-o", str(bundle)).exit_code == 0
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(bundle) as src, tarfile.open(tampered, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if member.name == "manifest.json":
                manifest = json.loads(data)
                rows = manifest["tables"]["arrays"]["rows"]
                rows[0][manifest["tables"]["arrays"]["columns"].index("sha256")] = "0" * 64
                data = json.dumps(manifest).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    target = tmp_path / "t"
    assert run(target, "import-bundle", str(bundle)).exit_code == 0  # a first, honest import
    before = tree_digest(target)
    result = run(tmp_path / "fresh", "import-bundle", str(tampered))
    assert result.exit_code == 1
    assert "the bundle was altered; refusing all of it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = run(target, "import-bundle", str(tampered))
    assert result.exit_code == 1 and tree_digest(target) == before
    assert run(target, "import-bundle", str(tmp_path / "missing.tar")).exit_code == 1


def test_parquet_export(llama_archive, tmp_path):
    result = run(llama_archive, "export", str(tmp_path / "pq"))
    assert result.exit_code == 0, result.output
    overlap = pl.read_parquet(tmp_path / "pq" / "overlap_global.parquet").sort(["k", "lang_a", "lang_b"])
    expected = mlarch.open(llama_archive).sql("SELECT * FROM overlap_global ORDER BY k, lang_a, lang_b")
    assert overlap.equals(expected)
    every = mlarch.open(llama_archive).sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'")
    assert {p.stem for p in (tmp_path / "pq").iterdir()} == set(every["table_name"])  # every table and view
    assert {"set_totals", "layer_depth", "language_unique_share", "evaluations_current"} <= set(every["table_name"])


def test_a_bundles_magnitudes_are_shared_with_an_archive_of_the_other_digest_scheme(model_dir, data, tmp_path):
    """|W| is stored once per weights whatever digest scheme each side recorded it with: a
    bundle written since schema 7 (chunked digests) into an archive from before (whole-array
    digests), whether the bundle's model reuses the archive's |W| group or names its own."""
    from old_archives import downgrade_to_schema_6
    from mlarch.store import catalog

    model, options = str(model_dir["llama"]), dict(samples=3, top_k=[0.05], device="cpu")
    source = mlarch.open(tmp_path / "source")
    source.ingest(model, ["en"], data["math"], data["control"], **options)
    source.ingest(model, ["de"], data["math"], data["control"], name="llama-two", **options)  # shares tiny-llama's |W|
    for name in ("llama-two", "tiny-llama"):
        assert run(source.root, "export-bundle", "--model", name, "-o", str(tmp_path / f"{name}.tar")).exit_code == 0
    for target, name, bundle in (("same-group", "tiny-llama", "llama-two"), ("other-name", "llama-here", "tiny-llama")):
        root = tmp_path / target
        mlarch.open(root).ingest(model, ["en"], data["math"], data["control"], name=name, **options)
        downgrade_to_schema_6(root)
        catalog._CHECKED.clear()
        result = run(root, "import-bundle", str(tmp_path / f"{bundle}.tar"))
        assert result.exit_code == 0, (target, result.output)
        archive = mlarch.open(root)
        assert archive.sql("SELECT sha256_scheme FROM arrays WHERE kind = 'magnitudes'").rows() == [(None,)], target
        assert archive.sql("SELECT count(DISTINCT magnitudes_group) FROM models").item() == 1, target
        assert archive.sql("SELECT count(*) FROM arrays WHERE kind = 'levels' AND sha256_scheme = 'chunks'").item() == 2
        assert run(root, "verify").exit_code == 0, target


def test_a_run_named_twice_is_exported_once(llama_archive, tmp_path):
    """export-bundle A B A: the manifest lists A, B once each, in the order given, and the
    summary counts two runs."""
    first, second = mlarch.open(llama_archive).sql("SELECT run_id FROM runs ORDER BY run_id DESC LIMIT 2")["run_id"]
    bundle = tmp_path / "twice.tar"
    result = run(llama_archive, "export-bundle", first, second, first, "-o", str(bundle))
    assert result.exit_code == 0, result.output
    assert "2 run(s)" in result.stdout, result.stdout
    with tarfile.open(bundle) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert manifest["run_ids"] == [first, second]
    assert run(tmp_path / "copy", "import-bundle", str(bundle)).stdout.startswith("Imported 2 run(s)")
