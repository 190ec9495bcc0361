"""Data files: JSONL, CSV and plain text, with clear errors naming file and line."""

import pytest

from mlarch.errors import MlarchError, UsageError
from mlarch.ingest.sources import QA_TEMPLATE, TemplateFileSource, parse_file, resolve


def test_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n\n{"text": "verbatim"}\n')
    texts, templates = parse_file(tmp_path / "a.jsonl")
    assert texts == ["Q: 1+1?\nA: 2", "verbatim"]
    assert QA_TEMPLATE in templates
    (tmp_path / "b.csv").write_text('question,answer\n"2+2?",4\n"3+3?",6\n')
    assert parse_file(tmp_path / "b.csv")[0] == ["Q: 2+2?\nA: 4", "Q: 3+3?\nA: 6"]
    (tmp_path / "c.txt").write_text("one line\n\nanother line\n")
    assert parse_file(tmp_path / "c.txt")[0] == ["one line", "another line"]


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl, line 2: invalid JSON"),
    ("fields.jsonl", '{"text": "ok"}\n{"question": "q"}\n', "fields.jsonl, line 2: expected"),
    ("empty.txt", "\n\n", "has no items"),
    ("header.csv", "a,b\n1,2\n", "header.csv, line 1: the CSV header"),
    ("row.csv", "question,answer\nq,\n", "row.csv, line 2"),
])
def test_malformed_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(MlarchError, match=message.replace("(", r"\(")):
        parse_file(tmp_path / name)


def test_template_errors(tmp_path):
    with pytest.raises(UsageError, match=r"neither a named source .* nor a path template"):
        resolve("data/en.jsonl")
    with pytest.raises(MlarchError, match=r"language 'de' does not exist"):
        TemplateFileSource(str(tmp_path / "{lang}.txt")).load("de")
