"""SQL parameters: `-p name=value` of `mlarch sql`, and the check that every `$name` of a
statement has a value before it runs (values are always bound, never put into the text).

A value is text unless the name says otherwise: `-p k:float=0.01`, `-p n:int=3`,
`-p name:str=...`. DuckDB converts text where the context fixes the type (`k = $k`,
`LIMIT $n`); elsewhere cast in SQL (`$n::INTEGER + 1`) or give the type.

Also the type checks the Python API applies to its arguments (the CLI's are typed by click):
an id or a name that is not a string, a list of them holding something else, a path that is
none, a seed that is not an integer is a UsageError naming the argument, never a TypeError or
a DuckDB error from deep inside a query.
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable, Mapping

from mlarch.errors import UsageError
from mlarch.wording import Arg, Phrase, brief, error

_SPEC = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::([A-Za-z]+))?=(.*)", re.DOTALL)
TYPES = {"str": str, "int": int, "float": float}


def parse_params(specs) -> dict:
    """{name: value} from `name=value` / `name:type=value` strings (type: str, int, float)."""
    params = {}
    for spec in specs:
        match = _SPEC.fullmatch(spec)
        if not match:
            raise UsageError(f"cannot read the parameter {spec!r}: write -p NAME=VALUE (or NAME:int=3, "
                             "NAME:float=0.01), NAME a letter or _ then letters, digits, _")
        name, kind, value = match.groups()
        if name in params:
            raise UsageError(f"parameter {name!r} is given twice: give each -p name once")
        if kind is not None and kind.lower() not in TYPES:
            raise UsageError(f"unknown parameter type {kind!r} in {spec!r}: use {', '.join(TYPES)}")
        convert = TYPES[(kind or "str").lower()]
        try:
            params[name] = convert(value)
        except ValueError:
            raise UsageError(f"parameter {name!r}: {value!r} is not a valid {kind.lower()}: give a number, "
                             f"or leave out :{kind} to bind it as text") from None
    return params


def check_params(statements, params) -> None:
    """UsageError when a statement but the last of `statements` (DuckDB Statements, run in
    order) has parameters (values bind in the last only), or when a `$name` of the last has no
    value or a named value is not used; positional parameters (a list) are left to DuckDB."""
    for number, statement in enumerate(statements[:-1], 1):
        if statement.named_parameters:
            names = sorted({"?" if n.isdigit() else "$" + n for n in statement.named_parameters})
            raise UsageError(f"statement {number} of {len(statements)} uses parameters ({', '.join(names)}), but "
                             "values bind in the last statement only: move them there, or run the statements "
                             "one at a time")
    statement = statements[-1]
    if params is not None and not isinstance(params, dict):
        return
    wanted = set(statement.named_parameters)
    given = set(params or {})
    if wanted and all(name.isdigit() for name in wanted):  # `?` / `$1`: positional
        if params:
            raise UsageError("the statement's parameters are positional (? or $1): pass a list, or name them $name")
        raise UsageError(f"the statement has {len(wanted)} positional parameter(s) (? or $1) and no values: "
                         "name them $name and bind each (-p name=VALUE; params={'name': ...} in Python)")
    missing = sorted(wanted - given)
    if missing:
        shown = ", ".join(f"${name}" for name in missing)
        raise UsageError(f"no value for the SQL parameter(s) {shown}: bind each "
                         f"(-p {missing[0]}=VALUE; params={{{missing[0]!r}: ...}} in Python)")
    unused = sorted(given - wanted)
    if unused:
        raise UsageError(f"the statement does not use the parameter(s) {', '.join(map(repr, unused))}: "
                         "remove them, or refer to each as $name")


# --- argument types of the Python API -------------------------------------------------------
SEE_RUNS = Phrase("see Archive.runs()", "see `mlarch runs`")
_SURROGATE = "a lone surrogate (what Python makes of bytes that are not UTF-8)"


def has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate ('\\udcff' of os.fsdecode), which UTF-8 (DuckDB,
    JSON, every catalog value) cannot hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_text(value, name: str, what: str, *fix, empty: bool = True) -> str:
    """`value` (the argument `name`: `what`, e.g. 'a run id') as a str, else a UsageError ending
    in `fix` (message parts). A lone surrogate is refused (no archived id or name holds one);
    so is '' unless `empty`."""
    if not isinstance(value, str):
        raise error(UsageError, Arg(name), f" takes {what} as a string, got {brief(value)}: ", *fix)
    if not value and not empty:
        raise error(UsageError, f"an empty string is not {what}: ", *fix)
    if has_surrogate(value):
        raise error(UsageError, f"{brief(value)} holds {_SURROGATE}, so it is not {what}: ", *fix)
    return value


def check_texts(values, name: str, what: str, *fix) -> list[str] | None:
    """`values` (one string or a list of them; None stays None) as a list of non-empty strings,
    each checked as check_text does; the message names the position of a bad item."""
    if values is None:
        return None
    if isinstance(values, str):
        return [check_text(values, name, what, *fix, empty=False)]
    if isinstance(values, (bytes, bytearray, Mapping)) or not isinstance(values, Iterable):
        raise error(UsageError, Arg(name), f" takes {what} or a list of them, got {brief(values)}: ", *fix)
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise error(UsageError, Arg(name), f" holds {brief(value)} at index {i}, not {what} (a string): ", *fix)
        check_text(value, name, what, *fix, empty=False)
    return values


def check_path(value, name: str, what: str, example: str) -> str | os.PathLike:
    """`value` (the argument `name`: `what`, e.g. 'a folder') as a file system path: a str or
    os.PathLike (not bytes) without a NUL character, else a UsageError (`example`: a value for
    its fix)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise error(UsageError, Arg(name), f" takes {what}, a str or pathlib.Path, got {brief(value)}: e.g. ",
                    Arg(name, example))
    if "\x00" in text:
        raise error(UsageError, Arg(name, shown=brief(text)), " holds a NUL character, which no path can hold: "
                    "remove it")
    return value


def check_ks(k) -> None:
    """A k argument that takes one number or several (charts, analysis_overlap): None, a
    number, a string ('0.01,0.05', 'all') or a list; anything else is a UsageError here (the
    values themselves are checked where they are read)."""
    if k is None or isinstance(k, (str, numbers.Real)):
        return
    if isinstance(k, (bytes, bytearray, Mapping)) or not isinstance(k, Iterable):
        raise error(UsageError, Arg("k"), f" takes a number or a list of them, got {brief(k)}: e.g. ",
                    Arg("k", [0.01, 0.05]))


def check_sql(query) -> str:
    """`query` as SQL text: a str without a lone surrogate, else a UsageError."""
    if isinstance(query, (bytes, bytearray)):
        raise error(UsageError, Arg("query"), f" takes SQL as a string, got bytes {brief(query)}: decode them "
                    "first, e.g. query.decode()")
    if not isinstance(query, str):
        raise error(UsageError, Arg("query"), f" takes SQL as a string, got {brief(query)}: e.g. ",
                    Arg("query", "SELECT * FROM runs"))
    if has_surrogate(query):
        raise UsageError(f"the SQL holds {_SURROGATE}: write the query as UTF-8 text")
    return query


def check_sql_params(params):
    """`params` of Archive.sql: None, a mapping ({name: value} for each $name, as a dict) or a
    sequence (values for ? in order, as a list), else a UsageError."""
    if params is None:
        return None
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, (list, tuple)):
        return list(params)
    raise error(UsageError, Arg("params"), f" takes a dict (a value for each $name) or a list (for ? in order), "
                f"got {brief(params)}: e.g. ", Arg("params", {"m": "tiny-llama"}))
