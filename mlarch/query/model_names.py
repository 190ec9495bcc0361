"""One rule for naming an archived model, used by every API entry point that takes one.

`resolve_model` (selection, sizes, magnitudes, analyses lookups, analysis_overlap): the exact
name wins; else the one model whose name contains the text (case-insensitive); several such
models are a UsageError listing them (pass one in full), none an error listing the archive's
models. `match_models` (compare and the charts, which may show several models side by side)
applies the same rule to each part of a comma list, except that a part matching several
models keeps them all: "tiny" compares tiny-llama with tiny-qwen, "tiny-llama" (an exact
name) only that model, even when tiny-llama-2 is archived too."""

from __future__ import annotations

from mlarch.errors import MlarchError, UsageError


def archived(con) -> list[str]:
    """The archived model names, sorted."""
    return [r[0] for r in con.execute("SELECT model FROM models ORDER BY model").fetchall()]


def _candidates(names: list[str], text: str) -> list[str]:
    """[text] when it is an archived name, else every name containing it (case-insensitive)."""
    if text in names:
        return [text]
    return [n for n in names if text.lower() in n.lower()]


def _none_match(names: list[str], text: str) -> MlarchError:
    if not names:
        return MlarchError("the archive holds no models yet: run `mlarch ingest` first")
    return MlarchError(f"no archived model matches {text!r}; archived models: {', '.join(names)}")


def resolve_model(con, name) -> str:
    """The archived model `name` means: itself if archived, else the only model whose name
    contains it; a UsageError listing them if several do, an MlarchError listing the
    archive's models if none does."""
    text = str(name).strip() if name is not None else ""
    if not text:
        raise UsageError("no model given: pass an archived model's name (see `mlarch models`)")
    names = archived(con)
    found = _candidates(names, text)
    if not found:
        raise _none_match(names, text)
    if len(found) > 1:
        raise UsageError(f"{text!r} matches {len(found)} archived models ({', '.join(found)}): pass one of them in "
                         "full")
    return found[0]


def match_models(con, pattern) -> list[str]:
    """The models a comparison shows: each part of a comma list ("gemma,qwen"; in the order
    given, each model once) resolved as resolve_model does, except that a part contained in
    several names keeps them all. Every part must match: a misspelt part never silently drops
    a model from a comparison."""
    names = archived(con)
    parts = [part.strip() for part in str(pattern).split(",") if part.strip()]
    if not parts:
        raise UsageError("no model given: pass an archived model's name, a part of it, or a comma list")
    matched: list[str] = []
    for part in parts:
        found = _candidates(names, part)
        if not found:
            raise _none_match(names, part)
        matched += [n for n in found if n not in matched]
    return matched
