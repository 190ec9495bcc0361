"""Named data sources against ../shared/data, the shipped starter set, and `mlarch sources`."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli
from mlarch.errors import MlarchError
from mlarch.ingest import corpora
from mlarch.ingest.sources import resolve

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference data not found at {SHARED} (../shared/data)")

EXPECTED = {
    "mgsm": ({"en", "bn", "de", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"}, {"*": 250}),
    "gsm8k": ({"en", "de", "hi"}, {"en": 8792, "de": 1319, "hi": 1319}),
    "flores": ({"en", "de", "fr", "hi", "bn", "es", "ja", "ru", "sw", "te", "th", "zh"}, {"*": 281}),
}


@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_source_loads_every_language(name):
    source = resolve(name, SHARED)
    langs, counts = EXPECTED[name]
    assert set(source.languages()) == langs
    for lang in sorted(langs):
        items = source.load(lang, "math")
        assert len(items.texts) == counts.get(lang, counts.get("*")), (name, lang)
        assert all(text.strip() for text in items.texts)
        for local, digest in items.files.items():
            assert len(digest) == 64 and (SHARED / local).is_file()


@needs_shared
def test_templates_and_passages():
    gsm = resolve("gsm8k", SHARED).load("de", "math").texts[0]
    assert gsm.startswith("Q: Janets Enten") and "\nA: " in gsm and "<<" not in gsm and gsm.endswith("#### 18")
    assert resolve("mgsm", SHARED).load("en", "math").texts[0].endswith("\nA: 18")
    passage = resolve("flores", SHARED).load("en", "control").texts[0]
    assert passage.count(". ") >= 2  # consecutive sentences of one article


@needs_shared
def test_digest_mismatch_names_file_and_digests(tmp_path):
    shutil.copytree(SHARED / "mgsm", tmp_path / "mgsm")
    with open(tmp_path / "mgsm" / "mgsm_de.tsv", "a", encoding="utf-8") as handle:
        handle.write("tampered\t1\n")
    with pytest.raises(MlarchError) as info:
        resolve("mgsm", tmp_path).load("de", "math")
    message = str(info.value)
    assert "mgsm/mgsm_de.tsv" in message and corpora.MGSM_SHA["de"] in message and "has sha256" in message


def test_missing_language_lists_the_source_languages():
    with pytest.raises(MlarchError, match=r"data source 'gsm8k' has no language 'fr'; it has: en, de, hi"):
        resolve("gsm8k", None).load("fr", "math")


def test_missing_file_in_data_dir(tmp_path):
    with pytest.raises(MlarchError, match=r"mgsm/mgsm_en.tsv.* is missing from data_dir="):
        resolve("mgsm", tmp_path).load("en", "math")


def test_starter_set_is_parallel_in_six_languages():
    source = resolve("starter")
    answers = {}
    for lang in corpora.STARTER_LANGS:
        math, control = source.load(lang, "math"), source.load(lang, "control")
        assert len(math.texts) == len(control.texts) == 24
        assert all(t.startswith("Q: ") and "\nA: " in t for t in math.texts)
        answers[lang] = [t.rsplit("####", 1)[1].strip() for t in math.texts]
    assert all(values == answers["en"] for values in answers.values())


def test_sources_command_lists_licences():
    result = CliRunner().invoke(cli, ["sources", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"mgsm", "gsm8k", "flores", "starter"}
    assert rows["mgsm"]["licence"] == "CC-BY-4.0" and rows["flores"]["licence"] == "CC-BY-SA-4.0"
    assert rows["flores"]["items"] == "281 each" and "en 8792" in rows["gsm8k"]["items"]
    assert "452a21ad3dae" in rows["mgsm"]["upstream"]


@needs_shared
def test_ingest_gsm8k_vs_flores_on_a_tiny_model(model_dir, tmp_path):
    root = tmp_path / "arch"
    result = CliRunner().invoke(cli, [
        "--archive", str(root), "ingest", "--model", str(model_dir["qwen2"]), "--langs", "en,de,hi",
        "--math", "gsm8k", "--control", "flores", "--data-dir", str(SHARED), "--samples", "4",
        "--max-length", "64", "--quiet"])
    assert result.exit_code == 0, result.output
    archive = mlarch.open(root)
    runs = archive.sql("SELECT lang, role, dataset, n_truncated FROM runs ORDER BY lang, role")
    assert runs["dataset"].to_list() == ["flores", "gsm8k"] * 3
    prov = archive.run(archive.sql("SELECT run_id FROM runs WHERE lang = 'hi' AND role = 'math'").item())["provenance"]
    assert prov["data"]["source"]["licence"].startswith("MIT")
    assert prov["data"]["files"] == {"gsm8k_hi/gsm8k_hi_test.csv": corpora.gsm8k(None).files["hi"][0].sha256}
    assert archive.sql("SELECT count(*) FROM overlap_global").item() == 3 * 7
