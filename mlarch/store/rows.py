"""Rows of a DuckDB statement as dicts: the one reading helper that the catalog (connections,
schema, migrations) and the record digests (records.py, which the migrations use) share,
so that neither imports the other for it."""

from __future__ import annotations


def dicts(con, query: str, params=None) -> list[dict]:
    """Rows of one statement as {column: value} dicts, values as DuckDB returns them."""
    result = con.execute(query, params)
    names = [d[0] for d in result.description]
    return [dict(zip(names, row)) for row in result.fetchall()]
