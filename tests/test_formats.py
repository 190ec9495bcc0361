"""--format: every format keeps one row per line (or quotes it) whatever the cells hold,
escapes what its reader treats specially, and reads back to the values; `mlarch sql -`
and `-p name=value` bind values as parameters, never as SQL text."""

import csv
import io
import json
import re
from datetime import date, datetime
from decimal import Decimal

import polars as pl
import pytest
from click.testing import CliRunner

from mlarch.cli import cli
from mlarch.formats import FORMATS, latex_escape, render

# cells that break naive writers: separators, line breaks, quotes, LaTeX's and markdown's
# specials, a backslash before a letter (\t read back as a tab), unicode line separators,
# terminal escape sequences (ESC, a C1 CSI, BEL)
HOSTILE = [
    "plain", "tab\there", "new\nline", "cr\rhere", "crlf\r\nhere", "back\\slash", "\\t literal", 'quo"te', "comma,sep",
    "pipe|cell", "& % $ # _ { } ~ ^ \\", "\\textbf{x}", "line\u2028sep", "日本語", "", "\n\n", "\t",
    "esc\x1b]0;title\x07\x1b[2K", "csi\x9b2J del\x7f",
]


def hostile_frame() -> pl.DataFrame:
    n = len(HOSTILE)
    return pl.DataFrame({
        "text & $name_1": HOSTILE,
        "n": [i * 1000 - 3 for i in range(n)],
        "x": [None, float("nan"), float("inf"), -1.5, *[i / 7 for i in range(n - 4)]],
        "flag": [i % 2 == 0 for i in range(n)],
        "items": [[i, i + 1] if i % 3 else None for i in range(n)],
    })


def unescape_tsv(field: str) -> str:
    """As PostgreSQL's COPY reads it (a run of \\xNN is the UTF-8 bytes of one or more characters)."""
    def one(m):
        if m.group(1):
            return bytes.fromhex(m.group(1).replace("\\x", "")).decode()
        return {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[m.group(2)]

    return re.sub(r"((?:\\x[0-9a-f]{2})+)|\\(.)", one, field)


def test_formats_listed():
    assert {"tsv", "jsonl", "latex"} <= set(FORMATS)


def test_tsv_one_line_per_row_and_reads_back():
    frame = hostile_frame()
    lines = render(frame, "tsv").split("\n")
    assert len(lines) == frame.height + 1  # a tab or newline inside a value broke no row
    rows = [line.split("\t") for line in lines]
    assert all(len(r) == frame.width for r in rows)
    assert [unescape_tsv(f) for f in rows[0]] == frame.columns
    assert [unescape_tsv(r[0]) for r in rows[1:]] == HOSTILE
    assert [int(r[1]) for r in rows[1:]] == frame["n"].to_list()
    assert [r[2] for r in rows[1:4]] == ["", "NaN", "inf"]  # NULL empty; NaN and inf as csv writes them
    assert float(rows[4][2]) == -1.5 and float(rows[6][2]) == 1 / 7  # full precision
    assert rows[1][3] == "true" and rows[2][3] == "false"
    assert rows[1][4] == "" and json.loads(rows[2][4]) == [1, 2]


def test_csv_reads_back_and_takes_nested_columns():
    frame = hostile_frame()
    rows = list(csv.reader(io.StringIO(render(frame, "csv"), newline="")))
    assert rows[0] == frame.columns and len(rows) == frame.height + 1
    assert [r[0] for r in rows[1:]] == HOSTILE
    assert json.loads(rows[2][4]) == [1, 2]  # polars alone refuses list columns in CSV


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_json_formats_read_back(fmt):
    frame = hostile_frame()
    text = render(frame, fmt)
    if fmt == "jsonl":
        lines = text.split("\n")
        assert len(lines) == frame.height and all(line.startswith("{") for line in lines)
        records = [json.loads(line) for line in lines]
    else:
        records = json.loads(text)
    assert [r["text & $name_1"] for r in records] == HOSTILE
    assert [r["x"] for r in records[:4]] == [None, None, None, -1.5]  # JSON has no NaN or Infinity
    assert records[1]["items"] == [1, 2] and records[0]["items"] is None
    assert records == json.loads(render(frame, "json"))  # the same value conversion


def test_json_values_are_plain():
    frame = pl.DataFrame({"d": [Decimal("3"), Decimal("2.5")], "t": [datetime(2024, 5, 1, 12), datetime(2024, 1, 1)],
                          "day": [date(2024, 5, 1), None], "l": [[Decimal("1")], []]},
                         schema={"d": pl.Object, "t": pl.Datetime, "day": pl.Date, "l": pl.Object})
    line = json.loads(render(frame, "jsonl").split("\n")[0])
    assert line == {"d": 3, "t": "2024-05-01T12:00:00", "day": "2024-05-01", "l": [1]}


LATEX_SPECIALS = set("&%$#_{}~^\\")


def latex_cells(line: str) -> list[str]:
    assert line.endswith(r" \\")
    return re.split(r"(?<!\\) & ", line[:-3])  # an escaped \& is no separator


def unescaped_specials(cell: str) -> set[str]:
    # remove every escape the writer uses; what is left must hold no special character
    cell = re.sub(r"\\text(backslash|asciitilde|asciicircum|less|greater|bar)\{\}", "", cell)
    cell = re.sub(r"\\[&%$#_{}]", "", cell)
    cell = cell.replace("$-$", "").replace(r"$\infty$", "").replace(r"$-\infty$", "")
    return set(cell) & LATEX_SPECIALS


def test_latex_is_booktabs_with_every_special_escaped():
    frame = hostile_frame()
    lines = render(frame, "latex").split("\n")
    assert lines[1] == r"\begin{tabular}{lrrll}"  # numbers right-aligned
    assert lines[2] == r"\toprule" and lines[4] == r"\midrule" and lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    header, body = lines[3], lines[5:-2]
    assert latex_cells(header) == [r"text \& \$name\_1", "n", "x", "flag", "items"]
    assert len(body) == frame.height  # no cell's newline started a row (or a paragraph)
    for line in [header, *body]:
        cells = latex_cells(line)
        assert len(cells) == frame.width, line
        for cell in cells:
            assert not unescaped_specials(cell), (line, cell)
            assert "\n" not in cell and "\r" not in cell
    assert latex_cells(body[1])[:3] == ["tab here", "997", ""]  # NaN: empty, as in table
    assert latex_cells(body[0])[1] == "$-$3"  # a minus sign, not a hyphen
    assert latex_cells(body[2])[2] == r"$\infty$"


@pytest.mark.parametrize("text,escaped", [
    ("50% & $5", r"50\% \& \$5"), ("a_b#c", r"a\_b\#c"), ("{x}", r"\{x\}"),
    ("~^", r"\textasciitilde{}\textasciicircum{}"), ("\\", r"\textbackslash{}"), ("\\&", r"\textbackslash{}\&"),
    ("a\n\nb", "a  b"), ("<|>", r"\textless{}\textbar{}\textgreater{}"),
])
def test_latex_escape_table(text, escaped):
    assert latex_escape(text) == escaped


def test_markdown_keeps_rows_on_one_line():
    frame = hostile_frame()
    lines = render(frame, "markdown").split("\n")
    assert len(lines) == frame.height + 2


# what a terminal acts on: C0 controls but the separators \t and \n, DEL, C1 (0x9b is CSI)
TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "csv"])  # csv has no escape: its values are exact
def test_no_format_sends_a_terminal_control_character(fmt):
    frame = hostile_frame().rename({"text & $name_1": "name\x1b]0;title\x07"})  # a header too
    text = render(frame, fmt)
    assert not TERMINAL_CONTROLS.search(text), repr(TERMINAL_CONTROLS.search(text))
    if fmt != "tsv":  # tsv's field separator; elsewhere a tab would shift the columns
        assert "\t" not in text


@pytest.mark.parametrize("fmt", ["table", "markdown", "latex"])
def test_human_formats_show_invisible_characters_as_escapes_and_keep_text(fmt):
    """Python's escapes for control, format and separator characters; accents, Bengali (its
    joiners too) and CJK as they are."""
    words = "café বাংলা র\u200d্যাব 日本語"
    frame = pl.DataFrame({"name\x1b[2K": ["gsm8k\x1b]0;pwned\x07", "a\u2028b\x9bc\u202ed", words]})
    text = render(frame, fmt)
    assert words in text
    for escape in [r"\x1b[2K", r"\x1b]0;pwned\x07", r"\u2028", r"\x9b", r"\u202e"]:
        assert escape in text.replace(r"\textbackslash{}", "\\")
    assert all(c.isprintable() or c in "\n\u200d" for c in text)


def test_table_keeps_one_line_per_row_whatever_the_cells_hold():
    frame = hostile_frame()
    lines = render(frame, "table").split("\n")
    assert len(lines) == frame.height + 2
    assert lines[2 + HOSTILE.index("new\nline")].startswith(r"new\nline ")
    assert lines[2 + HOSTILE.index("crlf\r\nhere")].startswith(r"crlf\r\nhere ")


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_results(fmt):
    frame = pl.DataFrame({"a b": [], "c": []}, schema={"a b": pl.Utf8, "c": pl.Int64})
    text = render(frame, fmt)
    expected = {"jsonl": "", "json": "[]", "tsv": "a b\tc", "csv": "a b,c"}
    if fmt in expected:
        assert text == expected[fmt]
    elif fmt == "latex":
        assert text.split("\n")[3:5] == [r"a b & c \\", r"\midrule"] and r"\bottomrule" in text


# --- through the CLI ---------------------------------------------------------------------

def run(archive, *args, input=None):
    return CliRunner().invoke(cli, ["--archive", str(archive), *args], input=input)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_through_sql(llama_archive, fmt):
    query = "SELECT run_id, lang, n_tokens, [seed, 2] AS l FROM runs ORDER BY run_id"
    result = run(llama_archive, "sql", query, "--format", fmt)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    if fmt == "jsonl":
        rows = [json.loads(line) for line in lines]
        assert len(rows) == 6 and rows[0]["l"] == [1, 2] and isinstance(rows[0]["n_tokens"], int)
    elif fmt == "tsv":
        assert len(lines) == 7 and lines[0] == "run_id\tlang\tn_tokens\tl"
        assert json.loads(lines[1].split("\t")[3]) == [1, 2]
    elif fmt == "latex":
        assert lines[1] == r"\begin{tabular}{llrl}" and lines[3] == r"run\_id & lang & n\_tokens & l \\"
        assert len(lines) == 5 + 6 + 2  # preamble and header, a line per run, the closing rules


def test_sql_from_stdin_with_parameters(llama_archive):
    query = "SELECT lang, role FROM runs WHERE lang = $lang AND seed = $seed ORDER BY role\n"
    result = run(llama_archive, "sql", "-", "-p", "lang=de", "-p", "seed:int=1", "--format", "jsonl", input=query)
    assert result.exit_code == 0, result.output
    assert [json.loads(x) for x in result.stdout.splitlines()] == [{"lang": "de", "role": "control"},
                                                                    {"lang": "de", "role": "math"}]
    hostile = "x'; DROP TABLE runs; --"  # a value is bound, never spliced into the SQL
    result = run(llama_archive, "sql", "SELECT $v AS v, length($v) AS n", "-p", f"v={hostile}", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"v": hostile, "n": len(hostile)}
    assert run(llama_archive, "sql", "SELECT count(*) AS n FROM runs", "--format", "csv").stdout == "n\n6\n"
    typed = run(llama_archive, "sql", "SELECT $n + 1 AS a, $k * 2 AS b", "-p", "n:int=41", "-p", "k:float=0.25",
                "--format", "jsonl")
    assert json.loads(typed.stdout) == {"a": 42, "b": 0.5}


@pytest.mark.parametrize("args,stdin,message", [
    (["SELECT $lang"], None, "no value for the SQL parameter(s) $lang"),
    (["SELECT 1", "-p", "x=1"], None, "does not use the parameter(s) 'x'"),
    (["SELECT $x", "-p", "x"], None, "cannot read the parameter 'x'"),
    (["SELECT $x", "-p", "1x=2"], None, "cannot read the parameter '1x=2'"),
    (["SELECT $x", "-p", "x:int=two"], None, "'two' is not a valid int"),
    (["SELECT $x", "-p", "x:date=1"], None, "unknown parameter type 'date'"),
    (["SELECT $x", "-p", "x=1", "-p", "x=2"], None, "given twice"),
    (["SELECT ?"], None, "positional parameter"),
    (["-"], "", "no SQL statement given"),
    (["-"], "SELECT $a, $b", "$a, $b"),
])
def test_bad_parameters_are_one_line_usage_errors(llama_archive, args, stdin, message):
    result = run(llama_archive, "sql", *args, input=stdin)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_render_is_library_code_a_notebook_imports_without_the_cli():
    """`mlarch.formats.render(frame, "latex")` is the API of --format: it needs no click."""
    import subprocess
    import sys

    code = ("import sys, polars, mlarch.formats as f; print(f.render(polars.DataFrame({'a': [1]}), 'latex')); "
            "assert 'click' not in sys.modules and 'mlarch.cli' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert r"\begin{tabular}{r}" in done.stdout
