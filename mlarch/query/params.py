"""SQL parameters: `-p name=value` of `mlarch sql`, and the check that every `$name` of a
statement has a value before it runs (values are always bound, never put into the text).

A value is text unless the name says otherwise: `-p k:float=0.01`, `-p n:int=3`,
`-p name:str=...`. DuckDB converts text where the context fixes the type (`k = $k`,
`LIMIT $n`); elsewhere cast in SQL (`$n::INTEGER + 1`) or give the type.
"""

from __future__ import annotations

import re

from mlarch.errors import UsageError

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


def check_params(statement, params) -> None:
    """UsageError when a `$name` of `statement` (a DuckDB Statement) has no value or a
    named value is not used; positional parameters (a list) are left to DuckDB."""
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
