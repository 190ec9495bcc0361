"""Data files: the record formats mlarch reads (JSONL, CSV with a header, plain text), how a
record becomes a text, and the source made of files named by a path template.

Text template for records: a ``text`` field is used verbatim; otherwise ``question`` and
``answer`` are formatted with ``QA_TEMPLATE`` (GSM8K style, question + worked solution).

The ``paper`` text template (``--template paper``) builds texts as the MathNeuro authors' code
does: a ``qa`` column verbatim where the file has one, else ``INSTRUCT_TEMPLATE`` over the
``question`` and ``solution`` columns, values unstripped.

A neutral module: the named corpora (corpora.py), hub data sets (hub_data.py) and the source
resolver (sources.py) all build on it, and it imports none of them.
"""

from __future__ import annotations

import csv
import decimal
import hashlib
import io
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mlarch.errors import MlarchError, UsageError
from mlarch.wording import Arg, error

QA_TEMPLATE = "Q: {question}\nA: {answer}"
TEXT_TEMPLATE = "{text}"
# the MathNeuro authors' texts (MathNeuroFast.py, compute_score_mask)
INSTRUCT_TEMPLATE = "Instruct: {question} Let's write a Python program.\nOutput:\n{solution}"
QA_COLUMN_TEMPLATE = "{qa}"
TEXT_TEMPLATES = ("default", "paper")
PAPER_TEMPLATE = Arg("template", "paper")  # `--template paper` / `template='paper'` in messages


def unknown_template(template) -> UsageError:
    """The error for a template not in TEXT_TEMPLATES."""
    return error(UsageError, Arg("template", shown=repr(template)),
                 f" is not known: use one of {', '.join(TEXT_TEMPLATES)}")


@dataclass
class LoadedItems:
    """A language's items, formatted, with what is needed to reproduce them."""

    texts: list[str]
    templates: list[str]  # the templates used (one, unless a file mixes record shapes)
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256
    # (question, answer) of every item, where every item has both (accuracy needs them:
    # the question for the prompt, the answer for the reference number); else None
    pairs: list[tuple[str, str]] | None = None
    # index of the first item of the source's training split (GSM8K en: test, then train),
    # where n-shot exemplars come from; None: the source has no training split
    train_from: int | None = None


class DataSource(Protocol):
    """Where a language's math or control texts come from: a named source or a path template."""
    name: str  # recorded as the run's `dataset`

    def load(self, lang: str, role: str) -> LoadedItems:
        """The items of `lang` for `role` (math or control), in file order."""

    def describe(self) -> dict:
        """The source as its runs' provenance records it."""


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _field(record: dict, name: str, where: str) -> str | None:
    """A question or answer field as text: a string as is, a JSON number written out in full
    (str(1e21) is '1e+21', whose last number is 21), None when absent or null; a list, an
    object, a boolean or a non-finite number is refused."""
    value = record.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        pass  # refused below: a JSON true is not the number 1
    elif isinstance(value, numbers.Integral):
        return str(int(value))
    elif isinstance(value, numbers.Real) and math.isfinite(value):
        return format(decimal.Decimal(repr(float(value))), "f")
    raise MlarchError(f"{where}: the {name!r} field is a {type(value).__name__}, not text or a number; "
                      "fix the record or remove it")


def _record_text(record: dict, where: str) -> tuple[str, str]:
    text = record.get("text")
    if isinstance(text, str) and text.strip():
        return text, TEXT_TEMPLATE
    question, answer = _field(record, "question", where), _field(record, "answer", where)
    if question not in (None, "") and answer not in (None, ""):
        return QA_TEMPLATE.format(question=question.strip(), answer=answer.strip()), QA_TEMPLATE
    raise MlarchError(
        f"{where}: expected a non-empty 'text' field or 'question' and 'answer' fields; "
        "fix the record or remove it"
    )


def instruct_text(question: str, solution: str) -> str:
    """The authors' prompt for a question/solution pair, verbatim (no stripping)."""
    return INSTRUCT_TEMPLATE.format(question=question, solution=solution)


def _paper_text(record: dict, has_qa: bool, where: str) -> tuple[str, str]:
    """The authors' choice, made per file as theirs is per data frame: the `qa` column verbatim
    if the file has one, else the Instruct prompt of `question` and `solution`."""
    if has_qa:
        qa = record.get("qa")
        if isinstance(qa, str) and qa != "":
            return qa, QA_COLUMN_TEMPLATE
        raise MlarchError(f"{where}: the file has a 'qa' column but this record's is empty; fix or remove it")
    question, solution = record.get("question"), record.get("solution")
    if isinstance(question, str) and question != "" and isinstance(solution, str) and solution != "":
        return instruct_text(question, solution), INSTRUCT_TEMPLATE
    raise error(
        MlarchError, f"{where}: ", PAPER_TEMPLATE, " needs a 'qa' field, or 'question' and 'solution' fields "
        "(the authors' columns); fix the record or use the default template"
    )


def _pair(record: dict, where: str) -> tuple[str, str] | None:
    question, answer = _field(record, "question", where), _field(record, "answer", where)
    if question in (None, "") or answer in (None, ""):
        return None
    return question.strip(), answer.strip()


def parse_file(path: Path) -> tuple[list[str], list[str]]:
    """Texts and templates from a .jsonl, .csv or plain-text file (one item per line)."""
    texts, templates, _ = parse_records(path)
    return texts, templates


def text_lines(content: str) -> list[str]:
    """The lines of a text as JSON-lines readers and `wc -l` count them: split at '\n' only
    (a trailing '\r' removed), never str.splitlines(), which also splits at U+2028, NEL,
    form feed and other characters that may sit inside an item."""
    return [line[:-1] if line.endswith("\r") else line for line in content.split("\n")]


def decoded(data: bytes) -> str:
    """UTF-8 bytes as text, without the byte-order mark some editors write first (Excel's
    "CSV UTF-8"): it is not part of the first item or of a CSV header's first column.
    UnicodeDecodeError's position is in `data`'s bytes."""
    return data.decode("utf-8").removeprefix("\ufeff")


class _NotJSON(ValueError):
    """A value Python's json reads but JSON has not (NaN, Infinity)."""


def _refuse_constant(name: str):
    raise _NotJSON(f"{name} is not a JSON value")


def _json_problem(exc: Exception) -> str:
    """Why a line is not JSON, short and without Python's advice (sys.set_int_max_str_digits)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, (json.JSONDecodeError, _NotJSON)):
        return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
    return "number too long"  # the only other ValueError json raises: int digits over Python's limit


def jsonl_records(lines, label: str, fix: str = "") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines text; one line per error,
    naming `label` and the line (`fix` is appended to the invalid-JSON message)."""
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise MlarchError(f"{label}, line {lineno}: invalid JSON ({_json_problem(exc)}){fix}") from None
        if not isinstance(record, dict):
            raise MlarchError(f"{label}, line {lineno}: expected a JSON object per line")
        try:  # a \ud800-style escape decodes to half a surrogate pair: no character, no UTF-8, no tokens
            json.dumps(record, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            half = exc.object[exc.start:exc.end].encode("unicode_escape").decode()
            raise MlarchError(f"{label}, line {lineno}: a \\u escape ({half}) names half of a UTF-16 surrogate "
                              "pair, which is no character; fix that line") from None
        records.append((lineno, record))
    return records


def parse_records(path: Path, template: str = "default") -> tuple[list[str], list[str], list[tuple[str, str]] | None]:
    """Texts, templates and, where every record has them, (question, answer) pairs.
    `template` 'paper': records become the authors' texts (see _paper_text)."""
    if template not in TEXT_TEMPLATES:
        raise unknown_template(template)
    paper = template == "paper"
    suffix = path.suffix.lower()
    if suffix in _NOT_LINES:  # "one item per line" would archive '[' and '  {' as items
        raise MlarchError(f"{path}: mlarch reads .jsonl, .csv and plain-text files, not {suffix}: convert it to "
                          "JSON Lines (one object per line) or CSV with a header")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:  # read whole below: never a disk image by mistake
            raise MlarchError(f"data file {path} is {path.stat().st_size:,} bytes, more than the {MAX_FILE_BYTES:,} "
                              "mlarch reads: split it, or sample the items you need into a smaller file")
        content = decoded(path.read_bytes())
    except UnicodeDecodeError as exc:
        raise MlarchError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    except OSError as exc:
        raise MlarchError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    check_line_count(content, str(path))
    texts: list[str] = []
    templates: set[str] = set()
    pairs: list[tuple[str, str] | None] = []
    if suffix in {".jsonl", ".ndjson"}:
        records = jsonl_records(text_lines(content), str(path), "; fix that line")
        has_qa = any("qa" in record for _, record in records)
        for lineno, record in records:
            where = f"{path}, line {lineno}"
            text, used = _paper_text(record, has_qa, where) if paper else _record_text(record, where)
            texts.append(text)
            templates.add(used)
            pairs.append(_pair(record, where))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(content), strict=True)  # an unclosed quote would swallow the rest
        fields = set(reader.fieldnames or [])
        if paper and "qa" not in fields and not {"question", "solution"} <= fields:
            raise error(
                MlarchError, f"{path}, line 1: ", PAPER_TEMPLATE,
                " needs a 'qa' column or 'question' and 'solution' columns"
            )
        if not paper and "text" not in fields and not {"question", "answer"} <= fields:
            raise MlarchError(
                f"{path}, line 1: the CSV header needs a 'text' column or 'question' and 'answer' columns"
            )
        # csv refuses a field over 131,072 characters; the file's size bounds them here, and an item
        # over MAX_ITEM_CHARS gets check_item_sizes' error, as in a .jsonl file
        limit = csv.field_size_limit(max(csv.field_size_limit(), MAX_FILE_BYTES))
        try:
            for record in reader:
                where = f"{path}, line {reader.line_num}"
                text, used = _paper_text(record, "qa" in fields, where) if paper else _record_text(record, where)
                texts.append(text)
                templates.add(used)
                pairs.append(_pair(record, where))
        except csv.Error as exc:
            raise MlarchError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None
        finally:
            csv.field_size_limit(limit)
    else:
        for lineno, line in enumerate(text_lines(content), start=1):
            if "\r" in line:  # old Mac line ends: the whole file would read as one item
                raise MlarchError(f"{path}, line {lineno}: a carriage return that ends no line (\\r without \\n): "
                                  "give the file \\n line ends (e.g. tr '\\r' '\\n')")
            if line.strip():
                texts.append(line)
                pairs.append(None)
        templates.add(TEXT_TEMPLATE)
    if not texts:
        raise MlarchError(f"data file {path} has no items; add at least one")
    check_item_sizes(texts, str(path))
    return texts, sorted(templates), (None if None in pairs else pairs)


# Files whose items are not lines: refused rather than read one item per line.
_NOT_LINES = {".json", ".tsv", ".parquet", ".arrow", ".feather", ".xlsx", ".xls", ".gz", ".zip", ".bz2", ".xz", ".zst"}
MAX_FILE_BYTES = 1 << 30  # GSM8K's train split is 4 MB
MAX_LINES = 2_000_000  # GSM8K's train split has 7,473 items; a line of 'ab' costs ~60 bytes as a str, ~250 as a dict
MAX_ITEM_CHARS = 1 << 20  # a math problem or a paragraph is thousands; tokenizing 16 M took 84 s and 4 GB


def check_line_count(content: str, label: str) -> None:
    """Refuse a text of more than MAX_LINES lines before any item is made of it: under the size
    bound, a gigabyte of tiny lines would still become ~30 GB of Python objects."""
    lines = content.count("\n") + (not content.endswith("\n"))
    if lines > MAX_LINES:
        raise MlarchError(f"{label} has {lines:,} lines, more than the {MAX_LINES:,} mlarch reads for one language: "
                          "sample the items you need into a smaller file")


def check_item_sizes(texts: list[str], label: str) -> None:
    """Refuse an item longer than MAX_ITEM_CHARS before anything tokenizes it."""
    for i, text in enumerate(texts):
        if len(text) > MAX_ITEM_CHARS:
            raise MlarchError(f"{label}: item {i} has {len(text):,} characters, more than the {MAX_ITEM_CHARS:,} "
                              "mlarch reads as one item: split it or remove it")


class TemplateFileSource:
    """Files named by a path template such as ``data/{lang}/math.jsonl``."""

    def __init__(self, spec: str, template: str = "default"):
        if "{lang}" not in spec:
            raise UsageError(f"data template {spec!r} must contain {{lang}}, e.g. data/{{lang}}.jsonl")
        if template not in TEXT_TEMPLATES:
            raise unknown_template(template)
        self.spec = spec
        self.name = spec
        self.template = template

    def path(self, lang: str) -> Path:
        """The file of `lang`: the template with {lang} filled in, ~ expanded."""
        return Path(self.spec.replace("{lang}", lang)).expanduser()

    def load(self, lang: str, role: str = "math") -> LoadedItems:
        """The items of `lang` from its file (an MlarchError naming the file when it is missing), with the file's
        sha256."""
        path = self.path(lang)
        if not path.is_file():
            raise error(
                MlarchError, f"data file {path} for language {lang!r} does not exist "
                f"(from template {self.spec!r}); create it or drop {lang!r} from ", Arg("langs")
            )
        texts, templates, pairs = parse_records(path, self.template)
        return LoadedItems(texts, templates, {str(path.resolve()): sha256_file(path)}, pairs)

    def describe(self) -> dict:
        """The source as provenance records it: kind 'template', the template as given, and the text template unless
        the default."""
        described = {"kind": "template", "template": self.spec}
        if self.template != "default":  # absent for the default: earlier runs' records are unchanged
            described["text_template"] = self.template
        return described


def shown_columns(columns, limit: int = 12) -> str:
    """Column names from a file we did not write, as one short printable list."""
    names = [(c if isinstance(c, str) and c.isprintable() else ascii(c))[:60] for c in columns[:limit]]
    return ", ".join(names) + (f", ... ({len(columns)} in all)" if len(columns) > limit else "") or "(none)"


def parse_rows(rows: list[dict], columns: list[str], label: str, template: str = "default"):
    """Texts, templates and (where every row has them) (question, answer) pairs of table rows
    (a hub data set's split), by a CSV file's rules; columns that hold no text are refused up
    front, naming the columns found."""
    if template not in TEXT_TEMPLATES:
        raise unknown_template(template)
    fields = set(columns)
    paper = template == "paper"
    if paper and "qa" not in fields and not {"question", "solution"} <= fields:
        raise error(UsageError, f"{label} has the columns {shown_columns(columns)}: ", PAPER_TEMPLATE,
                    " needs a 'qa' column or 'question' and 'solution' columns; pick another split or config")
    if not paper and "text" not in fields and not {"question", "answer"} <= fields:
        raise UsageError(f"{label} has the columns {shown_columns(columns)}: mlarch reads a 'text' column, or "
                          "'question' and 'answer' columns (as GSM8K's); pick another split or config")
    texts: list[str] = []
    templates: set[str] = set()
    pairs: list[tuple[str, str] | None] = []
    for i, row in enumerate(rows):
        where = f"{label}, row {i}"
        text, used = _paper_text(row, "qa" in fields, where) if paper else _record_text(row, where)
        texts.append(text)
        templates.add(used)
        pairs.append(_pair(row, where))
    if not texts:
        raise UsageError(f"{label} has no rows; pick another split or config")
    check_item_sizes(texts, label)
    return texts, sorted(templates), (None if None in pairs else pairs)
