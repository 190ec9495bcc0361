"""One output decorator for every command that prints rows:
--format table|csv|tsv|json|jsonl|markdown|latex (the text itself: mlarch.formats.render).
"""

from __future__ import annotations

import functools

import click

from mlarch.formats import FORMATS, render

FORMAT_HELP = ("Output format: json is an array of row objects, jsonl one object per line; tsv escapes "
               "\\, tab and newline inside values as \\\\ \\t \\n; latex is a booktabs tabular "
               "(\\usepackage{booktabs}).")


def output_options(command):
    """Decorator adding --format (FORMATS, default table) to a command, passed on as `fmt`."""
    @click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help=FORMAT_HELP,
    )
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        return command(*args, **kwargs)

    return wrapper


def emit(frame, fmt: str) -> None:
    """Print a polars DataFrame in the chosen format (render); no line at all for an empty jsonl."""
    text = render(frame, fmt)
    if text or fmt != "jsonl":  # no rows in jsonl: no line at all (a blank one is not a JSON object)
        click.echo(text)
