"""The README's Python API examples run as written (issue 13: tested, notebook-style examples):
the first under "## Python API", then the second, under "### Everything the CLI does, from
Python", in the same folder (it opens the archive the first made), its printed output checked
against the output the README shows below it."""

import ast
import contextlib
import io
import re
from pathlib import Path

import polars as pl
import pytest

from fixtures import LANGS, build_model, prose_items, write_data

README = Path(__file__).resolve().parent.parent / "README.md"
FIRST = "## Python API\n"
SECOND = "### Everything the CLI does, from Python\n"
SIZES_COLUMNS = ["lang", "n_selected", "n_params", "percent"]


def _section(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    end = re.search(r"\n#{2,3} ", section[len(heading):])  # up to the next heading of level 2 or 3
    return section if end is None else section[: len(heading) + end.start()]


def api_example(heading: str = FIRST) -> str:
    return re.search(r"```python\n(.*?)```", _section(heading), re.S).group(1)


def shown_output(heading: str) -> str:
    """The indented block after the example's "prints" line, dedented."""
    found = re.search(r"```python\n.*?```\s*\nprints\n\n((?: {4}.*\n|\n)+)", _section(heading), re.S)
    assert found, f"no 'prints' block after the Python example under {heading.strip()!r}"
    return "\n".join(line[4:] for line in found.group(1).rstrip("\n").splitlines()) + "\n"


def printed_items(output: str) -> list:
    """Each polars table as {"shape", "columns", "dtypes", "rows"}; every other line as text."""
    items, lines = [], output.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("shape: ("):
            end = next(j for j in range(i, len(lines)) if lines[j].startswith("└"))
            cells = [[c.strip() for c in line.strip().strip("│").split("┆")]
                     for line in lines[i + 1:end] if line.startswith("│")]
            assert cells[1] == ["---"] * len(cells[0]), lines[i:end + 1]
            items.append({"shape": lines[i], "columns": cells[0], "dtypes": cells[2], "rows": cells[3:]})
            i = end + 1
        else:
            if lines[i].strip():
                items.append(lines[i])
            i += 1
    return items


def _cell(value: str) -> str:
    """What may differ between machines: absolute paths (the test's folder) and digests."""
    if value.startswith("/"):
        return "<path>"
    return "<digest>" if re.fullmatch(r"[0-9a-f]{12,}…?", value) else value


def assert_matches(shown, printed) -> None:
    if isinstance(shown, dict):
        assert isinstance(printed, dict), printed
        assert (printed["shape"], printed["columns"], printed["dtypes"]) == (shown["shape"], shown["columns"],
                                                                            shown["dtypes"])
        if shown["columns"] == SIZES_COLUMNS:  # scored numbers: checked against the archive below
            assert sorted(r[0] for r in printed["rows"]) == sorted(r[0] for r in shown["rows"])
            assert [r[2] for r in printed["rows"]] == [r[2] for r in shown["rows"]]  # n_params
        else:
            assert [[_cell(c) for c in r] for r in printed["rows"]] == [[_cell(c) for c in r] for r in shown["rows"]]
    elif shown.startswith("{"):
        want, got = ast.literal_eval(shown), ast.literal_eval(printed)
        assert list(got) == list(want), printed
        for key in want:
            if key == "bytes":
                assert isinstance(got[key], int) and got[key] > 0
            elif key == "imported":  # fresh run ids: as many, of the same form
                assert len(got[key]) == len(want[key]) and all(re.fullmatch(r"[0-9a-f]{12}", r) for r in got[key])
            else:
                assert got[key] == want[key], (key, printed)
    else:
        assert printed == shown


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    """The folder the README describes, after its first example ran there: (folder, its
    variables, what it printed)."""
    folder = tmp_path_factory.mktemp("readme")
    build_model("llama", folder)
    write_data(folder)
    (folder / "reading").mkdir()
    for lang in LANGS:  # a second control set: the prose in another order
        (folder / "reading" / f"{lang}.txt").write_text("\n".join(reversed(prose_items(lang))) + "\n",
                                                         encoding="utf-8")
    scope: dict = {}
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(folder)
        exec(compile(api_example(FIRST), str(README), "exec"), scope)  # noqa: S102 - our own README
    return folder, scope, out.getvalue()


def test_the_readme_api_example_runs(readme_folder, monkeypatch):
    folder, scope, out = readme_folder
    monkeypatch.chdir(folder)  # the example's paths are relative

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
    assert (folder / "layers.svg").read_text().lstrip().startswith("<svg")
    assert any("would remove" in line or "run" in line for line in scope["plan"])
    assert "math-vs-reading" in out
    assert archive.runs("tiny-llama").height == 10  # the dry run removed nothing


def test_the_readme_cli_from_python_example_prints_what_the_readme_shows(readme_folder, monkeypatch, capsys):
    folder, _, _ = readme_folder
    monkeypatch.chdir(folder)
    capsys.readouterr()
    scope: dict = {}
    with pl.Config(restore_defaults=True):  # the README shows polars' default layout
        exec(compile(api_example(SECOND), str(README), "exec"), scope)  # noqa: S102 - our own README
    printed, shown = printed_items(capsys.readouterr().out), printed_items(shown_output(SECOND))
    # one item per print() of the example (a table, or a line), in the README and here
    assert len(shown) == len(re.findall(r"^print\(", api_example(SECOND), re.M)), shown
    assert [type(item) for item in printed] == [type(item) for item in shown], printed
    for want, got in zip(shown, printed):
        assert_matches(want, got)

    # What it printed is what the archives hold.
    archive, laptop = scope["archive"], scope["laptop"]
    tables = [item for item in printed if isinstance(item, dict)]
    assert {row[-1] for row in tables[0]["rows"]} == {"true"}  # every verify check ok
    sizes = archive.sql("SELECT lang, sum(n_selected) AS n, sum(n_params) AS p FROM set_sizes WHERE model = $m "
                        "AND analysis = $a AND k = $k GROUP BY lang",
                        {"m": "tiny-llama", "a": "math-vs-control", "k": 0.05})
    expected = {lang: [str(n), str(p), f"{round(100 * n / p, 3)}"] for lang, n, p in sizes.iter_rows()}
    size_rows = next(t["rows"] for t in tables if t["columns"] == SIZES_COLUMNS)
    assert {row[0]: row[1:] for row in size_rows} == expected
    assert [int(row[1]) for row in size_rows] == sorted((int(row[1]) for row in size_rows), reverse=True)
    runs = archive.runs("tiny-llama")
    assert scope["info"]["runs"] == runs.height and scope["info"]["bytes"] == (folder / "tiny.tar").stat().st_size
    imported = ast.literal_eval(next(item for item in printed if isinstance(item, str) and "'imported'" in item))
    assert set(imported["imported"]) == set(runs["run_id"]) == set(laptop.runs("tiny-llama")["run_id"])
    assert set(laptop.verify()["status"]) == {"ok"}
    assert f"{len(list((folder / 'exported').glob('*.parquet')))} Parquet files" in printed
    assert (folder / "report" / "index.html").read_text(encoding="utf-8").lstrip().lower().startswith("<!doctype html")


@pytest.mark.parametrize("typo", ["lang", "modle"])
def test_a_misspelt_chart_option_names_the_accepted_ones(llama_archive, typo):
    import mlarch
    from mlarch.errors import UsageError

    with pytest.raises(TypeError) as caught:
        mlarch.open(llama_archive).chart("layers", model="llama", **{typo: ["en"]})
    assert isinstance(caught.value, UsageError) and "it takes model, langs" in str(caught.value)
