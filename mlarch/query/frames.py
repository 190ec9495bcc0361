"""Query results as polars DataFrames through DuckDB's Arrow stream (`Archive.sql`).

The rows never become Python objects: DuckDB hands polars Arrow arrays through the Arrow
C stream interface (no pyarrow import), 1 M rows in under a second where building the
frame from Python rows took ~40 s. Columns whose Arrow form polars cannot read or reads
wrongly come back as DuckDB's text for them (see TEXT_TYPES); DECIMAL and HUGEINT come
back as plain numbers, as the catalog's other reads return them (catalog.frame).
"""

from __future__ import annotations

import re

import polars as pl

from mlarch.errors import MlarchError

# DuckDB types whose Arrow form polars cannot import (INTERVAL, UNION: a panic) or imports
# wrongly (UHUGEINT above 2**127 wraps negative, BIT as DuckDB's internal bytes, BIGNUM as
# opaque bytes, TIME WITH TIME ZONE loses its offset): cast to VARCHAR, DuckDB's exact text.
TEXT_TYPES = re.compile(r"\b(INTERVAL|UNION|BIT|BIGNUM|VARINT|UHUGEINT|TIME WITH TIME ZONE)\b")
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def arrow_frame(con, query: str, params=None) -> pl.DataFrame:
    """Run one statement on `con` and return its rows as a DataFrame (empty if it has none)."""
    relation = con.sql(query, params=params)
    if relation is None:
        return pl.DataFrame()
    names = relation.columns
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # a frame's columns need distinct names
        raise MlarchError(f"the result has more than one column named {', '.join(map(repr, repeated))}: "
                          "name them apart with AS")
    text = [TEXT_TYPES.search(str(t).upper()) is not None for t in relation.types]
    if any(text):
        relation = relation.project(", ".join(
            f"CAST({_quoted(n)} AS VARCHAR) AS {_quoted(n)}" if cast else _quoted(n) for n, cast in zip(names, text)))
    try:
        frame = pl.DataFrame(relation)  # Arrow C stream: polars >= 1.3 reads it without pyarrow
    except TypeError:  # an older polars refuses the type before reading anything: through pyarrow
        frame = relation.pl()
    return _plain_numbers(frame)


def _plain_numbers(frame: pl.DataFrame) -> pl.DataFrame:
    """DECIMAL -> Float64; HUGEINT (Decimal(38, 0) in Arrow, the 128-bit integer stored
    exactly) -> Int64 when every value fits, else Int128 (a Python int each: the Decimal
    would round to 28 digits), or the exact Decimal where polars has no Int128."""
    wide = getattr(pl, "Int128", None)
    casts = []
    for name, dtype in frame.schema.items():
        if not isinstance(dtype, pl.Decimal):
            continue
        if dtype.scale == 0:
            column = frame[name] if wide is None else frame[name].cast(wide)
            low, high = column.min(), column.max()
            fits = low is None or (low >= _INT64[0] and high <= _INT64[1])
            if fits or wide is not None:  # a polars without Int128 (< 1.18) keeps the exact Decimal
                casts.append(pl.col(name).cast(pl.Int64 if fits else wide))
        else:
            casts.append(pl.col(name).cast(pl.Float64))
    return frame.with_columns(casts) if casts else frame
