"""The README's Python API example runs as written (issue 13: a tested, notebook-style example)."""

import re
from pathlib import Path

import pytest

from fixtures import LANGS, build_model, prose_items, write_data

README = Path(__file__).resolve().parent.parent / "README.md"


def api_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    build_model("llama", tmp_path)
    write_data(tmp_path)
    (tmp_path / "reading").mkdir()
    for lang in LANGS:  # a second control set: the prose in another order
        (tmp_path / "reading" / f"{lang}.txt").write_text("\n".join(reversed(prose_items(lang))) + "\n",
                                                          encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(api_example(), str(README), "exec"), scope)  # noqa: S102 - our own README

    # What the example claims, checked against the archive it made.
    archive = scope["archive"]
    assert set(scope["runs"]["lang"]) == {"en", "de", "bn"}
    assert scope["sizes"]["lang"].to_list() == ["bn", "de", "en"] and all(n > 0 for n in scope["sizes"]["n"])
    assert scope["pairs"].height == 1 and 0 < scope["pairs"]["jaccard"][0] < 1
    assert scope["scores"].shape == (64, 128) or scope["scores"].ndim == 2
    assert scope["mask"].dtype == bool and scope["mask"].any()
    assert archive.analyses()["analysis"].to_list() == ["math-vs-control", "math-vs-reading"]
    assert archive.sql("SELECT count(*) AS n FROM arrays WHERE kind = 'magnitudes'")["n"][0] == 1
    assert scope["moved"].height == 1 and 0 < scope["moved"]["jaccard"][0] <= 1
    effects = scope["effects"]
    assert effects.height == 1 and effects["intervention"][0] == "prune" and effects["relative_change"][0] != 0
    assert (tmp_path / "layers.svg").read_text().lstrip().startswith("<svg")
    assert any("would remove" in line or "run" in line for line in scope["plan"])
    assert "math-vs-reading" in capsys.readouterr().out
    assert archive.runs("tiny-llama").height == 10  # the dry run removed nothing


@pytest.mark.parametrize("typo", ["lang", "modle"])
def test_a_misspelt_chart_option_names_the_accepted_ones(llama_archive, typo):
    import mlarch
    from mlarch.errors import UsageError

    with pytest.raises(TypeError) as caught:
        mlarch.open(llama_archive).chart("layers", model="llama", **{typo: ["en"]})
    assert isinstance(caught.value, UsageError) and "it takes model, langs" in str(caught.value)
