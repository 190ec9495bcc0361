"""Rows as text, in the formats the CLI's --format offers and a notebook may want
(a booktabs LaTeX table for a paper): `render(frame, "latex")`.

Machine formats keep every row on one line whatever the values hold: csv quotes, tsv
escapes (backslash, tab, newline, carriage return as \\\\ \\t \\n \\r, as PostgreSQL's COPY
text format and linear TSV do; other control characters as COPY's \\xNN), json and jsonl
escape inside JSON strings. latex is a booktabs tabular with LaTeX's special characters
escaped in every cell and header.

Text reaches a terminal as it is only where it is printable: table, markdown and latex show
a control or invisible character as its Python escape (\\x1b, \\n, \\u2028), so catalog text
or a planted file name cannot forge a row or send a terminal escape sequence. csv alone has
no escape to offer: it hands values over exactly, for programs.
"""

from __future__ import annotations

import json
import math
from datetime import date, datetime, time, timedelta
from decimal import Decimal

FORMATS = ("table", "csv", "tsv", "json", "jsonl", "markdown", "latex")


def _cell(value) -> str:
    """Human-readable cell: thousands separators, 4 decimals, empty for NULL."""
    if value is None:
        return ""
    if isinstance(value, Decimal):  # DuckDB sums of BIGINT are HUGEINT
        value = _plain(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if 0 < abs(value) < 0.01 else f"{value:.4f}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value)
    return str(value)


# Not printable by Python's rule but part of ordinary text: the joiners of Bengali, Devanagari
# (and emoji) conjuncts.
_JOINERS = "\u200c\u200d"


def _visible(text: str, keep: str = "") -> str:
    """`text` with every non-printable character (control, format, separator) but the
    joiners and `keep` as its Python escape, so it prints as what it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in _JOINERS or c in keep else repr(c)[1:-1] for c in text)


def _plain(value):
    """A JSON-ready value: Decimal -> int/float, dates -> ISO text, NaN and ±inf -> null
    (JSON has no such numbers), nested lists and structs converted throughout."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            return None
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _text(value) -> str:
    """A cell for machine formats (tsv): full precision, empty for NULL, NaN and inf as csv
    writes them, nested values as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "inf" if value > 0 else "-inf"
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


_TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r",
                              # other C0 controls, DEL and C1 (ESC, CSI...): COPY's \xNN of their UTF-8 bytes
                              **{c: "".join(f"\\x{b:02x}" for b in chr(c).encode())
                                 for c in [*range(0x20), *range(0x7f, 0xa0)] if chr(c) not in "\t\n\r"}})


def _tsv(value) -> str:
    return value.translate(_TSV_ESCAPES)


# LaTeX's specials in text mode; < > | print as other glyphs in the default OT1 encoding.
_LATEX_ESCAPES = str.maketrans({
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
    ">": r"\textgreater{}", "|": r"\textbar{}",
    "\n": " ", "\r": " ", "\t": " ",  # a blank line inside a cell would end the paragraph: an error
})


def latex_escape(text: str) -> str:
    """`text` with LaTeX's special characters escaped, safe inside a tabular cell (a control
    character, which LaTeX refuses, as its visible escape)."""
    return _visible(text, keep="\n\r\t").translate(_LATEX_ESCAPES)


def _latex_number(cell: str) -> str:
    # a minus sign, not a hyphen, in a numeric column
    if cell in ("inf", "-inf"):
        return cell.replace("inf", r"$\infty$").replace("-$", "$-")
    return "$-$" + cell[1:] if cell.startswith("-") else cell


def _json_rows(columns, rows):
    return ({c: _plain(v) for c, v in zip(columns, row)} for row in rows)


def _csv(frame) -> str:
    import polars as pl

    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested() or dtype == pl.Binary]
    if nested:  # CSV has no nested or binary values: write them as JSON text and b'...' (polars refuses them)
        frame = frame.with_columns(
            pl.Series(name, [None if v is None else _text(v) for v in frame[name].to_list()], dtype=pl.Utf8)
            for name in nested)
    return frame.write_csv().rstrip("\n") if frame.height else ",".join(frame.columns)


# Python's datetime and date range (years 1 to 9999) in polars' physical units; DuckDB's
# infinity and -infinity are the extreme integers of the type.
_DATE_RANGE = (-719_162, 2_932_896)  # days since 1970-01-01
_DATETIME_SECONDS = (-62_135_596_800, 253_402_300_800)  # [start of year 1, end of year 9999)
_UNIT = {"ns": 10**9, "us": 10**6, "ms": 10**3}


def _past_python_dates(frame):
    """`frame` with each date or datetime column that holds a value Python cannot hold
    (DuckDB's infinity and -infinity, a year past 9999) as text: polars panics converting
    such a value to Python (`sql "SELECT 'infinity'::TIMESTAMP"`)."""
    import polars as pl

    fixed = []
    for name, dtype in frame.schema.items():
        if dtype == pl.Date:
            low, high, unit = *_DATE_RANGE, None
        elif isinstance(dtype, pl.Datetime) and dtype.time_unit in _UNIT:
            unit = _UNIT[dtype.time_unit]
            low, high = _DATETIME_SECONDS[0] * unit, _DATETIME_SECONDS[1] * unit - 1
        else:
            continue
        physical = frame[name].to_physical()
        if physical.null_count() == len(physical) or (physical.min() >= low and physical.max() <= high):
            continue
        limit = 2**31 - 1 if unit is None else 2**63 - 1
        texts = []
        for value in physical.to_list():
            if value is None or not low <= value <= high:
                texts.append(None if value is None else "infinity" if value == limit else "-infinity"
                             if value == -limit else f"{value} {'days' if unit is None else dtype.time_unit} "
                             "from 1970-01-01 (past year 9999)")
            elif unit is None:
                texts.append((date(1970, 1, 1) + timedelta(days=value)).isoformat())
            else:
                whole, rest = divmod(value, unit)
                moment = datetime(1970, 1, 1) + timedelta(seconds=whole, microseconds=rest * 10**6 // unit)
                texts.append(moment.isoformat(sep=" ") + (f" {dtype.time_zone}" if dtype.time_zone else ""))
        fixed.append(pl.Series(name, texts, dtype=pl.Utf8))
    return frame.with_columns(fixed) if fixed else frame


def render(frame, fmt: str) -> str:
    """Text for a polars DataFrame in the chosen format (no trailing newline; jsonl of no
    rows is empty)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    columns = frame.columns
    frame = _past_python_dates(frame)
    if fmt == "csv":
        return _csv(frame)
    rows = frame.rows()
    if fmt == "json":
        return json.dumps(list(_json_rows(columns, rows)), indent=2, default=str)
    if fmt == "jsonl":  # json.dumps escapes newlines (and U+2028/9, ensure_ascii): one line per row
        return "\n".join(json.dumps(row, default=str) for row in _json_rows(columns, rows))
    if fmt == "tsv":
        return "\n".join("\t".join(_tsv(v) for v in line)
                         for line in [columns, *([_text(v) for v in row] for row in rows)])
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(r[i], (int, float, Decimal)) and not isinstance(r[i], bool) or r[i] is None for r in rows)
               for i in range(len(columns))]
    if fmt == "latex":
        def line(values):
            return " & ".join(values) + r" \\"

        body = [line([_latex_number(latex_escape(c)) if n else latex_escape(c) for c, n in zip(row, numeric)])
                for row in cells]
        spec = "".join("r" if n else "l" for n in numeric)
        return "\n".join([r"% \usepackage{booktabs}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                          line([latex_escape(c) for c in columns]), r"\midrule", *body, r"\bottomrule",
                          r"\end{tabular}"])
    if fmt == "markdown":
        def md(text):  # a newline would end the table row
            return _visible(text.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")
                            .replace("\r", "<br>"))

        header = "| " + " | ".join(md(c) for c in columns) + " |"
        rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
        body = ["| " + " | ".join(md(c) for c in row) + " |" for row in cells]
        return "\n".join([header, rule, *body])
    columns, cells = [_visible(c) for c in columns], [[_visible(c) for c in row] for row in cells]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)
