"""One output decorator for every command that prints rows: --format table|csv|json|markdown."""

from __future__ import annotations

import functools
import json
import math
from datetime import date, datetime
from decimal import Decimal

import click

FORMATS = ("table", "csv", "json", "markdown")


def output_options(command):
    @click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
        help="Output format; json is an array of row objects.",
    )
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        return command(*args, **kwargs)

    return wrapper


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


def _plain(value):
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def render(frame, fmt: str) -> str:
    """Text for a polars DataFrame in the chosen format (no trailing newline)."""
    columns = frame.columns
    rows = frame.rows()
    if fmt == "json":
        return json.dumps([{c: _plain(v) for c, v in zip(columns, row)} for row in rows], indent=2, default=str)
    if fmt == "csv":
        return frame.write_csv().rstrip("\n") if rows else ",".join(columns)
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(r[i], (int, float, Decimal)) and not isinstance(r[i], bool) or r[i] is None for r in rows)
               for i in range(len(columns))]
    if fmt == "markdown":
        header = "| " + " | ".join(columns) + " |"
        rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
        body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join([header, rule, *body])
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def emit(frame, fmt: str) -> None:
    click.echo(render(frame, fmt))
